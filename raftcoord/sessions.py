"""Client sessions of the state machine: at-most-once for retried commands.

A session is registered through the log (the ``session`` command) and gets
an id the store assigns, so every replica holds the same table and no client
can make up an id. A command carrying ``req: [client, seq, low]`` is applied
only if its session is live; its result is remembered under ``seq`` until the
client says it is done with it (``low`` above it) or room runs out.

What makes this safe (the Raft dissertation, section 6.3, with bounds):

* A command of an unknown or evicted session is refused ("session_expired")
  and never applied: an eviction can cost a client its session, never a
  second application of a request.
* A forgotten result is never applied again: dropping results by count
  raises the session's floor past them, and a result too large to keep
  leaves a tombstone, so a retry gets "duplicate_request".
* Sessions are bounded by count (least recently used first), results by count
  and bytes per session; all by the log alone, so replicas agree.

Pure: no I/O, no clock, no randomness; ``now`` is the store's apply counter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from raftcoord.errors import DuplicateRequestError, RaftcoordError, SessionExpiredError, ValueFormatError
from raftcoord.keys import MAX_CLOCK
from raftcoord.values import decode_cbor, encode_cbor

__all__ = ["MAX_RESULT_BYTES_PER_SESSION", "MAX_RESULTS_PER_SESSION", "MAX_SESSIONS", "Sessions"]

#: Client sessions kept at once; registering one more evicts the least recently used.
MAX_SESSIONS: Final = 4096
#: Results remembered per session (tombstones included); beyond it the oldest go.
MAX_RESULTS_PER_SESSION: Final = 1024
#: Encoded bytes of the results a session keeps; beyond it the oldest become tombstones.
MAX_RESULT_BYTES_PER_SESSION: Final = 64 * 1024


@dataclass(slots=True)
class _Session:
    last_used: int
    #: seq -> the result as canonical CBOR (immutable, and its size is its
    #: length), or None for a tombstone (applied; result not kept).
    results: dict[int, bytes | None] = field(default_factory=dict)
    low: int = 0
    total: int = 0


class Sessions:
    """The session table. Methods take ``now``: the store's apply counter."""

    def __init__(
        self,
        *,
        max_sessions: int = MAX_SESSIONS,
        max_results: int = MAX_RESULTS_PER_SESSION,
        max_result_bytes: int = MAX_RESULT_BYTES_PER_SESSION,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_results = max_results
        self.max_result_bytes = max_result_bytes
        # Least recently used first; the order follows the log, so it is the
        # same on every replica (and rebuilt from last_used on restore).
        self._table: OrderedDict[str, _Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, client: object) -> bool:
        return client in self._table

    def clients(self) -> list[str]:
        """Live session ids, least recently used first."""
        return list(self._table)

    def register(self, now: int) -> str:
        """A new session, with an id derived from ``now``; may evict the LRU one."""
        client = f"c{now}"
        n = 0
        while client in self._table:  # only after restoring ids of another scheme
            n += 1
            client = f"c{now}.{n}"
        self._table[client] = _Session(now)
        while len(self._table) > self.max_sessions:
            self._table.popitem(last=False)
        return client

    def check(self, client: str, seq: int, now: int) -> dict[str, Any] | None:
        """Before applying request ``client/seq``: the remembered result (a
        copy), None if it is new, or raise why it must not be applied."""
        session = self._table.get(client)
        if session is None:
            raise SessionExpiredError(
                f"client session {client!r} is not registered or has expired; register a new one",
                field="req",
            )
        if seq in session.results:
            result = session.results[seq]
            if result is not None:
                self._touch(client, session, now)
                return dict(decode_cbor(result, what="session result"))
        elif seq >= session.low:
            return None
        raise DuplicateRequestError(
            f"request {client}/{seq} was answered before and its result is no longer kept", field="req"
        )

    def remember(self, client: str, seq: int, low: int, result: dict[str, Any], now: int) -> None:
        """Keep ``result`` for request ``client/seq`` (checked by :meth:`check` first)."""
        session = self._table[client]
        self._touch(client, session, now)
        session.low = max(session.low, low)
        try:
            data: bytes | None = encode_cbor(result)
        except RaftcoordError:  # cannot happen for a result the store built; never raise here
            data = None
        self._put(session, seq, data)
        for old in [s for s in session.results if s < session.low]:
            self._drop(session, old)
        while len(session.results) > self.max_results:
            oldest = min(session.results)
            self._drop(session, oldest)
            # A dropped entry must never be applied again: raise the floor.
            session.low = max(session.low, oldest + 1)
        for s in sorted(session.results):
            if session.total <= self.max_result_bytes:
                break
            if session.results[s] is not None:
                self._put(session, s, None)

    def _touch(self, client: str, session: _Session, now: int) -> None:
        session.last_used = now
        self._table.move_to_end(client)

    @staticmethod
    def _put(session: _Session, seq: int, result: bytes | None) -> None:
        old = session.results.get(seq)
        session.total += len(result or b"") - len(old or b"")
        session.results[seq] = result

    @staticmethod
    def _drop(session: _Session, seq: int) -> None:
        session.total -= len(session.results.pop(seq) or b"")

    # ------------------------------------------------------------- snapshots

    def to_snapshot(self) -> list[Any]:
        """Sessions as CBOR-able lists, by client id; results as CBOR bytes or None."""
        return [
            [client, s.last_used, s.low, [[seq, s.results[seq]] for seq in sorted(s.results)]]
            for client, s in sorted(self._table.items())
        ]

    def load_snapshot(self, items: Any, *, results_as_maps: bool = False) -> None:
        """Replace the table by :meth:`to_snapshot` output; snapshot format 1
        kept results as maps (``results_as_maps``) and had no tombstones."""

        def uint(v: Any, name: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK:
                raise ValueFormatError(f"snapshot {name} must be a uint64, got {v!r}", field=name)
            return v

        loaded = []
        for client, last_used, low, results in items:
            if not isinstance(client, str):
                raise ValueFormatError("snapshot session id must be text", field="sessions")
            session = _Session(uint(last_used, "last_used"), low=uint(low, "low"))
            for seq, res in results:
                if results_as_maps and isinstance(res, Mapping):
                    res = encode_cbor(dict(res))
                elif res is not None and not isinstance(res, bytes):
                    raise ValueFormatError("snapshot session result must be CBOR bytes", field="sessions")
                self._put(session, uint(seq, "seq"), res)
            loaded.append((session.last_used, client, session))
        self._table.clear()
        for _, client, session in sorted(loaded, key=lambda t: (t[0], t[1])):
            self._table[client] = session
