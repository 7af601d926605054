"""The embedded coordinator API over the in-memory backend."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from raftcoord import Coordinator, MemoryBackend
from raftcoord.errors import (
    CommandError,
    CompactedError,
    ConflictError,
    KeyNotFoundError,
    RaftcoordError,
    ReservedKeyError,
    UnavailableError,
)
from raftcoord.keys import NODE_PREFIX, MessageKey, is_reserved
from raftcoord.values import NodeStatus

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class FakeTime:
    """A settable wall clock for timestamps."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


@pytest.fixture
def coord() -> Any:
    c = Coordinator.memory("n1", cluster="test")
    yield c
    c.close()


@pytest.fixture
def pair() -> Any:
    backend = MemoryBackend()
    clock = FakeTime()
    a = Coordinator(backend, host="n1", cluster="c1", now=clock)
    b = Coordinator(backend, host="n2", cluster="c1", now=clock)
    yield a, b, clock
    a.close()
    b.close()


def test_put_get_delete(coord: Coordinator) -> None:
    """put returns the revision, get returns the value, delete reports existence."""
    rev = coord.put(b"k", b"v")
    assert rev == 2
    assert coord.get(b"k") == b"v"
    assert coord.delete(b"k") is True
    assert coord.delete(b"k") is False
    with pytest.raises(KeyNotFoundError):
        coord.get(b"k")


def test_get_missing_is_a_key_error(coord: Coordinator) -> None:
    """KeyNotFoundError is also a KeyError, for Python callers."""
    with pytest.raises(KeyError):
        coord.get(b"missing")


def test_scan_order_offset_limit(coord: Coordinator) -> None:
    """scan returns the prefix's keys in order, honouring offset, limit and desc."""
    for k in (b"p/b", b"p/a", b"p/c", b"q/a"):
        coord.put(k, k)
    assert [kv.key for kv in coord.scan(b"p/")] == [b"p/a", b"p/b", b"p/c"]
    assert [kv.key for kv in coord.scan(b"p/", order="desc")] == [b"p/c", b"p/b", b"p/a"]
    assert [kv.key for kv in coord.scan(b"p/", offset=1, limit=1)] == [b"p/b"]
    assert len(coord.scan()) == 4


def test_bad_arguments_name_the_field(coord: Coordinator) -> None:
    """Wrong types are refused with an error naming the field."""
    with pytest.raises(CommandError) as exc:
        coord.put("text", b"v")  # type: ignore[arg-type]
    assert exc.value.field == "key"
    with pytest.raises(CommandError) as exc:
        coord.put(b"k", "text")  # type: ignore[arg-type]
    assert exc.value.field == "value"
    with pytest.raises(CommandError) as exc:
        coord.scan(b"", order="up")  # type: ignore[arg-type]
    assert exc.value.field == "order"


def test_reserved_keys_refused(coord: Coordinator) -> None:
    """Raw writes under the node header are refused, in shortcuts and transactions."""
    with pytest.raises(ReservedKeyError):
        coord.put(NODE_PREFIX + b"x", b"v")
    with pytest.raises(ReservedKeyError):
        with coord.transact() as txn:
            txn.set(NODE_PREFIX + b"x", b"v")


def test_transact_reads_own_writes_and_commits(coord: Coordinator) -> None:
    """A transaction sees its own writes and commits them as one revision."""
    coord.put(b"a", b"1")
    with coord.transact() as txn:
        assert txn.get(b"a") == b"1"
        txn.set(b"a", b"2")
        txn.set(b"b", b"3")
        assert txn.get(b"a") == b"2"
        assert txn.scan(b"") == [(b"a", b"2"), (b"b", b"3")]
        txn.remove(b"b")
        assert txn.scan(b"") == [(b"a", b"2")]
    assert coord.get(b"a") == b"2"
    with pytest.raises(KeyNotFoundError):
        coord.get(b"b")
    assert coord.get_kv(b"a").mod_revision == coord.revision()


def test_transact_conflict_on_changed_read(coord: Coordinator) -> None:
    """A key read in the transaction and changed before commit raises ConflictError."""
    coord.put(b"a", b"1")
    with pytest.raises(ConflictError):
        with coord.transact() as txn:
            txn.get(b"a")
            coord.put(b"a", b"other")
            txn.set(b"b", b"x")
    with pytest.raises(KeyNotFoundError):
        coord.get(b"b")


def test_transact_conflict_on_key_created_after_missing_read(coord: Coordinator) -> None:
    """Reading a missing key, then another writer creating it, conflicts."""
    with pytest.raises(ConflictError):
        with coord.transact() as txn:
            with pytest.raises(KeyNotFoundError):
                txn.get(b"a")
            coord.put(b"a", b"1")
            txn.set(b"b", b"x")


def test_transact_conflict_on_scan_phantom(coord: Coordinator) -> None:
    """A key inserted into or deleted from a scanned prefix conflicts."""
    coord.put(b"p/1", b"x")
    with pytest.raises(ConflictError):
        with coord.transact() as txn:
            txn.scan(b"p/")
            coord.put(b"p/2", b"y")
            txn.set(b"out", b"1")
    with pytest.raises(ConflictError):
        with coord.transact() as txn:
            txn.scan(b"p/")
            coord.delete(b"p/1")
            txn.set(b"out", b"1")


def test_transact_cancelled_by_exception(coord: Coordinator) -> None:
    """An exception inside the block writes nothing."""
    with pytest.raises(RuntimeError):
        with coord.transact() as txn:
            txn.set(b"a", b"1")
            raise RuntimeError("boom")
    with pytest.raises(KeyNotFoundError):
        coord.get(b"a")


def test_transact_truncate(coord: Coordinator) -> None:
    """truncate removes every user key but keeps node records."""
    coord.put(b"a", b"1")
    coord.put(b"b", b"old")
    coord.put(b"z", b"1")
    coord.set_node_state("up")
    with coord.transact() as txn:
        txn.truncate()
        with pytest.raises(KeyNotFoundError):
            txn.get(b"a")
        txn.set(b"b", b"2")
        txn.set(b"m", b"3")
    assert [kv.key for kv in coord.scan() if not is_reserved(kv.key)] == [b"b", b"m"]
    assert coord.get(b"b") == b"2"
    assert [s.host for s in coord.get_cluster_state()] == ["n1"]


def test_remove_missing_raises(coord: Coordinator) -> None:
    """Removing a key that does not exist raises KeyNotFoundError."""
    with pytest.raises(KeyNotFoundError):
        with coord.transact() as txn:
            txn.remove(b"nope")


def test_finished_transaction_refuses_use(coord: Coordinator) -> None:
    """A committed transaction cannot be used again."""
    with coord.transact() as txn:
        txn.set(b"a", b"1")
    with pytest.raises(RaftcoordError):
        txn.get(b"a")


def test_node_states(pair: Any) -> None:
    """Every node sees every node's state with its cluster and host."""
    a, b, clock = pair
    a.set_node_state("up", addr="127.0.0.1:1")
    b.set_node_state(NodeStatus.JOINING, addr="127.0.0.1:2", zone="z1")
    states = {s.host: s for s in b.get_cluster_state()}
    assert set(states) == {"n1", "n2"}
    assert states["n1"].status is NodeStatus.UP and states["n1"].cluster == "c1"
    assert states["n2"].extra == {"zone": "z1"} and states["n2"].timestamp == T0
    assert a.get_node_state("n2").addr == "127.0.0.1:2"
    with pytest.raises(RaftcoordError) as exc:
        a.set_node_state("sleepy")
    assert exc.value.field == "status"


def test_messages_between_two_nodes(pair: Any) -> None:
    """The PuzzleDB case: each node observes the other's five messages in clock order."""
    a, b, _ = pair
    got: dict[str, list[Any]] = {"n1": [], "n2": []}
    a.add_observer(got["n1"].append)
    b.add_observer(got["n2"].append)
    for value in range(10):
        (a if value % 2 == 0 else b).post_message("U", "C", value)
    wait_for(lambda: len(got["n1"]) == 5 and len(got["n2"]) == 5)
    assert [m.payload for m in got["n1"]] == [1, 3, 5, 7, 9]
    assert [m.payload for m in got["n2"]] == [0, 2, 4, 6, 8]
    for msgs in got.values():
        clocks = [m.clock for m in msgs]
        assert clocks == sorted(clocks) and len(set(clocks)) == 5
        assert all(m.type == ord("U") and m.event == ord("C") for m in msgs)
    assert sum(m.payload for msgs in got.values() for m in msgs) == 45


def test_post_assigns_increasing_clocks_and_advances_local_clock(coord: Coordinator) -> None:
    """Each post gets a larger clock; the local clock is at least the message's."""
    clocks = [coord.post_message("D", "U").clock for _ in range(5)]
    assert clocks == sorted(set(clocks))
    assert coord.clock >= clocks[-1]
    stored = coord.messages()
    assert [m.clock for m in stored] == clocks
    assert all(m.from_host == "n1" for m in stored)


def test_receiving_merges_the_local_clock(pair: Any) -> None:
    """A node receiving a message moves its clock past the message's clock."""
    a, b, _ = pair
    seen: list[Any] = []
    b.add_observer(seen.append)
    for _ in range(20):
        m = a.post_message("U")
    wait_for(lambda: len(seen) == 20)
    assert b.clock > m.clock


def test_observer_since_replays_backlog_then_live(pair: Any) -> None:
    """since= delivers stored messages first, then live ones, each once, in order."""
    a, b, _ = pair
    posted = [a.post_message("O", "C", i) for i in range(4)]
    got: list[Any] = []
    b.add_observer(got.append, since=posted[1].clock)
    for i in range(4, 6):
        a.post_message("O", "C", i)
    wait_for(lambda: len(got) == 4)
    assert [m.payload for m in got] == [2, 3, 4, 5]


def test_observer_include_own(coord: Coordinator) -> None:
    """Own messages are skipped unless include_own is set."""
    own: list[Any] = []
    skip: list[Any] = []
    coord.add_observer(own.append, include_own=True)
    coord.add_observer(skip.append)
    coord.post_message("U")
    wait_for(lambda: len(own) == 1)
    time.sleep(0.05)
    assert skip == []


def test_observer_failure_does_not_stop_delivery(coord: Coordinator) -> None:
    """A callback that raises is logged; later messages still arrive."""
    got: list[Any] = []

    def flaky(m: Any) -> None:
        got.append(m)
        if len(got) == 1:
            raise ValueError("observer bug")

    coord.add_observer(flaky, include_own=True)
    coord.post_message("U")
    coord.post_message("U")
    wait_for(lambda: len(got) == 2)


def test_observer_runs_on_another_thread(coord: Coordinator) -> None:
    """Observers are called on the delivery thread, not the caller's."""
    threads: list[Any] = []
    coord.add_observer(lambda m: threads.append(threading.current_thread()), include_own=True)
    coord.post_message("U")
    wait_for(lambda: threads)
    assert threads[0] is not threading.current_thread()


def test_observer_close_stops_delivery(coord: Coordinator) -> None:
    """A closed observer receives nothing more."""
    got: list[Any] = []
    obs = coord.add_observer(got.append, include_own=True)
    coord.post_message("U")
    wait_for(lambda: len(got) == 1)
    obs.close()
    coord.post_message("U")
    time.sleep(0.05)
    assert len(got) == 1


def test_purge_and_compacted_resume(pair: Any) -> None:
    """Purged messages make an older resume point fail loudly with CompactedError."""
    a, b, clock = pair
    first = a.post_message("U", payload=0)
    clock.now = T0 + timedelta(hours=2)
    a.post_message("U", payload=1)
    assert a.purge_messages(before=T0 + timedelta(hours=1)) == 1
    assert [m.payload for m in b.messages()] == [1]
    with pytest.raises(CompactedError):
        b.add_observer(lambda m: None, since=first.clock - 1)
    b.add_observer(lambda m: None, since=first.clock)  # resuming at the floor is fine
    assert a.purge_messages(max_count=0) == 1


def test_message_type_codes(coord: Coordinator) -> None:
    """Types and events take one-letter codes or ints; others are refused."""
    m = coord.post_message(ord("C"), "D", {"db": "x"})
    assert (m.type, m.event) == (ord("C"), ord("D"))
    assert MessageKey(m.clock, m.type).encode()[2:10] == m.clock.to_bytes(8, "big")
    with pytest.raises(CommandError):
        coord.post_message("UU")
    with pytest.raises(CommandError):
        coord.post_message(256)


def test_oversized_value_refused(coord: Coordinator) -> None:
    """A value beyond the command size limit is refused before it is proposed."""
    with pytest.raises(CommandError):
        coord.put(b"big", b"x" * (2 * 1024 * 1024))


def test_closed_coordinator_refuses(coord: Coordinator) -> None:
    """After close, calls raise UnavailableError."""
    coord.close()
    with pytest.raises(UnavailableError):
        coord.put(b"a", b"1")
    coord.close()  # idempotent


def test_status(coord: Coordinator) -> None:
    """status names the node, its role and the revision."""
    st = coord.status()
    assert st["host"] == "n1" and st["role"] == "leader" and st["revision"] == 1


def test_concurrent_writers_all_apply(coord: Coordinator) -> None:
    """Writes from many threads all land, each with its own revision."""
    revs: list[int] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        for j in range(50):
            r = coord.put(f"k{i}/{j}".encode(), b"v")
            with lock:
                revs.append(r)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(revs)) == 200
    assert len(coord.scan(b"k")) == 200
