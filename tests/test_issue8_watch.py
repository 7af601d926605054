"""Issue 8, item 4: ``Coordinator.watch`` with etcd's guarantees.

Ordered, unique, reliable (no gap), atomic per revision, resumable from a
revision, and a compacted error for a revision older than the kept history.
The in-memory backend runs the same store and feeds as a replica; the HTTP
stream and the cluster cases are in ``test_issue8_watch_http.py``.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replica_support import wait_for

from raftcoord.backends import MemoryBackend
from raftcoord.coordinator import Coordinator, WatchResponse
from raftcoord.errors import CommandError, CompactedError
from raftcoord.store import Store


@pytest.fixture
def coord() -> Any:
    c = Coordinator.memory("n1")
    yield c
    c.close()


def put_op(key: bytes, value: bytes) -> dict[str, Any]:
    return {"op": "put", "key": key, "value": value}


def delete_op(key: bytes) -> dict[str, Any]:
    return {"op": "delete", "key": key}


def txn(coord: Coordinator, ops: list[dict[str, Any]]) -> int:
    return int(coord.execute({"op": "txn", "compare": [], "success": ops, "failure": []})["revision"])


class Recorder:
    """Collects watch responses; ``events`` flattens them."""

    def __init__(self) -> None:
        self.responses: list[WatchResponse] = []
        self.errors: list[BaseException] = []

    def __call__(self, resp: WatchResponse) -> None:
        self.responses.append(resp)

    @property
    def events(self) -> list[tuple[str, bytes, bytes, int]]:
        return [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for r in self.responses for e in r.events]

    def wait(self, n: int, timeout: float = 5.0) -> None:
        wait_for(lambda: len(self.events) >= n, timeout, f"{n} events (have {len(self.events)})")


def test_watch_one_key_sees_puts_and_deletes_in_order(coord: Coordinator) -> None:
    rec = Recorder()
    coord.watch(b"a", callback=rec)
    r1 = coord.put(b"a", b"1")
    coord.put(b"b", b"x")  # another key: not seen
    r2 = coord.put(b"a", b"2")
    coord.delete(b"a")
    rec.wait(3)
    time.sleep(0.05)
    assert [(t, k, v) for t, k, v, _ in rec.events] == [("PUT", b"a", b"1"), ("PUT", b"a", b"2"),
                                                         ("DELETE", b"a", b"")]
    assert [m for *_, m in rec.events][:2] == [r1, r2]
    assert rec.events[2][3] == r2 + 1  # a DELETE carries the revision of the deletion


def test_watch_prefix_range_and_all_keys(coord: Coordinator) -> None:
    prefix, ranged, everything = Recorder(), Recorder(), Recorder()
    coord.watch("db/", prefix=True, callback=prefix)
    coord.watch(b"b", b"d", callback=ranged)
    coord.watch(b"\0", b"\0", callback=everything)
    for key in (b"a", b"b", b"c", b"d", b"db/x", b"db0"):
        coord.put(key, b"v")
    everything.wait(6)
    prefix.wait(1)
    ranged.wait(2)
    time.sleep(0.05)
    assert [k for _, k, _, _ in prefix.events] == [b"db/x"]
    assert [k for _, k, _, _ in ranged.events] == [b"b", b"c"]
    assert [k for _, k, _, _ in everything.events] == [b"a", b"b", b"c", b"d", b"db/x", b"db0"]


def test_one_response_per_revision_holds_all_its_events(coord: Coordinator) -> None:
    """Atomic: a txn's changes arrive in one response, with prev_kv when asked."""
    rec = Recorder()
    coord.put(b"k1", b"old")
    coord.watch(b"k", prefix=True, callback=rec, prev_kv=True)
    txn(coord, [put_op(b"k1", b"new"), put_op(b"k2", b"v"), delete_op(b"k3")])
    rec.wait(2)
    time.sleep(0.05)
    assert len(rec.responses) == 1
    first, second = rec.responses[0].events
    assert first.prev_kv is not None and first.prev_kv.value == b"old" and second.prev_kv is None
    assert rec.responses[0].revision == first.kv.mod_revision == second.kv.mod_revision


def test_filters_and_start_revision_replay(coord: Coordinator) -> None:
    revs = [coord.put(b"k", b"%d" % i) for i in range(5)]
    coord.delete(b"k")
    replay, noput, nodelete = Recorder(), Recorder(), Recorder()
    coord.watch(b"k", start_revision=revs[2], callback=replay)
    coord.watch(b"k", start_revision=revs[0], callback=noput, filters=["NOPUT"])
    coord.watch(b"k", start_revision=revs[0], callback=nodelete, filters=["NODELETE"])
    replay.wait(4)
    noput.wait(1)
    nodelete.wait(5)
    time.sleep(0.05)
    assert [v for _, _, v, _ in replay.events] == [b"2", b"3", b"4", b""]
    assert [t for t, *_ in noput.events] == ["DELETE"]
    assert [t for t, *_ in nodelete.events] == ["PUT"] * 5
    with pytest.raises(CommandError):
        coord.watch(b"k", callback=replay, filters=["NOPE"])


def test_a_start_revision_older_than_the_history_is_compacted() -> None:
    class Small(Store):
        history_revisions = 5

    coord = Coordinator(MemoryBackend(Small()), host="n1")
    try:
        revs = [coord.put(b"k", b"%d" % i) for i in range(20)]
        errors: list[BaseException] = []
        rec = Recorder()
        w = coord.watch(b"k", start_revision=2, callback=rec, on_error=errors.append)
        wait_for(lambda: errors, 5, "the compacted error")
        assert isinstance(errors[0], CompactedError) and errors[0].compact_revision == revs[-5]
        assert w.closed and w.error is errors[0] and rec.responses == []
        ok = Recorder()
        coord.watch(b"k", start_revision=revs[-5], callback=ok)
        ok.wait(5)
    finally:
        coord.close()


def test_progress_notifications_report_the_revision_reached(coord: Coordinator) -> None:
    rec = Recorder()
    coord.watch(b"quiet", callback=rec, progress_interval=0.1)
    rev = coord.put(b"other", b"v")
    wait_for(lambda: any(r.is_progress and r.revision >= rev for r in rec.responses), 5, "a progress notice")
    assert all(r.is_progress for r in rec.responses)


def test_close_stops_a_watch_and_a_blocked_watch_holds_back_only_itself(coord: Coordinator) -> None:
    release = threading.Event()
    blocked = coord.watch(b"k", callback=lambda r: release.wait(10))
    free = Recorder()
    w = coord.watch(b"k", callback=free)
    for i in range(5):
        coord.put(b"k", b"%d" % i)
    free.wait(5)
    w.close()
    coord.put(b"k", b"late")
    time.sleep(0.1)
    assert len(free.events) == 5
    release.set()
    blocked.close()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "delete", "txn"]), st.integers(0, 5), st.integers(0, 3)),
                min_size=1, max_size=40), st.integers(0, 40))
def test_replaying_the_events_gives_the_final_state(ops: list[tuple[str, int, int]], start_at: int) -> None:
    """Ordered, unique, no gap: the state at a revision plus the events after it is the final state."""
    coord = Coordinator.memory("n1")
    try:
        snapshots: dict[int, dict[bytes, bytes]] = {0: {}}
        for op, k, v in ops:
            key = b"w/%d" % k
            if op == "put":
                coord.put(key, b"%d" % v)
            elif op == "delete":
                coord.delete(key)
            else:
                txn(coord, [put_op(key, b"t%d" % v), delete_op(b"w/%d" % ((k + 1) % 6))])
            snapshots[coord.read(lambda s: s.revision)] = {
                kv.key: kv.value for kv in coord.range(b"w/", b"w0").kvs}
        revisions = sorted(snapshots)
        base = revisions[min(start_at, len(revisions) - 1)]
        rec = Recorder()
        final_rev = revisions[-1]
        coord.watch(b"w/", prefix=True, start_revision=base + 1, callback=rec, progress_interval=0.01)
        wait_for(lambda: any(r.revision >= final_rev for r in rec.responses), 5, "the final revision")
        state = dict(snapshots[base])
        seen = [r.revision for r in rec.responses if r.events]
        assert seen == sorted(set(seen))
        for resp in rec.responses:
            for e in resp.events:
                if e.type == "PUT":
                    state[e.kv.key] = e.kv.value
                else:
                    state.pop(e.kv.key, None)
        assert state == snapshots[final_rev]
    finally:
        coord.close()


def test_many_watches_and_writers_agree(coord: Coordinator) -> None:
    """Concurrent writers: every watch sees the same events, each once."""
    recs = [Recorder() for _ in range(4)]
    for rec in recs:
        coord.watch(b"c/", prefix=True, callback=rec)

    def writer(n: int) -> None:
        rnd = random.Random(n)
        for i in range(50):
            coord.put(b"c/%d" % rnd.randrange(10), b"%d-%d" % (n, i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rec in recs:
        rec.wait(200)
    assert all(rec.events == recs[0].events for rec in recs)
    assert len({m for *_, m in recs[0].events}) == 200
