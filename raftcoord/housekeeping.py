"""A node's timer work: its own state, liveness marking, retention purges.

A :class:`Housekeeper` runs one thread per node, embedded or served, and
every :data:`HOUSEKEEPING_PERIOD` seconds does what nobody asks for:

* **Its own state.** Once the cluster has a leader the node writes
  ``joining``; once it has caught up (its applied index reached the commit
  index the leader last told it) it writes ``up``. :meth:`Housekeeper.stop`
  writes ``leaving`` and then ``down``, best effort: a node that cannot reach
  a leader at stop time stops anyway.
* **Liveness, on the leader only.** The leader hears every follower and
  every named non-voter at each Raft heartbeat; the replica's status carries
  the seconds since each was last heard (``status["peers"]``, by raft
  address). A node whose record says it is there (``up``, ``joining``,
  ``idle``, ``unknown``, ``leaving``) and that the leader has not heard from
  for ``node_timeout`` seconds is marked ``unreachable``; a node whose
  record says ``unreachable`` and that is heard again is marked ``up``. A
  new leader gives every node ``node_timeout`` seconds of grace first, since
  it has heard nobody yet. Only changes are written (nothing while everyone
  is healthy), each as a ``node`` command with ``expect_revision``, so a
  mark never overwrites a newer record the node wrote itself. A non-voter
  is judged only once it has named itself to this leader (``engine.HELLO``);
  one that never did, e.g. one that died before this leader was elected,
  keeps whatever its record says.
* **Retention, on the leader only.** Every :data:`PURGE_PERIOD` seconds, a
  purge of messages older than ``message_retention_seconds`` or beyond
  ``message_retention_count``, with the cut-off inside the command (the
  state machine never reads a clock).

Nothing here may stop a node: a failed round (no leader, a slow Raft
thread, a bug) is logged at most once a minute, and the next round tries
again. The coordinator is duck-typed (``status``, ``read``, ``execute``,
``purge_messages``, ``host``, ``addr``, ``cluster``, ``clock``): this
module sits beside ``coordinator.py`` and imports nothing above it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from raftcoord.errors import ConflictError, RaftcoordError
from raftcoord.values import NodeState, NodeStatus

__all__ = ["FAILURE_LOG_PERIOD", "HOUSEKEEPING_PERIOD", "PURGE_PERIOD", "Housekeeper", "annotate_states"]

log = logging.getLogger(__name__)

#: Seconds between two rounds (liveness is judged at most this late).
HOUSEKEEPING_PERIOD: Final = 0.5
#: How often the leader proposes a retention purge.
PURGE_PERIOD: Final = 30.0
#: Housekeeping failures are logged at most once per this many seconds.
FAILURE_LOG_PERIOD: Final = 60.0
#: Default seconds the leader waits without hearing a node before marking it.
DEFAULT_NODE_TIMEOUT: Final = 5.0

#: Records that claim the node is there: the leader may mark them unreachable.
_PRESENT: Final = frozenset({NodeStatus.UP, NodeStatus.JOINING, NodeStatus.IDLE, NodeStatus.UNKNOWN,
                             NodeStatus.LEAVING})


def annotate_states(states: Iterable[NodeState], status: Mapping[str, Any]) -> list[NodeState]:
    """``states`` with ``role`` and ``heard_ago`` filled in from a replica's ``status``.

    ``status`` is the answering node's :meth:`Coordinator.status`. Roles:
    the leader's record (by raft address) is "leader", a voter's "follower"
    (this node's own: its role, e.g. "candidate"), any other "non-voter".
    ``heard_ago`` is 0 for the node itself and the seconds since its replica
    last heard the node otherwise; a follower hears only the leader, so on a
    follower every other node's ``heard_ago`` is None. Without a Raft status
    (the in-memory backend) both stay None.
    """
    states = list(states)
    if status.get("backend") != "raft":
        return states
    me = status.get("self")  # None on a non-voter
    host = status.get("host")
    leader = status.get("leader")
    voters = set(status.get("partners") or ())
    if me is not None:
        voters.add(me)
    peers: Mapping[str, float] = status.get("peers") or {}
    is_leader = status.get("role") == "leader"
    out = []
    for state in states:
        addr = state.addr
        own = state.host == host or (me is not None and addr == me)
        if addr and addr == leader:
            role: str | None = "leader"
        elif own:
            own_role = status.get("role")
            role = "non-voter" if me is None else own_role if own_role in ("follower", "candidate") else None
        elif addr in voters:
            role = "follower"
        else:
            role = "non-voter" if addr else None
        heard: float | None
        if own:
            heard = 0.0
        elif is_leader or addr == leader:
            heard = peers.get(addr)
        else:
            heard = None
        out.append(replace(state, role=role, heard_ago=heard))
    return out


class Housekeeper:
    """The timer work of one node (see the module docstring); a thread of its own.

    ``coordinator`` is the node's :class:`~raftcoord.coordinator.Coordinator`
    (duck-typed), ``config`` its :class:`~raftcoord.config.ClusterConfig`
    (duck-typed; ``node_timeout``, ``message_retention_seconds`` and
    ``message_retention_count`` are read from it, with defaults) or None.
    ``now`` replaces the wall clock used for record timestamps and purge
    cut-offs.
    """

    def __init__(self, coordinator: Any, config: Any, node_name: str, *,
                 period: float = HOUSEKEEPING_PERIOD, now: Callable[[], datetime] | None = None) -> None:
        self.coordinator = coordinator
        self.config = config
        self.node_name = node_name
        self.period = period
        self.node_timeout = float(getattr(config, "node_timeout", DEFAULT_NODE_TIMEOUT))
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._addr_of = {n.name: n.raft for n in getattr(config, "nodes", ())}
        self._stopping = threading.Event()
        self._write_lock = threading.Lock()  # own-state writes: "up" must never land after "leaving"
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: "new" (nothing written), "joining", "up", then "stopped".
        self.phase = "new"
        self._catch_up_to: int | None = None
        self._leader_term: Any = None
        self._leader_since = 0.0
        self._last_purge: float | None = None
        self._failing_since: float | None = None
        self._last_failure_log = -FAILURE_LOG_PERIOD
        self._failures = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the thread; the first round runs at once."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"raftcoord-housekeeping-{self.node_name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, then write ``leaving`` and ``down`` within ``timeout`` seconds.

        Best effort and idempotent: nothing is written if the node never
        wrote ``joining``, and a write that fails or takes too long is logged
        and skipped. Never raises.
        """
        deadline = time.monotonic() + timeout
        self._stopping.set()
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()) / 2)
        if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            log.info("node %s: a state write is still running; not recording leaving/down", self.node_name)
            return
        try:
            if self.phase == "new":
                return
            self.phase = "stopped"
            for status in (NodeStatus.LEAVING, NodeStatus.DOWN):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.info("node %s: no time left to record %s", self.node_name, status.value)
                    return
                try:
                    self._write_own(status, timeout=left)
                except Exception as exc:  # noqa: BLE001 - stopping goes on whatever happens
                    log.info("node %s: could not record the %s state: %s", self.node_name, status.value,
                             _reason(exc))
                    return
            log.info("node %s: recorded leaving, then down", self.node_name)
        finally:
            self._write_lock.release()

    def _run(self) -> None:
        while True:
            self.run_once()
            if self._stopping.wait(self.period):
                return

    def run_once(self) -> None:
        """One round; a failure is logged at most once a minute, never raised."""
        try:
            self._round()
        except Exception as exc:  # noqa: BLE001 - nothing here may stop the node
            now = time.monotonic()
            self._failures += 1
            if self._failing_since is None:
                self._failing_since = now
            if now - self._last_failure_log >= FAILURE_LOG_PERIOD:
                self._last_failure_log = now
                log.warning(
                    "node %s: housekeeping failed (%d times in %.0f s; the node carries on): %s",
                    self.node_name, self._failures, now - self._failing_since, _reason(exc),
                    exc_info=not isinstance(exc, RaftcoordError),
                )
                self._failures = 0
        else:
            if self._failing_since is not None:
                log.info("node %s: housekeeping works again", self.node_name)
                self._failing_since = None
                self._failures = 0
                self._last_failure_log = -FAILURE_LOG_PERIOD

    # --------------------------------------------------------------- rounds

    def _round(self) -> None:
        coord = self.coordinator
        status = coord.status()
        if not status.get("leader"):
            self._leader_term = None
            return
        if self.phase in ("new", "joining"):
            self._announce(status)
        if status.get("role") != "leader":
            self._leader_term = None
            return
        now = time.monotonic()
        if status.get("term") != self._leader_term or self._leader_term is None:
            # A new leader has heard from nobody yet: everyone gets a grace.
            self._leader_term = status.get("term")
            self._leader_since = now
        # A leader whose own Raft thread stalls, or that lost its majority,
        # cannot tell silence from its own deafness, and could not commit a
        # mark anyway: it judges nobody until it is sound again.
        sound = status.get("healthy") is not False and status.get("has_quorum") is not False
        if status.get("backend") == "raft" and sound:
            self._judge(status, grace_over=now - self._leader_since >= self.node_timeout)
        if self._last_purge is None or now - self._last_purge >= PURGE_PERIOD:
            self._last_purge = now
            self._purge()

    def _announce(self, status: Mapping[str, Any]) -> None:
        with self._write_lock:
            if self._stopping.is_set():
                return
            if self.phase == "new":
                self._write_own(NodeStatus.JOINING)
                self.phase = "joining"
                log.info("node %s: joining (leader %s)", self.node_name, status.get("leader"))
                status = self.coordinator.status()
                target = status.get("leader_commit_index")
                self._catch_up_to = int(target if target is not None else status.get("commit_index") or 0)
            applied = status.get("last_applied") or 0
            if self._catch_up_to is not None and applied >= self._catch_up_to:
                self._write_own(NodeStatus.UP)
                self.phase = "up"
                log.info("node %s: up (applied index %d reached the leader's commit index %d)",
                         self.node_name, applied, self._catch_up_to)

    def _write_own(self, status: NodeStatus, *, timeout: float | None = None) -> None:
        coord = self.coordinator
        state = NodeState(host=coord.host, status=status, clock=coord.clock, timestamp=self._now(),
                          addr=coord.addr or self._addr_of.get(self.node_name, ""), cluster=coord.cluster)
        coord.execute({"op": "node", "state": state.to_map()}, timeout=timeout)

    def _records(self) -> list[tuple[NodeState, int]]:
        def read(store: Any) -> list[tuple[NodeState, int]]:
            out = []
            for state in store.node_states():
                kv = store.get(state.key)
                if kv is not None:
                    out.append((state, kv.mod_revision))
            return out

        return list(self.coordinator.read(read, consistency="serializable"))

    def _judge(self, status: Mapping[str, Any], *, grace_over: bool) -> None:
        """Leader: mark the nodes it stopped hearing, and those heard again."""
        peers: Mapping[str, float] = status.get("peers") or {}
        voters = set(status.get("partners") or ())
        timeout = self.node_timeout
        for state, mod in self._records():
            if state.host == self.node_name or state.host == self.coordinator.host:
                # Nobody else marks the leader up again after it was itself
                # marked unreachable (paused, then re-elected): it does.
                if state.status is NodeStatus.UNREACHABLE and not self._stopping.is_set():
                    self._mark(state, mod, NodeStatus.UP, "it leads again")
                continue
            addr = state.addr or self._addr_of.get(state.host, "")
            if not addr or (addr not in voters and addr not in peers):
                continue  # a node this leader has no way to hear (a non-voter that never named itself)
            age = peers.get(addr)
            if state.status in _PRESENT and grace_over and (age is None or age >= timeout):
                heard = "never heard" if age is None else f"not heard for {age:.1f} s"
                self._mark(state, mod, NodeStatus.UNREACHABLE, heard)
            elif state.status is NodeStatus.UNREACHABLE and age is not None and age < timeout / 2:
                # Half the timeout: a node heard just often enough does not flap.
                self._mark(state, mod, NodeStatus.UP, f"heard {age:.1f} s ago")

    def _mark(self, state: NodeState, mod_revision: int, status: NodeStatus, why: str) -> None:
        new = replace(state, status=status, timestamp=self._now())
        try:
            # Bounded: the next round retries, and a round stuck on one mark
            # would hold back every other node's.
            self.coordinator.execute({"op": "node", "state": new.to_map(), "expect_revision": mod_revision},
                                     timeout=max(1.0, self.node_timeout))
        except ConflictError:
            log.debug("node %s wrote its own record meanwhile; not marking it %s", state.host, status.value)
            return
        log.info("marked node %s %s (%s)", state.host, status.value, why)

    def _purge(self) -> None:
        seconds = float(getattr(self.config, "message_retention_seconds", 3600.0))
        count = int(getattr(self.config, "message_retention_count", 10000))
        before = self._now() - timedelta(seconds=seconds)
        try:
            n = self.coordinator.purge_messages(before=before, max_count=count)
        except RaftcoordError as exc:
            log.info("message purge not applied: %s", exc.message)
            return
        if n:
            log.info("purged %d messages (older than %s or beyond %d)", n, before.isoformat(), count)


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, RaftcoordError) else f"{type(exc).__name__}: {exc}"
