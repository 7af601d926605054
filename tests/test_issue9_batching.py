"""Issue 9, item 3: concurrent commands share one Raft entry (the replica's write path).

The Raft thread hands the commands that arrived since its last tick to the
engine as one framed entry (``raftcoord.proposals.encode_batch``): one
pickle, one encryption, one journal write and one message per peer for the
lot. Each command keeps its own result, its order and its at-most-once
request id. These tests hold the Raft thread still while proposers queue up,
so that what shares an entry is decided by the test, not by timing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.config import FAIL_REASON
from replica_support import free_port, put, put_keys, wait_for
from test_replica import FAST, Cluster, cluster, converged, leader_of, session, snap, subclass_store  # noqa: F401

from raftcoord.errors import InvalidInputError
from raftcoord.proposals import BATCH_MAGIC, decode_batch, encode_batch
from raftcoord.replica import Replica, ReplicaSettings
from raftcoord.store import Store
from raftcoord.values import encode_cbor


@contextlib.contextmanager
def raft_thread_held(r: Replica) -> Iterator[None]:
    """Keep the Raft thread of ``r`` busy (between ticks) until the block ends."""
    inside, gate = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        gate.wait(30)

    t = threading.Thread(target=r._on_raft_thread, args=(hold, 40), daemon=True)
    t.start()
    assert inside.wait(5), "the raft thread did not run the hold task"
    try:
        yield
    finally:
        gate.set()
        t.join(10)


class Submissions:
    """Counts the attempts proposers hand over (the Proposer's ``submit``)."""

    def __init__(self, r: Replica) -> None:
        self.real = r._proposer._submit
        self.lock = threading.Lock()
        self.count = 0
        r._proposer._submit = self  # type: ignore[method-assign]

    def __call__(self, command: bytes, callback: Any) -> None:
        self.real(command, callback)
        with self.lock:
            self.count += 1


class Entries:
    """Stands in for ``engine.apply``: records each Raft entry, loses the answers of chosen ones."""

    def __init__(self, r: Replica, lose: int = 0) -> None:
        self.real = r._engine.apply
        self.sent: list[bytes] = []
        self.lose = lose
        r._engine.apply = self  # type: ignore[method-assign]

    def __call__(self, entry: bytes, callback: Any) -> None:
        self.sent.append(entry)
        if self.lose:
            self.lose -= 1
            self.real(entry, callback=lambda res, err: None)  # applied, the answer never comes (hazard 10)
        else:
            self.real(entry, callback=callback)


def propose_in_order(r: Replica, commands: list[bytes], subs: Submissions, timeout: float = 10.0,
                     ) -> tuple[list[threading.Thread], dict[int, Any]]:
    """Start one proposer per command, each once the previous one handed its command over."""
    results: dict[int, Any] = {}

    def one(i: int, cmd: bytes) -> None:
        try:
            results[i] = r.propose(cmd, timeout)
        except Exception as exc:  # noqa: BLE001 - checked by the test
            results[i] = exc

    threads = []
    for i, cmd in enumerate(commands):
        before = subs.count
        t = threading.Thread(target=one, args=(i, cmd), daemon=True)
        t.start()
        threads.append(t)
        wait_for(lambda b=before: subs.count > b, 5, f"proposal {i} handed over")
    return threads, results


def last_index(r: Replica) -> int:
    return r._on_raft_thread(lambda: r._engine.rc_last_entry()[0])


def test_issue9_concurrent_proposals_share_one_raft_entry(cluster: Cluster) -> None:
    """Twenty proposals that arrive during one tick become one log entry, each with its own result."""
    (r,) = cluster.start(1)
    r.propose(put(b"warm", b"up"), 5)
    subs, entries = Submissions(r), Entries(r)
    first = last_index(r)
    with raft_thread_held(r):
        threads, results = propose_in_order(r, [put(b"k%02d" % i, b"v") for i in range(20)], subs)
    for t in threads:
        t.join(10)
    assert [results[i] for i in range(20)] == [{"ok": True, "revision": 3 + i} for i in range(20)]
    assert len(entries.sent) == 1 and decode_batch(entries.sent[0]) is not None
    assert last_index(r) == first + 1


def test_issue9_a_batch_keeps_order_and_per_command_results_on_every_replica(cluster: Cluster) -> None:
    """Through a follower: commands apply in the order proposed, a refused one answers only its proposer."""
    logs: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    addrs = cluster.addresses(3)
    rs = [cluster.replica(a, addrs, on_applied=lambda ap, i=i: logs[i].extend(put_keys(ap)))
          for i, a in enumerate(addrs)]
    leader = leader_of(rs)
    follower = next(r for r in rs if r is not leader)
    follower.propose(put(b"warm", b"up"), 5)
    converged(rs)
    for log in logs.values():
        log.clear()
    commands = [put(b"k%d" % i, b"v%d" % i) for i in range(8)]
    commands[3] = put(b"N\x11reserved", b"x")  # refused by the store: node records have their own API
    subs, entries = Submissions(follower), Entries(follower)
    with raft_thread_held(follower):
        threads, results = propose_in_order(follower, commands, subs)
    for t in threads:
        t.join(10)
    assert len(entries.sent) == 1
    assert [results[i]["ok"] for i in range(8)] == [True, True, True, False, True, True, True, True]
    assert results[3]["error"]["code"] == "reserved_key"
    revisions = [results[i]["revision"] for i in range(8) if i != 3]
    assert revisions == list(range(revisions[0], revisions[0] + 7))
    assert results[3]["revision"] == results[2]["revision"]  # refused: the revision as it stood
    converged(rs)
    expected = [b"k%d" % i for i in range(8) if i != 3]
    assert logs[0] == logs[1] == logs[2] == expected


def test_issue9_a_batch_over_the_bounds_is_split(cluster: Cluster) -> None:
    """Entries hold at most batch_max_commands commands and batch_max_bytes bytes; a big command goes alone."""
    settings = ReplicaSettings(batch_max_commands=4, batch_max_bytes=1000)
    (r,) = cluster.start(1, settings=settings)
    r.propose(put(b"warm", b"up"), 5)
    small = [put(b"s%d" % i, b"v") for i in range(6)]
    medium = [put(b"m%d" % i, bytes(300)) for i in range(4)]
    big = put(b"big", bytes(5000))
    subs, entries = Submissions(r), Entries(r)
    with raft_thread_held(r):
        threads, results = propose_in_order(r, [*small, *medium, big], subs)
    for t in threads:
        t.join(10)
    assert all(results[i]["ok"] for i in range(11))
    batches = [decode_batch(e) for e in entries.sent]
    assert [len(b) if b is not None else 1 for b in batches] == [4, 4, 2, 1]  # count, bytes, bytes, alone
    assert entries.sent[-1] == big  # alone, and as a plain command
    for e, b in zip(entries.sent, batches):
        if b is not None:
            assert len(e) <= 1000 and len(b) <= 4
    flat = [c for e, b in zip(entries.sent, batches) for c in (b if b is not None else [e])]
    assert flat == [*small, *medium, big]


def test_issue9_retries_of_a_lost_batch_apply_at_most_once(cluster: Cluster) -> None:
    """Hazards 4 and 10: a batch whose answer is lost is proposed again; sessions apply each command once."""
    seen: list[bytes] = []
    (r,) = cluster.start(1, on_applied=lambda ap: seen.extend(put_keys(ap)),
                         settings=ReplicaSettings(retry_interval=0.3))
    r.propose(put(b"warm", b"up"), 5)
    client = session(r)
    # Five requests of one session in flight at once: the lowest outstanding is 1 for all.
    commands = [encode_cbor({"op": "put", "key": b"k%d" % i, "value": b"v", "req": [client, i + 1, 1]})
                for i in range(5)]
    subs, entries = Submissions(r), Entries(r, lose=1)
    with raft_thread_held(r):
        threads, results = propose_in_order(r, commands, subs)
    for t in threads:
        t.join(10)
    assert decode_batch(entries.sent[0]) == commands  # one entry, its answer lost
    assert len(entries.sent) >= 2  # ...and proposed again
    assert [results[i] for i in range(5)] == [{"ok": True, "revision": 3 + i} for i in range(5)]
    assert sorted(seen) == sorted([b"warm", *(b"k%d" % i for i in range(5))])
    assert r.read(lambda s: s.revision, consistency="serializable") == 7


def test_issue9_each_command_of_a_batch_is_applied_alone(cluster: Cluster) -> None:
    """Hazard 7 per command: one command that breaks the store, one that is not CBOR; the others apply."""
    boom = put(b"boom", b"!")

    def apply(self: Store, command: bytes) -> Any:
        if command == boom:
            raise RuntimeError("bug in the store")
        return Store.apply(self, command)

    rs = cluster.start(3, state_machine=subclass_store(apply=apply))
    leader = leader_of(rs)
    leader.propose(put(b"warm", b"up"), 5)
    entry = encode_batch([put(b"a", b"1"), boom, b"\xa1\x00not cbor", put(b"b", b"2")])
    done = threading.Event()
    answer: list[Any] = []
    leader._engine.apply(entry, callback=lambda res, err: (answer.append((res, err)), done.set()))
    assert done.wait(5)
    res, err = answer[0]
    assert err == FAIL_REASON.SUCCESS and isinstance(res, list) and len(res) == 4
    assert [x["ok"] for x in res] == [True, False, False, True]
    assert res[1]["error"]["code"] == "internal"
    assert leader.propose(put(b"after", b"1"), 5)["ok"]
    converged(rs)


def test_issue9_a_malformed_batch_entry_changes_nothing(cluster: Cluster) -> None:
    """A frame that does not parse is one refused command: an error result, the state as it was."""
    (r,) = cluster.start(1)
    r.propose(put(b"warm", b"up"), 5)
    before = snap(r)
    for bad in (BATCH_MAGIC, BATCH_MAGIC + b"\x00\x00\x00\x02\x00\x00\x00\x01x",
                encode_batch([put(b"a", b"1")]) + b"trailing"):
        assert decode_batch(bad) is None
        result = r._on_raft_thread(lambda bad=bad: r._apply(bad))
        assert isinstance(result, dict) and result["ok"] is False
        assert r.read(lambda s: s.get(b"a"), consistency="serializable") is None
    after = snap(r)
    assert Store.restore(after).revision == Store.restore(before).revision
    assert r.propose(put(b"after", b"1"), 5)["ok"]


def test_issue9_a_command_that_looks_like_a_batch_is_refused(cluster: Cluster) -> None:
    """No proposer can hand in a frame of its own: a command starting with the batch marker is refused."""
    (r,) = cluster.start(1)
    with pytest.raises(InvalidInputError):
        r.propose(encode_batch([put(b"a", b"1")]), 1)


def test_issue9_a_journal_of_unbatched_entries_still_replays(tmp_path: Path) -> None:
    """A journal written before batching (one command per entry), then batches, replays to the same state."""
    addr = f"127.0.0.1:{free_port()}"
    with Replica(addr, [], tmp_path, password=None) as r:
        wait_for(lambda: r.status()["role"] == "leader", 5, "leadership")
        done = threading.Semaphore(0)
        for i in range(5):  # the write path before issue 9: each command its own entry
            r._engine.apply(put(b"old%d" % i, b"v"), callback=lambda res, err: done.release())
        for _ in range(5):
            assert done.acquire(timeout=5)
        subs, entries = Submissions(r), Entries(r)
        with raft_thread_held(r):
            threads, results = propose_in_order(r, [put(b"new%d" % i, b"v") for i in range(5)], subs)
        for t in threads:
            t.join(10)
        assert len(entries.sent) == 1 and all(results[i]["ok"] for i in range(5))
        before = snap(r)
    assert not (tmp_path / "raft.snapshot").exists()  # the journal alone carries the state
    with Replica(addr, [], tmp_path, password=None) as r:
        wait_for(lambda: snap(r) == before, 10, "every write back from the journal")
        assert Store.restore(snap(r)).get(b"old4") is not None


def test_issue9_batching_off_keeps_one_command_per_entry(cluster: Cluster) -> None:
    """batch_max_commands=1 writes entries as before issue 9 (for a cluster with older members)."""
    (r,) = cluster.start(1, settings=ReplicaSettings(batch_max_commands=1))
    r.propose(put(b"warm", b"up"), 5)
    subs, entries = Submissions(r), Entries(r)
    with raft_thread_held(r):
        threads, results = propose_in_order(r, [put(b"k%d" % i, b"v") for i in range(4)], subs)
    for t in threads:
        t.join(10)
    assert entries.sent == [put(b"k%d" % i, b"v") for i in range(4)]
    assert all(results[i]["ok"] for i in range(4))


def test_issue9_compaction_counts_commands_not_entries(tmp_path: Path) -> None:
    """A snapshot follows compaction_entries commands even when batches put them in a few entries.

    Counting entries, a log of batches would grow up to batch_max_commands
    times longer between snapshots, and a restart would replay all of it.
    """
    settings = ReplicaSettings(compaction_entries=20)
    with Replica(f"127.0.0.1:{free_port()}", [], tmp_path, password=None, settings=settings) as r:
        wait_for(lambda: r.status()["role"] == "leader", 5, "leadership")
        subs, entries = Submissions(r), Entries(r)
        for round_ in range(2):
            with raft_thread_held(r):
                threads, results = propose_in_order(r, [put(b"k%d-%d" % (round_, i), b"v") for i in range(15)],
                                                    subs)
            for t in threads:
                t.join(10)
        assert len(entries.sent) == 2
        wait_for((tmp_path / "raft.snapshot").exists, 5, "a snapshot after 30 commands in 2 entries")


def test_issue9_peer_messages_are_framed_without_deflate(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peer messages skip pysyncobj's per-message deflate (tens of us each), and still decode as zlib.

    Set up before the cluster starts, so every connection is counted.
    """
    import pysyncobj.tcp_connection as tcp_connection

    calls = [0]
    real = tcp_connection.zlib.compress

    class CountingZlib:
        decompress = staticmethod(tcp_connection.zlib.decompress)

        @staticmethod
        def compress(data: bytes, level: int = -1) -> bytes:
            calls[0] += 1
            return real(data, level)

    monkeypatch.setattr(tcp_connection, "zlib", CountingZlib)
    addrs = cluster.addresses(3)
    rs = [cluster.replica(a, addrs, password="a secret") for a in addrs]
    learner = cluster.replica(None, addrs, password="a secret")  # a non-voter dials the voters
    leader = leader_of(rs)
    for i in range(5):
        assert leader.propose(put(b"k%d" % i, b"v"), 5)["ok"]
    assert learner.propose(put(b"from-learner", b"v"), 5)["ok"]
    converged([*rs, learner])
    assert calls[0] == 0


@pytest.mark.parametrize("size", [0, 1, 500, 65535, 65536, 200001])
def test_issue9_stored_zlib_frames_decode_with_zlib(size: int) -> None:
    """The uncompressed frame is a valid zlib stream, so a peer that still deflates reads ours and we read its."""
    import os
    import zlib

    from raftcoord.engine import stored_zlib

    data = os.urandom(size)
    assert zlib.decompress(stored_zlib(data)) == data
