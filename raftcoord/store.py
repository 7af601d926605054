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
   validated in full before anything is changed (a txn whose reads pass a
   cap after some of its writes undoes them).

State: one sorted map of bytes keys to records (value, create revision, mod
revision, version; one immutable bytes object per key, ``raftcoord.kvmap``)
with a global revision, as etcd keeps it; the coordinator
Lamport clock; the message floor (the highest clock purged, so that a reader
resuming from before it learns of the gap); and client sessions, which
remember recent results by request id so a retried command applies at most
once (the Raft dissertation's section 6.3; large results in a compact form
the retry's answer is rebuilt from, issue 9); and the watch history, every
recent revision's key changes (``raftcoord.history``), bounded by count and
bytes, so that every replica agrees on what a watch can still replay.

Commands (CBOR maps with text keys; ``op`` selects the command)::

    put       key, value, [prev_kv]
    delete    key, [range_end], [prev_kv]
    txn       compare: [..], success: [ops], failure: [ops]
    post      from, clock, type, timestamp, [event], [payload]
    node      state: {host, status, clock, timestamp, addr, cluster, ...}, [expect_revision]
    purge     [before: time], [max_count]   (always a prefix of clock order)
    truncate
    barrier   (changes nothing; a read barrier through the log)
    session   (registers a client session; the result names its id)

``raftcoord.commands`` names each of them with its fields and validates them;
this module only applies what that module accepted. Any command may carry
``req: [client_id, seq, lowest_outstanding]`` of a registered session
(``raftcoord.sessions``); a command of an unknown session is never applied.

Every command does bounded work: hard caps (``commands.MAX_TXN_OPS``,
``txn.MAX_TXN_KEYS``, ``txn.MAX_TXN_RESULT_BYTES``) refuse a txn that would
cost more, with a "limit_exceeded" error result and no change; ranges are
counted by bisection and walk only the keys they return.

Node and message records live in the same map under their key headers;
raw writes under those headers are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Final

from raftcoord import clock as lamport
from raftcoord.commands import (
    MAX_MEMBERS,
    Barrier,
    Delete,
    Member,
    MemberChange,
    NodeSet,
    Post,
    Purge,
    Put,
    Range,
    Session,
    Truncate,
    Txn,
)
from raftcoord.commands import decode_command, decode_req
from raftcoord.errors import (
    CommandError,
    CompactedError,
    ConflictError,
    MemberNotFoundError,
    RaftcoordError,
    RequestTooLargeError,
    ValueFormatError,
)
from raftcoord.events import Applied, Change, Event, KeyDeleted, KeyPut, KeyValue, MessagePosted, NodeStateSet, RangeResult
from raftcoord.history import HISTORY_BYTES, HISTORY_REVISIONS, History, KeyChange
from raftcoord.keys import MAX_CLOCK, MESSAGE_PREFIX, NODE_PREFIX, MessageKey, NodeKey, is_reserved, prefix_end
from raftcoord.kvmap import KVMap, pack_record, record_kv, record_mod_revision, record_value
from raftcoord.sessions import MAX_FULL_RESULT_BYTES, MAX_RESULT_BYTES_PER_SESSION, MAX_RESULTS_PER_SESSION
from raftcoord.sessions import MAX_SESSIONS, Sessions
from raftcoord.txn import MAX_TXN_KEYS, MAX_TXN_RESULT_BYTES, Budget, compares_hold, range_response
from raftcoord.txn import is_read_only_txn, read_txn
from raftcoord.values import Message, NodeState, decode_cbor, encode_cbor

__all__ = [
    "MAX_COMMAND_BYTES",
    "MAX_PURGE_PER_COMMAND",
    "MAX_RESULTS_PER_SESSION",
    "MAX_RESULT_BYTES_PER_SESSION",
    "MAX_SESSIONS",
    "Applied",
    "Change",
    "KeyDeleted",
    "KeyPut",
    "KeyValue",
    "MessagePosted",
    "NodeStateSet",
    "RangeResult",
    "Store",
    "StoreImage",
    "is_read_only_txn",
    "read_txn",
]

#: Commands larger than this are refused (pysyncobj slows badly past 1 MiB).
MAX_COMMAND_BYTES: Final = 1536 * 1024
#: Messages one purge examines and removes; the leader's next purge goes on.
MAX_PURGE_PER_COMMAND: Final = 4096
#: Format 5: ``members``, the member registry (issue 10); older formats restore
#: with an empty one.
#: Format 4: ``kvs`` is ``[keys, records]``, a record being the create
#: revision, mod revision and version (big-endian uint64s) then the value, as
#: the store holds it, and history changes are ``[key, record, previous]``:
#: encoded and decoded with no per-key work (issue 9).
#: Format 3: the watch history and compact_revision (issue 8).
#: Format 2: sessions are registered and results may be tombstones (None);
#: restored with an empty history (compact_revision = revision + 1).
#: Format 1 (ids chosen by clients) is still restored; its ids stay live.
SNAPSHOT_FORMAT: Final = 5
_READABLE_FORMATS: Final = (1, 2, 3, 4, 5)
FIRST_REVISION: Final = 1  # as in etcd: an empty store is at revision 1


def _error(exc: RaftcoordError, revision: int) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_dict(), "revision": revision}


def _internal(exc: Exception) -> RaftcoordError:
    # Only the type: a message may hold an address or a set's order, and
    # results are kept in sessions and so in snapshots (issue 6, defect 10).
    return RaftcoordError(f"internal error: {type(exc).__name__}")


_kv = record_kv
_value = record_value
_mod_revision = record_mod_revision


# (key, the record before the write or None): what undoes a txn's writes.
_Undo = list[tuple[bytes, "bytes | None"]]


class Store:
    """The deterministic state machine. See the module docstring.

    The session and watch-history bounds are class attributes (every replica
    must use the same ones); tests make them small with a subclass.
    """

    max_sessions: int = MAX_SESSIONS
    max_results_per_session: int = MAX_RESULTS_PER_SESSION
    max_result_bytes_per_session: int = MAX_RESULT_BYTES_PER_SESSION
    #: A result larger than this is remembered in compact form (``raftcoord.sessions``).
    max_full_result_bytes: int = MAX_FULL_RESULT_BYTES
    #: Changes the watch history keeps (the newest is always kept).
    history_revisions: int = HISTORY_REVISIONS
    #: Key + value + previous value bytes the watch history keeps.
    history_bytes: int = HISTORY_BYTES
    #: The sorted map type (tests use one with small sublists).
    kv_map: type[KVMap] = KVMap

    def __init__(self) -> None:
        self._data = self.kv_map()
        self._revision = FIRST_REVISION
        self._clock = 0
        self._message_floor = 0
        self._applied = 0
        self._sessions = Sessions(
            max_sessions=self.max_sessions,
            max_results=self.max_results_per_session,
            max_result_bytes=self.max_result_bytes_per_session,
            max_full_result_bytes=self.max_full_result_bytes,
        )
        self._history = History(max_revisions=self.history_revisions, max_bytes=self.history_bytes)
        # The member registry by name (issue 10): who is in the cluster, and who votes.
        self._members: dict[str, Member] = {}
        # The key changes of the command being applied, for the history:
        # (key, new record or None if deleted, old record or None).
        self._changed: list[KeyChange] = []

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
    def oldest_clock(self) -> int:
        """The clock of the oldest message kept, or the next clock to come when
        none is kept: a reader may resume from ``oldest_clock - 1``."""
        lo, hi = self._bounds(MESSAGE_PREFIX, prefix_end(MESSAGE_PREFIX))
        if lo < hi:
            return MessageKey.decode(self._data.key_at(lo)).clock
        return self._message_floor + 1

    @property
    def applied(self) -> int:
        """How many commands were applied (refused ones included)."""
        return self._applied

    @property
    def sessions(self) -> list[str]:
        """Live client session ids, least recently used first."""
        return self._sessions.clients()

    @property
    def members(self) -> tuple[Member, ...]:
        """The member registry, sorted by name; empty until the first leader seeds it."""
        return tuple(self._members[name] for name in sorted(self._members))

    def clear_members(self) -> None:
        """Empty the member registry (offline only: a restored backup seeds its new cluster's)."""
        self._members = {}

    @property
    def compact_revision(self) -> int:
        """The oldest revision a watch may start from (see :meth:`changes`)."""
        return self._history.compact_revision

    def changes(self, start_revision: int, *, limit: int = 0) -> list[Change]:
        """The watch history: kept changes from ``start_revision`` on, in order.

        At most ``limit`` of them (0: all), in O(log n + k); a start after the
        current revision gives ``[]``. Below :attr:`compact_revision` raises
        :class:`CompactedError` carrying ``compact_revision``.
        """
        return self._history.changes(start_revision, limit=limit)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> KeyValue | None:
        """The key's current value and revisions, or None."""
        rec = self._data.get(key)
        return None if rec is None else _kv(key, rec)

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
        if not range_end:
            # One key: a lookup, without the map's positions (rebuilt after
            # a key is added, in O(keys / 1000)).
            rec = self._data.get(key)
            shown = rec is not None and offset == 0
            return RangeResult((_kv(key, rec),) if shown else (), 0 if rec is None else 1, False)  # type: ignore[arg-type]
        lo, hi = self._bounds(key, range_end)
        count = hi - lo
        # Walk only the keys returned: offset+limit, never the whole range.
        start = min(count, offset)
        stop = count if not limit else min(count, start + limit)
        more = stop < count and bool(limit)
        if descending:
            i, j = hi - stop, hi - start
        else:
            i, j = lo + start, lo + stop
        keys, recs = self._data.items_between(i, j)
        if descending:
            keys.reverse()
            recs.reverse()
        return RangeResult(tuple(map(_kv, keys, recs)), count, more)

    def count(self, key: bytes, range_end: bytes = b"") -> int:
        """How many keys :meth:`range` would count, in O(log n)."""
        if not range_end:
            return int(key in self._data)
        lo, hi = self._bounds(key, range_end)
        return hi - lo

    def chunk(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        after: bytes | None = None,
        limit: int,
        descending: bool = False,
    ) -> list[KeyValue]:
        """At most ``limit`` keys of the range strictly after ``after`` in
        iteration order (ascending, or descending), in O(log n + limit).

        Lets a reader walk a large range in short steps, taking the state
        lock only for each step, so the Raft thread is never held for long.
        """
        if limit <= 0:
            return []
        lo, hi = self._bounds(key, range_end)
        data = self._data
        if descending:
            if after is not None:
                hi = max(lo, min(hi, data.bisect_left(after)))
            keys, recs = data.items_between(max(lo, hi - limit), hi)
            keys.reverse()
            recs.reverse()
        else:
            if after is not None:
                lo = min(hi, max(lo, data.bisect_right(after)))
            keys, recs = data.items_between(lo, min(hi, lo + limit))
        return list(map(_kv, keys, recs))

    def _bounds(self, key: bytes, range_end: bytes) -> tuple[int, int]:
        """Index bounds ``[lo, hi)`` in the sorted map of etcd's range."""
        data = self._data
        if not range_end:
            lo = data.bisect_left(key)
            return (lo, lo + 1) if key in data else (lo, lo)
        if range_end == b"\x00":
            return (0 if key == b"\x00" else data.bisect_left(key)), len(data)
        if range_end <= key:
            return 0, 0
        return data.bisect_left(key), data.bisect_left(range_end)

    def _keys(self, key: bytes, range_end: bytes) -> list[bytes]:
        lo, hi = self._bounds(key, range_end)
        return self._data.keys_between(lo, hi)

    def node_states(self) -> list[NodeState]:
        """Every node's state record, by hostname."""
        lo, hi = self._bounds(NODE_PREFIX, prefix_end(NODE_PREFIX))
        return [NodeState.decode(_value(rec)) for rec in self._data.items_between(lo, hi)[1]]

    def node_state(self, host: str) -> NodeState | None:
        """One node's state record, or None."""
        rec = self._data.get(NodeKey(host).encode())
        return None if rec is None else NodeState.decode(_value(rec))

    def messages(self, since: int | None = None, *, limit: int = 0) -> list[Message]:
        """Messages with a clock above ``since``, in clock order.

        ``since=None`` lists every message still kept. An explicit ``since``
        below the message floor raises :class:`CompactedError`: messages after
        it were purged, and a silent gap would break exactly-once delivery.
        """
        if since is not None and since < self._message_floor:
            oldest = self.oldest_clock
            raise CompactedError(
                f"messages up to clock {self._message_floor} were purged; the oldest clock kept is {oldest}; "
                f"cannot resume from {since}",
                field="since",
                oldest_clock=oldest,
            )
        if since is not None and since >= MAX_CLOCK:
            return []
        start = MESSAGE_PREFIX if since is None else MessageKey(since + 1, 0).encode()
        lo, hi = self._bounds(start, prefix_end(MESSAGE_PREFIX))
        if limit:
            hi = min(hi, lo + limit)
        return [Message.decode(_value(rec)) for rec in self._data.items_between(lo, hi)[1]]

    # ---------------------------------------------------------------- apply

    def apply(self, command: bytes) -> Applied:
        """Apply one CBOR command. Never raises; see the module docstring."""
        self._applied += 1
        if not isinstance(command, (bytes, bytearray, memoryview)):
            return Applied(_error(CommandError("command must be bytes", field="command"), self._revision))
        if len(command) > MAX_COMMAND_BYTES:
            err = RequestTooLargeError(
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
            req = decode_req(cmd)
            if req is None:
                return self._dispatch(cmd)
            if cmd.get("op") == Session.op:
                raise CommandError("a session command carries no req", field="req")
            # Before the body is even read: a request of an unknown session
            # is never applied, and a known request answers what it did.
            remembered = self._sessions.check(req.client, req.seq, self._applied, cmd)
        except RaftcoordError as exc:
            return Applied(_error(exc, self._revision))
        except Exception as exc:  # noqa: BLE001 - a bug must not wedge the cluster (hazard 7)
            return Applied(_error(_internal(exc), self._revision))
        if remembered is not None:
            return Applied(remembered)
        applied = self._dispatch(cmd)
        self._sessions.remember(req.client, req.seq, req.low, applied.result, self._applied)
        return applied

    def _dispatch(self, cmd: Mapping[str, Any]) -> Applied:
        try:
            command = decode_command(cmd)
            self._changed = []
            applied = self._HANDLERS[type(command)](self, command)
            if self._changed:
                self._history.record(self._revision, self._changed)
            return applied
        except RaftcoordError as exc:
            return Applied(_error(exc, self._revision))
        except Exception as exc:  # noqa: BLE001 - see apply_map
            return Applied(_error(_internal(exc), self._revision))

    # ------------------------------------------------------- write primitives

    def _put(self, key: bytes, value: bytes, revision: int, events: list[Event], undo: _Undo | None = None) -> KeyValue | None:
        rec = self._data.get(key)
        if undo is not None:
            undo.append((key, rec))
        if rec is None:
            create, version = revision, 1
            prev = None
        else:
            # A new record, not an in-place change: the old one is the undo.
            prev = _kv(key, rec)
            create, version = prev.create_revision, prev.version + 1
        new = pack_record(value, create, revision, version)
        self._data[key] = new
        self._changed.append((key, new, rec))
        events.append(KeyPut(KeyValue(key, value, create, revision, version), prev))
        return prev

    def _delete(self, keys: list[bytes], revision: int, events: list[Event], undo: _Undo | None = None) -> list[KeyValue]:
        prevs = []
        for k in keys:
            rec = self._data.pop(k)
            if undo is not None:
                undo.append((k, rec))
            self._changed.append((k, None, rec))
            prev = _kv(k, rec)
            prevs.append(prev)
            events.append(KeyDeleted(k, revision, prev))
        return prevs

    def _rollback(self, undo: _Undo) -> None:
        for key, rec in reversed(undo):
            if rec is None:
                del self._data[key]
            else:
                self._data[key] = rec

    def _deletable(self, op: Delete) -> list[bytes]:
        if not op.range_end:
            return [op.key] if op.key in self._data else []
        # A range that starts in the user's key space skips coordinator records.
        return [k for k in self._keys(op.key, op.range_end) if not is_reserved(k)]

    # --------------------------------------------------------------- commands

    def _cmd_put(self, cmd: Put) -> Applied:
        revision = self._revision + 1
        events: list[Event] = []
        prev = self._put(cmd.key, cmd.value, revision, events)
        self._revision = revision
        result: dict[str, Any] = {"ok": True, "revision": revision}
        if cmd.prev_kv and prev is not None:
            result["prev_kv"] = prev.to_map()
        return Applied(result, tuple(events))

    def _cmd_delete(self, cmd: Delete) -> Applied:
        keys = self._deletable(cmd)
        events: list[Event] = []
        if keys:
            self._revision += 1
            prevs = self._delete(keys, self._revision, events)
        else:
            prevs = []
        result: dict[str, Any] = {"ok": True, "revision": self._revision, "deleted": len(prevs)}
        if cmd.prev_kv:
            result["prev_kvs"] = [p.to_map() for p in prevs]
        return Applied(result, tuple(events))

    def _cmd_txn(self, cmd: Txn) -> Applied:
        budget = Budget(keys=MAX_TXN_KEYS, result_bytes=MAX_TXN_RESULT_BYTES, bytes_setting=None, range_keys=True)
        succeeded = compares_hold(self, cmd.compare, budget)
        branch = "success" if succeeded else "failure"
        revision = self._revision + 1
        events: list[Event] = []
        responses: list[dict[str, Any]] = []
        undo: _Undo = []
        try:
            for op in cmd.success if succeeded else cmd.failure:
                if isinstance(op, Range):
                    responses.append({"op": "range", **range_response(self, op, budget, branch)})
                elif isinstance(op, Put):
                    prev = self._put(op.key, op.value, revision, events, undo)
                    resp: dict[str, Any] = {"op": "put"}
                    if op.prev_kv and prev is not None:
                        resp["prev_kv"] = prev.to_map()
                    responses.append(resp)
                else:
                    prevs = self._delete(self._deletable(op), revision, events, undo)
                    resp = {"op": "delete", "deleted": len(prevs)}
                    if op.prev_kv:
                        resp["prev_kvs"] = [p.to_map() for p in prevs]
                    responses.append(resp)
        except Exception:
            # A range past the budget after some writes (or a bug): undo them,
            # so the refused txn leaves the state exactly as it was.
            self._rollback(undo)
            raise
        if events:
            self._revision = revision
        for resp in responses:
            if resp["op"] != "range":
                resp["revision"] = self._revision
        result = {"ok": True, "revision": self._revision, "succeeded": succeeded, "responses": responses}
        return Applied(result, tuple(events))

    def _cmd_post(self, cmd: Post) -> Applied:
        draft = cmd.draft()
        new_clock = lamport.merge(self._clock, cmd.clock)
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

    def _cmd_node(self, cmd: NodeSet) -> Applied:
        value = cmd.state.encode()
        if cmd.expect_revision is not None:
            rec = self._data.get(cmd.state.key)
            current = 0 if rec is None else _mod_revision(rec)
            if current != cmd.expect_revision:
                raise ConflictError(
                    f"node {cmd.state.host!r} record is at mod_revision {current}, "
                    f"not the expected {cmd.expect_revision}",
                    field="expect_revision",
                )
        revision = self._revision + 1
        events: list[Event] = []
        self._put(cmd.state.key, value, revision, events)
        self._revision = revision
        events.append(NodeStateSet(cmd.state))
        return Applied({"ok": True, "revision": revision}, tuple(events))

    def _cmd_purge(self, cmd: Purge) -> Applied:
        lo, hi = self._bounds(MESSAGE_PREFIX, prefix_end(MESSAGE_PREFIX))
        # Bounded work: look at the oldest messages only; what is left over
        # goes with the leader's next purge ("more" says there may be some).
        window = min(hi - lo, MAX_PURGE_PER_COMMAND)
        keys, recs = self._data.items_between(lo, lo + window)
        cut = 0  # purge the first `cut` messages: always a prefix of the total order
        if cmd.before is not None:
            # Only the prefix in which every message is old: one message from
            # a node with a wrong wall clock (stamped 1999) must not take the
            # newer messages before it along (issue 8, item 2).
            for rec in recs:
                if Message.decode(_value(rec)).timestamp >= cmd.before:
                    break
                cut += 1
        if cmd.max_count is not None and (hi - lo) - cut > cmd.max_count:
            cut = min(window, (hi - lo) - cmd.max_count)
        events: list[Event] = []
        if cut:
            self._revision += 1
            self._delete(keys[:cut], self._revision, events)
            self._message_floor = max(self._message_floor, MessageKey.decode(keys[cut - 1]).clock)
        result: dict[str, Any] = {"ok": True, "revision": self._revision, "purged": cut, "floor": self._message_floor}
        if cut == MAX_PURGE_PER_COMMAND and hi - lo > cut:
            result["more"] = True
        return Applied(result, tuple(events))

    def _cmd_truncate(self, cmd: Truncate) -> Applied:
        keys = [k for k in self._data if not is_reserved(k)]
        events: list[Event] = []
        if keys:
            self._revision += 1
            self._delete(keys, self._revision, events)
        return Applied({"ok": True, "revision": self._revision, "deleted": len(keys)}, tuple(events))

    def _cmd_barrier(self, cmd: Barrier) -> Applied:
        return Applied({"ok": True, "revision": self._revision})

    def _cmd_session(self, cmd: Session) -> Applied:
        client = self._sessions.register(self._applied)
        return Applied({"ok": True, "revision": self._revision, "client": client})

    def _cmd_member(self, cmd: MemberChange) -> Applied:
        # The registry is not a key: a change moves no revision, as etcd's
        # member changes leave the key space's alone.
        members = self._members
        if cmd.action == "seed":
            if members:
                return Applied({"ok": True, "revision": self._revision, "seeded": False})
            self._check_distinct(cmd.members)
            self._members = {m.name: m for m in cmd.members}
            return Applied({"ok": True, "revision": self._revision, "seeded": True})
        if cmd.action == "add":
            new = cmd.members[0]
            if new.name in members:
                raise ConflictError(f"member {new.name!r} already exists", field="name")
            self._check_distinct((*members.values(), new))
            if len(members) >= MAX_MEMBERS:
                raise ConflictError(f"the registry already holds {MAX_MEMBERS} members", field="members")
            members[new.name] = new
            return Applied({"ok": True, "revision": self._revision, "member": new.to_map()})
        old = members.get(cmd.name or "")
        if old is None:
            raise MemberNotFoundError(f"no member named {cmd.name!r}", field="name")
        if cmd.action == "promote":
            if old.voter:
                raise ConflictError(f"member {old.name!r} is already a voter", field="name")
            members[old.name] = Member(old.name, old.raft, old.client, True)
            return Applied({"ok": True, "revision": self._revision, "member": members[old.name].to_map()})
        if old.voter and sum(m.voter for m in members.values()) == 1:
            raise ConflictError(f"member {old.name!r} is the last voter", field="name")
        del members[old.name]
        return Applied({"ok": True, "revision": self._revision, "member": old.to_map()})

    @staticmethod
    def _check_distinct(members: Iterable[Member]) -> None:
        seen: dict[str, set[str]] = {"name": set(), "raft": set(), "client": set()}
        for m in members:
            for field_name, values in seen.items():
                value = getattr(m, field_name)
                if value in values:
                    raise ConflictError(f"two members would share the {field_name} {value!r}", field=field_name)
                values.add(value)

    _HANDLERS: Final[dict[type, Callable[[Store, Any], Applied]]] = {
        Put: _cmd_put,
        Delete: _cmd_delete,
        Txn: _cmd_txn,
        Post: _cmd_post,
        NodeSet: _cmd_node,
        Purge: _cmd_purge,
        Truncate: _cmd_truncate,
        Barrier: _cmd_barrier,
        Session: _cmd_session,
        MemberChange: _cmd_member,
    }

    # ------------------------------------------------------------- snapshots

    def image(self) -> StoreImage:
        """The whole state, frozen: cheap to take, and encodable on any thread.

        Taking it copies references only (a few ms per 100,000 keys): records
        are immutable bytes, so :meth:`StoreImage.encode` may run later, off
        the thread that applies commands, and still give the bytes
        :meth:`snapshot` would have given now.
        """
        # The small parts first: their many small lists may set off a garbage
        # collection, which should not also have to walk two lists of every key.
        sessions, history = self._sessions.to_snapshot(), self._history.to_snapshot()
        keys, records = self._data.flat()
        return StoreImage(
            {
                "format": SNAPSHOT_FORMAT,
                "revision": self._revision,
                "clock": self._clock,
                "message_floor": self._message_floor,
                "applied": self._applied,
                "kvs": [keys, records],
                "sessions": sessions,
                "compact_revision": self._history.compact_revision,
                "history": history,
                "members": [self._members[name].to_map() for name in sorted(self._members)],
            }
        )

    def snapshot(self) -> bytes:
        """The whole state as canonical CBOR; ``restore`` gives it back."""
        return self.image().encode()

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
        if not isinstance(snap, Mapping):
            raise ValueFormatError("snapshot must be a CBOR map", field="snapshot")
        fmt = snap.get("format")
        if fmt not in _READABLE_FORMATS:
            if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > max(_READABLE_FORMATS):
                # Issue 10: a rolling upgrade's newer node wrote it; say so, and what to do.
                raise ValueFormatError(f"snapshot format {fmt} is newer than this node knows "
                                       f"({min(_READABLE_FORMATS)}-{max(_READABLE_FORMATS)}): upgrade raftcoord",
                                       field="format")
            raise ValueFormatError(f"unsupported snapshot format {fmt!r}", field="format")
        store = cls()
        store._revision = _uint(snap["revision"], "revision")
        store._clock = _uint(snap["clock"], "clock")
        store._message_floor = _uint(snap["message_floor"], "message_floor")
        store._applied = _uint(snap["applied"], "applied")
        store._data = cls.kv_map.from_snapshot(snap["kvs"], flat=fmt >= 4)
        # Format 1 sessions had ids their clients chose; they stay live here.
        store._sessions.load_snapshot(snap["sessions"], results_as_maps=fmt == 1)
        if fmt >= 3:
            compact, items = snap["compact_revision"], snap["history"]
        else:
            # No history was kept: a watch may start only after this point.
            compact, items = store._revision + 1, []
        store._history = History.load(
            items,
            compact_revision=compact,
            revision=store._revision,
            max_revisions=cls.history_revisions,
            max_bytes=cls.history_bytes,
            records=fmt >= 4,
            current=store._data.get,
        )
        if fmt >= 5:
            try:
                members = [Member.from_map(m) for m in snap["members"]]
            except CommandError as exc:
                raise ValueFormatError(f"snapshot member registry: {exc.message}", field="members") from None
            store._members = {m.name: m for m in members}
        return store


class StoreImage:
    """A frozen copy of a store's state (:meth:`Store.image`).

    Holds plain lists of immutable values, shared with no live store, so
    :meth:`encode` is safe on any thread and gives the same bytes wherever
    and whenever it runs.
    """

    __slots__ = ("_state",)

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    @property
    def revision(self) -> int:
        """The store's revision when the image was taken."""
        return int(self._state["revision"])

    @property
    def applied(self) -> int:
        """The store's applied counter when the image was taken."""
        return int(self._state["applied"])

    def __len__(self) -> int:
        return len(self._state["kvs"][0])

    def encode(self) -> bytes:
        """The snapshot bytes: canonical CBOR, as :meth:`Store.snapshot` gives."""
        return encode_cbor(self._state)


def _uint(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK:
        raise ValueFormatError(f"snapshot {name} must be a uint64, got {v!r}", field=name)
    return v
