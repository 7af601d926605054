"""The HTTP client against fake endpoints: request ids, retries, timeouts, malformed answers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_endpoint import FakeCluster, Handler, fake_cluster, raw_server, refused_addr, silent_listener
from raftcoord.client import Client
from raftcoord.errors import InvalidInputError, RaftcoordError, UnavailableError, UnknownOutcomeError

PUT = "/v3/kv/put"


def ids(cluster: FakeCluster, route: str = PUT) -> list[str | None]:
    """The request id header of every request ``route`` received."""
    return [s.headers.get("x-raftcoord-request") for s in cluster.requests(route)]


def wait_for(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ----------------------------------------------------------------- d7


def test_issue6_d7_slow_commit_is_not_applied_twice() -> None:
    """A put that applies but is answered after the client's timeout is not applied again elsewhere."""
    with fake_cluster(2) as cluster:
        cluster.hooks[0] = lambda stage, route, h: 1.5 if stage == "after" and route == PUT else None
        client = Client([cluster.addr(0), cluster.addr(1)], timeout=1.0)
        outcome: Any = None
        try:
            outcome = client.put(b"k", b"v")
        except RaftcoordError as exc:
            outcome = exc
        time.sleep(0.7)  # let the slow node finish its answer; nothing may apply meanwhile
        assert cluster.writes_applied() == 1, f"applied {cluster.writes_applied()} times: {ids(cluster)}"
        sent = ids(cluster)
        assert sent[0] is not None and set(sent) == {sent[0]}, f"a resend without the same id: {sent}"
        assert isinstance(outcome, UnknownOutcomeError), outcome
        assert "may have been applied" in outcome.message


def test_issue6_d7_reset_after_send_retries_under_the_same_id() -> None:
    """A node that applies a put and then resets the connection: the retry elsewhere carries the same id."""
    with fake_cluster(2) as cluster:
        cluster.hooks[0] = lambda stage, route, h: "reset" if stage == "after" and route == PUT else None
        client = Client([cluster.addr(0), cluster.addr(1)], timeout=5.0)
        revision = client.put(b"k", b"v")
        assert cluster.writes_applied() == 1
        sent = ids(cluster)
        assert len(sent) == 2 and sent[0] == sent[1] and sent[0] is not None
        assert [s.node for s in cluster.requests(PUT)] == [0, 1]
        assert revision == 1  # the remembered result of the first attempt


def test_issue6_d7_read_timeout_retries_under_the_same_id() -> None:
    """A node that applies a put and hangs: the client asks another node under the same id, in time."""
    with fake_cluster(2) as cluster:
        cluster.hooks[0] = lambda stage, route, h: 3.0 if stage == "after" and route == PUT else None
        start = time.monotonic()
        revision = Client([cluster.addr(0), cluster.addr(1)], timeout=5.0, dial_timeout=0.5).put(b"k", b"v")
        assert time.monotonic() - start < 4.0
        assert cluster.writes_applied() == 1
        assert revision == 1
        sent = ids(cluster)
        assert len(sent) == 2 and sent[0] == sent[1] is not None


def test_issue6_d7_writes_carry_ids_of_one_lazily_registered_session() -> None:
    """The first write registers one session; each write gets the next seq, reads carry no id."""
    with fake_cluster(1) as cluster:
        client = Client([cluster.addr(0)], timeout=5.0)
        with pytest.raises(RaftcoordError):
            client.get(b"nothing")
        assert cluster.requests("/raftcoord/v1/session") == []
        client.put(b"a", b"1")
        client.delete(b"a")
        client.post("U", "C", {"x": 1})
        assert len(cluster.requests("/raftcoord/v1/session")) == 1
        sent = ids(cluster, PUT) + ids(cluster, "/v3/kv/deleterange") + ids(cluster, "/raftcoord/v1/messages")
        assert sent == ["c1:1:1", "c1:2:2", "c1:3:3"]
        assert all("x-raftcoord-request" not in s.headers for s in cluster.requests("/v3/kv/range"))


def test_issue6_d7_session_expired_on_a_first_attempt_registers_again() -> None:
    """session_expired on a write sent once: it did not apply, so a new session sends it once more."""
    with fake_cluster(1) as cluster:
        client = Client([cluster.addr(0)], timeout=5.0)
        client.put(b"a", b"1")
        cluster.store.sessions.clear()  # the store evicted the session
        client.put(b"b", b"2")
        assert cluster.writes_applied() == 2
        assert len(cluster.requests("/raftcoord/v1/session")) == 2
        assert ids(cluster)[1:] == ["c1:2:2", "c2:3:3"]


def test_issue6_d7_session_expired_on_a_retry_is_an_unknown_outcome() -> None:
    """session_expired on a write that may have applied before is an unknown outcome, never a resend."""
    with fake_cluster(2) as cluster:
        cluster.hooks[0] = lambda stage, route, h: "reset" if stage == "after" and route == PUT else None
        cluster.hooks[1] = lambda stage, route, h: (
            (409, {"code": "session_expired", "message": "gone"}) if stage == "before" and route == PUT else None)
        client = Client([cluster.addr(0), cluster.addr(1)], timeout=5.0)
        with pytest.raises(UnknownOutcomeError, match="may have been applied"):
            client.put(b"k", b"v")
        assert cluster.writes_applied() == 1
        assert len(cluster.requests("/raftcoord/v1/session")) == 1


def test_issue6_d7_reads_retry_freely() -> None:
    """A read whose connection resets is simply asked of the next node."""
    with fake_cluster(2) as cluster:
        cluster.store.kv["k"] = "v"
        cluster.hooks[0] = lambda stage, route, h: "reset" if stage == "after" else None
        assert Client([cluster.addr(0), cluster.addr(1)], timeout=5.0).get(b"k")["value"] == b"v"


def test_refused_endpoint_is_skipped() -> None:
    """A node that refuses connections is skipped at once; the write goes to the next, once."""
    with fake_cluster(1) as cluster:
        start = time.monotonic()
        Client([refused_addr(), cluster.addr(0)], timeout=5.0).put(b"k", b"v")
        assert time.monotonic() - start < 1.0
        assert cluster.writes_applied() == 1


def test_no_endpoint_reachable_fails_fast() -> None:
    """Every node refusing: an UnavailableError naming them, without waiting for the timeout."""
    start = time.monotonic()
    with pytest.raises(UnavailableError, match="no endpoint answered"):
        Client([refused_addr(), refused_addr()], timeout=5.0).get(b"k")
    assert time.monotonic() - start < 1.0


# ----------------------------------------------------------------- d15


def test_issue6_d15_unknown_outcome_answer_is_an_unknown_outcome() -> None:
    """504 with code unknown_outcome is retried under the same id, then raised as UnknownOutcomeError."""
    with fake_cluster(2) as cluster:
        for i in (0, 1):
            cluster.hooks[i] = lambda stage, route, h: (
                (504, {"error": "commit timed out", "code": "unknown_outcome", "message": "commit timed out"})
                if stage == "before" and route == PUT else None)
        with pytest.raises(RaftcoordError) as info:
            Client([cluster.addr(0), cluster.addr(1)], timeout=1.0).put(b"k", b"v")
        assert type(info.value) is UnknownOutcomeError, type(info.value)
        assert "may have been applied" in info.value.message
        sent = ids(cluster)
        assert len(sent) >= 2 and set(sent) == {sent[0]}


def test_issue6_d15_plain_unavailable_is_not_an_unknown_outcome() -> None:
    """503 (no leader) on every node: the write certainly did not apply, so it is UnavailableError."""
    with fake_cluster(1) as cluster:
        cluster.hooks[0] = lambda stage, route, h: (
            (503, {"code": "unavailable", "message": "no leader"}) if stage == "before" and route == PUT else None)
        with pytest.raises(UnavailableError) as info:
            Client([cluster.addr(0)], timeout=0.5).put(b"k", b"v")
        assert not isinstance(info.value, UnknownOutcomeError)


@pytest.mark.parametrize("operation", ["get", "put", "nodes", "messages"])
def test_issue6_d15_paused_first_endpoint_is_skipped_within_the_dial_timeout(operation: str) -> None:
    """A node that accepts connections but never answers costs about the dial timeout (2 s), not the timeout."""
    with fake_cluster(1) as cluster, silent_listener() as paused:
        cluster.store.kv["k"] = "v"
        client = Client([paused, cluster.addr(0)], timeout=8.0)
        start = time.monotonic()
        {"get": lambda: client.get(b"k"), "put": lambda: client.put(b"k", b"w"), "nodes": client.nodes,
         "messages": client.messages}[operation]()
        elapsed = time.monotonic() - start
        assert elapsed < 4.0, f"{operation} took {elapsed:.1f} s with a paused first endpoint"
        assert cluster.writes_applied() == (1 if operation == "put" else 0)


def test_issue6_d15_paused_node_never_gets_the_body() -> None:
    """A write given up on a paused node never sent its body there: it cannot apply when the node resumes."""
    with fake_cluster(1) as cluster, silent_listener() as paused:
        Client([paused, cluster.addr(0)], timeout=5.0, dial_timeout=0.3).put(b"k", b"v")
        assert cluster.writes_applied() == 1


# ----------------------------------------------------------------- d13

MALFORMED = [b"<html><body>hello</body></html>", b"[1,2]", b"{}", b"null", b"\xff\xfe", b"[" * 5000]
OPERATIONS = {
    "put": lambda c: c.put(b"k", b"v"),
    "delete": lambda c: c.delete(b"k"),
    "post": lambda c: c.post("U", "C"),
    "get": lambda c: c.get(b"k"),
    "scan": lambda c: c.scan(b""),
    "nodes": lambda c: c.nodes(),
    "messages": lambda c: c.messages(),
    "status": lambda c: c.status(),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("body", MALFORMED, ids=["html", "list", "empty", "null", "not-utf8", "deep"])
def test_issue6_d13_malformed_answer_is_an_error(operation: str, body: bytes) -> None:
    """A 200 that is not a raftcoord answer is an error (unknown outcome for a write), never a success."""
    with fake_cluster(1) as cluster:
        def hook(stage: str, route: str, h: Handler) -> Any:
            return (200, body) if stage == "before" and route != "/raftcoord/v1/session" else None

        cluster.hooks[0] = hook
        with pytest.raises(RaftcoordError) as info:
            OPERATIONS[operation](Client([cluster.addr(0)], timeout=2.0))
        if operation in ("put", "delete", "post"):
            assert isinstance(info.value, UnknownOutcomeError)
        assert "not a raftcoord answer" in info.value.message


def test_issue6_d13_messages_that_never_move_on_stop() -> None:
    """A server answering the same page with more: true forever ends in an error, not a loop."""
    with fake_cluster(1) as cluster:
        page = {"messages": [{"clock": 5, "type": 85}], "more": True}
        cluster.hooks[0] = lambda stage, route, h: (200, page) if stage == "before" else None
        with pytest.raises(UnavailableError, match="not a raftcoord answer"):
            Client([cluster.addr(0)], timeout=2.0).messages()


def test_issue6_d13_messages_more_forever_is_bounded() -> None:
    """A server that always has one more page stops the listing after max_pages pages."""
    with fake_cluster(1) as cluster:
        def hook(stage: str, route: str, h: Handler) -> Any:
            since = int(h.path.partition("since=")[2] or 0)
            return (200, {"messages": [{"clock": since + 1, "type": 85}], "more": True}) if stage == "before" else None

        cluster.hooks[0] = hook
        with pytest.raises(UnavailableError, match="did not end after 20 pages"):
            Client([cluster.addr(0)], timeout=2.0).messages(max_pages=20)


@pytest.mark.parametrize("endpoint", [
    "http://[::1", "127.0.0.1:abc", "127.0.0.1:70000", "127.0.0.1:0", "ftp://h:1", "", " ", "h:1/x?y=1",
    "\udcff:1", "ünï:1", "[zz]:1", "http://:1", "a b:1", "1.2.3.4:99999999999999999999",
])
def test_issue6_d13_malformed_endpoint_is_invalid_input(endpoint: str) -> None:
    """A malformed endpoint is InvalidInputError naming it, at construction."""
    with pytest.raises(InvalidInputError, match="endpoint"):
        Client([endpoint])


@pytest.mark.parametrize("timeout", [float("nan"), -1, 0, float("inf"), 1e300, True, "1"])
def test_issue6_d13_bad_timeout_is_invalid_input(timeout: Any) -> None:
    """timeout and dial_timeout must be finite seconds in (0, 3600]."""
    with pytest.raises(InvalidInputError, match="timeout"):
        Client(["127.0.0.1:2379"], timeout=timeout)
    with pytest.raises(InvalidInputError, match="dial_timeout"):
        Client(["127.0.0.1:2379"], dial_timeout=timeout)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_endpoint_text_parses_or_is_invalid_input(text: str) -> None:
    """Whatever the text, building a client succeeds or raises InvalidInputError, nothing else."""
    try:
        client = Client([text])
    except InvalidInputError:
        return
    assert client.endpoints[0].startswith(("http://", "https://"))


def test_ipv6_endpoint() -> None:
    """[::1]:port is accepted and kept in brackets."""
    assert Client(["[::1]:2379"]).endpoints == ["http://[::1]:2379"]
    assert Client(["https://example.com"]).endpoints == ["https://example.com:443"]


# ----------------------------------------------------------------- the real endpoint


@pytest.fixture
def real_endpoint() -> Any:
    """host:port of the real endpoint (aiohttp) over an in-memory coordinator, served from a thread."""
    import asyncio
    import threading

    from aiohttp import web

    from raftcoord.coordinator import Coordinator, MemoryBackend
    from raftcoord.endpoint import make_app

    coordinator = Coordinator(MemoryBackend(), host="n1", cluster="t")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(coordinator))
    ready: list[str] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.append("127.0.0.1:%d" % runner.addresses[0][1])

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    wait_for(lambda: ready, 10, "the endpoint to listen")
    yield ready[0], coordinator
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    coordinator.close()


def test_client_against_the_real_endpoint(real_endpoint: Any) -> None:
    """Every call works against the real endpoint; writes register a session and carry ids (C1)."""
    addr, _coordinator = real_endpoint
    client = Client([refused_addr(), addr], timeout=10.0)
    rev = client.put(b"k", b"v")
    assert client._session is not None and client._sessions_supported
    assert client.get(b"k")["value"] == b"v"
    assert client.scan(b"")["revision"] >= rev
    assert client.delete(b"k") == 1
    assert client.delete(b"k") == 0
    message = client.post("U", "C", {"n": 1})
    assert [m["clock"] for m in client.messages()] == [message["clock"]]
    assert client.status()["role"] == "leader"
    assert isinstance(client.nodes(), list)
    with pytest.raises(RaftcoordError):
        client.get(b"k")


GARBLED = {
    "not-http": b"hello there\r\n\r\n",
    "empty": b"",
    "huge-length": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999\r\n\r\n{}",
    "short-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "header-flood": b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 500 + b"\r\n",
    "long-line": b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100_000 + b"\r\n\r\n",
    "bad-status": b"HTTP/1.1 abc\r\n\r\n",
}


@pytest.mark.parametrize("answer", list(GARBLED.values()), ids=list(GARBLED))
def test_issue6_d13_garbled_http_is_an_error(answer: bytes) -> None:
    """An answer that is not well-formed HTTP is a RaftcoordError for reads, within the timeout."""
    with raw_server(answer) as addr:
        start = time.monotonic()
        with pytest.raises(RaftcoordError):
            Client([addr], timeout=2.0).nodes()
        assert time.monotonic() - start < 3.0


ANSWER_KEYS = ["header", "revision", "kvs", "key", "value", "count", "more", "messages", "clock", "message",
               "nodes", "client", "deleted", "role"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(ANSWER_KEYS), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(body=st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_any_answer_is_a_result_or_a_raftcoord_error(body: bytes) -> None:
    """Whatever a node answers with 200, each call returns its shape or raises a RaftcoordError."""
    with fake_cluster(1) as cluster:
        cluster.hooks[0] = lambda stage, route, h: (
            (200, body) if stage == "before" and route != "/raftcoord/v1/session" else None)
        client = Client([cluster.addr(0)], timeout=2.0)
        for operation in OPERATIONS.values():
            try:
                operation(client)
            except RaftcoordError:
                pass


def test_single_endpoint_slow_read_is_waited_for() -> None:
    """With one endpoint, a read slower than the dial timeout is waited for, not abandoned and resent."""
    with fake_cluster(1) as cluster:
        cluster.hooks[0] = lambda stage, route, h: 1.0 if stage == "before" else None
        assert Client([cluster.addr(0)], timeout=5.0, dial_timeout=0.3).nodes() == []
        assert len(cluster.requests("/raftcoord/v1/nodes")) == 1
