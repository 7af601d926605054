"""The coordinator's state machine: a sorted key-value map, revisions, the clock.

Theory of operation
-------------------
A :class:`Store` is a pure, deterministic function of the commands applied to
it. ``Store.apply(command_bytes)`` is its one entry point for change: it takes
one CBOR command, applies it or refuses it, and returns an :class:`Applied`
value holding the result (plain CBOR-able data, sent back to whoever proposed
the command) and the events it caused (for observers and watches). Everything
else here only reads.

Two rules keep replicas identical, and this module exists to keep them:

1. It does no I/O, reads no clock, draws no random number and starts no
   thread. Whatever varies between nodes (the time, the sender's host and
   Lamport clock, a request id) is decided by the proposer and arrives inside
   the command.
2. It never raises from ``apply``. A command that is malformed or refused
   gives an error result (``{"ok": False, "error": {...}}``), identical on
   every replica, and leaves the state exactly as it was: every command is
   validated in full before anything is changed.

State: one sorted map of bytes keys to records (value, create revision, mod
revision, version) with a global revision, as etcd keeps it; the coordinator
Lamport clock; the message floor (the highest clock purged, so that a reader
resuming from before it learns of the gap); and client sessions, which
remember recent results by request id so a retried command applies at most
once (the Raft dissertation's section 6.3).

Commands (CBOR maps with text keys; ``op`` selects the command)::

    put       key, value, [prev_kv]
    delete    key, [range_end], [prev_kv]
    txn       compare: [..], success: [ops], failure: [ops]
    post      from, clock, type, timestamp, [event], [payload]
    node      state: {host, status, clock, timestamp, addr, cluster, ...}
    purge     [before: time], [max_count]
    truncate
    barrier   (changes nothing; a read barrier through the log)

Any command may carry ``req: [client_id, seq, lowest_outstanding]``.
Node and message records live in the same map under their key headers;
raw writes under those headers are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sortedcontainers import SortedDict

from raftcoord import clock as lamport
from raftcoord.errors import (
    CommandError,
    CompactedError,
    DuplicateRequestError,
    RaftcoordError,
    ReservedKeyError,
    ValueFormatError,
)
from raftcoord.keys import (
    MAX_CLOCK,
    MESSAGE_PREFIX,
    NODE_PREFIX,
    MessageKey,
    NodeKey,
    is_reserved,
    prefix_end,
)
from raftcoord.events import (
    Applied,
    Event,
    KeyDeleted,
    KeyPut,
    KeyValue,
    MessagePosted,
    NodeStateSet,
    RangeResult,
)
from raftcoord.values import Message, NodeState, decode_cbor, encode_cbor

__all__ = [
    "MAX_COMMAND_BYTES",
    "Applied",
    "KeyDeleted",
    "KeyPut",
    "KeyValue",
    "MessagePosted",
    "NodeStateSet",
    "RangeResult",
    "Store",
]

#: Commands larger than this are refused (pysyncobj slows badly past 1 MiB).
MAX_COMMAND_BYTES: Final = 1536 * 1024
#: Client sessions remembered at once; the least recently used is dropped.
MAX_SESSIONS: Final = 4096
#: Results remembered per client session, beyond which the oldest are dropped.
MAX_RESULTS_PER_SESSION: Final = 1024
SNAPSHOT_FORMAT: Final = 1
FIRST_REVISION: Final = 1  # as in etcd: an empty store is at revision 1

_COMPARE_TARGETS: Final = ("value", "version", "create", "mod", "keys")
_COMPARE_RESULTS: Final = ("equal", "not_equal", "greater", "less")


# --------------------------------------------------------------------------
# Command field validation


def _field(cmd: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, default: Any = ...) -> Any:
    if name not in cmd:
        if default is ...:
            raise CommandError(f"command has no {name!r} field", field=name)
        return default
    value = cmd[name]
    if isinstance(value, bool) and kind is int:
        raise CommandError(f"{name} must be an integer, not a boolean", field=name)
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CommandError(f"{name} must be {expected}, not {type(value).__name__}", field=name)
    return value


def _uint_field(cmd: Mapping[str, Any], name: str, *, default: Any = ..., maximum: int = MAX_CLOCK) -> Any:
    value = _field(cmd, name, int, default=default)
    if value is not None and value is not default and not 0 <= value <= maximum:
        raise CommandError(f"{name} must be 0-{maximum}, got {value}", field=name)
    return value


def _key_field(cmd: Mapping[str, Any], name: str = "key") -> bytes:
    key = _field(cmd, name, bytes)
    if not key:
        raise CommandError(f"{name} must not be empty", field=name)
    return key


def _check_writable(key: bytes) -> None:
    if is_reserved(key):
        raise ReservedKeyError(
            f"key {key!r} is under a coordinator header; node and message records change only "
            "through their own API",
            field="key",
        )


def _error(exc: RaftcoordError, revision: int) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_dict(), "revision": revision}


@dataclass(slots=True)
class _Record:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    def kv(self, key: bytes) -> KeyValue:
        """This record as the public, immutable KeyValue."""
        return KeyValue(key, self.value, self.create_revision, self.mod_revision, self.version)


@dataclass(slots=True)
class _Session:
    last_used: int
    results: dict[int, dict[str, Any]]
    low: int = 0


class Store:
    """The deterministic state machine. See the module docstring."""

    def __init__(self) -> None:
        self._data: SortedDict[bytes, _Record] = SortedDict()
        self._revision = FIRST_REVISION
        self._clock = 0
        self._message_floor = 0
        self._applied = 0
        self._sessions: dict[str, _Session] = {}

    # ----------------------------------------------------------------- reads

    @property
    def revision(self) -> int:
        """The revision of the last change (etcd's header revision)."""
        return self._revision

    @property
    def clock(self) -> int:
        """The coordinator's Lamport clock: the clock of the last message."""
        return self._clock

    @property
    def message_floor(self) -> int:
        """The highest message clock purged; earlier clocks are gone."""
        return self._message_floor

    @property
    def applied(self) -> int:
        """How many commands were applied (refused ones included)."""
        return self._applied

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> KeyValue | None:
        """The key's current value and revisions, or None."""
        rec = self._data.get(key)
        return None if rec is None else rec.kv(key)

    def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        offset: int = 0,
        descending: bool = False,
    ) -> RangeResult:
        """Keys in ``[key, range_end)`` with etcd's conventions.

        An empty ``range_end`` means the key alone; ``b"\\0"`` means every key
        from ``key`` on (and ``key == b"\\0"`` too means every key). ``count``
        is the number of keys in the range, ``more`` whether ``limit`` cut it.
        """
        keys = list(self._keys_in(key, range_end, reverse=descending))
        count = len(keys)
        selected = keys[offset:]
        more = False
        if limit and len(selected) > limit:
            selected, more = selected[:limit], True
        return RangeResult(tuple(self.get(k) for k in selected), count, more)  # type: ignore[misc]

    def _keys_in(self, key: bytes, range_end: bytes, *, reverse: bool = False) -> Iterator[bytes]:
        if not range_end:
            if key in self._data:
                yield key
            return
        if range_end == b"\x00":
            minimum, maximum = (None if key == b"\x00" else key), None
        else:
            if range_end <= key:
                return
            minimum, maximum = key, range_end
        yield from self._data.irange(minimum, maximum, inclusive=(True, False), reverse=reverse)

    def node_states(self) -> list[NodeState]:
        """Every node's state record, by hostname."""
        end = prefix_end(NODE_PREFIX)
        return [NodeState.decode(self._data[k].value) for k in self._data.irange(NODE_PREFIX, end, inclusive=(True, False))]

    def node_state(self, host: str) -> NodeState | None:
        """One node's state record, or None."""
        rec = self._data.get(NodeKey(host).encode())
        return None if rec is None else NodeState.decode(rec.value)

    def messages(self, since: int | None = None, *, limit: int = 0) -> list[Message]:
        """Messages with a clock above ``since``, in clock order.

        ``since=None`` lists every message still kept. An explicit ``since``
        below the message floor raises :class:`CompactedError`: messages after
        it were purged, and a silent gap would break exactly-once delivery.
        """
        if since is not None and since < self._message_floor:
            raise CompactedError(
                f"messages up to clock {self._message_floor} were purged; cannot resume from {since}",
                field="since",
            )
        if since is not None and since >= MAX_CLOCK:
            return []
        start = MESSAGE_PREFIX if since is None else MessageKey(since + 1, 0).encode()
        out = []
        for k in self._data.irange(start, prefix_end(MESSAGE_PREFIX), inclusive=(True, False)):
            out.append(Message.decode(self._data[k].value))
            if limit and len(out) >= limit:
                break
        return out

    # ---------------------------------------------------------------- apply

    def apply(self, command: bytes) -> Applied:
        """Apply one CBOR command. Never raises; see the module docstring."""
        self._applied += 1
        if not isinstance(command, (bytes, bytearray, memoryview)):
            return Applied(_error(CommandError("command must be bytes", field="command"), self._revision))
        if len(command) > MAX_COMMAND_BYTES:
            err = CommandError(
                f"command of {len(command)} bytes exceeds the limit of {MAX_COMMAND_BYTES}", field="command"
            )
            return Applied(_error(err, self._revision))
        try:
            cmd = decode_cbor(bytes(command), what="command")
        except RaftcoordError as exc:
            return Applied(_error(exc, self._revision))
        return self.apply_map(cmd)

    def apply_map(self, cmd: Any) -> Applied:
        """Apply one decoded command. Never raises."""
        try:
            if not isinstance(cmd, Mapping):
                raise CommandError(f"command must be a map, not {type(cmd).__name__}", field="command")
            req = cmd.get("req")
            if req is None:
                return self._dispatch(cmd)
            client, seq, low = self._parse_req(req)
        except RaftcoordError as exc:
            return Applied(_error(exc, self._revision))
        except Exception as exc:  # noqa: BLE001 - a bug must not wedge the cluster (hazard 7)
            return Applied(_error(RaftcoordError(f"internal error: {exc!r}"), self._revision))
        return self._apply_with_session(cmd, client, seq, low)

    @staticmethod
    def _parse_req(req: Any) -> tuple[str, int, int]:
        if (
            not isinstance(req, list)
            or len(req) != 3
            or not isinstance(req[0], str)
            or not req[0]
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK for v in req[1:])
        ):
            raise CommandError("req must be [client_id, seq, lowest_outstanding]", field="req")
        return req[0], req[1], req[2]

    def _apply_with_session(self, cmd: Mapping[str, Any], client: str, seq: int, low: int) -> Applied:
        session = self._sessions.get(client)
        if session is not None:
            if seq in session.results:
                session.last_used = self._applied
                return Applied(copy.deepcopy(session.results[seq]))
            if seq < session.low:
                err = DuplicateRequestError(
                    f"request {client}/{seq} was answered before and its result is no longer kept",
                    field="req",
                )
                return Applied(_error(err, self._revision))
        applied = self._dispatch(cmd)
        if session is None:
            session = self._sessions[client] = _Session(self._applied, {})
            self._evict_sessions()
        session.last_used = self._applied
        session.low = max(session.low, low)
        session.results[seq] = applied.result
        for old in [s for s in session.results if s < session.low]:
            del session.results[old]
        while len(session.results) > MAX_RESULTS_PER_SESSION:
            oldest = min(session.results)
            del session.results[oldest]
            # A dropped result must never be applied again: raise the floor.
            session.low = max(session.low, oldest + 1)
        return Applied(copy.deepcopy(applied.result), applied.events)

    def _evict_sessions(self) -> None:
        while len(self._sessions) > MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda c: (self._sessions[c].last_used, c))
            del self._sessions[oldest]

    def _dispatch(self, cmd: Mapping[str, Any]) -> Applied:
        try:
            op = _field(cmd, "op", str)
            handler = self._HANDLERS.get(op)
            if handler is None:
                raise CommandError(f"unknown command op {op!r}", field="op")
            return handler(self, cmd)
        except RaftcoordError as exc:
            return Applied(_error(exc, self._revision))
        except Exception as exc:  # noqa: BLE001 - see apply_map
            return Applied(_error(RaftcoordError(f"internal error: {exc!r}"), self._revision))

    # ------------------------------------------------------- write primitives

    def _put(self, key: bytes, value: bytes, revision: int, events: list[Event]) -> KeyValue | None:
        rec = self._data.get(key)
        prev = None if rec is None else rec.kv(key)
        if rec is None:
            rec = self._data[key] = _Record(value, revision, revision, 1)
        else:
            rec.value, rec.mod_revision, rec.version = value, revision, rec.version + 1
        events.append(KeyPut(rec.kv(key), prev))
        return prev

    def _delete(self, keys: list[bytes], revision: int, events: list[Event]) -> list[KeyValue]:
        prevs = []
        for k in keys:
            rec = self._data.pop(k)
            prev = rec.kv(k)
            prevs.append(prev)
            events.append(KeyDeleted(k, revision, prev))
        return prevs

    def _deletable(self, key: bytes, range_end: bytes) -> list[bytes]:
        if not range_end:
            _check_writable(key)
            return list(self._keys_in(key, b""))
        if is_reserved(key):
            _check_writable(key)
        # A range that starts in the user's key space skips coordinator records.
        return [k for k in self._keys_in(key, range_end) if not is_reserved(k)]

    # --------------------------------------------------------------- commands

    def _cmd_put(self, cmd: Mapping[str, Any]) -> Applied:
        key = _key_field(cmd)
        value = _field(cmd, "value", bytes)
        want_prev = _field(cmd, "prev_kv", bool, default=False)
        _check_writable(key)
        revision = self._revision + 1
        events: list[Event] = []
        prev = self._put(key, value, revision, events)
        self._revision = revision
        result: dict[str, Any] = {"ok": True, "revision": revision}
        if want_prev and prev is not None:
            result["prev_kv"] = prev.to_map()
        return Applied(result, tuple(events))

    def _cmd_delete(self, cmd: Mapping[str, Any]) -> Applied:
        key = _key_field(cmd)
        range_end = _field(cmd, "range_end", bytes, default=b"")
        want_prev = _field(cmd, "prev_kv", bool, default=False)
        keys = self._deletable(key, range_end)
        events: list[Event] = []
        if keys:
            self._revision += 1
            prevs = self._delete(keys, self._revision, events)
        else:
            prevs = []
        result: dict[str, Any] = {"ok": True, "revision": self._revision, "deleted": len(prevs)}
        if want_prev:
            result["prev_kvs"] = [p.to_map() for p in prevs]
        return Applied(result, tuple(events))

    def _cmd_txn(self, cmd: Mapping[str, Any]) -> Applied:
        compares = [self._parse_compare(c) for c in _field(cmd, "compare", list, default=[])]
        success = [self._parse_op(o) for o in _field(cmd, "success", list, default=[])]
        failure = [self._parse_op(o) for o in _field(cmd, "failure", list, default=[])]
        for ops, branch in ((success, "success"), (failure, "failure")):
            self._check_txn_ops(ops, branch)
        succeeded = all(self._compare_holds(c) for c in compares)
        ops = success if succeeded else failure
        revision = self._revision + 1
        events: list[Event] = []
        responses = []
        for op in ops:
            if op["op"] == "range":
                responses.append({"op": "range", **self._range_op(op)})
            elif op["op"] == "put":
                prev = self._put(op["key"], op["value"], revision, events)
                resp: dict[str, Any] = {"op": "put", "revision": revision}
                if op["prev_kv"] and prev is not None:
                    resp["prev_kv"] = prev.to_map()
                responses.append(resp)
            else:
                keys = self._deletable(op["key"], op["range_end"])
                prevs = self._delete(keys, revision, events)
                resp = {"op": "delete", "revision": revision, "deleted": len(prevs)}
                if op["prev_kv"]:
                    resp["prev_kvs"] = [p.to_map() for p in prevs]
                responses.append(resp)
        if events:
            self._revision = revision
        for resp in responses:
            if resp["op"] != "range":
                resp["revision"] = self._revision
        result = {"ok": True, "revision": self._revision, "succeeded": succeeded, "responses": responses}
        return Applied(result, tuple(events))

    def _parse_compare(self, c: Any) -> dict[str, Any]:
        if not isinstance(c, Mapping):
            raise CommandError("each compare must be a map", field="compare")
        target = _field(c, "target", str)
        result = _field(c, "result", str, default="equal")
        if target not in _COMPARE_TARGETS:
            raise CommandError(f"compare target {target!r} is not one of {_COMPARE_TARGETS}", field="target")
        if result not in _COMPARE_RESULTS:
            raise CommandError(f"compare result {result!r} is not one of {_COMPARE_RESULTS}", field="result")
        out = {"key": _key_field(c), "range_end": _field(c, "range_end", bytes, default=b""), "target": target, "result": result}
        if target == "value":
            out["value"] = _field(c, "value", bytes)
        elif target == "keys":
            if result != "equal":
                raise CommandError("a 'keys' compare only tests equality", field="result")
            expected = _field(c, "value", list)
            for item in expected:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], int)):
                    raise CommandError("a 'keys' compare value is a list of [key, mod_revision]", field="value")
            out["value"] = [(k, r) for k, r in expected]
        else:
            out["value"] = _uint_field(c, "value")
        return out

    def _compare_holds(self, c: dict[str, Any]) -> bool:
        keys = list(self._keys_in(c["key"], c["range_end"]))
        if c["target"] == "keys":
            return [(k, self._data[k].mod_revision) for k in keys] == c["value"]
        if not keys:
            if c["target"] == "value":
                return False  # as in etcd: a missing key has no value to compare
            return _holds(0, c["value"], c["result"])
        for k in keys:
            rec = self._data[k]
            actual = {
                "value": rec.value,
                "version": rec.version,
                "create": rec.create_revision,
                "mod": rec.mod_revision,
            }[c["target"]]
            if not _holds(actual, c["value"], c["result"]):
                return False
        return True

    def _parse_op(self, o: Any) -> dict[str, Any]:
        if not isinstance(o, Mapping):
            raise CommandError("each txn operation must be a map", field="op")
        op = _field(o, "op", str)
        if op == "put":
            key = _key_field(o)
            _check_writable(key)
            return {"op": op, "key": key, "value": _field(o, "value", bytes), "prev_kv": _field(o, "prev_kv", bool, default=False)}
        if op == "delete":
            key = _key_field(o)
            range_end = _field(o, "range_end", bytes, default=b"")
            if not range_end or is_reserved(key):
                _check_writable(key)
            return {"op": op, "key": key, "range_end": range_end, "prev_kv": _field(o, "prev_kv", bool, default=False)}
        if op == "range":
            return self._parse_range(o)
        raise CommandError(f"txn operation {op!r} must be put, delete or range", field="op")

    @staticmethod
    def _check_txn_ops(ops: list[dict[str, Any]], branch: str) -> None:
        # As in etcd: one key written twice in one revision would have no
        # single well-defined version, so the request is refused.
        written: set[bytes] = set()
        ranges: list[tuple[bytes, bytes]] = []
        for op in ops:
            if op["op"] == "put" or (op["op"] == "delete" and not op["range_end"]):
                if op["key"] in written:
                    raise CommandError(f"duplicate key {op['key']!r} in txn {branch}", field=branch)
                written.add(op["key"])
            elif op["op"] == "delete":
                ranges.append((op["key"], op["range_end"]))
        for key in written:
            for start, end in ranges:
                if start <= key and (end == b"\x00" or key < end):
                    raise CommandError(f"duplicate key {key!r} in txn {branch}: also in a deleted range", field=branch)

    @staticmethod
    def _parse_range(o: Mapping[str, Any]) -> dict[str, Any]:
        order = _field(o, "sort_order", str, default="asc")
        if order not in ("asc", "desc"):
            raise CommandError(f"sort_order must be asc or desc, not {order!r}", field="sort_order")
        return {
            "op": "range",
            "key": _key_field(o),
            "range_end": _field(o, "range_end", bytes, default=b""),
            "limit": _uint_field(o, "limit", default=0),
            "offset": _uint_field(o, "offset", default=0),
            "descending": order == "desc",
            "keys_only": _field(o, "keys_only", bool, default=False),
            "count_only": _field(o, "count_only", bool, default=False),
        }

    def _range_op(self, op: dict[str, Any]) -> dict[str, Any]:
        res = self.range(op["key"], op["range_end"], limit=op["limit"], offset=op["offset"], descending=op["descending"])
        return res.to_map(keys_only=op["keys_only"], count_only=op["count_only"])

    def _cmd_post(self, cmd: Mapping[str, Any]) -> Applied:
        sender = _field(cmd, "from", str)
        sender_clock = _uint_field(cmd, "clock")
        timestamp = _field(cmd, "timestamp", datetime)
        try:
            draft = Message(
                type=_uint_field(cmd, "type", maximum=0xFF),
                timestamp=timestamp,
                from_host=sender,
                event=_uint_field(cmd, "event", default=None, maximum=0xFF),
                payload=cmd.get("payload"),
            )
            NodeKey(sender)
        except RaftcoordError as exc:
            raise CommandError(exc.message, field=exc.field) from None
        new_clock = lamport.merge(self._clock, sender_clock)
        message = Message(
            type=draft.type,
            timestamp=draft.timestamp,
            clock=new_clock,
            from_host=draft.from_host,
            event=draft.event,
            payload=draft.payload,
        )
        value = message.encode()  # may raise before anything changes
        revision = self._revision + 1
        events: list[Event] = []
        self._put(MessageKey(new_clock, message.type).encode(), value, revision, events)
        self._clock, self._revision = new_clock, revision
        events.append(MessagePosted(message))
        return Applied({"ok": True, "revision": revision, "message": message.to_map()}, tuple(events))

    def _cmd_node(self, cmd: Mapping[str, Any]) -> Applied:
        try:
            state = NodeState.from_map(_field(cmd, "state", Mapping))
        except ValueFormatError as exc:
            raise CommandError(exc.message, field=exc.field) from None
        value = state.encode()
        revision = self._revision + 1
        events: list[Event] = []
        self._put(state.key, value, revision, events)
        self._revision = revision
        events.append(NodeStateSet(state))
        return Applied({"ok": True, "revision": revision}, tuple(events))

    def _cmd_purge(self, cmd: Mapping[str, Any]) -> Applied:
        before = _field(cmd, "before", (datetime, type(None)), default=None)
        max_count = _uint_field(cmd, "max_count", default=None)
        end = prefix_end(MESSAGE_PREFIX)
        keys = list(self._data.irange(MESSAGE_PREFIX, end, inclusive=(True, False)))
        cut = 0  # purge the first `cut` messages: always a prefix of the total order
        if before is not None:
            for i, k in enumerate(keys):
                if Message.decode(self._data[k].value).timestamp < before:
                    cut = i + 1
        if max_count is not None and len(keys) - cut > max_count:
            cut = len(keys) - max_count
        events: list[Event] = []
        if cut:
            self._revision += 1
            self._delete(keys[:cut], self._revision, events)
            self._message_floor = max(self._message_floor, MessageKey.decode(keys[cut - 1]).clock)
        result = {"ok": True, "revision": self._revision, "purged": cut, "floor": self._message_floor}
        return Applied(result, tuple(events))

    def _cmd_truncate(self, cmd: Mapping[str, Any]) -> Applied:
        keys = [k for k in self._data if not is_reserved(k)]
        events: list[Event] = []
        if keys:
            self._revision += 1
            self._delete(keys, self._revision, events)
        return Applied({"ok": True, "revision": self._revision, "deleted": len(keys)}, tuple(events))

    def _cmd_barrier(self, cmd: Mapping[str, Any]) -> Applied:
        return Applied({"ok": True, "revision": self._revision})

    _HANDLERS: Final = {
        "put": _cmd_put,
        "delete": _cmd_delete,
        "txn": _cmd_txn,
        "post": _cmd_post,
        "node": _cmd_node,
        "purge": _cmd_purge,
        "truncate": _cmd_truncate,
        "barrier": _cmd_barrier,
    }

    # ------------------------------------------------------------- snapshots

    def snapshot(self) -> bytes:
        """The whole state as canonical CBOR; ``restore`` gives it back."""
        sessions = [
            [client, s.last_used, s.low, [[seq, s.results[seq]] for seq in sorted(s.results)]]
            for client, s in sorted(self._sessions.items())
        ]
        return encode_cbor(
            {
                "format": SNAPSHOT_FORMAT,
                "revision": self._revision,
                "clock": self._clock,
                "message_floor": self._message_floor,
                "applied": self._applied,
                "kvs": [[k, r.value, r.create_revision, r.mod_revision, r.version] for k, r in self._data.items()],
                "sessions": sessions,
            }
        )

    @classmethod
    def restore(cls, data: bytes) -> Store:
        """A store from :meth:`snapshot` bytes; raises ValueFormatError if bad."""
        snap = decode_cbor(data, what="snapshot")
        try:
            return cls._from_snapshot(snap)
        except ValueFormatError:
            raise
        except (RaftcoordError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ValueFormatError(f"snapshot is malformed: {exc}", field="snapshot") from None

    @classmethod
    def _from_snapshot(cls, snap: Any) -> Store:
        def uint(v: Any, name: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK:
                raise ValueFormatError(f"snapshot {name} must be a uint64, got {v!r}", field=name)
            return v

        if not isinstance(snap, Mapping):
            raise ValueFormatError("snapshot must be a CBOR map", field="snapshot")
        if snap.get("format") != SNAPSHOT_FORMAT:
            raise ValueFormatError(f"unsupported snapshot format {snap.get('format')!r}", field="format")
        store = cls()
        store._revision = uint(snap["revision"], "revision")
        store._clock = uint(snap["clock"], "clock")
        store._message_floor = uint(snap["message_floor"], "message_floor")
        store._applied = uint(snap["applied"], "applied")
        last = None
        for item in snap["kvs"]:
            key, value, create, mod, version = item
            if not isinstance(key, bytes) or not isinstance(value, bytes):
                raise ValueFormatError("snapshot keys and values must be bytes", field="kvs")
            if last is not None and key <= last:
                raise ValueFormatError("snapshot keys are not strictly sorted", field="kvs")
            store._data[key] = _Record(value, uint(create, "create_revision"), uint(mod, "mod_revision"), uint(version, "version"))
            last = key
        for client, last_used, low, results in snap["sessions"]:
            if not isinstance(client, str):
                raise ValueFormatError("snapshot session id must be text", field="sessions")
            store._sessions[client] = _Session(
                uint(last_used, "last_used"), {uint(seq, "seq"): dict(res) for seq, res in results}, uint(low, "low")
            )
        return store


def _holds(actual: Any, expected: Any, result: str) -> bool:
    if result == "equal":
        return bool(actual == expected)
    if result == "not_equal":
        return bool(actual != expected)
    if result == "greater":
        return bool(actual > expected)
    return bool(actual < expected)
