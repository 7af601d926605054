"""Issue 8, item 1: every observer gets every message, in clock order, once.

The three defects found in review each have a regression test here
(``test_issue8_1a_...``, ``1b``, ``1c``), written against the code before the
fix and seen to fail there. The replicas run in this process (real pysyncobj
engines on 127.0.0.1), as in ``test_replica.py``; the multi-process cases
(kill, restart, pause past compaction) are in ``test_issue8_cluster.py``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from replica_support import free_port, wait_for
from replica_support.proxy import FaultProxy

import raftcoord.replica as replica_mod
from raftcoord.coordinator import Coordinator
from raftcoord.errors import CompactedError
from raftcoord.replica import Replica, ReplicaSettings
from raftcoord.values import Message

QUICK = dict(heartbeat_period=0.05, connection_retry=0.1, connection_timeout=1.0, retry_interval=2.0)


def clocks(messages: list[Message]) -> list[int]:
    return [m.clock for m in messages]  # type: ignore[misc]


# ------------------------------------------------------------------ 1a


def test_issue8_1a_snapshot_installed_messages_are_delivered(tmp_path: Path) -> None:
    """A follower that installs the leader's snapshot delivers the messages inside it.

    The follower is reachable only through a proxy; it is cut off while the
    leader commits and compacts past it, then healed, so it catches up by
    installing a snapshot. Before the fix its observer got none of the
    messages in that snapshot (and its clock never merged theirs).
    """
    ports = sorted((free_port() for _ in range(3)), key=lambda p: f"127.0.0.1:{p}")
    addrs = [f"127.0.0.1:{p}" for p in ports]
    real = free_port()
    proxy = FaultProxy(ports[0], real)  # the lowest address only accepts connections: all through the proxy
    restored: list[int] = []
    made: list[Any] = []
    try:
        follower = Replica(addrs[0], addrs[1:], tmp_path / "f", password=None, bind_address=f"127.0.0.1:{real}",
                           on_restored=lambda: restored.append(1),
                           settings=ReplicaSettings(election_timeout_min=3.0, election_timeout_max=4.0,
                                                    compaction_entries=10, **{**QUICK, "connection_timeout": 4.0}))
        made.append(follower)
        for i, a in enumerate(addrs[1:]):
            made.append(Replica(a, [x for x in addrs if x != a], tmp_path / f"r{i}", password=None,
                                settings=ReplicaSettings(election_timeout_min=0.3, election_timeout_max=0.6,
                                                         compaction_entries=10, **{**QUICK, "connection_timeout": 4.0})))
        watcher = Coordinator(follower, host="watcher", timeout=10)
        poster = Coordinator(made[1], host="poster", timeout=10)
        made[:0] = [watcher, poster]
        got: list[Message] = []
        watcher.add_observer(got.append)
        first = poster.post_message("U", payload=0)
        wait_for(lambda: len(got) == 1, 10, "the first message on the follower")

        proxy.cut()
        sent = [first] + [poster.post_message("U", payload=i) for i in range(1, 60)]
        proxy.heal()
        wait_for(lambda: restored, 20, "the follower to install a snapshot")
        wait_for(lambda: len(got) >= len(sent), 20, f"every message on the follower (got {len(got)})")
        time.sleep(0.2)
        assert clocks(got) == clocks(sent)
        assert watcher.clock > sent[-1].clock  # the follower's Lamport clock merged the snapshot's messages
    finally:
        for m in made:
            m.close()
        proxy.close()


# ------------------------------------------------------------------ 1b


def test_issue8_1b_observer_added_with_since_gets_its_backlog_first() -> None:
    """The review's case: A blocked on clock 2, clock 4 posted, B added with since=0 gets 2 then 4.

    Before the fix B received [4] and never 2: the delivery loop picked its
    targets when it delivered the queued live message, not when it queued it.
    """
    coord = Coordinator.memory("n1")
    try:
        release = threading.Event()
        got_a: list[Message] = []
        got_b: list[Message] = []

        def slow(m: Message) -> None:
            got_a.append(m)
            release.wait(10)

        coord.add_observer(slow, include_own=True)
        m1 = coord.post_message("U", payload=1)
        wait_for(lambda: got_a, 5, "A to block on the first message")
        m2 = coord.post_message("U", payload=2)
        coord.add_observer(got_b.append, since=0, include_own=True)
        release.set()
        wait_for(lambda: len(got_a) == 2 and len(got_b) >= 2, 5, "both observers to get both messages")
        time.sleep(0.05)
        assert clocks(got_b) == [m1.clock, m2.clock]
        assert clocks(got_a) == [m1.clock, m2.clock]
    finally:
        coord.close()


def test_a_blocked_observer_holds_back_only_itself() -> None:
    """One callback that never returns does not delay another observer."""
    coord = Coordinator.memory("n1")
    release = threading.Event()
    try:
        coord.add_observer(lambda m: release.wait(10), include_own=True)
        got: list[Message] = []
        coord.add_observer(got.append, include_own=True)
        posted = [coord.post_message("U", payload=i) for i in range(5)]
        wait_for(lambda: len(got) == 5, 5, "the free observer's messages")
        assert clocks(got) == clocks(posted)
    finally:
        release.set()
        coord.close()


def test_an_observer_may_post_from_its_callback() -> None:
    """A callback that posts (a reply) neither deadlocks nor loses messages."""
    coord = Coordinator.memory("n1")
    try:
        got: list[Message] = []

        def reply(m: Message) -> None:
            got.append(m)
            if m.payload < 5:
                coord.post_message("U", payload=m.payload + 1)

        coord.add_observer(reply, include_own=True)
        coord.post_message("U", payload=0)
        wait_for(lambda: len(got) == 6, 5, "the chain of replies")
        assert [m.payload for m in got] == [0, 1, 2, 3, 4, 5]
    finally:
        coord.close()


def test_an_observer_passed_by_retention_gets_compacted_and_stops() -> None:
    """A slow observer whose next message was purged gets CompactedError once, naming the oldest kept."""
    coord = Coordinator.memory("n1")
    release = threading.Event()
    try:
        got: list[Message] = []
        errors: list[BaseException] = []

        def slow(m: Message) -> None:
            got.append(m)
            release.wait(10)

        obs = coord.add_observer(slow, include_own=True, on_error=errors.append)
        posted = [coord.post_message("U", payload=0)]
        wait_for(lambda: got, 5, "the first delivery")
        posted += [coord.post_message("U", payload=i) for i in range(1, 10)]
        assert coord.purge_messages(max_count=3) == 7
        release.set()
        wait_for(lambda: errors, 5, "the compacted error")
        assert isinstance(errors[0], CompactedError) and obs.error is errors[0]
        assert errors[0].oldest_clock == posted[7].clock
        assert obs.closed
        assert clocks(got) == [posted[0].clock]  # it never skipped silently to the kept messages
        with pytest.raises(CompactedError):
            coord.add_observer(got.append, since=obs.last_clock, include_own=True)
        coord.add_observer(got.append, since=errors[0].oldest_clock - 1, include_own=True)
        wait_for(lambda: len(got) == 4, 5, "the resumed observer")
        assert clocks(got[1:]) == clocks(posted[7:])
    finally:
        release.set()
        coord.close()


# ------------------------------------------------------------------ 1c


def test_issue8_1c_a_restarted_replica_serves_its_snapshot_before_its_first_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads and observers registered right after open see the snapshot's state, not an empty store.

    Before the fix the snapshot was loaded on the Raft thread's first tick,
    after the replica was open: a serializable read in that window saw an
    empty store and floor 0, and the store was then swapped without notice.
    The first tick is held back here to make the window certain.
    """
    settings = ReplicaSettings(compaction_entries=5, election_timeout_min=0.3, election_timeout_max=0.6, **QUICK)
    addr = f"127.0.0.1:{free_port()}"
    with Coordinator(Replica(addr, [], tmp_path, password=None, settings=settings), host="n1") as coord:
        posted = [coord.post_message("U", payload=i) for i in range(23)]
        wait_for((tmp_path / "raft.snapshot").exists, 5, "a snapshot")

    hold = threading.Event()
    run = replica_mod.Replica._run

    def held_run(self: Replica) -> None:
        hold.wait(10)
        run(self)

    monkeypatch.setattr(replica_mod.Replica, "_run", held_run)
    try:
        with Coordinator(Replica(addr, [], tmp_path, password=None, settings=settings), host="n1") as coord:
            seen = coord.messages(consistency="serializable")
            in_snapshot = len(seen)
            assert in_snapshot > 0, "the snapshot's messages are not served before the first tick"
            assert clocks(seen) == clocks(posted[:in_snapshot])
            assert coord.clock >= seen[-1].clock
            got: list[Message] = []
            coord.add_observer(got.append, since=posted[0].clock - 1, include_own=True)
            hold.set()
            wait_for(lambda: len(got) == len(posted), 10, "the snapshot's and the journal's messages")
            time.sleep(0.2)
            assert clocks(got) == clocks(posted)
    finally:
        hold.set()


def test_messages_are_read_in_steps_with_no_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long message list is read a page at a time and comes back whole, in order."""
    import raftcoord.coordinator as coordinator_mod

    monkeypatch.setattr(coordinator_mod, "MESSAGE_PAGE", 7)
    coord = Coordinator.memory("n1")
    try:
        posted = [coord.post_message("U", payload=i) for i in range(30)]
        assert clocks(coord.messages()) == clocks(posted)
        assert clocks(coord.messages(since=posted[9].clock)) == clocks(posted[10:])
        assert coord.messages(since=posted[-1].clock) == []
    finally:
        coord.close()


def test_followers_learn_a_commit_before_the_leader_applies_it(tmp_path: Path) -> None:
    """The leader sends the new commit index before its own apply, so followers do not trail by it.

    The leader's store takes 0.6 s to apply a marked command; a follower must
    have applied it while the leader is still busy. Before the change the
    commit went out only after the leader's apply: the followers had it
    0.6 s later.
    """
    from raftcoord.store import Store

    busy: dict[str, Any] = {"addr": None}

    def make_store(addr: str) -> type[Store]:
        class SlowOnLeader(Store):
            def apply(self, command: bytes) -> Any:
                if b"slow-marker" in command and busy["addr"] == addr:
                    time.sleep(0.6)
                return super().apply(command)
        return SlowOnLeader

    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    # Elections slower than the leader's apply: no new leader may carry the commit instead.
    settings = ReplicaSettings(election_timeout_min=1.5, election_timeout_max=2.0,
                               **{**QUICK, "connection_timeout": 2.0})
    applied_at: dict[str, float] = {}
    rs = []
    try:
        for i, a in enumerate(addrs):
            def seen(applied: Any, a: str = a) -> None:
                if b"slow-marker" in repr(applied.result).encode() or any(
                        getattr(getattr(e, "kv", None), "key", b"") == b"slow-marker" for e in applied.events):
                    applied_at.setdefault(a, time.monotonic())
            rs.append(Replica(a, [x for x in addrs if x != a], tmp_path / f"r{i}", password=None,
                              settings=settings, state_machine=make_store(a), on_applied=seen))
        leader = wait_for(lambda: next((r for r in rs if r.status()["role"] == "leader"), None), 10, "a leader")
        busy["addr"] = leader.self_address
        from raftcoord.values import encode_cbor
        sent = time.monotonic()
        threading.Thread(target=leader.propose, args=(encode_cbor(
            {"op": "put", "key": b"slow-marker", "value": b"v"}), 10), daemon=True).start()
        wait_for(lambda: len(applied_at) == 3, 10, "every replica to apply the marker")
        followers = [a for a in addrs if a != leader.self_address]
        assert max(applied_at[a] for a in followers) - sent < 0.3, "a follower waited for the leader's apply"
        assert applied_at[leader.self_address] - sent >= 0.6
    finally:
        for r in rs:
            r.close()


def test_issue8_a_snapshot_slower_than_the_connection_timeout_still_installs(tmp_path: Path) -> None:
    """A follower catching up by a snapshot that takes longer to send than the connection timeout.

    Found while this issue's watch history made snapshots twice as large: a
    follower answers nothing until the last chunk, so the leader read nothing
    from it for the whole transfer, dropped the connection after its
    connection timeout and started the snapshot again, for ever. Before the
    fix the follower here never caught up (the transfer takes about 3 s, the
    leader's connection timeout is 1 s).
    """
    ports = sorted((free_port() for _ in range(3)), key=lambda p: f"127.0.0.1:{p}")
    addrs = [f"127.0.0.1:{p}" for p in ports]
    real = free_port()
    proxy = FaultProxy(ports[0], real)
    made: list[Any] = []
    try:
        follower = Replica(addrs[0], addrs[1:], tmp_path / "f", password=None, bind_address=f"127.0.0.1:{real}",
                           settings=ReplicaSettings(election_timeout_min=30.0, election_timeout_max=40.0,
                                                    compaction_entries=5, **{**QUICK, "connection_timeout": 40.0}))
        made.append(follower)
        for i, a in enumerate(addrs[1:]):
            made.append(Replica(a, [x for x in addrs if x != a], tmp_path / f"r{i}", password=None,
                                settings=ReplicaSettings(election_timeout_min=0.3, election_timeout_max=0.6,
                                                         compaction_entries=5, **QUICK)))
        leader = wait_for(lambda: next((r for r in made[1:] if r.status()["role"] == "leader"), None), 10, "a leader")
        from raftcoord.values import encode_cbor
        proxy.cut()
        for i in range(20):  # about 800 kB of state and as much of history
            leader.propose(encode_cbor({"op": "put", "key": b"big%d" % i, "value": os.urandom(40000)}), 10)
        proxy.heal(bytes_per_second=5e5)
        want = leader.status()["last_applied"]
        wait_for(lambda: follower.status()["last_applied"] >= want, 40, "the follower to install the snapshot")
    finally:
        for m in made:
            m.close()
        proxy.close()
