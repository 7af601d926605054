"""Issue 9, the request path above the replica: what each HTTP request costs the node.

The endpoint must not look at the replica's status once per request, must
not give each single-key read a read (and a read barrier) of its own, must
keep as many writes in flight as clients send, and must answer a single-key
read exactly as the general range path does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from raftcoord import endpoint as endpoint_module
from raftcoord import etcd_json
from raftcoord.coordinator import Coordinator, MemoryBackend
from raftcoord.endpoint import make_app
from raftcoord.errors import LimitExceededError, UnavailableError
from raftcoord.store import Store, read_txn


def b64(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode()


class CountingBackend(MemoryBackend):
    """A memory backend that counts status and read calls, and can hold reads and proposals at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.status_calls = 0
        self.reads = 0
        self.term = 1
        self.gate = threading.Event()
        self.gate.set()
        self.proposing = 0
        self.most_proposing = 0
        self.hold_proposals: Callable[[], bool] | None = None
        self._count = threading.Lock()

    def status(self) -> dict[str, Any]:
        """The memory backend's status, with a term the test sets."""
        self.status_calls += 1
        return {**super().status(), "term": self.term}

    def read(self, fn: Any, *, consistency: Any, timeout: float) -> Any:
        """Count, wait at the gate, read."""
        with self._count:
            self.reads += 1
        self.gate.wait(10)
        return super().read(fn, consistency=consistency, timeout=timeout)

    def read_view(self, *, consistency: Any, timeout: float) -> Any:
        """Count, wait at the gate, open a view."""
        with self._count:
            self.reads += 1
        self.gate.wait(10)
        return super().read_view(consistency=consistency, timeout=timeout)

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Propose; while ``hold_proposals()`` says so, wait (up to 5 s) with the others in flight."""
        with self._count:
            self.proposing += 1
            self.most_proposing = max(self.most_proposing, self.proposing)
        try:
            deadline = time.monotonic() + 5
            while self.hold_proposals is not None and self.hold_proposals() and time.monotonic() < deadline:
                time.sleep(0.005)
            return super().propose(command, timeout=timeout)
        finally:
            with self._count:
                self.proposing -= 1


async def started(app: Any) -> TestClient[Any, Any]:
    """A test client for ``app`` on the running loop."""
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


async def post(client: TestClient[Any, Any], path: str, body: Any) -> tuple[int, Any]:
    """POST JSON; (status, JSON body)."""
    async with client.post(path, json=body) as resp:
        return resp.status, await resp.json()


def test_issue9_response_headers_do_not_read_status_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Puts and ranges take the header's Raft term from a cached value, not from a status call each."""
    monkeypatch.setattr(endpoint_module, "TERM_REFRESH", 60.0, raising=False)
    backend = CountingBackend()
    with Coordinator(backend, host="n1") as coord:

        async def go() -> None:
            client = await started(make_app(coord))
            try:
                for i in range(40):
                    status, out = await post(client, "/v3/kv/put", {"key": b64(b"k%d" % i), "value": b64(b"v")})
                    assert status == 200 and out["header"]["raft_term"] == "1", out
                    status, out = await post(client, "/v3/kv/range", {"key": b64(b"k%d" % i)})
                    assert status == 200 and out["header"]["raft_term"] == "1", out
            finally:
                await client.close()

        backend.status_calls = 0
        asyncio.run(go())
    assert backend.status_calls <= 2, f"{backend.status_calls} status calls for 80 requests"


def test_issue9_header_term_follows_a_new_term(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new Raft term shows in response headers once the cached one is older than TERM_REFRESH."""
    monkeypatch.setattr(endpoint_module, "TERM_REFRESH", 0.05, raising=False)
    backend = CountingBackend()
    with Coordinator(backend, host="n1") as coord:

        async def go() -> None:
            client = await started(make_app(coord))
            try:
                status, out = await post(client, "/v3/kv/put", {"key": b64(b"k"), "value": b64(b"v")})
                assert out["header"]["raft_term"] == "1"
                backend.term = 7
                deadline = time.monotonic() + 5
                while True:
                    status, out = await post(client, "/v3/kv/put", {"key": b64(b"k"), "value": b64(b"v")})
                    if out["header"]["raft_term"] == "7" or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.01)
                assert out["header"]["raft_term"] == "7", out
            finally:
                await client.close()

        asyncio.run(go())


def _waiting_reads(app: Any) -> int:
    """Single-key reads the endpoint holds for its next batched call (0 where it has no such batching)."""
    streams = next((v for v in app.values() if hasattr(v, "endpoint")), None)
    batchers = getattr(getattr(streams, "endpoint", None), "key_reads", {})
    return sum(getattr(b, "waiting", 0) for b in batchers.values())


@pytest.mark.parametrize("consistency", ["linearizable", "serializable"])
def test_issue9_concurrent_single_key_reads_share_one_read(consistency: str) -> None:
    """32 concurrent single-key ranges cost the replica two reads (one barrier each), not 32, and each
    gets its own key's answer."""
    backend = CountingBackend()
    n = 32
    with Coordinator(backend, host="n1") as coord:
        for i in range(n):
            coord.put(b"k%02d" % i, b"v%02d" % i)
        app = make_app(coord)

        async def go() -> list[tuple[int, Any]]:
            client = await started(app)
            try:
                backend.gate.clear()
                backend.reads = 0
                body: dict[str, Any] = {"serializable": True} if consistency == "serializable" else {}
                tasks = [asyncio.ensure_future(post(client, "/v3/kv/range", {"key": b64(b"k%02d" % i), **body}))
                         for i in range(n)]
                # The first read waits at the gate; release it once every request reached the node
                # (as a read of its own, or waiting for the next batched one).
                deadline = time.monotonic() + 10
                while backend.reads + _waiting_reads(app) < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                backend.gate.set()
                return await asyncio.gather(*tasks)
            finally:
                backend.gate.set()
                await client.close()

        answers = asyncio.run(go())
    for i, (status, out) in enumerate(answers):
        assert status == 200, out
        assert [base64.b64decode(kv["value"]) for kv in out["kvs"]] == [b"v%02d" % i]
        assert out["header"]["revision"] == str(n + 1) and out["count"] == "1"
    assert backend.reads <= 2, f"{backend.reads} reads of the replica for {n} concurrent requests"


def test_issue9_writes_in_flight_are_not_capped_below_the_clients() -> None:
    """64 concurrent puts are all handed to the replica at once (the worker pool held 32 before)."""
    backend = CountingBackend()
    n = 64
    with Coordinator(backend, host="n1") as coord:
        coord.put(b"warm", b"x")  # registers the node's session before the proposals are held
        backend.hold_proposals = lambda: backend.proposing < n and backend.most_proposing < n

        async def go() -> list[tuple[int, Any]]:
            client = await started(make_app(coord))
            try:
                return await asyncio.gather(*(post(client, "/v3/kv/put", {"key": b64(b"k%d" % i), "value": ""})
                                              for i in range(n)))
            finally:
                await client.close()

        answers = asyncio.run(go())
    assert all(status == 200 for status, _ in answers), answers
    assert backend.most_proposing == n


# ------------------------------------------------- the single-key fast path


_KEYS = st.sampled_from([b"a", b"b", b"k", b"zz"])


@st.composite
def stores(draw: Any) -> Store:
    """A store after a few puts and deletes."""
    store = Store()
    for key, value in draw(st.lists(st.tuples(_KEYS, st.binary(max_size=40) | st.none()), max_size=12)):
        store.apply_map({"op": "put", "key": key, "value": value} if value is not None else
                        {"op": "delete", "key": key})
    return store


@st.composite
def single_key_queries(draw: Any) -> etcd_json.RangeQuery:
    """A RangeQuery of one key, with the options a client may set."""
    body: dict[str, Any] = {"key": b64(draw(_KEYS))}
    for name in ("keys_only", "count_only", "serializable"):
        if draw(st.booleans()):
            body[name] = True
    if draw(st.booleans()):
        body["limit"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        body["revision"] = draw(st.integers(0, 15))
    return etcd_json.parse_range(body)


def _answer(fn: Callable[[], dict[str, Any]]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the error is part of the answer compared
        return (type(exc).__name__, getattr(exc, "field", None))


@settings(max_examples=300, deadline=None)
@given(stores(), single_key_queries(), st.sampled_from([10, 60, 1 << 20]))
def test_issue9_single_key_answer_matches_the_range_path(store: Store, q: etcd_json.RangeQuery,
                                                          max_bytes: int) -> None:
    """key_result answers a one-key range exactly as read_txn of range_txn does: kvs, count, more,
    revision checks and the max_response_bytes refusal."""
    assert q.single_key
    general = _answer(lambda: etcd_json.range_response(
        q, read_txn(store, etcd_json.range_txn(q), max_result_bytes=max_bytes)))
    fast = _answer(lambda: etcd_json.range_response(
        q, etcd_json.key_result(q, store.get(q.key), store.revision, max_bytes=max_bytes)))
    assert fast == general


def test_issue9_single_key_range_refused_past_max_response_bytes() -> None:
    """Over HTTP, a single key larger than max_response_bytes is refused as a range of it was."""
    with Coordinator.memory("n1", max_response_bytes=100) as coord:
        coord.put(b"big", b"x" * 200)
        coord.put(b"small", b"x")

        async def go() -> list[tuple[int, Any]]:
            client = await started(make_app(coord))
            try:
                return [await post(client, "/v3/kv/range", {"key": b64(key)}) for key in (b"big", b"small")]
            finally:
                await client.close()

        (status, out), (status2, out2) = asyncio.run(go())
    assert (status, out["field"], out["raftcoord_code"]) == (400, "max_response_bytes", "limit_exceeded"), out
    assert status2 == 200 and base64.b64decode(out2["kvs"][0]["value"]) == b"x"


def test_issue9_range_options_still_served_by_the_range_path() -> None:
    """Ranges with range_end, sorting or filters answer as before (the general path)."""
    with Coordinator.memory("n1") as coord:
        for key in (b"a1", b"a2", b"b1"):
            coord.put(key, key.upper())

        async def go() -> list[Any]:
            client = await started(make_app(coord))
            try:
                out = []
                for body in ({"key": b64(b"a"), "range_end": b64(b"b")},
                             {"key": b64(b"a1"), "sort_order": "DESCEND", "sort_target": "VALUE"},
                             {"key": b64(b"a1"), "min_mod_revision": "3"}):
                    status, answer = await post(client, "/v3/kv/range", body)
                    assert status == 200, answer
                    out.append([base64.b64decode(kv["key"]) for kv in answer.get("kvs", [])])
                return out
            finally:
                await client.close()

        assert asyncio.run(go()) == [[b"a1", b"a2"], [b"a1"], []]


# ---------------------------------------------------- the pool and batcher


def test_issue9_worker_pool_hands_back_results_and_errors() -> None:
    """Each call gets its own result or exception, also when many end at once."""
    from raftcoord.httpserve import WorkerPool

    pool = WorkerPool(8, "t")
    barrier = threading.Barrier(8)

    def call(i: int) -> int:
        barrier.wait(5)  # all eight end together: their outcomes arrive in one burst
        if i % 3 == 0:
            raise ValueError(i)
        return i * i

    async def go() -> list[Any]:
        return await asyncio.gather(*(pool.run(lambda i=i: call(i)) for i in range(8)), return_exceptions=True)

    try:
        out = asyncio.run(go())
    finally:
        pool.shutdown()
    for i, got in enumerate(out):
        if i % 3 == 0:
            assert isinstance(got, ValueError) and got.args == (i,)
        else:
            assert got == i * i


def test_issue9_worker_pool_survives_a_closed_loop_and_refuses_after_shutdown() -> None:
    """A call that ends after its loop closed is dropped quietly; a shut-down pool refuses new calls."""
    from raftcoord.httpserve import WorkerPool

    pool = WorkerPool(2, "t")
    release = threading.Event()
    done = threading.Event()

    def slow() -> int:
        release.wait(5)
        done.set()
        return 1

    async def start_and_leave() -> None:
        task = asyncio.ensure_future(pool.run(slow))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(start_and_leave())  # the loop closes while slow() still runs
    release.set()
    assert done.wait(5)
    assert asyncio.run(pool.run(lambda: 2)) == 2  # the thread is still there
    pool.shutdown()

    async def after() -> None:
        await pool.run(lambda: 3)

    with pytest.raises(RuntimeError):
        asyncio.run(after())


def test_issue9_batcher_gives_each_waiter_its_answer_or_the_error() -> None:
    """Items that arrive while a call runs go together in the next, at most max_batch per call; an error
    reaches every item of its batch, and a cancelled waiter does not disturb the others."""
    from raftcoord.httpserve import Batcher, WorkerPool

    pool = WorkerPool(2, "t")
    calls: list[list[int]] = []
    gate = threading.Event()

    def call(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            gate.wait(5)
        if 13 in items:
            raise UnavailableError("no")
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(pool, call, max_batch=4)

    async def go() -> list[Any]:
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3, 4, 5, 6, 13)]
        doomed = asyncio.ensure_future(batcher.submit(99))
        await asyncio.sleep(0)
        assert batcher.waiting == 8
        doomed.cancel()
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        out = asyncio.run(go())
    finally:
        pool.shutdown()
    assert out[:5] == [0, 10, 20, 30, 40]
    assert all(isinstance(x, UnavailableError) for x in out[5:]), out
    assert calls == [[0], [1, 2, 3, 4], [5, 6, 13]]


# ------------------------------------------------------------- event loop


def test_issue9_event_loop_factory_prefers_uvloop_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes run on uvloop when it is installed; RAFTCOORD_EVENT_LOOP=asyncio keeps asyncio's loop."""
    from raftcoord.server import event_loop_factory

    monkeypatch.setenv("RAFTCOORD_EVENT_LOOP", "asyncio")
    assert event_loop_factory() is None
    monkeypatch.delenv("RAFTCOORD_EVENT_LOOP")
    try:
        import uvloop
    except ImportError:
        assert event_loop_factory() is None
    else:
        assert event_loop_factory() is uvloop.new_event_loop


def test_issue9_node_server_serves_on_the_chosen_event_loop(tmp_path: Path) -> None:
    """A NodeServer on the loop event_loop_factory picks answers puts, ranges and a watch."""
    from raftcoord.config import load_config
    from raftcoord.server import NodeServer, event_loop_factory
    from test_server import write_config

    config = load_config(write_config(tmp_path), env={})

    async def go() -> None:
        server = NodeServer(config, "n1", coordinator=Coordinator.memory("n1"))
        await server.start()
        try:
            url = config.node("n1").client_url
            async with ClientSession() as session:
                async with session.post(f"{url}/v3/watch", json={"create_request": {"key": b64(b"w")}}) as watch:
                    created = json.loads(await watch.content.readline())
                    assert created["result"]["created"] is True
                    async with session.post(f"{url}/v3/kv/put", json={"key": b64(b"w"), "value": b64(b"1")}) as r:
                        assert r.status == 200
                    event = json.loads(await asyncio.wait_for(watch.content.readline(), 10))
                    assert base64.b64decode(event["result"]["events"][0]["kv"]["value"]) == b"1"
                async with session.post(f"{url}/v3/kv/range", json={"key": b64(b"w")}) as r:
                    out = await r.json()
                    assert base64.b64decode(out["kvs"][0]["value"]) == b"1"
        finally:
            await server.stop()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(go())


def test_issue9_limit_error_is_the_store_error_type() -> None:
    """key_result refuses with the same error type and field read_txn uses."""
    q = etcd_json.parse_range({"key": b64(b"k")})
    store = Store()
    store.apply_map({"op": "put", "key": b"k", "value": b"x" * 100})
    with pytest.raises(LimitExceededError) as fast:
        etcd_json.key_result(q, store.get(b"k"), store.revision, max_bytes=50)
    with pytest.raises(LimitExceededError) as general:
        read_txn(store, etcd_json.range_txn(q), max_result_bytes=50)
    assert fast.value.field == general.value.field == "max_response_bytes"


def test_issue9_get_many_reads_keys_at_one_revision() -> None:
    """Coordinator.get_many: each key's KeyValue or None, and the revision they were read at; bad keys refused."""
    from raftcoord.errors import CommandError

    with Coordinator.memory("n1") as coord:
        coord.put(b"a", b"1")
        rev = coord.put(b"b", b"2")
        kvs, revision = coord.get_many([b"b", b"missing", b"a"], consistency="serializable")
        assert revision == rev
        assert [kv.value if kv is not None else None for kv in kvs] == [b"2", None, b"1"]
        assert coord.get_many([]) == ([], rev)
        with pytest.raises(CommandError):
            coord.get_many([b""])
