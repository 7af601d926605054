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

Compact results (issue 9). A retry must find the result of every request
still outstanding, and a txn of 1,000 puts has a 20 KB result: kept whole,
three of them filled a session. So a result over ``max_full_result_bytes``
is kept in a compact form, and when a session's results pass their byte
bound the oldest whole ones are made compact first; only if the compact
forms alone still pass it do the oldest become tombstones. A compact form
(a CBOR array, where a whole result is a map) keeps:

* every number, flag and short text (at most :data:`SHORT` bytes) of the
  result: ``ok``, ``revision``, ``succeeded``, ``deleted``, ``purged``, ...;
  of an error its code and field, and its message cut to :data:`SHORT`;
  of a posted message every field but a long ``payload``;
* of a txn's responses the same small fields of each (``op``, ``revision``,
  ``deleted``, ``count``, ``more``), equal neighbours counted once, so
  1,000 puts cost a few bytes;
* the names of what it dropped: ``prev_kv``, ``prev_kvs`` and range ``kvs``
  that were not empty, a long payload.

A retry gets the whole answer rebuilt when nothing was dropped, or when only
a message's payload was, which the retried post itself carries (the rebuilt
message must match every kept field, so another command under the same id
is not answered with a made-up message). Otherwise (a read's kvs, a prev_kv
are not kept) it gets "duplicate_request" naming the revision it applied at
and what is gone: a clear error the client can follow with a read, never
an answer with data missing.

Pure: no I/O, no clock, no randomness; ``now`` is the store's apply counter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from datetime import datetime

from raftcoord.commands import Post, decode_command
from raftcoord.errors import DuplicateRequestError, RaftcoordError, SessionExpiredError, ValueFormatError
from raftcoord.keys import MAX_CLOCK
from raftcoord.values import Message, decode_cbor, encode_cbor

__all__ = [
    "MAX_FULL_RESULT_BYTES",
    "MAX_RESULT_BYTES_PER_SESSION",
    "MAX_RESULTS_PER_SESSION",
    "MAX_SESSIONS",
    "SHORT",
    "Sessions",
    "compact_result",
    "expand_result",
]

#: Client sessions kept at once; registering one more evicts the least recently used.
MAX_SESSIONS: Final = 4096
#: Results remembered per session (tombstones included); beyond it the oldest go.
MAX_RESULTS_PER_SESSION: Final = 1024
#: Encoded bytes of the results a session keeps; beyond it the oldest are made
#: compact, and only if that is not enough become tombstones.
MAX_RESULT_BYTES_PER_SESSION: Final = 64 * 1024
#: Encoded bytes of a result kept whole; a larger one is kept compact at once.
MAX_FULL_RESULT_BYTES: Final = 8 * 1024
#: The longest text or bytes value a compact result keeps (a hostname fits).
SHORT: Final = 256
#: The first item of a compact form: its layout's version.
_COMPACT_V1: Final = 1
#: Maps of a result whose small fields a compact form keeps one level down.
_NESTED: Final = ("message", "error")


@dataclass(slots=True)
class _Session:
    last_used: int
    #: seq -> the result as canonical CBOR (immutable, and its size is its
    #: length): a map whole, an array compact; or None for a tombstone
    #: (applied; result not kept).
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
        max_full_result_bytes: int = MAX_FULL_RESULT_BYTES,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_results = max_results
        self.max_result_bytes = max_result_bytes
        self.max_full_result_bytes = max_full_result_bytes
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

    def check(
        self, client: str, seq: int, now: int, command: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Before applying request ``client/seq``: the remembered result (a
        copy), None if it is new, or raise why it must not be applied.

        ``command`` is the retried command: a compact result may need it to
        rebuild the answer (see the module docstring).
        """
        session = self._table.get(client)
        if session is None:
            raise SessionExpiredError(
                f"client session {client!r} is not registered or has expired; register a new one",
                field="req",
            )
        if seq in session.results:
            result = session.results[seq]
            if result is not None:
                # A refusal (expand_result raising) changes nothing, as elsewhere.
                if _is_compact(result):
                    answer = expand_result(result, command, f"{client}/{seq}")
                else:
                    answer = dict(decode_cbor(result, what="session result"))
                self._touch(client, session, now)
                return answer
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
            if len(data) > self.max_full_result_bytes:
                data = encode_cbor(compact_result(result))
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
        if session.total > self.max_result_bytes:
            self._shrink(session)

    def _shrink(self, session: _Session) -> None:
        """Bring a session's results under the byte bound: oldest whole ones
        made compact first, then oldest tombstoned (compact forms are small,
        so that second step needs many requests outstanding at once)."""
        order = sorted(session.results)
        for s in order:
            if session.total <= self.max_result_bytes:
                return
            data = session.results[s]
            if data is not None and not _is_compact(data):
                try:
                    small = encode_cbor(compact_result(decode_cbor(data, what="session result")))
                except RaftcoordError:  # never raise on the apply path: a tombstone is safe
                    small = None
                if small is None or len(small) < len(data):
                    self._put(session, s, small)
        for s in order:
            if session.total <= self.max_result_bytes:
                return
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


# ------------------------------------------------------------ compact forms


def _is_compact(data: bytes) -> bool:
    # CBOR major type 4 (array); a whole result is always a map (type 5).
    return bool(data) and data[0] >> 5 == 4


def _small(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, datetime)):
        return True
    if isinstance(v, (str, bytes)):
        return len(v) <= SHORT
    return isinstance(v, (list, tuple, dict)) and not v


def _shrink_map(m: Mapping[str, Any], *, cut_message: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    elided = []
    for k, v in m.items():
        if cut_message and k == "message" and isinstance(v, str) and len(v) > SHORT:
            out[k] = v[:SHORT] + "..."  # an error's code and field say what went wrong
        elif _small(v):
            out[k] = v
        else:
            elided.append(k)
    if elided:
        out["elided"] = sorted(elided)
    return out


def compact_result(result: Mapping[str, Any]) -> list[Any]:
    """The compact form of a store result: ``[1, top, runs]``.

    ``top`` is the result's small fields (``message`` and ``error`` shrunk
    one level down), with ``elided`` naming what was dropped; ``runs`` is
    ``[[count, response], ...]`` of the shrunk txn responses, equal
    neighbours counted once (``None`` when the result has no responses).
    Deterministic: it depends on the result alone.
    """
    top: dict[str, Any] = {}
    elided = []
    runs: list[list[Any]] | None = None
    for k, v in result.items():
        if k == "responses" and isinstance(v, list):
            runs = []
            last: Any = None
            for resp in v:
                if runs and resp == last:  # 1,000 equal puts: one comparison each
                    runs[-1][0] += 1
                    continue
                last = resp
                small = _shrink_map(resp) if isinstance(resp, Mapping) else {"elided": ["response"]}
                if runs and runs[-1][1] == small:
                    runs[-1][0] += 1
                else:
                    runs.append([1, small])
        elif k in _NESTED and isinstance(v, Mapping):
            top[k] = _shrink_map(v, cut_message=k == "error")
        elif _small(v):
            top[k] = v
        else:
            elided.append(k)
    if elided:
        top["elided"] = sorted(elided)
    return [_COMPACT_V1, top, runs]


def expand_result(data: bytes, command: Mapping[str, Any] | None, request: str) -> dict[str, Any]:
    """The answer a compact form (CBOR bytes) gives the retry ``command``.

    Raises :class:`DuplicateRequestError` when the answer needs what the
    form dropped (its message names the revision and what is gone), or
    when ``command`` is not the request whose result this is.
    """
    form = decode_cbor(data, what="session result")
    if not isinstance(form, list) or len(form) != 3 or form[0] != _COMPACT_V1:
        raise DuplicateRequestError(f"request {request} was answered before; its result is unreadable", field="req")
    _, top, runs = form
    result = dict(top)
    missing = list(result.pop("elided", ()))
    if runs is not None:
        responses: list[dict[str, Any]] = []
        for count, resp in runs:
            if "elided" in resp:
                missing.extend(f"{resp.get('op', 'response')} {name}" for name in resp["elided"])
            responses.extend(dict(resp) for _ in range(count))
        result["responses"] = responses
    message = result.get("message")
    if isinstance(message, Mapping) and "elided" in message:
        result["message"] = _rebuild_message(message, command, request)
    if missing:
        outcome = f", succeeded: {str(result['succeeded']).lower()}" if "succeeded" in result else ""
        raise DuplicateRequestError(
            f"request {request} was applied at revision {result.get('revision')}{outcome}; its "
            f"{', '.join(sorted(set(missing)))} are too large to be kept for a retry: read them again",
            field="req",
        )
    return result


def _rebuild_message(kept: Mapping[str, Any], command: Mapping[str, Any] | None, request: str) -> dict[str, Any]:
    # The payload came from the post itself: the retry carries it again.
    try:
        post = decode_command(command) if command is not None else None
        if isinstance(post, Post) and isinstance(kept.get("clock"), int):
            draft = post.draft()
            message = Message(
                type=draft.type,
                timestamp=draft.timestamp,
                clock=kept["clock"],
                from_host=draft.from_host,
                event=draft.event,
                payload=draft.payload,
            ).to_map()
            if encode_cbor(_shrink_map(message)) == encode_cbor(dict(kept)):
                return message
    except RaftcoordError:
        pass
    raise DuplicateRequestError(
        f"request {request} was answered before for another command; its message is not kept whole", field="req"
    )
