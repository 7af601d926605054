"""The guarded engine at unit level: one Engine fed messages from a pretend leader.

The engine does not tick on its own (``autoTick=False``); a test hands it
``append_entries`` messages exactly as pysyncobj 0.3.17's leader builds them
and records what it answers. Each test is named after the defect of issue 6
it pins (``d<n>``) and fails with the guard taken out.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pysyncobj.serializer
import pytest
from pysyncobj import SyncObjConf
from pysyncobj.journal import FileJournal
from pysyncobj.transport import TCPTransport
from replica_support import free_port, wait_for

from raftcoord.engine import Engine
from raftcoord.raftfiles import Dump, FlushedJournal, encode_dump

BATCH = 2**16  # pysyncobj's appendEntriesBatchSizeBytes
NO_OP = b"\x01"  # a command pysyncobj skips when applying

Entry = tuple[bytes, int, int]


def snapshot_chunks(*, split: int = 3) -> list[tuple[bytes, bool, bool]]:
    """A well-formed snapshot file as pysyncobj's leader streams it: (data, is_first, is_last) chunks."""
    data = encode_dump(Dump((NO_OP, 5, 1), (NO_OP, 4, 1), (), b"a store's snapshot"))
    step = -(-len(data) // split)
    chunks = [(data[i:i + step], i == 0, False) for i in range(0, len(data), step)]
    return [*chunks, (b"", False, True)]


class Follower:
    """An Engine that only hears a pretend leader and records its own answers."""

    def __init__(self, tmp: Path, *, deserializer: Callable[[str], Any] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.me, self.leader_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        conf = SyncObjConf(autoTick=False, raftMinTimeout=100, raftMaxTimeout=200, connectionTimeout=300,
                           connectionRetryTime=100)
        if deserializer is not None:
            conf.fullDumpFile = str(tmp / "raft.snapshot")
            conf.serializer = lambda path, data: None
            conf.deserializer = deserializer
        kwargs = {} if on_fatal is None else {"on_fatal": on_fatal}
        self.engine = Engine(self.me, [self.leader_address], conf, self._apply, **kwargs)
        self.transport = self.engine._SyncObj__transport
        self.transport.rc_test_sent = []
        self.leader = next(iter(self.engine.otherNodes))
        self.applied: list[bytes] = []

    def _apply(self, command: bytes) -> dict[str, Any]:
        self.applied.append(command)
        return {"ok": True}

    @property
    def sent(self) -> list[dict[str, Any]]:
        return self.transport.rc_test_sent

    def deliver(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Hand ``message`` to the engine as the leader's; return what it answered."""
        before = len(self.sent)
        self.transport._onMessageReceived(self.leader, message)
        return self.sent[before:]

    def append(self, prev: tuple[int, int], entries: list[Entry], *, term: int, commit: int) -> list[dict[str, Any]]:
        return self.deliver({"type": "append_entries", "term": term, "commit_index": commit,
                             "entries": entries, "prevLogIdx": prev[0], "prevLogTerm": prev[1]})

    def log(self) -> list[Entry]:
        journal = self.engine._SyncObj__raftLog
        return [journal[i] for i in range(len(journal))]

    def close(self) -> None:
        self.engine.destroy()


@pytest.fixture
def follower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Follower]]:
    """Makes Followers; their network sends are recorded, never made."""

    def record(transport: Any, node: Any, message: Any) -> bool:
        getattr(transport, "rc_test_sent", []).append(message)
        return True

    monkeypatch.setattr(TCPTransport, "send", record)
    made: list[Follower] = []

    def make(**kwargs: Any) -> Follower:
        f = Follower(tmp_path, **kwargs)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def leader_chunks(entry: Entry, prev: tuple[int, int], *, term: int, commit: int) -> list[dict[str, Any]]:
    """The messages pysyncobj 0.3.17's leader sends for one entry of 64 KiB or more (its loop, verbatim)."""
    data = pickle.dumps(entry, 2)
    out = []
    for pos in range(0, len(data), BATCH):
        if pos == 0:
            kind = "start"
        elif pos + BATCH >= len(entry[0]):  # the flaw: the command's length, not the pickle's
            kind = "finish"
        else:
            kind = "process"
        out.append({"type": "append_entries", "transmission": kind, "data": data[pos:pos + BATCH], "term": term,
                    "commit_index": commit, "prevLogIdx": prev[0], "prevLogTerm": prev[1]})
    return out


class PretendLeader:
    """pysyncobj's leader bookkeeping for one follower: pipelined batches, answers applied later."""

    def __init__(self, log: list[Entry], term: int, commit: int, batch: int) -> None:
        self.log, self.term, self.commit, self.batch = log, term, commit, batch
        self.next = log[-1][1] + 1  # what a new leader starts with
        self.match = 0

    def entry(self, idx: int) -> Entry:
        return self.log[idx - self.log[0][1]]

    def round(self, f: Follower) -> None:
        """One append round: every batch from ``next`` on, sent without waiting; then the answers."""
        answers = []
        first = True
        while self.next <= self.log[-1][1] or first:
            first = False
            entries = [self.entry(i) for i in range(self.next, min(self.next + self.batch, self.log[-1][1] + 1))]
            prev = self.entry(self.next - 1)
            answers += f.append((prev[1], prev[2]), entries, term=self.term, commit=self.commit)
            if entries:
                self.next = entries[-1][1] + 1  # optimistic, as pysyncobj's __sendAppendEntries
        for a in answers:  # as pysyncobj's handling of next_node_idx
            if a["reset"]:
                self.next = a["next_node_idx"]
            if a["success"] and self.match < a["next_node_idx"] - 1:
                self.match, self.next = a["next_node_idx"] - 1, a["next_node_idx"]


# ------------------------------------------------------------------ d4


def test_issue6_d4_a_diverged_follower_is_reached_despite_pipelined_batches(follower: Callable[..., Follower]) -> None:
    """d4: an old leader holding uncommitted entries of its term catches up with a pipelining new leader."""
    f = follower()
    old = [(NO_OP, i, 1) for i in range(2, 11)]
    f.append((1, 0), old, term=1, commit=5)  # 2..5 committed, 6..10 only ever on this node
    new_log = [(NO_OP, 1, 0), *old[:4], *[(NO_OP, i, 2) for i in range(6, 41)]]
    leader = PretendLeader(new_log, term=2, commit=40, batch=8)
    for _ in range(5):
        leader.round(f)
        if f.log() == new_log:
            break
    assert f.log() == new_log, f"stuck at next index {leader.next}, log ends {f.log()[-1][1:]}"


def test_issue6_d4_a_refusal_never_points_before_the_shared_prefix(follower: Callable[..., Follower]) -> None:
    """d4: a refused append is answered with the index after the commit point, not past this log's end."""
    f = follower()
    f.append((1, 0), [(NO_OP, i, 1) for i in range(2, 11)], term=1, commit=5)
    past_end = f.append((30, 2), [(NO_OP, 31, 2)], term=2, commit=40)
    mismatch = f.append((8, 2), [(NO_OP, 9, 2)], term=2, commit=40)
    assert [(a["next_node_idx"], a["reset"], a["success"]) for a in past_end + mismatch] == [(6, True, False)] * 2
    # A log that ends in the leader's own term is all the leader's: pysyncobj's answer stands.
    f.append((5, 1), [(NO_OP, 6, 2)], term=2, commit=5)
    assert [a["next_node_idx"] for a in f.append((30, 2), [], term=2, commit=5)] == [7]


# ------------------------------------------------------------------ d8


def test_issue6_d8_a_snapshot_that_fails_to_load_is_never_acknowledged(
        follower: Callable[..., Follower], caplog: pytest.LogCaptureFixture) -> None:
    """d8: the follower does not ack a snapshot it cannot load; on_fatal fires; it answers nobody after."""
    fatal: list[str] = []

    def broken_reader(path: str) -> Any:
        raise ValueError("not a snapshot")  # e.g. the store cannot restore the state it holds

    f = follower(deserializer=broken_reader, on_fatal=fatal.append)
    f.append((1, 0), [(NO_OP, 2, 1), (NO_OP, 3, 1)], term=1, commit=3)
    answers = []
    for chunk in snapshot_chunks():
        answers += f.deliver({"type": "append_entries", "term": 2, "commit_index": 50, "serialized": chunk})
    assert not [a for a in answers if a.get("success")]
    assert len(fatal) == 1 and "not a snapshot" in fatal[0]
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    assert f.append((3, 1), [(NO_OP, 4, 2)], term=2, commit=4) == []
    assert f.log()[-1][1] == 3
    assert f.engine.rc_failed


def test_issue6_d8_without_on_fatal_the_failure_is_logged_critical(
        follower: Callable[..., Follower], caplog: pytest.LogCaptureFixture) -> None:
    """d8: with no on_fatal callback the engine still stops, with a CRITICAL line naming the cause."""

    def broken_reader(path: str) -> Any:
        raise ValueError("not a snapshot")

    f = follower(deserializer=broken_reader)
    answers = []
    for chunk in snapshot_chunks():
        answers += f.deliver({"type": "append_entries", "term": 2, "commit_index": 50, "serialized": chunk})
    assert not [a for a in answers if a.get("success")]
    assert [r for r in caplog.records if r.levelno == logging.CRITICAL and "not a snapshot" in r.getMessage()]


# ------------------------------------------------------------------ d14


class FileOps:
    """Records fsyncs (by path) and renames, in order, while still doing them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ops: list[tuple[str, ...]] = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd: int) -> None:
            self.ops.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(src: Any, dst: Any, real: Callable[..., Any] = real_rename, **kw: Any) -> None:
            self.ops.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            real(src, dst, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", lambda s, d, **kw: rename(s, d, real_replace, **kw))
        monkeypatch.setattr(pysyncobj.serializer, "atomicReplace", rename)

    def check_durable_replace(self, target: Path) -> None:
        """The file renamed onto ``target`` was fsync'ed before, and its directory after."""
        target = target.resolve()
        renames = [i for i, op in enumerate(self.ops) if op[0] == "rename" and op[2] == str(target)]
        assert renames, f"nothing was renamed onto {target}: {self.ops}"
        for i in renames:
            src = self.ops[i][1]
            assert ("fsync", src) in self.ops[:i], f"{src} renamed before it was synced: {self.ops}"
            assert ("fsync", str(target.parent)) in self.ops[i + 1:], f"directory not synced after: {self.ops}"


def test_issue6_d14_the_term_and_vote_file_is_synced_before_it_is_renamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """d14: fsync=True writes term/vote (and commit index) as temp file, fsync, rename, fsync of the directory."""
    path = tmp_path / "raft.journal"
    journal = FlushedJournal(FileJournal(str(path)), Path(str(path) + ".meta"))
    ops = FileOps(monkeypatch)
    journal.setCurrentTerm(7, "127.0.0.1:1")
    ops.check_durable_replace(Path(str(path) + ".meta"))
    ops.ops.clear()
    journal.setRaftCommitIndex(12)
    journal.onOneSecondTimer()  # pysyncobj's once-a-second rewrite of the same file
    ops.check_durable_replace(Path(str(path) + ".meta"))
    journal._destroy()
    reread = FileJournal(str(path))
    assert (reread.getCurrentTerm(), reread.getVotedForNodeId(), reread.getRaftCommitIndex()) == (7, "127.0.0.1:1", 12)
    reread._destroy()


def test_issue6_d14_trimming_the_journal_after_a_snapshot_replaces_it_durably(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """d14: fsync=True trims the journal into a new synced file renamed over the old, never rewriting it in place."""
    path = tmp_path / "raft.journal"
    journal = FlushedJournal(FileJournal(str(path)), Path(str(path) + ".meta"))
    entries = [(b"\x01cmd%d" % i, i, 1) for i in range(1, 11)]
    for e in entries:
        journal.add(*e)
    journal.setRaftCommitIndex(9)
    ops = FileOps(monkeypatch)
    journal.deleteEntriesTo(6)  # what pysyncobj does after a snapshot at index 6
    ops.check_durable_replace(path)
    assert [journal[i] for i in range(len(journal))] == entries[6:]
    journal.add(b"\x01more", 11, 2)
    journal._destroy()
    reread = FileJournal(str(path))
    assert [reread[i] for i in range(len(reread))] == [*entries[6:], (b"\x01more", 11, 2)]
    assert reread.getRaftCommitIndex() == 9
    reread._destroy()


def test_issue6_d14_a_received_snapshot_is_synced_before_it_replaces_the_old_one(
        tmp_path: Path, follower: Callable[..., Follower], monkeypatch: pytest.MonkeyPatch) -> None:
    """d14: the snapshot file received from the leader is fsync'ed before the rename, its directory after."""
    got: list[bytes] = []

    def reader(path: str) -> Any:
        got.append(Path(path).read_bytes())
        return (NO_OP, 5, 1), (NO_OP, 4, 1), []

    f = follower(deserializer=reader)
    ops = FileOps(monkeypatch)
    answers = []
    chunks = snapshot_chunks()
    for chunk in chunks:
        answers += f.deliver({"type": "append_entries", "term": 1, "commit_index": 5, "serialized": chunk})
    assert got == [b"".join(c[0] for c in chunks)]
    assert [a["next_node_idx"] for a in answers if a["success"]] == [6]
    ops.check_durable_replace(tmp_path / "raft.snapshot")


# ------------------------------------------------------------------ d15


def test_issue6_d15_held_entries_sent_in_chunks_are_not_truncated(
        follower: Callable[..., Follower], caplog: pytest.LogCaptureFixture) -> None:
    """d15 (a): a large entry resent in chunks does not make the follower delete the entries after it."""
    f = follower()
    big = (NO_OP + b"x" * 100_000, 3, 1)
    held = [(NO_OP, 2, 1), big, *[(NO_OP, i, 1) for i in range(4, 8)]]
    f.append((1, 0), held, term=1, commit=7)
    f.engine.doTick(0)
    assert f.engine.raftLastApplied == 7
    answers = []
    for message in leader_chunks(big, (2, 1), term=1, commit=7):
        answers += f.deliver(message)
    assert f.log()[1:] == held
    assert answers[-1]["success"] and answers[-1]["next_node_idx"] == 8
    assert "truncating already-applied" not in caplog.text


def premature_finish_size() -> int:
    """A command length for which pysyncobj's leader marks a chunk 'finish' before the last one."""
    for n in range(2 * BATCH - 200, 2 * BATCH):
        kinds = [m["transmission"] for m in leader_chunks((NO_OP + b"x" * n, 2, 1), (1, 0), term=1, commit=1)]
        if kinds.count("finish") > 1:
            return n
    raise AssertionError("no size marks a chunk 'finish' too early: has pysyncobj's leader changed?")


@pytest.mark.parametrize("kind", ["ascii", "binary"])
def test_issue6_d15_a_chunk_marked_last_too_early_is_not_unpickled(follower: Callable[..., Follower],
                                                                   kind: str) -> None:
    """d15 (b): an entry just under a multiple of 64 KiB arrives whole, with no UnpicklingError on the way.

    Binary bytes pickle (protocol 2) to up to twice their length, so several
    chunks before the last are marked 'finish'.
    """
    f = follower()
    if kind == "ascii":
        entry = (NO_OP + b"x" * premature_finish_size(), 2, 1)
    else:
        entry = (NO_OP + os.urandom(130_900), 2, 1)
    messages = leader_chunks(entry, (1, 0), term=1, commit=1)
    assert [m["transmission"] for m in messages].count("finish") > 1
    answers = []
    for message in messages:
        answers += f.deliver(message)  # pysyncobj raised UnpicklingError out of here
    assert f.log()[1:] == [entry]
    assert answers[-1]["success"] and answers[-1]["next_node_idx"] == 3


def test_issue6_d15_a_chunk_without_its_start_is_a_heartbeat(follower: Callable[..., Follower]) -> None:
    """d15: a last chunk whose start went with an old connection does not raise; the leader resends."""
    f = follower()
    entry = (NO_OP + b"x" * 100_000, 2, 1)
    last = leader_chunks(entry, (1, 0), term=1, commit=1)[-1]
    answers = f.deliver(last)  # pysyncobj: TypeError, str + bytes
    assert [(a["success"], a["next_node_idx"]) for a in answers] == [(True, 2)]
    assert f.log()[-1][1] == 1


# ------------------------------------------------------------------ d6


class _AcceptFails:
    """A listening socket whose next accept fails as it does out of file handles."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def accept(self) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_issue6_d6_out_of_file_handles_the_raft_port_stays_open(follower: Callable[..., Follower]) -> None:
    """d6: an accept that fails with EMFILE does not close the raft port for good (pysyncobj unbinds)."""
    f = follower()
    server = f.transport._server
    real = server._TcpServer__socket
    port = int(f.me.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        server._TcpServer__socket = _AcceptFails(real)
        f.engine.doTick(0.1)  # the pending connection: accept fails
        server._TcpServer__socket = real
    wait_for(lambda: f.engine.doTick(0.05) or getattr(server, "rc_paused_until", None) is None, 2,
             "accepting to resume")
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        f.engine.doTick(0.1)
        f.engine.doTick(0.1)
    assert len(f.transport._unknownConnections) >= 1


# ------------------------------------------------- issue 8: liveness (item 3)


def test_issue8_3_peer_ages_come_from_raft_traffic(follower: Callable[..., Follower]) -> None:
    """Every message from a peer, a heartbeat included, refreshes its age; nobody is heard before."""
    f = follower()
    assert f.engine.peer_ages() == {}
    f.deliver({"type": "append_entries", "term": 1, "commit_index": 0, "entries": [], "prevLogIdx": 1,
               "prevLogTerm": 0})
    ages = f.engine.peer_ages()
    assert set(ages) == {f.leader_address} and 0 <= ages[f.leader_address] < 1


def _tick_until(engines: list[Engine], predicate: Callable[[], Any], timeout: float, what: str) -> None:
    def step() -> Any:
        for e in engines:
            e.doTick(0.01)
        return predicate()

    wait_for(step, timeout, what, interval=0)


def test_issue8_3_a_named_non_voter_is_heard_by_the_leader_under_its_address(tmp_path: Path) -> None:
    """A non-voter with rc_identity names itself (HELLO), so the leader's peer_ages carry its address;
    pysyncobj alone knows it only as an anonymous connection "0"."""
    voter_address = f"127.0.0.1:{free_port()}"
    conf = {"autoTick": False, "raftMinTimeout": 0.1, "raftMaxTimeout": 0.2, "appendEntriesPeriod": 0.02,
            "password": "0123456789abcdef-secret"}
    voter = Engine(voter_address, [], SyncObjConf(**conf), lambda c: {"ok": True})
    engines = [voter]
    try:
        _tick_until(engines, voter._isLeader, 10, "the single voter to lead")
        anonymous = Engine(None, [voter_address], SyncObjConf(**conf), lambda c: {"ok": True})
        engines.append(anonymous)
        _tick_until(engines, lambda: voter.getStatus()["readonly_nodes_count"] == 1, 10, "the non-voter to connect")
        _tick_until(engines, lambda: len(voter.rc_heard) == 0 and anonymous.raftLastApplied > 0, 10, "a heartbeat")
        assert voter.peer_ages() == {}  # heard, but nameless
        named = Engine(None, [voter_address], SyncObjConf(**conf), lambda c: {"ok": True})
        named.rc_identity = "127.0.0.1:7999"
        engines.append(named)
        _tick_until(engines, lambda: "127.0.0.1:7999" in voter.peer_ages(), 10, "the named non-voter to be heard")
        first = voter.rc_heard["127.0.0.1:7999"]
        _tick_until(engines, lambda: voter.rc_heard["127.0.0.1:7999"] > first, 10, "its answers to heartbeats")
        assert named.raftLastApplied > 0  # it still replicates as before
    finally:
        for e in engines:
            e.destroy()


def test_issue8_3_a_greeting_is_taken_only_from_a_non_voter_and_never_for_a_voter(
        follower: Callable[..., Follower]) -> None:
    """HELLO names a non-voter's connection; a voter's address, a voter's connection or junk are ignored."""
    from pysyncobj.node import Node

    from raftcoord.engine import HELLO

    f = follower()
    t = f.transport
    stranger = Node("0")
    t._readonlyNodes.add(stranger)
    for node, addr in ((stranger, f.leader_address), (stranger, 7), (stranger, "x" * 301), (f.leader, "10.0.0.9:1")):
        t._onMessageReceived(node, {"type": HELLO, "addr": addr})
    assert "10.0.0.9:1" not in f.engine.peer_ages() and t._rc_readonly_addr == {}
    t._onMessageReceived(stranger, {"type": HELLO, "addr": "10.0.0.9:1"})
    t._onMessageReceived(stranger, {"type": "next_node_idx", "next_node_idx": 1, "reset": False, "success": False})
    assert set(f.engine.peer_ages()) == {"10.0.0.9:1"}
    t.max_heard = 2
    for i in range(5):
        t._rc_hello(stranger, {"type": HELLO, "addr": f"10.0.1.{i}:1"})
    assert len(f.engine.rc_heard) == 2 and "10.0.1.4:1" in f.engine.rc_heard
