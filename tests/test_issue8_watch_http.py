"""Issue 8 over HTTP and the CLI: the compacted error, POST /v3/watch, the messages follow stream.

The endpoint runs on a real socket (``serve``, with its connection limits) over
an in-memory coordinator; one test runs a 3-node cluster of real processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app
from raftcoord.httpserve import serve
from raftcoord.store import Store
from raftcoord.watch_http import STREAMS


class Served:
    """The endpoint over ``coordinator``, served by :func:`serve` from an event loop in a thread."""

    def __init__(self, coordinator: Coordinator, **app_options: Any) -> None:
        self.coordinator = coordinator
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="endpoint-test", daemon=True)
        self.thread.start()
        self.app = make_app(coordinator, **app_options)
        self.runner: web.AppRunner = asyncio.run_coroutine_threadsafe(
            serve(self.app, "127.0.0.1", 0), self.loop).result(10)
        self.port = int(self.runner.addresses[0][1])
        self.addr = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop serving and join the loop's thread (the coordinator stays the caller's)."""
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def coord() -> Iterator[Coordinator]:
    """A memory coordinator for node n1."""
    c = Coordinator.memory("n1", cluster="t")
    yield c
    c.close()


@pytest.fixture
def node(coord: Coordinator) -> Iterator[Served]:
    """The endpoint over ``coord`` on a real socket."""
    s = Served(coord)
    yield s
    s.stop()


def invoke(*args: str) -> Any:
    """Run the CLI in-process (click's CliRunner)."""
    from click.testing import CliRunner

    from raftcoord.cli import main

    return CliRunner().invoke(main, list(args))


def purged(coord: Coordinator, posted: int = 5, kept: int = 2) -> tuple[list[int], int]:
    """Post ``posted`` messages and purge all but ``kept``; returns the clocks and the oldest kept."""
    clocks = [int(coord.post_message("U", "C", {"n": i}).clock or 0) for i in range(posted)]
    coord.purge_messages(max_count=kept)
    return clocks, clocks[-kept]


# ------------------------------------------------------ item 2: compacted, over HTTP and CLI


def test_issue8_2_http_messages_below_the_floor_is_410_naming_the_oldest_clock(node: Served) -> None:
    """GET /raftcoord/v1/messages?since=N below what is kept: 410, code compacted, oldest_clock in the body."""
    import json
    import urllib.error
    import urllib.request

    clocks, oldest = purged(node.coordinator)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{node.addr}/raftcoord/v1/messages?since={clocks[0]}", timeout=10)
    body = json.loads(info.value.read())
    assert info.value.code == 410
    assert body["code"] == "compacted" and body["field"] == "since" and body["oldest_clock"] == oldest
    assert f"oldest clock kept is {oldest}" in body["message"]
    with urllib.request.urlopen(f"http://{node.addr}/raftcoord/v1/messages?since={oldest - 1}", timeout=10) as ok:
        assert [m["clock"] for m in json.loads(ok.read())["messages"]] == clocks[-2:]


def test_issue8_2_client_raises_compacted_with_the_oldest_clock(node: Served) -> None:
    """Client.messages(since=) below what is kept raises CompactedError carrying .oldest_clock."""
    from raftcoord.client import Client
    from raftcoord.errors import CompactedError

    clocks, oldest = purged(node.coordinator)
    with pytest.raises(CompactedError) as info:
        Client([node.addr], timeout=5).messages(since=clocks[0])
    assert info.value.oldest_clock == oldest and info.value.field == "since"


def test_issue8_2_cli_messages_below_the_floor_is_one_error_line_naming_the_oldest_clock(node: Served) -> None:
    """raftcoord messages --since below what is kept: one Error: line naming the oldest clock kept, exit 1."""
    clocks, oldest = purged(node.coordinator)
    result = invoke("--endpoints", node.addr, "messages", "--since", str(clocks[0]))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert f"oldest clock kept is {oldest}" in lines[0]


# ------------------------------------------------------ item 4: POST /v3/watch


def b64(data: bytes | str) -> str:
    """Standard base64 of bytes or UTF-8 text."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class RawWatch:
    """A watch stream over a plain socket: the request body is chunked and stays open for more requests."""

    def __init__(self, addr: str, first: dict[str, Any], *, path: str = "/v3/watch", timeout: float = 10) -> None:
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n".encode())
        self.send(first)
        self.file = self.sock.makefile("rb")
        status_line = self.file.readline().decode()
        self.status = int(status_line.split()[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline().decode().strip()):
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def send(self, obj: Any) -> None:
        """Send one more request object of the body."""
        data = (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n"
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def next(self, timeout: float = 10) -> Any:
        """The next JSON object of the answer (one per chunk), or None at its end."""
        self.sock.settimeout(timeout)
        if "chunked" not in self.headers.get("transfer-encoding", ""):
            return json.loads(self.file.read(int(self.headers["content-length"])))
        size = int(self.file.readline().strip(), 16)
        if size == 0:
            return None
        data = self.file.read(size + 2)[:size]
        assert data.endswith(b"\n") and data.count(b"\n") == 1, data  # one object per chunk, one line
        return json.loads(data)

    def results(self, n: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The next ``n`` results (unwrapped from ``{"result": ...}``)."""
        out = []
        for _ in range(n):
            line = self.next(timeout)
            assert line is not None and "result" in line, line
            out.append(line["result"])
        return out

    def quiet(self, seconds: float = 0.3) -> bool:
        """True if nothing arrives for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            return not self.file.peek(1)
        except TimeoutError:
            return True

    def close(self) -> None:
        """Drop the connection (the reader holds the socket open too)."""
        self.file.close()
        self.sock.close()


def delete_key(coord: Coordinator, key: bytes) -> int:
    """Delete ``key``; returns the revision of the deletion."""
    return int(coord.execute({"op": "delete", "key": key})["revision"])


def create(key: str, **fields: Any) -> dict[str, Any]:
    """A create_request for ``key`` (text), other fields as given (bytes fields base64-encoded)."""
    body = {"key": b64(key), **{k: b64(v) if k == "range_end" else v for k, v in fields.items()}}
    return {"create_request": body}


def kv_of(event: dict[str, Any]) -> tuple[str, str, str]:
    """(type, key, value) of a JSON watch event."""
    kv = event["kv"]
    return (event.get("type", "PUT"), base64.b64decode(kv["key"]).decode(),
            base64.b64decode(kv.get("value", "")).decode())


def test_issue8_4_watch_created_then_events_with_prev_kv(node: Served) -> None:
    """created first (header at the current revision), then one line per revision: PUT/DELETE, kv, prev_kv."""
    coord = node.coordinator
    before = coord.put(b"a1", b"old")
    w = RawWatch(node.addr, create("a", range_end="b", prev_kv=True))
    try:
        assert w.status == 200 and w.headers["content-type"].startswith("application/json")
        (created,) = w.results(1)
        assert created["created"] is True and created["header"]["revision"] == str(before)
        assert "watch_id" not in created  # the first id is 0, left out as the gateway does
        assert set(created["header"]) == {"cluster_id", "member_id", "revision", "raft_term"}
        r1 = coord.put(b"a1", b"new")
        coord.put(b"b1", b"outside")
        r2 = delete_key(coord, b"a1")
        put, delete = w.results(2)
        assert put["header"]["revision"] == str(r1) and [kv_of(e) for e in put["events"]] == [("PUT", "a1", "new")]
        assert put["events"][0]["kv"] == {"key": b64("a1"), "value": b64("new"), "create_revision": str(before),
                                          "mod_revision": str(r1), "version": "2"}
        assert kv_of({"kv": put["events"][0]["prev_kv"]}) == ("PUT", "a1", "old")
        (event,) = delete["events"]
        assert event["type"] == "DELETE" and event["kv"] == {"key": b64("a1"), "mod_revision": str(r2)}
        assert base64.b64decode(event["prev_kv"]["value"]) == b"new"
        assert w.quiet()
    finally:
        w.close()


def test_issue8_4_watch_start_revision_filters_and_atomic_revisions(node: Served) -> None:
    """start_revision replays the kept history; a txn's events come in one line; NOPUT drops puts."""
    coord = node.coordinator
    r1 = coord.put(b"k1", b"1")
    coord.execute({"op": "txn", "compare": [], "failure": [], "success": [
        {"op": "put", "key": b"k2", "value": b"2"}, {"op": "put", "key": b"k3", "value": b"3"}]})
    delete_key(coord, b"k1")
    w = RawWatch(node.addr, create("k", range_end="l", start_revision=str(r1)))
    nodel = RawWatch(node.addr, create("k", range_end="l", start_revision=r1, filters=["NOPUT"]))
    try:
        created, first, both, deleted = w.results(4)
        assert created["created"] and [kv_of(e) for e in first["events"]] == [("PUT", "k1", "1")]
        assert [kv_of(e) for e in both["events"]] == [("PUT", "k2", "2"), ("PUT", "k3", "3")]
        assert int(both["header"]["revision"]) == r1 + 1
        assert [kv_of(e)[:2] for e in deleted["events"]] == [("DELETE", "k1")]
        _, only = nodel.results(2)
        assert [kv_of(e)[:2] for e in only["events"]] == [("DELETE", "k1")] and nodel.quiet()
    finally:
        w.close()
        nodel.close()


def test_issue8_4_watch_progress_notify_progress_request_and_cancel(coord: Coordinator) -> None:
    """progress_notify gives empty responses; progress_request answers watch_id -1; cancel answers canceled."""
    node = Served(coord, watch_progress_interval=0.2)
    try:
        rev = coord.put(b"p", b"1")
        w = RawWatch(node.addr, create("p", progress_notify=True))
        (created,) = w.results(1)
        notice = w.results(1, timeout=5)[0]
        assert "events" not in notice and notice["header"]["revision"] == str(rev) and "watch_id" not in notice
        w.send(create("q", watch_id=7))
        line = w.next()["result"]
        while "created" not in line:  # progress notices of watch 0 may come first
            line = w.next()["result"]
        assert line["watch_id"] == "7"
        w.send({"progress_request": {}})
        line = w.next()["result"]
        while line.get("watch_id") != "-1":
            line = w.next()["result"]
        assert line["header"]["revision"] == str(rev) and "events" not in line
        w.send({"cancel_request": {"watch_id": 7}})
        line = w.next()["result"]
        while not line.get("canceled"):
            line = w.next()["result"]
        assert line["watch_id"] == "7"
        coord.put(b"q", b"after cancel")
        r = coord.put(b"p", b"2")
        line = w.next()["result"]
        while "events" not in line:
            line = w.next()["result"]
        assert line["header"]["revision"] == str(r) and [kv_of(e) for e in line["events"]] == [("PUT", "p", "2")]
        w.close()
        streams = node.app[STREAMS]
        wait_until(lambda: not streams.open and streams.watches == 0, 5, "the stream to end and free its watches")
    finally:
        node.stop()


@pytest.fixture
def short_node(monkeypatch: Any) -> Iterator[Served]:
    """The endpoint over a memory coordinator whose store keeps only 3 revisions of history."""
    monkeypatch.setattr(Store, "history_revisions", 3)
    coordinator = Coordinator.memory("n1", cluster="t")
    served = Served(coordinator)
    yield served
    served.stop()
    coordinator.close()


def test_issue8_4_watch_older_than_the_kept_history_gets_compact_revision(short_node: Served) -> None:
    """A start_revision older than the kept history: created, then canceled with compact_revision."""
    node = short_node
    coord = node.coordinator
    revs = [coord.put(b"c", str(i).encode()) for i in range(8)]
    compact = coord.read(lambda s: s.compact_revision)
    assert compact > revs[0]
    w = RawWatch(node.addr, create("c", start_revision=revs[0]))
    try:
        created, gone = w.results(2)
        assert created["created"] is True
        assert gone["canceled"] is True and gone["compact_revision"] == str(compact) and "events" not in gone
        ok = RawWatch(node.addr, create("c", start_revision=compact))
        _, first = ok.results(2)
        assert first["events"][0]["kv"]["mod_revision"] == str(compact)
        ok.close()
    finally:
        w.close()


@pytest.mark.parametrize("body, status", [
    (b"", 400), (b"[1]", 400), (b'{"create_request": {"key": "!!"}}', 400),
    (b'{"create_request": {}}', 400), (b'{"nope": {}}', 400), (b'{"create_request": {"key": "YQ=="', 400),
], ids=["empty", "array", "bad-base64", "no-key", "unknown", "unfinished"])
def test_issue8_4_watch_bad_first_request_is_a_plain_4xx(node: Served, body: bytes, status: int) -> None:
    """A malformed first watch request is an ordinary JSON error answer, not a stream."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{node.addr}/v3/watch", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == status
    assert json.loads(info.value.read())["code"] == 3  # gRPC InvalidArgument, as under /v3/


def test_issue8_4_watch_bad_later_request_ends_the_stream_with_an_error_line(node: Served) -> None:
    """A malformed request after the first: grpc-gateway's {"error": ...} line, then the stream ends."""
    w = RawWatch(node.addr, create("x"))
    try:
        w.results(1)
        w.send(b'{"cancel_request": {"watch_id": "x"}}')
        error = w.next()
        assert error["error"]["http_code"] == 400 and "watch_id" in error["error"]["message"]
        assert w.next() is None
        streams = node.app[STREAMS]
        wait_until(lambda: streams.watches == 0, 5, "the watch to be freed")
    finally:
        w.close()


def test_issue8_4_watch_on_a_get_is_405_and_limits_per_stream(node: Served, monkeypatch: Any) -> None:
    """GET /v3/watch is 405; past MAX_WATCHES_PER_STREAM a create is answered created+canceled with a reason."""
    import urllib.error
    import urllib.request

    from raftcoord import watch_http

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{node.addr}/v3/watch", timeout=10)
    assert info.value.code == 405
    monkeypatch.setattr(watch_http, "MAX_WATCHES_PER_STREAM", 2)
    w = RawWatch(node.addr, create("a"))
    try:
        w.send(create("b"))
        w.send(create("c"))
        first, second, refused = w.results(3)
        assert first["created"] and second["created"] and second["watch_id"] == "1"
        assert refused["created"] and refused["canceled"] and refused["watch_id"] == "-1"
        assert "at most 2 watches" in refused["cancel_reason"]
    finally:
        w.close()


def test_issue8_4_a_client_that_stops_reading_holds_only_its_own_watch(node: Served) -> None:
    """A watcher that never reads fills its own outbox; another watcher still gets every event at once."""
    coord = node.coordinator
    stalled = RawWatch(node.addr, create("s", range_end="t"))
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    live = RawWatch(node.addr, create("s", range_end="t"))
    try:
        live.results(1)
        value = b"v" * 50_000
        for i in range(120):  # about 8 MB of answers: far past socket buffers and the outbox
            coord.put(b"s%03d" % i, value)
        start = time.monotonic()
        got = [live.next(timeout=10)["result"] for _ in range(120)]
        assert [kv_of(r["events"][0])[1] for r in got] == [f"s{i:03d}" for i in range(120)]
        assert time.monotonic() - start < 10
        rev = coord.put(b"s-last", b"x")  # writes are not held back either
        assert int(live.next()["result"]["header"]["revision"]) == rev
    finally:
        live.close()
        stalled.close()
    streams = node.app[STREAMS]
    wait_until(lambda: not streams.open and streams.watches == 0, 10, "both streams to end")


def test_issue8_4_server_stop_ends_open_streams_at_once(coord: Coordinator) -> None:
    """Stopping the server ends open watch and follow streams promptly, closing their watches."""
    node = Served(coord)
    w = RawWatch(node.addr, create("z"))
    w.results(1)
    follow = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    follow.sendall(f"GET /raftcoord/v1/messages?follow=1 HTTP/1.1\r\nHost: {node.addr}\r\n\r\n".encode())
    streams = node.app[STREAMS]
    wait_until(lambda: len(streams.open) == 2, 5, "two open streams")
    start = time.monotonic()
    node.stop()
    assert time.monotonic() - start < 5
    assert streams.watches == 0
    w.close()
    follow.close()


# ------------------------------------------------------ the messages follow stream


def follow_lines(addr: str, query: str) -> tuple[socket.socket, Any, int]:
    """Open GET /raftcoord/v1/messages?<query>; returns the socket, its reader (past the head) and the status."""
    sock = socket.create_connection(tuple((addr.rsplit(":", 1)[0], int(addr.rsplit(":", 1)[1]))), timeout=10)
    sock.sendall(f"GET /raftcoord/v1/messages?{query} HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    while reader.readline().strip():
        pass
    return sock, reader, status


def next_chunk(reader: Any) -> Any:
    """The JSON object of the next chunk."""
    size = int(reader.readline().strip(), 16)
    return json.loads(reader.read(size + 2)[:size])


def test_issue8_4_messages_follow_streams_backlog_then_new_messages(node: Served) -> None:
    """?follow=1&since=N: every kept message above N, then new ones (own included), one per line."""
    coord = node.coordinator
    clocks = [coord.post_message("U", "C", {"n": i}).clock for i in range(3)]
    sock, reader, status = follow_lines(node.addr, f"follow=1&since={clocks[0]}")
    try:
        assert status == 200
        assert [next_chunk(reader)["clock"] for _ in range(2)] == clocks[1:]
        later = coord.post_message("D", "U", {"n": 3})
        got = next_chunk(reader)
        assert got["clock"] == later.clock and got["type"] == ord("D") and got["from"] == "n1"
    finally:
        reader.close()
        sock.close()


def test_issue8_2_messages_follow_below_the_floor_is_410_first(node: Served) -> None:
    """A follow stream from a purged clock is a 410 naming the oldest clock, before any stream starts."""
    clocks, oldest = purged(node.coordinator)
    sock, reader, status = follow_lines(node.addr, f"follow=1&since={clocks[0]}")
    try:
        assert status == 410
    finally:
        reader.close()
        sock.close()
    from raftcoord.client import Client
    from raftcoord.errors import CompactedError

    with pytest.raises(CompactedError) as info:
        next(Client([node.addr], timeout=5).follow_messages(since=clocks[0]))
    assert info.value.oldest_clock == oldest


# ------------------------------------------------------ the client


def test_issue8_4_client_watch_yields_revisions_and_resumes_on_another_node(coord: Coordinator) -> None:
    """Client.watch yields each revision once; when its node stops it resumes on the next from the next revision."""
    from raftcoord.client import Client

    first, second = Served(coord), Served(coord)
    try:
        client = Client([first.addr, second.addr], timeout=10, dial_timeout=1)
        answers = client.watch(b"w", prefix=True, prev_kv=True)
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: got.extend(a for _, a in zip(range(4), answers)), daemon=True)
        reader.start()
        wait_until(lambda: first.app[STREAMS].open, 5, "the watch on the first node")
        r1 = coord.put(b"w1", b"a")
        wait_until(lambda: got, 5, "the first revision")
        first.stop()
        r2 = coord.put(b"w1", b"b")
        r3 = delete_key(coord, b"w1")
        r4 = coord.put(b"w2", b"c")
        reader.join(10)
        assert [a["revision"] for a in got] == [r1, r2, r3, r4]
        assert got[1]["events"][0]["prev_kv"]["value"] == b"a" and got[2]["events"][0]["type"] == "DELETE"
    finally:
        first.stop()
        second.stop()


# ------------------------------------------------------ etcd3gw


def test_issue8_4_etcd3gw_watch_prefix_and_watch_from_a_revision(node: Served) -> None:
    """etcd3gw's watch_prefix and watch(key, start_revision=) work against a node, as existing users call them."""
    etcd3gw = pytest.importorskip("etcd3gw", reason="etcd3gw is not installed")
    coord = node.coordinator
    client = etcd3gw.client(host="127.0.0.1", port=node.port, api_path="/v3/", timeout=10)
    r0 = coord.put(b"/app/a", b"0")
    events, cancel = client.watch_prefix("/app/")
    try:
        wait_until(lambda: node.app[STREAMS].open, 5, "the watch stream")
        client.put("/app/b", "1")
        client.put("/other", "x")
        client.delete("/app/a")
        first, second = next(events), next(events)
        assert first["kv"]["key"] == b"/app/b" and first["kv"]["value"] == b"1"
        assert second["type"] == "DELETE" and second["kv"]["key"] == b"/app/a"
    finally:
        cancel()
    replay, cancel = client.watch("/app/a", start_revision=r0)
    try:
        put, deleted = next(replay), next(replay)
        assert put["kv"]["value"] == b"0" and put["kv"]["mod_revision"] == str(r0)
        assert deleted["type"] == "DELETE"
    finally:
        cancel()
    wait_until(lambda: not node.app[STREAMS].open, 10, "etcd3gw's cancels to end the streams")


# ------------------------------------------------------ the CLI


def cli_process(*args: str) -> subprocess.Popen[str]:
    """``python -m raftcoord ARGS`` with its stdout piped, line-buffered."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "raftcoord", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def read_lines(proc: subprocess.Popen[str], n: int, timeout: float = 15) -> list[str]:
    """The next ``n`` lines of ``proc``'s stdout, within ``timeout`` seconds."""
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout.readline() for _ in range(n)),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    reader.join(timeout)
    assert len(out) == n, f"got {out!r}"
    return [line.rstrip("\n") for line in out]


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Ctrl-C ``proc``; returns its exit code and stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_issue8_4_cli_watch_streams_until_ctrl_c(node: Served) -> None:
    """raftcoord watch PREFIX --rev N prints each event as it comes and exits 0 on Ctrl-C."""
    coord = node.coordinator
    r0 = coord.put(b"cli/a", b"1")
    proc = cli_process("--endpoints", node.addr, "watch", "cli/", "--rev", str(r0))
    try:
        assert read_lines(proc, 1) == [f"{r0}\tPUT\tcli/a\t1"]
        wait_until(lambda: node.app[STREAMS].open, 5, "the CLI's watch")
        r1 = delete_key(coord, b"cli/a")
        assert read_lines(proc, 1) == [f"{r1}\tDELETE\tcli/a"]
    finally:
        code, err = interrupt(proc)
    assert code == 0, err
    assert "Traceback" not in err


def test_issue8_4_cli_watch_json_and_failure_is_one_error_line(short_node: Served) -> None:
    """watch --json prints one object per event; a compacted --rev is one Error: line naming the oldest revision."""
    node = short_node
    coord = node.coordinator
    revs = [coord.put(b"j", str(i).encode()) for i in range(5)]
    result = invoke("--endpoints", node.addr, "watch", "j", "--rev", str(revs[0]))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    compact = coord.read(lambda s: s.compact_revision)
    assert f"oldest revision kept is {compact}" in lines[0]
    proc = cli_process("--endpoints", node.addr, "watch", "j", "--rev", str(revs[-1]), "--json", "--prev-kv")
    try:
        (line,) = read_lines(proc, 1)
        assert json.loads(line) == {"revision": revs[-1], "type": "PUT", "key": "j", "value": "4", "version": 5,
                                    "create_revision": revs[0], "mod_revision": revs[-1], "prev_value": "3"}
    finally:
        code, _ = interrupt(proc)
    assert code == 0


def test_issue8_4_cli_messages_follow_streams_until_ctrl_c(node: Served) -> None:
    """raftcoord messages --follow --since N prints the backlog, then new messages, with letters; Ctrl-C exits 0."""
    coord = node.coordinator
    first = coord.post_message("U", "C", {"n": 1})
    proc = cli_process("--endpoints", node.addr, "messages", "--follow", "--since", "0", "--json")
    try:
        (line,) = read_lines(proc, 1)
        assert json.loads(line)["clock"] == first.clock and json.loads(line)["type"] == "U"
        wait_until(lambda: node.app[STREAMS].open, 5, "the CLI's follow stream")
        later = coord.post_message("C", "D")
        (line,) = read_lines(proc, 1)
        shown = json.loads(line)
        assert (shown["clock"], shown["type"], shown["event"]) == (later.clock, "C", "D")
    finally:
        code, err = interrupt(proc)
    assert code == 0, err


# ------------------------------------------------------ a watch through a SIGKILL of the leader

FAST = "\n".join([
    "heartbeat_period = 0.05",
    "election_timeout_min = 0.4",
    "election_timeout_max = 0.8",
])


@pytest.mark.cluster
def test_issue8_4_http_watch_held_through_a_leader_kill_sees_every_event_once(tmp_path: Path) -> None:
    """A /v3/watch on a follower, held while the leader is SIGKILLed: every event once, in order, matching the end state."""
    from cluster_support import LocalCluster

    from raftcoord.errors import RaftcoordError, UnknownOutcomeError

    cluster = LocalCluster(tmp_path, 3, extra=FAST)
    try:
        cluster.start()
        leader = cluster.wait_for_leader()
        follower = next(n for n in cluster.names if n != leader)
        cluster.wait_healthy(follower)
        w = RawWatch(cluster.client_addr[follower], create("k", range_end="l", prev_kv=True), timeout=30)
        (created,) = w.results(1, timeout=30)
        assert created["created"]
        seen: list[dict[str, Any]] = []
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                try:
                    line = w.next(timeout=1)
                except (TimeoutError, OSError):
                    continue
                if line is None:
                    return
                seen.append(line["result"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        client = cluster.client(timeout=20)
        acked: dict[int, tuple[bytes, bytes]] = {}
        for i in range(80):
            if i == 30:
                cluster.kill(leader)
            key, value = b"k%d" % (i % 7), b"v%d" % i
            try:
                acked[client.put(key, value)] = (key, value)
            except UnknownOutcomeError:
                pass  # it may have applied: the final state decides
            if i % 10 == 9:
                try:
                    client.delete(b"k%d" % (i % 7))
                except (UnknownOutcomeError, RaftcoordError):
                    pass
        # A fence write in the watched range: the store's own revision may
        # move on after it (the new leader marks the killed node unreachable),
        # and such a record is outside the range, so no event ever reports it.
        fence = client.put(b"kfence", b"end")
        acked[fence] = (b"kfence", b"end")
        final = cluster.client(follower, timeout=20).range(b"k", b"l")
        wait_until(lambda: seen and int(seen[-1]["header"]["revision"]) >= fence, 30,
                   "the watch to reach the fence revision")
        stop.set()
        reader.join(5)
        w.close()

        assert cluster.procs[leader].poll() is not None and len(acked) >= 70 and len(seen) >= len(acked)
        revisions = [int(r["header"]["revision"]) for r in seen]
        assert revisions == sorted(set(revisions)), "revisions repeated or out of order"
        state: dict[bytes, tuple[bytes, int]] = {}
        by_revision: dict[int, list[tuple[str, bytes, bytes]]] = {}
        for r in seen:
            for e in r["events"]:
                kind, key, value = kv_of(e)
                assert int(e["kv"]["mod_revision"]) == int(r["header"]["revision"])
                by_revision.setdefault(int(e["kv"]["mod_revision"]), []).append((kind, key.encode(), value.encode()))
                if kind == "PUT":
                    state[key.encode()] = (value.encode(), int(e["kv"]["mod_revision"]))
                else:
                    state.pop(key.encode(), None)
        for revision, (key, value) in acked.items():
            assert by_revision.get(revision) == [("PUT", key, value)], f"acknowledged put at {revision} not seen once"
        assert state == {kv["key"]: (kv["value"], kv["mod_revision"]) for kv in final["kvs"]}
    finally:
        cluster.stop_all()


# ------------------------------------------------------ the request splitter

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('ab{}[]"\\ :,é\n')),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(objects=st.lists(st.dictionaries(st.text(max_size=4), _JSON, max_size=3), max_size=4),
       gaps=st.lists(st.sampled_from(["", " ", "\n", "\r\n\t"]), min_size=5, max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_splitter_finds_each_object_however_the_bytes_are_cut(objects: list[Any], gaps: list[str],
                                                              cuts: list[int]) -> None:
    """Objects separated by any whitespace, fed in any pieces, come out whole and in order."""
    from raftcoord.watch_http import _Splitter

    data = "".join(gap + json.dumps(obj, ensure_ascii=False) for gap, obj in zip(gaps, objects)).encode()
    splitter, found, last = _Splitter(1 << 20), [], 0
    for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
        found += splitter.feed(data[last:cut])
        last = cut
    assert [json.loads(raw) for raw in found] == objects and not splitter.pending


def test_issue8_4_client_follow_messages_resumes_after_the_last_clock(coord: Coordinator) -> None:
    """Client.follow_messages yields each message once; when its node stops it resumes on the next after the last clock."""
    from raftcoord.client import Client

    first, second = Served(coord), Served(coord)
    try:
        client = Client([first.addr, second.addr], timeout=10, dial_timeout=1)
        clocks = [coord.post_message("U", "C", {"n": i}).clock for i in range(2)]
        messages = client.follow_messages(since=0)
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: got.extend(m for _, m in zip(range(4), messages)), daemon=True)
        reader.start()
        wait_until(lambda: len(got) == 2, 5, "the backlog")
        first.stop()
        clocks += [coord.post_message("U", "U", {"n": i}).clock for i in (2, 3)]
        reader.join(10)
        assert [m["clock"] for m in got] == clocks
    finally:
        first.stop()
        second.stop()


def test_issue8_2_cli_messages_follow_below_the_floor_is_one_error_line(node: Served) -> None:
    """messages --follow --since below what is kept: one Error: line naming the oldest clock, exit 1."""
    clocks, oldest = purged(node.coordinator)
    result = invoke("--endpoints", node.addr, "messages", "--follow", "--since", str(clocks[0]))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and f"oldest clock kept is {oldest}" in lines[0], result.output
