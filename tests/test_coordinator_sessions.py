"""The coordinator's side of issue 6: sessions (d9, d7), limits (d2), reads off the log (d1, d3), layering (d16)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftcoord import coordinator as coordinator_module
from raftcoord.coordinator import Coordinator, MemoryBackend
from raftcoord.errors import (
    DuplicateRequestError,
    LimitExceededError,
    SessionExpiredError,
    UnavailableError,
    UnknownOutcomeError,
)
from raftcoord.store import Store
from raftcoord.values import decode_cbor, encode_cbor
from raftcoord.views import ViewRegistry

REPO = Path(__file__).resolve().parents[1]


def register_sessions(store: Store, n: int) -> None:
    """Register ``n`` client sessions on ``store`` (others' sessions, pushing older ones out)."""
    for _ in range(n):
        result = store.apply(encode_cbor({"op": "session"})).result
        assert result["ok"], result


class TinyStore(Store):
    """A store that keeps only a few client sessions."""

    max_sessions = 3


def evict_all(store: Store) -> None:
    """Register as many new sessions as the store keeps: every older one is forgotten."""
    register_sessions(store, store.max_sessions)


class RetryingBackend(MemoryBackend):
    """A memory backend that proposes like the replica after an ambiguous attempt.

    With ``between`` set, a proposal is applied, ``between(store, command)``
    runs (other clients' traffic), and the same bytes are applied again; the
    caller hears only the second answer, as after a lost LEADER_CHANGED reply.
    """

    proposes_once = False

    def __init__(self) -> None:
        super().__init__(TinyStore())
        self.between: Any = None

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Apply ``command``; with ``between`` armed, apply it a second time after it."""
        between, self.between = self.between, None
        if between is None:
            return super().propose(command, timeout=timeout)
        super().propose(command, timeout=timeout)
        with self._lock:
            between(self.store, decode_cbor(command))
        return super().propose(command, timeout=timeout)


class ViewBackend(MemoryBackend):
    """A memory backend with chunked read views (as the replica's) that counts plain reads."""

    def __init__(self, chunk_keys: int = 3) -> None:
        super().__init__()
        self.registry = ViewRegistry(self._lock, lambda: self.store, chunk_keys=chunk_keys)
        self.reads = 0

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Apply, feeding the open views their pre-images."""
        with self._lock:
            self._check_open()
            applied = self.store.apply(command)
            self.registry.record(applied.events)
            for listener in self._listeners:
                listener(applied)
            return applied.result

    def read(self, fn: Any, *, consistency: Any, timeout: float) -> Any:
        """Count, then read."""
        self.reads += 1
        return super().read(fn, consistency=consistency, timeout=timeout)

    @contextmanager
    def read_view(self, *, consistency: Any, timeout: float) -> Iterator[Any]:
        """A chunked view of one revision."""
        with self.registry.open(timeout) as view:
            yield view


@pytest.fixture
def retrying() -> Iterator[tuple[Coordinator, RetryingBackend]]:
    backend = RetryingBackend()
    coord = Coordinator(backend, host="n1")
    yield coord, backend
    coord.close()


# ----------------------------------------------------------------- d9, d7


def test_issue6_d9_retry_after_session_eviction_is_unknown_not_reapplied(
    retrying: tuple[Coordinator, RetryingBackend],
) -> None:
    """A retried write whose session was evicted in between raises UnknownOutcomeError and applies once."""
    coord, backend = retrying
    coord.put(b"warm", b"up")  # the session exists and is in use
    backend.between = lambda store, cmd: evict_all(store)
    with pytest.raises(UnknownOutcomeError):
        coord.put(b"k", b"v1")
    kv = coord.get_kv(b"k")
    assert kv is not None and (kv.value, kv.version) == (b"v1", 1)
    # The next write registers a new session and applies once.
    rev = coord.put(b"k", b"v2")
    kv = coord.get_kv(b"k")
    assert kv is not None and (kv.value, kv.version, kv.mod_revision) == (b"v2", 2, rev)


def test_issue6_d9_retry_after_result_forgotten_is_unknown(retrying: tuple[Coordinator, RetryingBackend]) -> None:
    """A retried write whose remembered result was dropped raises UnknownOutcomeError, not a conflict."""
    coord, backend = retrying

    def forget(store: Store, cmd: dict[str, Any]) -> None:
        client, seq, _ = cmd["req"]
        # The same client reports everything up to seq done: its result goes.
        result = store.apply(encode_cbor({"op": "barrier", "req": [client, seq + 1, seq + 1]})).result
        assert result["ok"], result

    coord.put(b"warm", b"up")
    backend.between = forget
    with pytest.raises(UnknownOutcomeError):
        coord.put(b"k", b"v1")
    kv = coord.get_kv(b"k")
    assert kv is not None and kv.version == 1
    coord.put(b"k", b"v2")
    assert coord.get_kv(b"k").version == 2  # type: ignore[union-attr]


def test_issue6_d9_expired_session_sent_once_is_resent() -> None:
    """On a backend that proposes once, a write refused for an expired session goes again under a new one."""
    backend = MemoryBackend(TinyStore())
    with Coordinator(backend, host="n1") as coord:
        coord.put(b"k", b"v1")
        evict_all(backend.store)
        coord.put(b"k", b"v2")
        assert coord.get_kv(b"k").version == 2  # type: ignore[union-attr]


def test_session_registered_lazily_not_at_construction() -> None:
    """Building a coordinator proposes nothing (a cluster may have no leader yet)."""
    backend = MemoryBackend()
    with Coordinator(backend, host="n1") as coord:
        assert backend.store.applied == 0
        coord.put(b"k", b"v")
        assert backend.store.applied == 2  # the session, then the put
        coord.put(b"k", b"w")
        assert backend.store.applied == 3


def test_issue6_d7_client_request_id_used_as_given() -> None:
    """With req, the client's id is used as is: a retry returns the first result, never applies twice."""
    backend = MemoryBackend()
    with Coordinator(backend, host="n1") as coord:
        client = coord.new_session()
        first = coord.execute({"op": "put", "key": b"k", "value": b"v"}, req=[client, 1, 1])
        again = coord.execute({"op": "put", "key": b"k", "value": b"v"}, req=[client, 1, 1])
        assert again == first
        assert coord.get_kv(b"k").version == 1  # type: ignore[union-attr]
        coord.execute({"op": "put", "key": b"k", "value": b"w"}, req=[client, 3, 3])
        with pytest.raises(DuplicateRequestError):
            coord.execute({"op": "put", "key": b"k", "value": b"v"}, req=[client, 1, 1])
        with pytest.raises(SessionExpiredError):
            coord.execute({"op": "put", "key": b"k", "value": b"x"}, req=["c-never-registered", 1, 1])
        assert coord.get(b"k") == b"w"


def test_new_sessions_are_distinct() -> None:
    """Each registration gets its own store-assigned id."""
    with Coordinator.memory("n1") as coord:
        ids = {coord.new_session() for _ in range(5)}
        assert len(ids) == 5 and all(isinstance(i, str) and i for i in ids)


def test_session_registration_without_leader_says_not_applied() -> None:
    """If the session cannot be registered, the write fails as not applied (not unknown)."""

    class NoLeader(MemoryBackend):
        def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
            raise UnknownOutcomeError("lost")

    with Coordinator(NoLeader(), host="n1") as coord:
        with pytest.raises(UnavailableError) as exc:
            coord.put(b"k", b"v")
        assert not isinstance(exc.value, UnknownOutcomeError)


def _put(coord: Coordinator, key: bytes, value: bytes) -> None:
    """Write straight into the memory store (no session needed): set-up for read tests."""
    store = coord.backend.store  # type: ignore[attr-defined]
    assert store.apply(encode_cbor({"op": "put", "key": key, "value": value})).result["ok"]


def _fill(coord: Coordinator, n: int) -> None:
    for i in range(n):
        _put(coord, b"k/%03d" % i, b"v%d" % i)


# ----------------------------------------------------------------- d2 limits


def _txn(compare: int = 0, success: int = 0, failure: int = 0, *, write: bool = True) -> dict[str, Any]:
    op = (lambda i: {"op": "put", "key": b"k%d" % i, "value": b"v"}) if write else (
        lambda i: {"op": "range", "key": b"k%d" % i}
    )
    return {
        "op": "txn",
        "compare": [{"key": b"c%d" % i, "target": "version", "result": "equal", "value": 0} for i in range(compare)],
        "success": [op(i) for i in range(success)],
        "failure": [op(i) for i in range(failure)],
    }


@pytest.mark.parametrize(
    "shape", [{"success": 5}, {"failure": 5}, {"compare": 5}, {"success": 5, "write": False}]
)
def test_issue6_d2_txn_over_max_txn_ops_refused_before_proposing(shape: dict[str, Any]) -> None:
    """A txn with more ops than max_txn_ops is refused with an error naming the setting; nothing is proposed."""
    backend = MemoryBackend()
    with Coordinator(backend, host="n1", max_txn_ops=4) as coord:
        with pytest.raises(LimitExceededError) as exc:
            coord.execute(_txn(**shape))
        assert exc.value.field == "max_txn_ops" and "max_txn_ops" in exc.value.message
        assert exc.value.http_status == 400
        assert backend.store.applied == 0
        # At the limit, counted as etcd does (the larger branch), it goes through.
        coord.execute(_txn(compare=4, success=4, failure=4))


def test_max_txn_ops_default_is_etcds() -> None:
    """128 ops pass by default, 129 do not."""
    with Coordinator.memory("n1") as coord:
        assert coord.max_txn_ops == 128 and coord.max_response_bytes == 32 * 1024 * 1024
        coord.execute(_txn(success=128))
        with pytest.raises(LimitExceededError):
            coord.execute(_txn(success=129))


def test_issue6_d2_range_over_max_response_bytes_refused() -> None:
    """A range whose answer would pass max_response_bytes is refused naming the setting; keys_only and count_only are cheap."""
    with Coordinator.memory("n1", max_response_bytes=64 * 1024) as coord:
        for i in range(4):
            _put(coord, b"big/%d" % i, b"x" * 20_000)
        with pytest.raises(LimitExceededError) as exc:
            coord.scan(b"big/")
        assert exc.value.field == "max_response_bytes"
        assert len(coord.scan(b"big/", limit=3)) == 3
        with pytest.raises(LimitExceededError):
            coord.scan(b"big/", max_bytes=30_000, limit=2)
        keys = coord.range(b"big/", b"big0", keys_only=True)
        assert [kv.key for kv in keys.kvs] == [b"big/%d" % i for i in range(4)]
        assert all(kv.value == b"" for kv in keys.kvs)
        counted = coord.range(b"big/", b"big0", count_only=True)
        assert (counted.kvs, counted.count, counted.more) == ((), 4, False)


def test_issue6_d2_read_only_txn_over_max_response_bytes_refused() -> None:
    """A read-only txn of many ranges over one large value is refused, not answered in gigabytes."""
    with Coordinator.memory("n1", max_response_bytes=1024 * 1024) as coord:
        _put(coord, b"big", b"x" * 100_000)
        cmd = {"op": "txn", "compare": [], "success": [{"op": "range", "key": b"big"}] * 100, "failure": []}
        with pytest.raises(LimitExceededError):
            coord.execute(cmd)


# ------------------------------------------------------- d1, d3 reads off the log


def test_issue6_d1_read_only_txn_never_enters_the_log() -> None:
    """A txn without writes is answered as a read, with the result a proposed txn would give."""
    backend = MemoryBackend()
    with Coordinator(backend, host="n1") as coord:
        _fill(coord, 5)
        cmd = {
            "op": "txn",
            "compare": [{"key": b"k/001", "target": "version", "result": "equal", "value": 1}],
            "success": [
                {"op": "range", "key": b"k/", "range_end": b"k0", "limit": 2},
                {"op": "range", "key": b"k/", "range_end": b"k0", "count_only": True},
                {"op": "range", "key": b"k/003", "keys_only": True},
            ],
            "failure": [{"op": "range", "key": b"k/004"}],
        }
        applied_before = backend.store.applied
        clone = Store.restore(backend.store.snapshot())
        expected = clone.apply(encode_cbor(cmd)).result
        got = coord.execute(cmd)
        assert backend.store.applied == applied_before
        assert got == expected
        assert coord.read_txn(cmd, consistency="serializable") == expected


def test_issue6_d3_ranges_and_read_txns_use_read_views() -> None:
    """range, scan, transaction scans and read-only txns read through backend.read_view, never a locked read."""
    backend = ViewBackend()
    with Coordinator(backend, host="n1") as coord:
        _fill(coord, 10)
        backend.reads = 0
        assert [kv.key for kv in coord.scan(b"k/", limit=4, offset=2)] == [b"k/%03d" % i for i in range(2, 6)]
        assert coord.range(b"k/", b"k0", descending=True, limit=1).kvs[0].key == b"k/009"
        assert backend.reads == 0
        assert coord.range(b"k/", b"k0", count_only=True).count == 10
        coord.execute({"op": "txn", "compare": [], "success": [{"op": "range", "key": b"k/", "range_end": b"k0"}],
                       "failure": []})
        with coord.transact() as txn:
            assert len(txn.scan(b"k/")) == 10
            assert backend.reads == 0
            txn.set(b"new", b"1")
        assert coord.get(b"new") == b"1"


keys_st = st.lists(st.binary(min_size=1, max_size=3), max_size=30, unique=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=keys_st,
    start=st.binary(min_size=1, max_size=2),
    end=st.sampled_from([b"", b"\x00", b"\x80", b"\xff\xff", b"\x01"]),
    limit=st.integers(0, 12),
    offset=st.integers(0, 35),
    descending=st.booleans(),
    views=st.booleans(),
)
def test_range_in_steps_matches_the_store(
    monkeypatch: pytest.MonkeyPatch,
    keys: list[bytes],
    start: bytes,
    end: bytes,
    limit: int,
    offset: int,
    descending: bool,
    views: bool,
) -> None:
    """Coordinator.range, read a page or a chunk at a time, answers exactly what Store.range does."""
    monkeypatch.setattr(coordinator_module, "RANGE_PAGE", 2)
    backend: MemoryBackend = ViewBackend(chunk_keys=2) if views else MemoryBackend()
    with Coordinator(backend, host="n1") as coord:
        for k in keys:
            backend.store.apply(encode_cbor({"op": "put", "key": k, "value": k * 2}))
        got = coord.range(start, end, limit=limit, offset=offset, descending=descending)
        want = backend.store.range(start, end, limit=limit, offset=offset, descending=descending)
        assert got == want


# ------------------------------------------------------------------ d16 layering


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_issue6_d16_coordinator_does_not_import_the_service_layer() -> None:
    """coordinator.py imports neither server nor endpoint, anywhere in it, so the arrow runs one way."""
    found = _imports(REPO / "raftcoord" / "coordinator.py")
    assert not found & {"raftcoord.server", "raftcoord.endpoint", "raftcoord.etcd_json", "raftcoord.cli"}
    # config is a leaf the coordinator may build replicas from: it must not import upwards either.
    assert not {m for m in _imports(REPO / "raftcoord" / "config.py") if m.startswith("raftcoord.")} - {
        "raftcoord.errors",
        "raftcoord.keys",
    }
    probe = (
        "import sys, raftcoord.coordinator as c; "
        "print(sorted(m for m in sys.modules if m in ('raftcoord.server', 'raftcoord.endpoint')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_from_config_runs_a_one_node_replica(tmp_path: Path) -> None:
    """Coordinator.from_config and server.open_coordinator build a working replica from a cluster file."""
    from cluster_support import LocalCluster, wait_until

    from raftcoord.server import open_coordinator

    cluster = LocalCluster(tmp_path, n=1, extra="max_txn_ops = 8" if _config_knows("max_txn_ops") else "")
    for opener in (Coordinator.from_config, open_coordinator):
        coord = opener(str(cluster.config_path), node="n1")
        try:
            wait_until(lambda: coord.status().get("leader"), 30, "a leader")
            coord.put(b"k", b"v")
            assert coord.get(b"k") == b"v"
            assert [kv.key for kv in coord.scan(b"k")] == [b"k"]
            cmd = {"op": "txn", "compare": [], "success": [{"op": "range", "key": b"k"}], "failure": []}
            assert coord.execute(cmd)["responses"][0]["kvs"][0]["value"] == b"v"
            if _config_knows("max_txn_ops"):
                assert coord.max_txn_ops == 8
        finally:
            coord.close()


def _config_knows(name: str) -> bool:
    from raftcoord.config import ClusterConfig

    return name in getattr(ClusterConfig, "__dataclass_fields__", {})


def test_issue6_d9_idle_session_evicted_on_a_real_replica_is_resent_not_unknown(tmp_path: Path) -> None:
    """On a real replica, a write whose one attempt met an evicted session is sent again, not reported unknown.

    The replica tells the coordinator (``report["single"]``) that only one
    attempt reached the log, so the refusal proves nothing was applied.
    """
    from replica_support import free_port, wait_for

    from raftcoord.replica import Replica

    replica = Replica(f"127.0.0.1:{free_port()}", [], tmp_path / "r", password=None, state_machine=TinyStore)
    coord = Coordinator(replica, host="n1")
    try:
        wait_for(lambda: replica.status().get("leader"), 15, "a leader")
        coord.put(b"k", b"v1")
        for _ in range(TinyStore.max_sessions):  # other clients' sessions push this one out
            assert replica.propose(encode_cbor({"op": "session"}), 5)["ok"]
        coord.put(b"k", b"v2")
        kv = coord.get_kv(b"k")
        assert kv is not None and (kv.value, kv.version) == (b"v2", 2)
    finally:
        coord.close()


def test_proposal_reports_whether_one_attempt_alone_can_have_applied() -> None:
    """Proposal.single: refused-not-applied attempts do not count; an ambiguous one does."""
    from pysyncobj.config import FAIL_REASON

    from raftcoord.proposals import Proposal

    p = Proposal()
    p.start_attempt()(None, FAIL_REASON.MISSING_LEADER)
    p.start_attempt()({"ok": True}, FAIL_REASON.SUCCESS)
    assert p.single
    q = Proposal()
    q.start_attempt()(None, FAIL_REASON.LEADER_CHANGED)
    q.start_attempt()({"ok": True}, FAIL_REASON.SUCCESS)
    assert not q.single
