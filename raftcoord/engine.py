"""The guarded Raft engine: pysyncobj's SyncObj with one replicated method.

:class:`Engine` carries ``apply(command_bytes)`` and nothing else (hazard 8);
:class:`GuardedTransport` filters what peers send before pysyncobj sees it, so
that the places where pysyncobj 0.3.17 would otherwise lie are closed
(``notes/pysyncobj-hazards.md``; the numbers are that page's). The replica
(``replica.py``) drives the engine on its own thread; this module does no
business logic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.transport import TCPTransport

__all__ = ["Engine", "GuardedTransport", "Throttle", "cap_snapshot_commit", "skip_held_entries"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# The guards on incoming append_entries (hazards 3 and 5).


def cap_snapshot_commit(engine: Engine, message: dict[str, Any]) -> dict[str, Any]:
    """Hazard 3: a snapshot chunk must not commit this replica's own entries."""
    if "prevLogIdx" not in message and message["commit_index"] > engine.raftCommitIndex:
        return {**message, "commit_index": engine.raftCommitIndex}
    return message


def skip_held_entries(engine: Engine, message: dict[str, Any]) -> dict[str, Any]:
    """Hazard 5: do not let pysyncobj delete entries this replica already holds."""
    prev_idx, prev_term = message.get("prevLogIdx"), message.get("prevLogTerm")
    if prev_idx is None or message.get("transmission") is not None:
        return message
    if engine.rc_term_at(prev_idx) != prev_term:
        return message  # pysyncobj refuses it
    entries = message.get("entries") or []
    held = 0
    for _command, idx, term in entries:
        if engine.rc_term_at(idx) != term:
            break
        held += 1  # same index and term: the same entry (Log Matching)
    if held:
        _command, prev_idx, prev_term = entries[held - 1]
    rest = entries[held:]
    if not rest:
        last_idx, last_term = engine.rc_last_entry()
        if last_idx > prev_idx and last_term == message["term"]:
            # Entries of the leader's own term came from this leader: they
            # are in its log, and so is everything before them.
            prev_idx, prev_term = last_idx, last_term
    if prev_idx == message["prevLogIdx"]:
        return message
    return {**message, "entries": rest, "prevLogIdx": prev_idx, "prevLogTerm": prev_term}


class Throttle:
    """Lets a repeated log line through at most once per ``interval``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.suppressed = 0
        self._next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        return True

    def take(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class GuardedTransport(TCPTransport):
    """pysyncobj's TCP transport with the append_entries guards and peer logs."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        self._rc_up: set[Any] = set()
        self._rc_flaps: dict[Any, Throttle] = {}
        self._rc_refused = Throttle(60.0)
        super().__init__(syncObj, selfNode, otherNodes)

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if type(message) is dict and message.get("type") == "append_entries":
            if message.get("term", -1) >= self._syncObj.raftCurrentTerm:
                message = skip_held_entries(self._syncObj, cap_snapshot_commit(self._syncObj, message))
        super()._onMessageReceived(node, message)

    def _onNodeConnected(self, node: Any) -> None:  # noqa: N802
        if node not in self._rc_up:
            self._rc_up.add(node)
            flaps = self._rc_flaps.get(node)
            (log.debug if flaps is not None and flaps.suppressed else log.info)("raft peer %s connected", node)
        super()._onNodeConnected(node)

    def _onNodeDisconnected(self, node: Any) -> None:  # noqa: N802
        if node in self._rc_up:
            self._rc_up.discard(node)
            flaps = self._rc_flaps.setdefault(node, Throttle(30.0))
            if flaps():  # a peer that keeps reconnecting is reported twice a minute
                log.warning("raft peer %s disconnected (%d more disconnects not logged)", node, flaps.take())
            else:
                log.debug("raft peer %s disconnected", node)
        super()._onNodeDisconnected(node)

    def _onReadonlyNodeConnected(self, node: Any) -> None:  # noqa: N802
        log.info("non-voting replica connected")
        super()._onReadonlyNodeConnected(node)

    def _onDisconnected(self, conn: Any) -> None:  # noqa: N802
        if conn in self._unknownConnections and self._rc_refused():
            # pysyncobj drops a peer that fails authentication without a word
            # (upstream issue 175); this is the only trace of it.
            log.warning("closed an incoming raft connection that did not identify itself "
                        "(wrong cluster secret, or not a raft peer?); %d more not logged",
                        self._rc_refused.take())
        super()._onDisconnected(conn)


# --------------------------------------------------------------------------
# The engine: a SyncObj with one replicated method.


class Engine(SyncObj):
    """pysyncobj's SyncObj carrying ``apply(command_bytes)``, and nothing else."""

    def __init__(self, self_address: str | None, partners: list[str], conf: SyncObjConf,
                 sink: Callable[[bytes], dict[str, Any]]) -> None:
        self._rc_sink = sink
        super().__init__(self_address, partners, conf=conf, transportClass=GuardedTransport)

    @replicated
    def apply(self, command: bytes) -> dict[str, Any]:
        """The one replicated method (hazard 8): apply a command to the store."""
        return self._rc_sink(command)

    # pysyncobj keeps its log private; these are the only reads of it.
    def rc_term_at(self, idx: int) -> int | None:
        """The term of the entry at ``idx`` in this replica's log, or None."""
        journal = self._SyncObj__raftLog  # type: ignore[attr-defined]
        pos = idx - journal[0][1]
        return journal[pos][2] if 0 <= pos < len(journal) else None

    def rc_last_entry(self) -> tuple[int, int]:
        """``(index, term)`` of the last entry in this replica's log."""
        entry = self._SyncObj__raftLog[-1]  # type: ignore[attr-defined]
        return entry[1], entry[2]
