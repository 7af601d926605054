"""The replication layer: one state machine, replicated with Raft by pysyncobj.

A :class:`Replica` carries opaque command bytes through the Raft log into a
deterministic state machine (:class:`raftcoord.store.Store`). It knows no
business rules; it decides only when a command counts as done, and guards
the places where pysyncobj 0.3.17 would otherwise lie (``notes/
pysyncobj-hazards.md``; the numbers below are that page's).

The loop contract
-----------------
1. **Proposed.** :meth:`Replica.propose` queues the exact bytes for the
   Raft thread, which hands everything queued since its last tick to the
   engine as one entry (issue 9: one pickle, journal write, encryption and
   message per peer for the lot), within ``batch_max_commands`` and
   ``batch_max_bytes``; a lone command is its own entry, as before, and a
   follower forwards entries to the leader it knows. The only replicated
   method is ``apply(entry_bytes)`` (hazard 8). Every replica applies
   committed entries in log order on its Raft thread, and the commands of a
   batch in their order, each through ``store.apply``, which never raises; a
   guard logs and swallows anything that would escape anyway, since one
   exception would wedge the cluster (hazard 7). Each proposer hears its own
   command's result. Listeners (``on_applied``, :meth:`add_listener`) run
   right after each command's apply, on the Raft thread, while no reader can
   see the store.
2. **Heard back, no leader, retried.** When ``propose`` returns, when it
   raises UnavailableError or TimeoutError (not applied) or
   UnknownOutcomeError (maybe applied), and what it proposes again is
   stated in ``raftcoord/proposals.py``, which holds that machinery.
3. **Reads.** :meth:`read` with ``consistency="linearizable"`` first passes
   a read barrier (``proposals.py``: a barrier entry committed in the
   leader's term and applied here, shared by concurrent readers). :meth:`read`
   runs a function under the state lock and is for short reads only;
   anything sized by a client goes through :meth:`read_view`, which answers
   as of one revision while it takes the lock a chunk at a time
   (``views.py``), and the Raft thread takes that lock before any waiting
   reader.
4. **Status.** :meth:`status` never waits for the Raft thread: the Raft
   thread refreshes a snapshot of its state as it ticks, and a stalled Raft
   thread shows as ``healthy: False`` with ``stalled_for`` seconds, never as
   an error.
5. **Fail-stop.** A snapshot that fails to load (the engine's ``on_fatal``)
   stops the replica for good: a CRITICAL line, no more ticks (no peer hears
   from it, so it never counts toward a commit), role "failed", and
   ReplicaFailedError from propose and reads.

Guards on the engine (regression tests in ``tests/test_replica.py`` first
reproduce each hazard with the guard removed):

* A snapshot chunk (an ``append_entries`` without ``prevLogIdx``) may not
  raise the commit index: pysyncobj would otherwise commit and apply entries
  of this replica's own log that no leader checked, e.g. a cut-off old
  leader's writes, and report them as SUCCESS (hazard 3).
* Entries this replica already holds with the same index and term are taken
  off an incoming ``append_entries`` before pysyncobj sees it, so it no
  longer deletes and rewrites them (hazard 5). Past the last entry sent, the
  log is kept only when it ends in the leader's own term (Raft's Log Matching
  property makes that tail the leader's); anything else is truncated as
  before.
* Snapshots are the store's own CBOR, written through pysyncobj's
  ``serializer`` hooks next to the journal (hazards 6 and 9), never pickle,
  once ``compaction_entries`` commands or ``compaction_bytes`` bytes of
  entries were applied since the last one (issue 9: 1,000 txns of 1,000
  puts are only 1,000 commands). Only ``store.image()`` runs on the Raft
  thread (about 44 ms at 1,000,000 keys); encoding, writing and fsync run
  on a thread of their own (``DumpJob``), renamed into place only when
  whole, and pysyncobj trims the journal only after that. cbor2 encodes in
  one C call that holds the GIL, so the Raft thread still waits out the
  encoding itself (about 0.3 s at 1,000,000 keys), but no longer the copy
  into the file, the write and the fsync.
  At start, a journal left untrimmed by a crash between writing a snapshot
  and trimming the journal is aligned with the snapshot rather than thrown
  away, as pysyncobj would do.
* The Raft thread is the replica's own (``autoTick=False``), so it lives
  until :meth:`Replica.close`, whatever thread built the replica
  (hazard 11); ``close`` destroys the engine on that thread and frees the
  port before it returns.
* The cluster secret is passed to pysyncobj as ``password`` (peer traffic
  is Fernet-encrypted and authenticated); whether a secret is required is
  decided by ``config.py`` (hazard 1).

Durability: by default (``fsync=False``) the journal is written through
``mmap`` and never flushed, so it survives a crash of the process (kill -9)
but not of the machine: what the kernel had not yet written back (up to
about 35 s with Linux's default ``vm.dirty_*`` settings) is lost, and so may
be the term/vote file, which pysyncobj renames into place unsynced (a node
could then vote twice in a term); trimming the journal after a snapshot
rewrites it in place, so a crash in that instant loses this node's entries
past the snapshot. With ``fsync=True`` (``raftfiles.FlushedJournal``, at
about half the write rate) every journal change is msync'ed before
pysyncobj goes on (a follower acknowledges only flushed entries); the
term/vote file is replaced by temp file, fsync, rename and fsync of the
directory before the vote that depends on it is sent; trimming writes the
kept entries to a new journal, syncs it and renames it over the old one;
and this node's own snapshot is fsync'ed before its rename, the directory
after. Either way, a snapshot received from the leader is fsync'ed before
it replaces the old one and its directory after (``engine.py``), and a
journal left untrimmed at start is aligned by a durable rewrite.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import inspect
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pysyncobj import SyncObjConf
from pysyncobj.config import FAIL_REASON
from pysyncobj.poller import POLL_EVENT_TYPE

from raftcoord.errors import (
    ConfigError,
    InvalidInputError,
    NewerFormatError,
    RaftcoordError,
    ReplicaFailedError,
    UnavailableError,
    ValueFormatError,
)
from raftcoord.engine import Engine, Throttle
from raftcoord.formats import check_entry
from raftcoord.proposals import BARRIER, Barriers, Batcher, Proposer, decode_batch
from raftcoord.raftfiles import FlushedJournal, align_journal, decode_dump, fsync_path
from raftcoord.snapshotting import SUCCESS, BackgroundSerializer, DumpJob, no_cyclic_gc
from raftcoord.stats import ReplicaStats
from raftcoord.views import PriorityLock, ReadView, ViewRegistry

if TYPE_CHECKING:
    from raftcoord.store import Applied, Store

__all__ = ["BARRIER", "Replica", "ReplicaSettings", "open_replica_backend"]  # BARRIER: callers import it here

log = logging.getLogger(__name__)

T = TypeVar("T")

_ROLES: Final = {0: "follower", 1: "candidate", 2: "leader"}
#: Least seconds between two refreshes of the cached status (a refresh costs
#: about 40 us; under load the Raft thread ticks thousands of times a second).
_STATUS_EVERY: Final = 0.01
#: Least ``compaction_bytes``: below one full batch entry every entry would set off a snapshot.
MIN_COMPACTION_BYTES: Final = 64 * 1024
DEFAULT_COMPACTION_BYTES: Final = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSettings:
    """Timing, compaction and durability settings. Durations are seconds."""

    #: Leader heartbeat period (pysyncobj ``appendEntriesPeriod``).
    heartbeat_period: float = 0.1
    #: Batch entries per heartbeat (``appendEntriesUseBatch``). Off: every
    #: command is sent at once (about 1 ms a write instead of 100 ms).
    batch_appends: bool = False
    #: Election timeout bounds (``raftMinTimeout``/``raftMaxTimeout``).
    election_timeout_min: float = 0.4
    election_timeout_max: float = 1.4
    #: A leader that hears from no majority this long steps down
    #: (``leaderFallbackTimeout``). None: twice ``election_timeout_max``.
    leader_fallback_timeout: float | None = None
    #: A connection that stays silent this long is dropped. None: the larger
    #: of 3.5 and ``election_timeout_max``.
    connection_timeout: float | None = None
    #: Pause between attempts to reach a peer that is down.
    connection_retry: float = 1.0
    #: Longest wait of the Raft thread for network events.
    tick_period: float = 0.05
    #: Compact the log (snapshot) past this many entries or commands applied
    #: since the last snapshot (a batch entry holds many commands)...
    compaction_entries: int = 10000
    #: ...or past this many bytes of entries applied since the last snapshot
    #: (issue 9): a few huge transactions count like many small commands, so
    #: neither the journal a restart replays nor its copy in memory grows
    #: past about this much.
    compaction_bytes: int = DEFAULT_COMPACTION_BYTES
    #: ...or this long after the previous snapshot.
    compaction_seconds: float = 3600.0
    #: How long one attempt of a proposal may stay unanswered before the same
    #: bytes are proposed again.
    retry_interval: float = 2.0
    #: Commands waiting for the Raft thread before QUEUE_FULL.
    queue_size: int = 100000
    #: Largest command accepted by :meth:`Replica.propose`.
    max_command_bytes: int = 1536 * 1024
    #: Most commands the Raft thread puts in one log entry (issue 9). 1 writes
    #: one command per entry, as replicas before batching did and as a
    #: cluster with such members needs (they cannot apply a batch).
    batch_max_commands: int = 256
    #: Most bytes of one batch entry. Below pysyncobj's 64 KiB, past which an
    #: entry travels in chunks; a larger command still goes, alone.
    batch_max_bytes: int = 60 * 1024
    #: Flush the journal on every change and fsync term/vote and snapshots.
    fsync: bool = False
    #: Seconds between appends a leader sends each non-voter while entries keep
    #: coming (issue 10): voters get every entry at once, non-voters what piled
    #: up, in one message, so seven non-voters cost a put little. 0: at once.
    learner_append_interval: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"replica setting {field}: {why}", field=field)

        need(self.heartbeat_period > 0, "heartbeat_period", "must be positive")
        need(self.election_timeout_min > 3 * self.heartbeat_period, "election_timeout_min",
             "must be more than three heartbeat periods")
        need(self.election_timeout_max > self.election_timeout_min, "election_timeout_max",
             "must be more than election_timeout_min")
        need(self.fallback_timeout > self.heartbeat_period, "leader_fallback_timeout",
             "must be more than heartbeat_period")
        need(self.silence_timeout >= self.election_timeout_max, "connection_timeout",
             "must be at least election_timeout_max")
        need(self.connection_retry >= 0, "connection_retry", "must not be negative")
        need(self.tick_period > 0, "tick_period", "must be positive")
        need(0 <= self.learner_append_interval <= self.heartbeat_period, "learner_append_interval",
             "must be between 0 and heartbeat_period")
        need(self.compaction_entries >= 2, "compaction_entries", "must be at least 2")
        need(self.compaction_bytes >= MIN_COMPACTION_BYTES, "compaction_bytes",
             f"must be at least {MIN_COMPACTION_BYTES} (one batch entry)")
        need(self.compaction_seconds > 0, "compaction_seconds", "must be positive")
        need(self.retry_interval > 0, "retry_interval", "must be positive")
        need(self.queue_size > 0, "queue_size", "must be positive")
        need(self.max_command_bytes > 0, "max_command_bytes", "must be positive")
        need(self.batch_max_commands > 0, "batch_max_commands", "must be positive")
        need(self.batch_max_bytes > 0, "batch_max_bytes", "must be positive")

    @property
    def fallback_timeout(self) -> float:
        """``leader_fallback_timeout`` with its default filled in."""
        v = self.leader_fallback_timeout
        return 2 * self.election_timeout_max if v is None else v

    @property
    def silence_timeout(self) -> float:
        """``connection_timeout`` with its default filled in."""
        v = self.connection_timeout
        return max(3.5, self.election_timeout_max) if v is None else v


# --------------------------------------------------------------------------
# The replica


class Replica:
    """One replica of the state machine, and the calls that reach the log.

    ``self_address`` is this node's Raft address (``"host:port"``, what the
    partners list), or None for a non-voting replica (a pysyncobj read-only
    node, which connects to the voters and never votes). ``partners`` are the
    other voters. ``data_dir`` holds the journal and the snapshot; one
    replica at a time may use it. ``password`` is the cluster secret.
    ``on_applied`` is a first listener (see :meth:`add_listener`);
    ``on_restored`` runs on the Raft thread after a snapshot from the leader
    replaced the store, since no ``on_applied`` call tells of those changes
    (see :meth:`add_restore_listener` for listeners that take the new store).
    ``state_machine`` is the store class (default
    :class:`raftcoord.store.Store`). ``bind_address`` is where to listen when
    peers reach this node at another address (NAT, a proxy).
    """

    def __init__(
        self,
        self_address: str | None,
        partners: Iterable[str],
        data_dir: str | os.PathLike[str],
        *,
        password: str | None,
        settings: ReplicaSettings | None = None,
        on_applied: Callable[[Applied], None] | None = None,
        on_restored: Callable[[], None] | None = None,
        state_machine: type[Store] | None = None,
        bind_address: str | None = None,
    ) -> None:
        if state_machine is None:
            from raftcoord.store import Store as state_machine
        self.settings = settings = settings or ReplicaSettings()
        self.self_address = self_address
        self._sm = state_machine
        self._store: Store = state_machine()
        self._state_lock = PriorityLock()  # the Raft thread takes it with .first()
        self._listeners: tuple[Callable[[Applied], None], ...] = (on_applied,) if on_applied else ()
        self._on_restored = on_restored
        self._restore_listeners: tuple[Callable[[Store], None], ...] = ()
        self._closed = False
        self._failed: str | None = None  # why the replica stopped for good (defect 8)
        self._close_lock = threading.Lock()
        self._proposer = Proposer(self._submit, retry_interval=settings.retry_interval,
                                  max_command_bytes=settings.max_command_bytes, check_open=self._check_open)
        #: Counters for metrics (issue 10), read at scrape time by raftcoord.metrics.
        self.stats = ReplicaStats(proposals=self._proposer)
        self._batcher = Batcher(max_commands=settings.batch_max_commands, max_bytes=settings.batch_max_bytes,
                                max_waiting=settings.queue_size)
        self._views = ViewRegistry(self._state_lock, lambda: self._store, check=self._check_open)
        self._status_cache: dict[str, Any] = {"backend": "raft", "self": self_address, "role": "starting"}
        self._status_at = 0.0  # when the Raft thread last refreshed _status_cache
        self._last_tick = time.monotonic()  # when the Raft thread last completed a tick
        self._status_errors = Throttle(60.0)
        self._engine_destroyed = False
        self._tasks: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._stop = threading.Event()
        self._leader_seen: tuple[Any, int] | None = None
        self._tick_errors = Throttle(10.0)
        self._since_dump = 0  # commands applied since the last snapshot (Raft thread)
        self._since_dump_bytes = 0  # bytes of entries applied since then (Raft thread)
        self._dump_job: DumpJob | None = None  # the snapshot being written in the background
        self._startup_dump: tuple[tuple[int, int], Store] | None = None

        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.data_dir / "replica.lock", "a+b")  # noqa: SIM115 - held open
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise UnavailableError(f"{self.data_dir} is in use by another replica", field="data_dir") from None
        try:
            self._engine = self._start_engine(list(partners), password, bind_address)
        except BaseException:
            self._lock_file.close()
            raise
        self._wake_lock = threading.Lock()
        self._woken = False  # a wake-up byte is in the pipe, not yet drained: no need for another
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._engine._poller.subscribe(self._wake_r, self._drain_wakeups, POLL_EVENT_TYPE.READ)
        self._barriers = Barriers(self.propose, name=f"raftcoord-barrier-{self_address}")
        self._thread = threading.Thread(target=self._run, name=f"raftcoord-raft-{self_address}", daemon=True)
        self._refresh_status()  # the Raft thread is not running yet: safe here
        self._thread.start()
        self._barriers.start()

    def _start_engine(self, partners: list[str], password: str | None, bind: str | None) -> Engine:
        s = self.settings
        journal = self.data_dir / "raft.journal"
        dump_path = self.data_dir / "raft.snapshot"
        if dump_path.exists():
            try:
                stat = dump_path.stat()
                dump = decode_dump(dump_path.read_bytes())
                with no_cyclic_gc():
                    self._startup_dump = ((stat.st_mtime_ns, stat.st_size), self._sm.restore(dump.state))
                # Serve the snapshot's state from the moment the replica is
                # open: pysyncobj loads it only on the first tick, and a read
                # or an observer in between would see an empty store (issue 8,
                # 1c). The first tick then finds this same store and keeps it.
                self._store = self._startup_dump[1]
            except (OSError, RaftcoordError) as exc:
                # Starting without it would replay a compacted journal from
                # nothing: a silently different state.
                raise ValueFormatError(f"{dump_path}: cannot use the snapshot: {exc}", field="data_dir") from None
            dropped = align_journal(journal, dump)
            if dropped:
                log.warning("%s: dropped %d journal entries already in the snapshot "
                            "(the last run stopped while compacting)", journal, dropped)
        conf = SyncObjConf(
            password=password,
            bindAddress=bind,
            autoTick=False,
            appendEntriesUseBatch=s.batch_appends,
            appendEntriesPeriod=s.heartbeat_period,
            raftMinTimeout=s.election_timeout_min,
            raftMaxTimeout=s.election_timeout_max,
            leaderFallbackTimeout=s.fallback_timeout,
            connectionTimeout=s.silence_timeout,
            connectionRetryTime=s.connection_retry,
            commandsQueueSize=s.queue_size,
            commandsWaitLeader=False,
            logCompactionMinEntries=s.compaction_entries,
            logCompactionMinTime=s.compaction_seconds,
            journalFile=str(journal),
            fullDumpFile=str(dump_path),
            serializer=self._refuse_dump,  # never called: BackgroundSerializer writes the snapshots
            deserializer=self._read_dump,
            maxBindRetries=1,
            onStateChanged=self._on_state_changed,
            # Voters change through the log (issue 10, raftcoord.membership):
            # the configuration is that of the last change entry in the log,
            # kept in snapshots, so a node's cluster file only seeds it.
            dynamicMembershipChange=True,
        )
        extra: dict[str, Any] = {}
        if "on_fatal" in inspect.signature(Engine.__init__).parameters:
            extra["on_fatal"] = self._fail
        try:
            engine = Engine(self.self_address, partners, conf, self._apply, **extra)
        except Exception as exc:  # noqa: BLE001 - pysyncobj raises plain Exception subclasses
            raise UnavailableError(f"cannot start the raft engine on {self.self_address}: {exc}",
                                   field="raft") from None
        engine.rc_learner_interval = s.learner_append_interval
        serializer = engine._SyncObj__serializer  # type: ignore[attr-defined]
        serializer.__class__ = BackgroundSerializer
        serializer.rc_start = self._start_dump
        serializer.rc_done = self._dump_ended
        if s.fsync:
            engine._SyncObj__raftLog = FlushedJournal(  # type: ignore[attr-defined]
                engine._SyncObj__raftLog, Path(str(journal) + ".meta"))  # type: ignore[attr-defined]
        return engine

    # ------------------------------------------------------------ Raft thread

    def _run(self) -> None:
        engine, period = self._engine, self.settings.tick_period
        try:
            while not self._stop.is_set():
                if self._failed is not None:
                    # Fail-stop: no ticks, so no peer hears from this node
                    # again; status() and tasks are still answered.
                    self._destroy_engine()
                    self._batcher.refuse_all(FAIL_REASON.QUEUE_FULL)
                    self._last_tick = time.monotonic()
                    self._refresh_status(force=True)
                    self._run_tasks()
                    self._stop.wait(period)
                    continue
                self._hand_over()
                try:
                    engine.doTick(period)
                except Exception:  # noqa: BLE001 - pysyncobj's own tick loop also logs and goes on
                    if self._failed is not None:
                        continue  # said once, by _fail (e.g. a newer log entry format): no traceback
                    if self._tick_errors():
                        log.exception("raft tick failed (%d more not logged)", self._tick_errors.take())
                    self._stop.wait(period)
                if (self._since_dump >= self.settings.compaction_entries
                        or self._since_dump_bytes >= self.settings.compaction_bytes):
                    # pysyncobj counts entries; a batch holds up to
                    # batch_max_commands, and one txn may put thousands of
                    # keys: a journal that long between snapshots would be
                    # replayed command by command at start (13.9 s for
                    # 1,000,000 keys loaded as 1,000 txns), and pysyncobj
                    # keeps every entry twice in memory until then.
                    engine.forceLogCompaction()
                self._run_tasks()
                self._watch_leader()
                self._last_tick = time.monotonic()
                self._refresh_status()
        finally:
            self._destroy_engine()
            job = self._dump_job
            if job is not None:
                job.thread.join()  # its rename lands before the next replica may open the directory
            self._batcher.refuse_all(FAIL_REASON.QUEUE_FULL)  # never handed to the engine
            self._run_tasks()
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = -1
            self._lock_file.close()

    def _hand_over(self) -> None:
        """Raft thread: hand the commands proposed since the last tick to the engine, batched."""
        for entry, callback in self._batcher.take():
            try:
                self._engine.apply(entry, callback=callback)
            except Exception:  # noqa: BLE001 - e.g. the engine is being destroyed
                log.exception("handing a command to the raft engine failed")
                callback(None, FAIL_REASON.QUEUE_FULL)

    def _destroy_engine(self) -> None:
        if self._engine_destroyed:
            return
        self._engine_destroyed = True
        try:
            self._engine.destroy()  # autoTick=False: closes sockets and the journal now
        except Exception:  # noqa: BLE001
            log.exception("destroying the raft engine failed")

    def _refresh_status(self, *, force: bool = False) -> None:
        """Raft thread: the status snapshot that status() hands out without waiting (C5)."""
        now = time.monotonic()
        if not force and now - self._status_at < _STATUS_EVERY:
            return
        self._status_at = now
        if self._failed is not None:
            self._status_cache = {**self._status_cache, "role": "failed", "has_quorum": False,
                                  "error": self._failed}
            return
        try:
            engine = self._engine
            st = engine.getStatus()
            leader = st["leader"]
            self._status_cache = {
                "backend": "raft",
                "self": self.self_address,
                "role": "learner" if self.self_address is None else _ROLES.get(st["state"], "unknown"),
                "leader": getattr(leader, "address", None) if leader is not None else None,
                "term": st["raft_term"],
                "commit_index": st["commit_idx"],
                "last_applied": st["last_applied"],
                "last_log_index": engine.rc_last_entry()[0],
                "log_entries": st["log_len"],
                "has_quorum": st["has_quorum"],
                "partners": {n.address: engine.isNodeConnected(n) for n in engine.otherNodes},
                "voters": engine.rc_voters(),
                "learners_connected": st["readonly_nodes_count"],
                # The commit index the leader last told this replica (None
                # until it did): caught up once last_applied reaches it.
                "leader_commit_index": st.get("leader_commit_idx"),
                # Raft address -> seconds since a message from that peer last
                # arrived; on the leader, every follower and named non-voter.
                "peers": engine.peer_ages() if hasattr(engine, "peer_ages") else {},
            }
        except Exception:  # noqa: BLE001 - a status must never take the Raft thread down
            if self._status_errors():
                log.exception("collecting the raft status failed (%d more not logged)", self._status_errors.take())

    def _fail(self, reason: str, *, advice: str = "if it fails again, restore its data directory from a healthy node"
              ) -> None:
        """Stop this replica for good (fail-stop, defect 8); the engine's ``on_fatal``.

        Nothing is applied any more, the Raft thread stops answering peers
        (so this node never counts toward a commit), status reports role
        "failed", and propose/read raise ReplicaFailedError.
        """
        with self._close_lock:
            if self._failed is not None:
                return
            self._failed = reason or "fatal error"
        log.critical("replica %s stopped: %s. It answers no peer and serves no request until restarted; %s",
                     self.self_address or "(non-voting)", self._failed, advice)
        self._proposer.close()

    def _apply(self, entry: bytes) -> dict[str, Any] | list[dict[str, Any]]:
        """The replicated method's body; runs on the Raft thread; never raises.

        ``entry`` is one command, or a batch of them (``proposals.
        encode_batch``; issue 9), whose commands are applied in order exactly
        as if each had an entry of its own (listeners and read views see each
        one), under one hold of the state lock; a batch's result is the list
        of its commands' results.
        """
        try:
            check_entry(entry)  # issue 10: first, and a one-byte test for a plain command
            commands = decode_batch(entry)
        except NewerFormatError as exc:
            # A format this code does not know: guessing would diverge from the
            # nodes that know it. Stop, and raise so that pysyncobj neither
            # counts the entry applied nor answers its proposer (hazard 7:
            # wanted here, and only this replica is left behind).
            at = getattr(getattr(self, "_engine", None), "raftLastApplied", None)
            self._fail(f"at log index {'?' if at is None else at + 1}, {exc.message}",
                       advice="its data is sound: upgrade raftcoord on this node and start it again")
            raise
        if self._failed is not None:
            # The store may be behind the log (a snapshot failed to load):
            # applying on top of it would diverge.
            def refused() -> dict[str, Any]:
                return {"ok": False, "revision": 0,
                        "error": {"code": ReplicaFailedError.code, "message": "the replica has failed"}}
            return refused() if commands is None else [refused() for _ in commands]
        started = time.perf_counter()  # from before the lock: readers holding it delay the apply too
        try:
            with self._state_lock.first():
                self._since_dump_bytes += len(entry)
                if commands is None:
                    self._since_dump += 1
                    return self._apply_one(entry)
                self._since_dump += len(commands)
                return [self._apply_one(command) for command in commands]
        except Exception as exc:  # noqa: BLE001 - hazard 7; _apply_one never raises, the lock might
            log.exception("applying a log entry failed; its commands were refused")
            return (self._internal_error(exc) if commands is None
                    else [self._internal_error(exc) for _ in commands])
        finally:
            self.stats.apply.observe(time.perf_counter() - started)
            self.stats.applied_commands += 1 if commands is None else len(commands)

    def _apply_one(self, command: bytes) -> dict[str, Any]:
        """Apply one command under the state lock: the store, read views, listeners. Never raises."""
        try:
            try:
                applied = self._store.apply(command)
            except BaseException:
                self._views.invalidate("the store failed to apply a command")
                raise
            if self._views.active:
                try:
                    self._views.record(applied.events)
                except Exception:  # noqa: BLE001 - a read view must never wedge the apply path
                    log.exception("recording pre-images for read views failed")
                    self._views.invalidate("internal error")
            for listener in self._listeners:
                try:
                    listener(applied)
                except Exception:  # noqa: BLE001
                    log.exception("on_applied listener %r failed", listener)
            return applied.result
        except Exception as exc:  # noqa: BLE001 - hazard 7: an exception here wedges every replica
            log.exception("store.apply raised; the command was refused")
            return self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> dict[str, Any]:
        try:
            revision = self._store.revision
        except Exception:  # noqa: BLE001
            revision = 0
        return {"ok": False, "revision": revision,
                "error": {"code": "internal", "message": f"internal error: {exc!r}"}}

    @staticmethod
    def _refuse_dump(path: str, data: tuple[Any, ...]) -> None:
        raise RuntimeError("pysyncobj's own snapshot writing is replaced by the replica's")

    def _start_dump(self, path: str, data: tuple[Any, ...]) -> DumpJob:
        """Raft thread: freeze the state and write it to ``path`` on a thread of its own.

        Called through :class:`BackgroundSerializer` where pysyncobj would
        call its ``serializer`` hook. Only ``store.image()`` (copies of
        references, about 44 ms at 1,000,000 keys) runs here; the encoding
        (about 0.3 s there), the write and the fsync do not, so the Raft
        thread goes on applying meanwhile (issue 9). pysyncobj trims the
        journal only once the job reports success (the serializer's
        ``checkSerializing``), so a restart in between finds the old
        snapshot with the whole journal, or the new one with an untrimmed
        journal, which ``align_journal`` repairs.
        """
        last, prev, cluster = data
        since = (self._since_dump, self._since_dump_bytes)
        self._since_dump = 0
        self._since_dump_bytes = 0
        job = DumpJob(
            path=Path(path),
            last=(bytes(last[0]), last[1], last[2]),
            prev=(bytes(prev[0]), prev[1], prev[2]),
            cluster=tuple(sorted(n.id for n in cluster if n is not None)),
            image=self._store.image(),
            fsync=self.settings.fsync,
        )
        job.since = since
        job.stats = self.stats
        job.thread = threading.Thread(target=job.run, name=f"raftcoord-snapshot-{self.self_address}", daemon=True)
        self._dump_job = job
        job.thread.start()
        return job

    def _dump_ended(self, job: DumpJob) -> None:
        """Raft thread (the serializer's ``rc_done``): a failed job's entries still count toward the next one."""
        if job.outcome != SUCCESS and not job.cancelled:
            self._since_dump += job.since[0]
            self._since_dump_bytes += job.since[1]

    def _read_dump(self, path: str) -> tuple[Any, ...]:
        """pysyncobj ``deserializer`` hook (Raft thread): load a snapshot file.

        Everything that can fail (reading, decoding, restoring the store,
        syncing) happens before the new store replaces the old one, so a
        failure never leaves a half-loaded store in place. A failure stops
        the replica (fail-stop, defect 8: pysyncobj would log it and still
        acknowledge the snapshot) and raises, so that pysyncobj keeps its log
        as it is.
        """
        try:
            dump = decode_dump(Path(path).read_bytes())
            early, self._startup_dump = self._startup_dump, None
            stat = os.stat(path)
            if early is not None and early[0] == (stat.st_mtime_ns, stat.st_size):
                store = early[1]  # read and checked before the engine started
            else:
                store = self._sm.restore(dump.state)
            if self.settings.fsync:
                fsync_path(Path(path))
                fsync_path(Path(path).parent)
            # pysyncobj drops its own node from a loaded cluster by comparing
            # Node objects; the dump holds addresses, so it is dropped here
            # (else, with dynamic membership, a node becomes its own partner).
            loaded = (dump.last, dump.prev, [a for a in dump.cluster if a != self.self_address])
        except Exception as exc:
            self._fail(f"cannot load the snapshot {path}: {exc!r}")
            raise
        if store is self._store:
            # The snapshot loaded at start (see _start_engine): already served.
            log.info("resumed from the snapshot at log index %d (revision %d)", dump.last[1], store.revision)
            return loaded
        self._since_dump = 0
        self._since_dump_bytes = 0
        with self._state_lock.first():
            self._store = store
            self._views.invalidate("the replica loaded a snapshot from the leader")
            if self._on_restored is not None:
                try:
                    self._on_restored()
                except Exception:  # noqa: BLE001
                    log.exception("on_restored callback failed")
            for listener in self._restore_listeners:
                try:
                    listener(store)
                except Exception:  # noqa: BLE001
                    log.exception("restore listener %r failed", listener)
        log.info("loaded the snapshot at log index %d (revision %d)", dump.last[1], store.revision)
        return loaded

    def _on_state_changed(self, old: int, new: int) -> None:
        log.info("raft role %s -> %s", _ROLES.get(old), _ROLES.get(new))

    def _watch_leader(self) -> None:
        seen = (self._engine._getLeader(), self._engine.raftCurrentTerm)
        if seen[0] != (self._leader_seen or (None,))[0]:
            if seen[0] is None:
                log.warning("no raft leader (term %d)", seen[1])
            else:
                self.stats.leader_changes += 1
                log.info("raft leader is %s (term %d)", seen[0], seen[1])
        self._leader_seen = seen

    def _run_tasks(self) -> None:
        while self._tasks:
            fn, fut = self._tasks.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)

    def _drain_wakeups(self, fd: int, event: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        # Only once the pipe is empty: a caller that saw the flag still set
        # queued its work before this, and the loop takes that work after
        # this poll; one that finds it clear writes a byte of its own.
        self._woken = False

    def _wake(self) -> None:
        if self._woken:
            return  # a byte is waiting in the pipe already: one write per tick, not one per proposal
        with self._wake_lock:  # never write to a closed (and maybe reused) descriptor
            if self._wake_w >= 0:
                self._woken = True
                try:
                    os.write(self._wake_w, b"!")
                except BlockingIOError:
                    pass  # already woken

    def _on_raft_thread(self, fn: Callable[[], T], timeout: float = 5.0) -> T:
        """Run ``fn`` on the Raft thread, between ticks, and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._tasks.append((fn, fut))
        if not self._thread.is_alive():
            self._run_tasks()
        else:
            self._wake()
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:  # the builtin; ours shadows the name here
            raise UnavailableError("the raft thread did not answer in time") from None

    # ---------------------------------------------------------------- writes

    #: ``propose(..., report=)`` tells whether one attempt alone can have applied.
    reports_attempts = True

    def propose(self, command: bytes, timeout: float, *, retry_ambiguous: bool = True,
                report: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit ``command``, apply it here, and return the store's result.

        Raises UnavailableError or TimeoutError when the command certainly did
        not apply, UnknownOutcomeError when it may have; ``retry_ambiguous``
        and ``report`` are as for :meth:`raftcoord.proposals.Proposer.propose`.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("propose() on the raft thread (e.g. in a listener) would wait for itself")
        return self._proposer.propose(command, timeout, retry_ambiguous=retry_ambiguous, report=report)

    def _submit(self, command: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue one attempt of a proposal for the Raft thread (the Proposer's ``submit``).

        The Raft thread hands whatever arrived since its last tick to the
        engine as few entries as the batch bounds allow (``_hand_over``).
        """
        self._batcher.add(command, callback)
        self._wake()

    # ------------------------------------------------------------ membership

    def change_voters(self, kind: str, address: str, registry_command: bytes, timeout: float) -> dict[str, Any]:
        """Add (``"add"``) or remove (``"rem"``) the voter at ``address``, with its registry change.

        One Raft entry carries both (:meth:`Engine.rc_change_membership`).
        Returns the store's result for ``registry_command`` once the entry is
        committed and applied here. Raises ConflictError when the leader
        refuses (another change is not committed yet, the node is already in
        or not in the configuration, or the leader would remove itself),
        UnavailableError when no leader took it, and UnknownOutcomeError when
        it may have applied (the caller reads the registry to find out).
        """
        from raftcoord.errors import ConflictError, UnknownOutcomeError

        self._check_open()
        done = threading.Event()
        outcome: list[Any] = []

        def callback(result: Any, reason: int) -> None:
            outcome.append((result, reason))
            done.set()

        self._on_raft_thread(lambda: self._engine.rc_change_membership(kind, address, registry_command, callback))
        if not done.wait(timeout):
            raise UnknownOutcomeError(f"the membership change of {address} was not heard back in {timeout} s: "
                                      "list the members to see whether it applied", field="member")
        result, reason = outcome[0]
        if reason == FAIL_REASON.SUCCESS:
            return result if isinstance(result, dict) else {"ok": True}
        if reason == FAIL_REASON.REQUEST_DENIED:
            raise ConflictError(f"the leader refused to {'add' if kind == 'add' else 'remove'} voter {address}: "
                                "another membership change is not committed yet, the leader is new, or the "
                                "configuration already is so (retry in a moment)", field="member")
        if reason in (FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER,
                      FAIL_REASON.DISCARDED):
            raise UnavailableError(f"the membership change of {address} did not apply (no leader took it); retry",
                                   field="member")
        raise UnknownOutcomeError(f"the membership change of {address} may or may not have applied "
                                  f"(pysyncobj reason {reason}): list the members to see", field="member")

    def transfer_leadership(self, timeout: float) -> str | None:
        """On the leader: hand leadership to the most caught-up voter; the new leader's address.

        Returns None when this replica is not the leader. Raises
        UnavailableError when no other voter took over within ``timeout``.
        """
        self._check_open()
        if not self._on_raft_thread(self._engine._isLeader):
            return None
        me = self.self_address
        deadline = time.monotonic() + timeout
        asked = -math.inf
        while time.monotonic() < deadline:
            leader = self.status().get("leader")
            if leader is not None and leader != me:
                return str(leader)
            if time.monotonic() - asked > 0.3 and leader == me:
                # pysyncobj hands over only to a follower that holds the whole
                # log; under writes that takes a few tries.
                asked = time.monotonic()
                self._on_raft_thread(lambda: self._engine.transferLeadership())
            time.sleep(0.02)
        raise UnavailableError(f"no other voter took leadership from {me} within {timeout} s", field="member")

    # ----------------------------------------------------------------- reads

    def read_barrier(self, timeout: float) -> None:
        """Return once every write acknowledged before this call is applied here.

        Commits a barrier through the log in the leader's current term (shared
        with concurrent readers) and waits until this replica applied it.
        Raises UnavailableError or TimeoutError if that does not happen in
        ``timeout`` seconds, e.g. on a leader cut off from the majority.
        """
        self._check_open()
        self._barriers.wait(timeout)

    def read(self, fn: Callable[[Store], T], *, consistency: str = "linearizable", timeout: float = 10.0) -> T:
        """Run ``fn(store)`` on this replica's store and return what it returns.

        For short reads only (a key, a revision, registering a listener):
        ``fn`` runs under the state lock, so the Raft thread can neither apply
        nor send heartbeats until it returns; anything sized by a client (a
        range) goes through :meth:`read_view`. ``"linearizable"`` passes a
        read barrier first; ``"serializable"`` reads the local replica as it
        is (possibly behind). ``fn`` runs while no command is applied, so it
        sees one revision, and a listener added inside it misses nothing.
        """
        if consistency == "linearizable":
            self.read_barrier(timeout)
        elif consistency != "serializable":
            raise InvalidInputError("consistency must be 'linearizable' or 'serializable'", field="consistency")
        with self._state_lock:
            self._check_open()
            return fn(self._store)

    @contextlib.contextmanager
    def read_view(self, *, consistency: str = "linearizable", timeout: float = 10.0) -> Iterator[ReadView]:
        """A reader (``revision``, ``get``, ``range``, ``count``, ``scan``) fixed at one revision.

        The view answers as of the revision it was opened at, however long
        the caller takes and whatever is applied meanwhile, while it takes the
        state lock only for one chunk of about a thousand keys at a time, so the
        Raft thread goes on applying and sending heartbeats (defect 3; see
        ``raftcoord/views.py``). ``consistency`` is as for :meth:`read`. Open
        views are bounded (64; more wait up to ``timeout``, then get
        UnavailableError), and so are the changes one view can outlast: past
        them, or when a snapshot replaces the store, its next read raises a
        retryable UnavailableError.
        """
        deadline = time.monotonic() + timeout
        if consistency == "linearizable":
            self.read_barrier(timeout)
        elif consistency != "serializable":
            raise InvalidInputError("consistency must be 'linearizable' or 'serializable'", field="consistency")
        view = self._views.open(max(0.0, deadline - time.monotonic()))
        try:
            yield view
        finally:
            view.close()

    def add_listener(self, listener: Callable[[Applied], None]) -> None:
        """Call ``listener(applied)`` for each command applied here, in log order.

        It runs on the Raft thread while readers wait, so it must be quick and
        must not block; what it raises is logged and ignored. After a restart
        the journal is replayed from the last snapshot, so a listener given
        as ``on_applied`` sees those commands again.
        """
        with self._state_lock:
            self._listeners = (*self._listeners, listener)

    def add_restore_listener(self, listener: Callable[[Store], None]) -> None:
        """Call ``listener(store)`` when a snapshot from the leader replaces the store.

        No ``add_listener`` call tells of the commands inside such a snapshot;
        this does, with the new store, on the Raft thread while readers wait
        (so it must be quick). A snapshot loaded at start is already in
        place when the replica is open and calls nobody.
        """
        with self._state_lock:
            self._restore_listeners = (*self._restore_listeners, listener)

    # ------------------------------------------------------------ lifecycle

    def status(self) -> dict[str, Any]:
        """This replica's view of the cluster (pysyncobj's getStatus, trimmed).

        Never waits for the Raft thread (C5): the Raft thread refreshes a
        snapshot of its state as it ticks, and this returns that snapshot with
        the store's revision, ``stalled_for`` (seconds since the Raft thread
        last completed a tick) and ``healthy`` (false when the replica failed
        or its Raft thread has been stuck longer than an election timeout,
        after which peers no longer count on it). Role "failed" means the
        replica stopped for good (fail-stop, with the reason in "error");
        "stopped" that it was closed.
        """
        stalled = max(0.0, time.monotonic() - self._last_tick)
        if self._closed:
            return {"backend": "raft", "self": self.self_address, "role": "stopped",
                    "healthy": False, "stalled_for": 0.0}
        out = dict(self._status_cache)
        out["revision"] = self._store.revision  # one attribute read; never the state lock
        out["stalled_for"] = round(stalled, 3)
        out["healthy"] = self._failed is None and stalled < self.settings.election_timeout_max
        if self._failed is not None:
            out["role"] = "failed"
            out["error"] = self._failed
        return out

    def close(self) -> None:
        """Stop the Raft thread, close the engine and free the port. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._proposer.close()
        self._barriers.close()  # its proposal in flight, if any, ended just now
        self._stop.set()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the replica is closed")
        if self._failed is not None:
            raise ReplicaFailedError(f"the replica has failed and serves nothing until restarted: {self._failed}")


def open_replica_backend(config: Any, node: str, *, voters: list[str] | None = None, voter: bool | None = None,
                         **kwargs: Any) -> Replica:
    """The replica of ``node`` described by a cluster configuration.

    ``config`` is a :class:`raftcoord.config.ClusterConfig` (duck-typed, so
    this layer imports nothing from the service layer). A non-voter is a
    pysyncobj read-only node: no address of its own, it connects to the voters.
    ``voters`` (the other voters' raft addresses) and ``voter`` replace the
    file's: a node joining a running cluster takes them from its member
    registry. Either way they only seed the Raft configuration: a snapshot
    and the log's membership entries decide it.
    """
    me = config.node(node)
    settings = ReplicaSettings(
        heartbeat_period=config.heartbeat_period,
        election_timeout_min=config.election_timeout_min,
        election_timeout_max=config.election_timeout_max,
        compaction_entries=config.compaction_entries,
        compaction_bytes=getattr(config, "compaction_bytes", DEFAULT_COMPACTION_BYTES),
        fsync=config.fsync,
    )
    partners = voters if voters is not None else [n.raft for n in config.voters if n.name != me.name]
    votes = me.voter if voter is None else voter
    replica = Replica(me.raft if votes else None, partners, me.data_dir,
                      password=config.secret, settings=settings, **kwargs)
    if not votes:
        # pysyncobj knows a non-voter only as an anonymous connection: it names
        # itself to the voters (engine HELLO) so the leader can judge its liveness.
        replica._engine.rc_identity = me.raft
    return replica
