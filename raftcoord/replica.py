"""The replication layer: one state machine, replicated with Raft by pysyncobj.

A :class:`Replica` carries opaque command bytes through the Raft log into a
deterministic state machine (:class:`raftcoord.store.Store`). It knows no
business rules; it decides only when a command counts as done, and guards
the places where pysyncobj 0.3.17 would otherwise lie (``notes/
pysyncobj-hazards.md``; the numbers below are that page's).

The loop contract
-----------------
1. **Proposed.** :meth:`Replica.propose` hands the exact bytes to the Raft
   engine; a follower forwards them to the leader it knows. The only
   replicated method is ``apply(command_bytes)`` (hazard 8). Every replica
   applies committed entries in log order on its Raft thread, calling
   ``store.apply``, which never raises; a guard logs and swallows anything
   that would escape anyway, since one exception would wedge the cluster
   (hazard 7). Listeners (``on_applied``, :meth:`add_listener`) run right
   after each apply, on the Raft thread, while no reader can see the store.
2. **Heard back.** ``propose`` returns the store's result once the entry is
   committed *and* applied on this replica, so a read here right after sees
   the write. It never waits longer than its own ``timeout``: pysyncobj's
   callbacks may never fire (hazard 10).
3. **No leader.** Without a leader the engine refuses at once
   (``MISSING_LEADER``; nothing waits in its queue), and ``propose`` retries
   with a short back-off until the deadline, then raises
   :class:`~raftcoord.errors.UnavailableError`. Refusals that prove the
   command was not applied (``QUEUE_FULL``, ``MISSING_LEADER``,
   ``NOT_LEADER``, ``DISCARDED``) end, at the deadline, in
   ``UnavailableError`` or :class:`~raftcoord.errors.TimeoutError`.
4. **Retried.** ``LEADER_CHANGED``, ``UNKNOWN_OUTCOME`` and an attempt that
   stays unanswered for ``retry_interval`` are ambiguous (hazard 4): the same
   bytes are proposed again, and the store's at-most-once sessions (the
   ``req`` field) turn a second application into the remembered result. If
   the deadline passes while any attempt may still apply, ``propose`` raises
   :class:`~raftcoord.errors.UnknownOutcomeError`. Commands without ``req``
   must be idempotent (a barrier is) or be proposed with
   ``retry_ambiguous=False``.
5. **Reads.** :meth:`read` with ``consistency="linearizable"`` first commits
   a ``{"op": "barrier"}`` entry and waits until this replica applied it. A
   barrier commits only in the term of the leader that appended it, so a
   leader cut off from the majority cannot pass one (hazard 2). Readers that
   arrive while a barrier is in flight share the next one: any burst of
   readers costs at most two rounds. :meth:`read` runs a function under the
   state lock and is for short reads only; anything sized by a client goes
   through :meth:`read_view`, which answers as of one revision while it
   takes the lock a chunk at a time (``views.py``), and the Raft thread
   takes that lock before any waiting reader.
6. **Status.** :meth:`status` never waits for the Raft thread: the Raft
   thread refreshes a snapshot of its state as it ticks, and a stalled Raft
   thread shows as ``healthy: False`` with ``stalled_for`` seconds, never as
   an error.
7. **Fail-stop.** A snapshot that fails to load (the engine's ``on_fatal``)
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
  ``serializer`` hooks next to the journal (hazards 6 and 9), never pickle.
  They are taken on the Raft thread, which must not apply anything while
  the store is read: ``store.snapshot()`` plus one file write took 11 ms
  for 10,000 keys (1.2 MB) and 170 ms for 100,000 keys (12 MB), once every
  ``compaction_entries`` commands; a larger state wants a larger setting.
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

Durability: the journal is written through ``mmap`` and, by default, never
flushed, so it survives a crash of the process (kill -9) but not of the
machine: what the kernel had not yet written back (up to about 35 s with
Linux's default ``vm.dirty_*`` settings) is lost, and so may be the
term/vote file, which lets a node vote twice in a term. With ``fsync=True``
every journal change is msync'ed before pysyncobj goes on (a follower
acknowledges only flushed entries), and the term/vote file and the snapshot
are fsync'ed with their directory, at about half the write rate. Still
open in pysyncobj either way: the term/vote file is renamed before it is
synced, and trimming the journal after a snapshot rewrites it in place, so
a crash in that instant loses this node's entries past the snapshot.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import inspect
import logging
import os
import threading
import time
import weakref
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
    RaftcoordError,
    ReplicaFailedError,
    TimeoutError,
    UnavailableError,
    UnknownOutcomeError,
    ValueFormatError,
)
from raftcoord.engine import Engine, Throttle
from raftcoord.raftfiles import Dump, FlushedJournal, align_journal, decode_dump, encode_dump, fsync_path
from raftcoord.values import encode_cbor
from raftcoord.views import PriorityLock, ReadView, ViewRegistry

if TYPE_CHECKING:
    from raftcoord.store import Applied, Store

__all__ = ["Replica", "ReplicaSettings", "open_replica_backend"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The command a read barrier commits; the store applies it as a no-op.
BARRIER: Final = encode_cbor({"op": "barrier"})
#: Outcomes that prove a command was not applied; any other failure
#: (LEADER_CHANGED, UNKNOWN_OUTCOME, no answer) leaves it unknown (hazard 4).
NOT_APPLIED: Final = frozenset(
    {FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER,
     FAIL_REASON.DISCARDED, FAIL_REASON.REQUEST_DENIED}
)
_REASON_NAMES: Final = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}
_ROLES: Final = {0: "follower", 1: "candidate", 2: "leader"}
_BACKOFF: Final = (0.01, 0.25)  # first and longest pause between refused attempts
#: Least seconds between two refreshes of the cached status (a refresh costs
#: about 40 us; under load the Raft thread ticks thousands of times a second).
_STATUS_EVERY: Final = 0.01


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
    #: Compact the log (snapshot) past this many entries...
    compaction_entries: int = 10000
    #: ...or this long after the previous snapshot.
    compaction_seconds: float = 3600.0
    #: How long one attempt of a proposal may stay unanswered before the same
    #: bytes are proposed again.
    retry_interval: float = 2.0
    #: Commands waiting for the Raft thread before QUEUE_FULL.
    queue_size: int = 100000
    #: Largest command accepted by :meth:`Replica.propose`.
    max_command_bytes: int = 1536 * 1024
    #: Flush the journal on every change and fsync term/vote and snapshots.
    fsync: bool = False

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
        need(self.compaction_entries >= 2, "compaction_entries", "must be at least 2")
        need(self.compaction_seconds > 0, "compaction_seconds", "must be positive")
        need(self.retry_interval > 0, "retry_interval", "must be positive")
        need(self.queue_size > 0, "queue_size", "must be positive")
        need(self.max_command_bytes > 0, "max_command_bytes", "must be positive")

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
# Proposals and read barriers


class _Proposal:
    """The attempts of one ``propose`` call and what came back for them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.current = 0  # the attempt being waited for
        self.pending = 0  # attempts without an answer
        self.ambiguous = False  # some attempt may have applied
        self.error: int | None = None  # refusal of the current attempt
        self.result: dict[str, Any] | None = None
        self.closed = False

    def start_attempt(self) -> Callable[[Any, int], None]:
        with self.cond:
            self.current += 1
            self.pending += 1
            self.error = None
            attempt = self.current
        fired = False

        def callback(result: Any, reason: int) -> None:
            nonlocal fired
            with self.cond:
                if fired:
                    return
                fired = True
                self.pending -= 1
                if reason == FAIL_REASON.SUCCESS:
                    if self.result is None:
                        self.result = result
                elif reason not in NOT_APPLIED:
                    self.ambiguous = True
                if attempt == self.current and reason != FAIL_REASON.SUCCESS:
                    self.error = reason
                self.cond.notify_all()

        return callback

    def wait(self, until: float) -> str | int:
        """"ok", "closed", "timeout", or the current attempt's failure code."""
        with self.cond:
            while True:
                if self.result is not None:
                    return "ok"
                if self.closed:
                    return "closed"
                if self.error is not None:
                    error, self.error = self.error, None
                    return error
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                self.cond.wait(remaining)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _Round:
    """One barrier shared by the readers that joined it before it started."""

    def __init__(self) -> None:
        self.deadline = 0.0
        self.waiters = 0
        self.done = threading.Event()
        self.error: RaftcoordError | None = None


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
    replaced the store, since no ``on_applied`` call tells of those changes.
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
        self._closed = False
        self._failed: str | None = None  # why the replica stopped for good (defect 8)
        self._close_lock = threading.Lock()  # also guards _proposals, which close() walks
        self._proposals: weakref.WeakSet[_Proposal] = weakref.WeakSet()
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
        self._giveups = Throttle(5.0)
        self._dump_written = False
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
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._engine._poller.subscribe(self._wake_r, self._drain_wakeups, POLL_EVENT_TYPE.READ)
        self._barrier_cond = threading.Condition()
        self._barrier_next: _Round | None = None
        self._barrier_thread = threading.Thread(target=self._run_barriers, name=f"raftcoord-barrier-{self_address}",
                                                daemon=True)
        self._thread = threading.Thread(target=self._run, name=f"raftcoord-raft-{self_address}", daemon=True)
        self._refresh_status()  # the Raft thread is not running yet: safe here
        self._thread.start()
        self._barrier_thread.start()

    def _start_engine(self, partners: list[str], password: str | None, bind: str | None) -> Engine:
        s = self.settings
        journal = self.data_dir / "raft.journal"
        dump_path = self.data_dir / "raft.snapshot"
        if dump_path.exists():
            try:
                stat = dump_path.stat()
                dump = decode_dump(dump_path.read_bytes())
                self._startup_dump = ((stat.st_mtime_ns, stat.st_size), self._sm.restore(dump.state))
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
            serializer=self._write_dump,
            deserializer=self._read_dump,
            maxBindRetries=1,
            onStateChanged=self._on_state_changed,
        )
        extra: dict[str, Any] = {}
        if "on_fatal" in inspect.signature(Engine.__init__).parameters:
            extra["on_fatal"] = self._fail
        try:
            engine = Engine(self.self_address, partners, conf, self._apply, **extra)
        except Exception as exc:  # noqa: BLE001 - pysyncobj raises plain Exception subclasses
            raise UnavailableError(f"cannot start the raft engine on {self.self_address}: {exc}",
                                   field="raft") from None
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
                    self._last_tick = time.monotonic()
                    self._refresh_status(force=True)
                    self._run_tasks()
                    self._stop.wait(period)
                    continue
                try:
                    engine.doTick(period)
                except Exception:  # noqa: BLE001 - pysyncobj's own tick loop also logs and goes on
                    if self._tick_errors():
                        log.exception("raft tick failed (%d more not logged)", self._tick_errors.take())
                    self._stop.wait(period)
                if self._dump_written:
                    self._dump_written = False
                    if self.settings.fsync:
                        fsync_path(self.data_dir)  # the snapshot's rename
                self._run_tasks()
                self._watch_leader()
                self._last_tick = time.monotonic()
                self._refresh_status()
        finally:
            self._destroy_engine()
            self._run_tasks()
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = -1
            self._lock_file.close()

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
                "learners_connected": st["readonly_nodes_count"],
            }
        except Exception:  # noqa: BLE001 - a status must never take the Raft thread down
            if self._status_errors():
                log.exception("collecting the raft status failed (%d more not logged)", self._status_errors.take())

    def _fail(self, reason: str) -> None:
        """Stop this replica for good (fail-stop, defect 8); the engine's ``on_fatal``.

        Nothing is applied any more, the Raft thread stops answering peers
        (so this node never counts toward a commit), status reports role
        "failed", and propose/read raise ReplicaFailedError.
        """
        with self._close_lock:
            if self._failed is not None:
                return
            self._failed = reason or "fatal error"
            pending = list(self._proposals)
        log.critical("replica %s stopped: %s. It answers no peer and serves no request until restarted; "
                     "if it fails again, restore its data directory from a healthy node",
                     self.self_address or "(non-voting)", self._failed)
        for p in pending:
            p.close()

    def _apply(self, command: bytes) -> dict[str, Any]:
        """The replicated method's body; runs on the Raft thread; never raises."""
        if self._failed is not None:
            # The store may be behind the log (a snapshot failed to load):
            # applying on top of it would diverge.
            return {"ok": False, "revision": 0,
                    "error": {"code": ReplicaFailedError.code, "message": "the replica has failed"}}
        try:
            with self._state_lock.first():
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
            try:
                revision = self._store.revision
            except Exception:  # noqa: BLE001
                revision = 0
            return {"ok": False, "revision": revision,
                    "error": {"code": "internal", "message": f"internal error: {exc!r}"}}

    def _write_dump(self, path: str, data: tuple[Any, ...]) -> None:
        """pysyncobj ``serializer`` hook (Raft thread): the store's CBOR snapshot."""
        last, prev, cluster = data
        started = time.monotonic()
        blob = encode_dump(Dump(
            (bytes(last[0]), last[1], last[2]),
            (bytes(prev[0]), prev[1], prev[2]),
            tuple(sorted(n.id for n in cluster if n is not None)),
            self._store.snapshot(),
        ))
        with open(path, "wb") as f:
            f.write(blob)
            if self.settings.fsync:
                f.flush()
                os.fsync(f.fileno())
        self._dump_written = True
        elapsed = time.monotonic() - started
        (log.warning if elapsed > 0.1 else log.info)(
            "snapshot at log index %d: %d bytes in %.0f ms", last[1], len(blob), elapsed * 1000)

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
            loaded = (dump.last, dump.prev, list(dump.cluster))
        except Exception as exc:
            self._fail(f"cannot load the snapshot {path}: {exc!r}")
            raise
        with self._state_lock.first():
            self._store = store
            self._views.invalidate("the replica loaded a snapshot from the leader")
            if self._on_restored is not None:
                try:
                    self._on_restored()
                except Exception:  # noqa: BLE001
                    log.exception("on_restored callback failed")
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

    def _wake(self) -> None:
        with self._wake_lock:  # never write to a closed (and maybe reused) descriptor
            if self._wake_w >= 0:
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

    def propose(self, command: bytes, timeout: float, *, retry_ambiguous: bool = True) -> dict[str, Any]:
        """Commit ``command``, apply it here, and return the store's result.

        Raises UnavailableError or TimeoutError when the command certainly did
        not apply, UnknownOutcomeError when it may have (see the module doc).
        Refusals that prove the command did not apply are always retried;
        with ``retry_ambiguous=False`` an ambiguous outcome is raised at once
        and an unanswered attempt is waited for until the deadline, never
        proposed twice.
        """
        if not isinstance(command, (bytes, bytearray, memoryview)):
            raise InvalidInputError("a command must be bytes", field="command")
        command = bytes(command)
        if len(command) > self.settings.max_command_bytes:
            raise InvalidInputError(f"command of {len(command)} bytes exceeds the limit of "
                                    f"{self.settings.max_command_bytes}", field="command")
        self._check_open()
        if threading.current_thread() is self._thread:
            raise RuntimeError("propose() on the raft thread (e.g. in a listener) would wait for itself")
        deadline = time.monotonic() + timeout
        p = _Proposal()
        with self._close_lock:  # close() and _fail() walk the set (defect 15)
            self._proposals.add(p)
            if self._closed or self._failed is not None:
                p.close()
        refusal: int | None = None
        backoff = _BACKOFF[0]
        attempts = 0
        while True:
            attempts += 1
            callback = p.start_attempt()
            try:
                self._engine.apply(command, callback=callback)
                if self.settings.batch_appends:
                    self._wake()  # unbatched, pysyncobj wakes its own thread
            except Exception:  # noqa: BLE001 - e.g. the engine is being destroyed
                log.exception("handing a command to the raft engine failed")
                callback(None, FAIL_REASON.QUEUE_FULL)
            until = min(deadline, time.monotonic() + self.settings.retry_interval) if retry_ambiguous else deadline
            outcome = p.wait(until)
            if outcome == "ok":
                return p.result  # type: ignore[return-value]
            if outcome == "closed":
                break
            if outcome == "timeout":
                if not retry_ambiguous or time.monotonic() >= deadline:
                    break
                log.debug("attempt %d unanswered after %.1f s; proposing the same bytes again",
                          attempts, self.settings.retry_interval)
                continue
            log.debug("attempt %d refused: %s", attempts, _REASON_NAMES.get(outcome, outcome))
            if outcome in NOT_APPLIED:
                refusal = outcome
            elif not retry_ambiguous:
                break
            pause = p.wait(min(deadline, time.monotonic() + backoff))  # a late success still counts
            if pause == "ok":
                return p.result  # type: ignore[return-value]
            if pause == "closed" or time.monotonic() >= deadline:
                break
            backoff = min(2 * backoff, _BACKOFF[1])
        with p.cond:
            if p.result is not None:
                return p.result
            maybe = p.ambiguous or p.pending > 0
        if self._giveups():
            log.warning("gave up on a proposal after %d attempts (%s); %d more not logged", attempts,
                        "outcome unknown" if maybe else _REASON_NAMES.get(refusal, "closed"),
                        self._giveups.take())
        if maybe:
            raise UnknownOutcomeError(f"the command may or may not have been applied "
                                      f"({attempts} attempts in {timeout:g} s)")
        if p.closed:
            self._check_open()
            raise UnavailableError("the replica is closed")
        if refusal in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER):
            raise UnavailableError(f"no raft leader within {timeout:g} s; the command was not applied")
        raise TimeoutError(f"the command was not applied within {timeout:g} s "
                           f"(last refusal: {_REASON_NAMES.get(refusal, refusal)})")

    # ----------------------------------------------------------------- reads

    def read_barrier(self, timeout: float) -> None:
        """Return once every write acknowledged before this call is applied here.

        Commits a barrier through the log in the leader's current term (shared
        with concurrent readers) and waits until this replica applied it.
        Raises UnavailableError or TimeoutError if that does not happen in
        ``timeout`` seconds, e.g. on a leader cut off from the majority.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        with self._barrier_cond:
            rnd = self._barrier_next
            if rnd is None:
                rnd = self._barrier_next = _Round()
                self._barrier_cond.notify_all()
            rnd.deadline = max(rnd.deadline, deadline)
            rnd.waiters += 1
        if not rnd.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"read barrier not applied within {timeout:g} s")
        if rnd.error is not None:
            raise rnd.error

    def _run_barriers(self) -> None:
        while True:
            with self._barrier_cond:
                while self._barrier_next is None and not self._closed:
                    self._barrier_cond.wait()
                rnd, self._barrier_next = self._barrier_next, None
            if rnd is None:
                return
            try:
                self.propose(BARRIER, max(0.0, rnd.deadline - time.monotonic()))
            except UnknownOutcomeError as exc:
                rnd.error = TimeoutError(f"read barrier not applied in time: {exc.message}")
            except RaftcoordError as exc:
                rnd.error = exc
            rnd.done.set()

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
            pending = list(self._proposals)  # under the lock: propose() adds from other threads
        for p in pending:
            p.close()
        with self._barrier_cond:
            self._barrier_cond.notify_all()
        self._stop.set()
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if threading.current_thread() is not self._barrier_thread:
            self._barrier_thread.join()

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the replica is closed")
        if self._failed is not None:
            raise ReplicaFailedError(f"the replica has failed and serves nothing until restarted: {self._failed}")


def open_replica_backend(config: Any, node: str, **kwargs: Any) -> Replica:
    """The replica of ``node`` described by a cluster configuration.

    ``config`` is a :class:`raftcoord.config.ClusterConfig` (duck-typed, so
    this layer imports nothing from the service layer). A non-voter is a
    pysyncobj read-only node: no address of its own, it connects to the voters.
    """
    me = config.node(node)
    settings = ReplicaSettings(
        heartbeat_period=config.heartbeat_period,
        election_timeout_min=config.election_timeout_min,
        election_timeout_max=config.election_timeout_max,
        compaction_entries=config.compaction_entries,
        fsync=config.fsync,
    )
    partners = [n.raft for n in config.voters if n.name != me.name]
    return Replica(me.raft if me.voter else None, partners, me.data_dir,
                   password=config.secret, settings=settings, **kwargs)
