"""The state machine's commands: the one vocabulary of proposers and the store.

Every command that may enter the Raft log is named here, as a frozen dataclass
with its fields, ``to_map()`` (the CBOR map that is proposed) and validation
that runs when it is built. :func:`decode_command` turns a decoded map back
into one of them, raising :class:`CommandError` (or a child) that names the
offending field; ``store.py`` applies only what this module accepted, so
adding a command means adding it here and giving the store a handler.

Like the store, this module does no I/O, reads no clock and draws no random
number: a replica decoding the same bytes must reach the same verdict.

Any command may travel with ``req: [client_id, seq, lowest_outstanding]``
(see :func:`decode_req`); ``client_id`` is a session the store assigned
through :class:`Session`.

Hard caps (constants, not settings): a committed command must never make a
replica do unbounded work on the Raft thread, whoever proposed it. The
configurable, smaller limits are checked by the proposer before proposing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Final, Union

from raftcoord.errors import CommandError, LimitExceededError, RaftcoordError, ReservedKeyError, ValueFormatError
from raftcoord.keys import MAX_CLOCK, NodeKey, is_reserved
from raftcoord.values import Message, NodeState

__all__ = [
    "MAX_TXN_OPS",
    "Barrier",
    "Command",
    "Compare",
    "Delete",
    "Member",
    "MemberChange",
    "NodeSet",
    "Post",
    "Purge",
    "Put",
    "Range",
    "Req",
    "Session",
    "Truncate",
    "TxnOp",
    "Txn",
    "decode_command",
    "decode_req",
]

#: Compares, success ops and failure ops a txn may each hold (etcd's
#: configurable default is 128; proposers enforce that setting).
MAX_TXN_OPS: Final = 1024

COMPARE_TARGETS: Final = ("value", "version", "create", "mod", "keys")
COMPARE_RESULTS: Final = ("equal", "not_equal", "greater", "less")

_NO_DEFAULT: Any = object()


# --------------------------------------------------------------------------
# Field checks (shared by decoding and construction)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)


def _check(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind is int:
        raise CommandError(f"{name} must be an integer, not a boolean", field=name)
    if not isinstance(value, kind):
        raise CommandError(f"{name} must be {_kind_name(kind)}, not {type(value).__name__}", field=name)
    return value


def _check_uint(name: str, value: Any, maximum: int = MAX_CLOCK) -> int:
    _check(name, value, int)
    if not 0 <= value <= maximum:
        raise CommandError(f"{name} must be 0-{maximum}, got {value}", field=name)
    return int(value)


def _check_key(value: Any, name: str = "key") -> bytes:
    _check(name, value, bytes)
    if not value:
        raise CommandError(f"{name} must not be empty", field=name)
    return bytes(value)


def check_writable(key: bytes) -> None:
    """Refuse a raw write under a header the coordinator owns."""
    if is_reserved(key):
        raise ReservedKeyError(
            f"key {key!r} is under a coordinator header; node and message records change only "
            "through their own API",
            field="key",
        )


def _get(m: Mapping[str, Any], name: str, default: Any = _NO_DEFAULT) -> Any:
    if name in m:
        return m[name]
    if default is _NO_DEFAULT:
        raise CommandError(f"command has no {name!r} field", field=name)
    return default


def _map(value: Any, what: str, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CommandError(f"each {what} must be a map", field=field)
    return value


# --------------------------------------------------------------------------
# Key-value commands (also the write operations of a txn)


@dataclass(frozen=True, slots=True, kw_only=True)
class Put:
    """Write ``value`` at ``key``; ``prev_kv`` asks for the previous record."""

    op: ClassVar[str] = "put"
    key: bytes
    value: bytes
    prev_kv: bool = False

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check("value", self.value, bytes)
        _check("prev_kv", self.prev_kv, bool)
        check_writable(self.key)

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        out: dict[str, Any] = {"op": self.op, "key": self.key, "value": self.value}
        if self.prev_kv:
            out["prev_kv"] = True
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Put:
        """Decode and validate (``__post_init__`` checks the types)."""
        return cls(key=_get(m, "key"), value=_get(m, "value"), prev_kv=_get(m, "prev_kv", False))


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    """Delete ``key``, or every user key of ``[key, range_end)`` (etcd's conventions)."""

    op: ClassVar[str] = "delete"
    key: bytes
    range_end: bytes = b""
    prev_kv: bool = False

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check("range_end", self.range_end, bytes)
        _check("prev_kv", self.prev_kv, bool)
        # A range that starts in the user's key space skips coordinator records
        # when applied; one that starts under a header, or a single reserved
        # key, is a raw write to coordinator records.
        if not self.range_end or is_reserved(self.key):
            check_writable(self.key)

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        out: dict[str, Any] = {"op": self.op, "key": self.key}
        if self.range_end:
            out["range_end"] = self.range_end
        if self.prev_kv:
            out["prev_kv"] = True
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Delete:
        """Decode and validate (``__post_init__`` checks the types)."""
        return cls(key=_get(m, "key"), range_end=_get(m, "range_end", b""), prev_kv=_get(m, "prev_kv", False))


@dataclass(frozen=True, slots=True, kw_only=True)
class Range:
    """A read inside a txn (etcd's RangeRequest, without revision)."""

    op: ClassVar[str] = "range"
    key: bytes
    range_end: bytes = b""
    limit: int = 0
    offset: int = 0
    descending: bool = False
    keys_only: bool = False
    count_only: bool = False

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check("range_end", self.range_end, bytes)
        _check_uint("limit", self.limit)
        _check_uint("offset", self.offset)
        _check("descending", self.descending, bool)
        _check("keys_only", self.keys_only, bool)
        _check("count_only", self.count_only, bool)

    def to_map(self) -> dict[str, Any]:
        """The operation as proposed."""
        out: dict[str, Any] = {"op": self.op, "key": self.key}
        for name in ("range_end", "limit", "offset", "keys_only", "count_only"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.descending:
            out["sort_order"] = "desc"
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Range:
        """Decode and validate."""
        order = _check("sort_order", _get(m, "sort_order", "asc"), str)
        if order not in ("asc", "desc"):
            raise CommandError(f"sort_order must be asc or desc, not {order!r}", field="sort_order")
        return cls(
            key=_get(m, "key"),
            range_end=_get(m, "range_end", b""),
            limit=_get(m, "limit", 0),
            offset=_get(m, "offset", 0),
            descending=order == "desc",
            keys_only=_get(m, "keys_only", False),
            count_only=_get(m, "count_only", False),
        )


TxnOp = Union[Put, Delete, Range]
_TXN_OPS: Final[dict[str, Any]] = {"put": Put, "delete": Delete, "range": Range}


@dataclass(frozen=True, slots=True, kw_only=True)
class Compare:
    """One txn condition on ``[key, range_end)``: every key in it must hold.

    ``target`` "keys" (equality only) compares the exact list of
    ``(key, mod_revision)`` in the range: ``transact()`` uses it to learn
    that a scanned range changed.
    """

    key: bytes
    target: str
    value: Any
    result: str = "equal"
    range_end: bytes = b""

    def __post_init__(self) -> None:
        _check("target", self.target, str)
        _check("result", self.result, str)
        if self.target not in COMPARE_TARGETS:
            raise CommandError(f"compare target {self.target!r} is not one of {COMPARE_TARGETS}", field="target")
        if self.result not in COMPARE_RESULTS:
            raise CommandError(f"compare result {self.result!r} is not one of {COMPARE_RESULTS}", field="result")
        _check_key(self.key)
        _check("range_end", self.range_end, bytes)
        if self.target == "value":
            _check("value", self.value, bytes)
        elif self.target == "keys":
            if self.result != "equal":
                raise CommandError("a 'keys' compare only tests equality", field="result")
            _check("value", self.value, (list, tuple))
            for item in self.value:
                if not (
                    isinstance(item, (list, tuple))
                    and len(item) == 2
                    and isinstance(item[0], bytes)
                    and isinstance(item[1], int)
                ):
                    raise CommandError("a 'keys' compare value is a list of [key, mod_revision]", field="value")
            object.__setattr__(self, "value", tuple((k, r) for k, r in self.value))
        else:
            _check_uint("value", self.value)

    def to_map(self) -> dict[str, Any]:
        """The compare as proposed."""
        out: dict[str, Any] = {"key": self.key, "target": self.target, "result": self.result}
        out["value"] = [[k, r] for k, r in self.value] if self.target == "keys" else self.value
        if self.range_end:
            out["range_end"] = self.range_end
        return out

    @classmethod
    def from_map(cls, c: Any) -> Compare:
        """Decode and validate (fields are looked up in the order they are checked)."""
        c = _map(c, "compare", "compare")
        return cls(
            target=_get(c, "target"),
            result=_get(c, "result", "equal"),
            key=_get(c, "key"),
            range_end=_get(c, "range_end", b""),
            value=_get(c, "value"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Txn:
    """etcd's If/Then/Else: all ``compare`` hold -> ``success``, else ``failure``."""

    op: ClassVar[str] = "txn"
    compare: tuple[Compare, ...] = ()
    success: tuple[TxnOp, ...] = ()
    failure: tuple[TxnOp, ...] = ()

    def __post_init__(self) -> None:
        for name in ("compare", "success", "failure"):
            object.__setattr__(self, name, tuple(_check_count(name, getattr(self, name))))
        for c in self.compare:
            _check("compare", c, Compare)
        for branch in ("success", "failure"):
            for o in getattr(self, branch):
                _check("op", o, (Put, Delete, Range))
            _check_distinct_writes(getattr(self, branch), branch)

    @property
    def read_only(self) -> bool:
        """True when neither branch writes: the txn is a read."""
        return all(isinstance(o, Range) for o in self.success + self.failure)

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        return {
            "op": self.op,
            "compare": [c.to_map() for c in self.compare],
            "success": [o.to_map() for o in self.success],
            "failure": [o.to_map() for o in self.failure],
        }

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Txn:
        """Decode and validate; the op count is capped before any op is decoded."""
        raw = {name: _check_count(name, _check(name, _get(m, name, []), list)) for name in ("compare", "success", "failure")}
        return cls(
            compare=tuple(Compare.from_map(c) for c in raw["compare"]),
            success=tuple(_decode_txn_op(o) for o in raw["success"]),
            failure=tuple(_decode_txn_op(o) for o in raw["failure"]),
        )


def _check_count(name: str, items: Any) -> Any:
    _check(name, items, (list, tuple))
    if len(items) > MAX_TXN_OPS:
        raise LimitExceededError(f"txn {name} has {len(items)} entries; at most {MAX_TXN_OPS} are applied", field=name)
    return items


def _decode_txn_op(o: Any) -> TxnOp:
    o = _map(o, "txn operation", "op")
    op = _check("op", _get(o, "op"), str)
    kind = _TXN_OPS.get(op)
    if kind is None:
        raise CommandError(f"txn operation {op!r} must be put, delete or range", field="op")
    return kind.from_map(o)  # type: ignore[no-any-return]


def _check_distinct_writes(ops: tuple[TxnOp, ...], branch: str) -> None:
    # As in etcd: one key written twice in one revision would have no single
    # well-defined version, so the request is refused. Messages name keys in
    # op order or sorted, never in set order: they are kept in session
    # results and so in snapshots, which must not depend on the hash seed.
    written: dict[bytes, None] = {}
    ranges: list[tuple[bytes, bytes]] = []
    for op in ops:
        if isinstance(op, Put) or (isinstance(op, Delete) and not op.range_end):
            if op.key in written:
                raise CommandError(f"duplicate key {op.key!r} in txn {branch}", field=branch)
            written[op.key] = None
        elif isinstance(op, Delete):
            ranges.append((op.key, op.range_end))
    if not ranges:
        return
    for key in sorted(written):
        for start, end in ranges:
            if start <= key and (end == b"\x00" or key < end):
                raise CommandError(f"duplicate key {key!r} in txn {branch}: also in a deleted range", field=branch)


# --------------------------------------------------------------------------
# Coordinator records


@dataclass(frozen=True, slots=True, kw_only=True)
class Post:
    """A message from ``from_host`` (``from`` on the wire) at its Lamport ``clock``."""

    op: ClassVar[str] = "post"
    from_host: str
    clock: int
    type: int
    timestamp: datetime
    event: int | None = None
    payload: Any = None

    def __post_init__(self) -> None:
        _check("from", self.from_host, str)
        _check_uint("clock", self.clock)
        _check("timestamp", self.timestamp, datetime)
        _check_uint("type", self.type, 0xFF)
        if self.event is not None:
            _check_uint("event", self.event, 0xFF)
        try:
            self.draft()
            NodeKey(self.from_host)
        except RaftcoordError as exc:
            raise CommandError(exc.message, field=exc.field) from None

    def draft(self) -> Message:
        """The message as sent, before the coordinator assigns its clock."""
        return Message(
            type=self.type, timestamp=self.timestamp, from_host=self.from_host, event=self.event, payload=self.payload
        )

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        out: dict[str, Any] = {
            "op": self.op,
            "from": self.from_host,
            "clock": self.clock,
            "type": self.type,
            "timestamp": self.timestamp,
        }
        if self.event is not None:
            out["event"] = self.event
        if self.payload is not None:
            out["payload"] = self.payload
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Post:
        """Decode and validate."""
        sender = _check("from", _get(m, "from"), str)
        clock = _check_uint("clock", _get(m, "clock"))
        timestamp = _check("timestamp", _get(m, "timestamp"), datetime)
        type_ = _check_uint("type", _get(m, "type"), 0xFF)
        event = _get(m, "event", None)
        return cls(from_host=sender, clock=clock, type=type_, timestamp=timestamp, event=event, payload=m.get("payload"))


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSet:
    """Write one node's state record (op ``node``).

    With ``expect_revision`` the write applies only if the record's current
    mod_revision equals it (0: the record must not exist yet); otherwise the
    store answers "conflict" and changes nothing. The liveness tracker uses
    it so that a status it derived from a stale read never overwrites a
    newer record.
    """

    op: ClassVar[str] = "node"
    state: NodeState
    expect_revision: int | None = None

    def __post_init__(self) -> None:
        _check("state", self.state, NodeState)
        if self.expect_revision is not None:
            _check_uint("expect_revision", self.expect_revision)

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        out: dict[str, Any] = {"op": self.op, "state": self.state.to_map()}
        if self.expect_revision is not None:
            out["expect_revision"] = self.expect_revision
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> NodeSet:
        """Decode and validate (``expect_revision`` before the state)."""
        expect = _get(m, "expect_revision", None)
        if expect is not None:
            _check_uint("expect_revision", expect)
        try:
            state = NodeState.from_map(_check("state", _get(m, "state"), Mapping))
        except ValueFormatError as exc:
            raise CommandError(exc.message, field=exc.field) from None
        return cls(state=state, expect_revision=expect)


@dataclass(frozen=True, slots=True, kw_only=True)
class Purge:
    """Drop the oldest messages, always a prefix of clock order.

    ``before`` takes the longest prefix in which every message is older than
    it (the first newer one stops it); ``max_count`` then keeps at most that
    many of the rest, the newest.
    """

    op: ClassVar[str] = "purge"
    before: datetime | None = None
    max_count: int | None = None

    def __post_init__(self) -> None:
        if self.before is not None:
            _check("before", self.before, datetime)
        if self.max_count is not None:
            _check_uint("max_count", self.max_count)

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        out: dict[str, Any] = {"op": self.op}
        if self.before is not None:
            out["before"] = self.before
        if self.max_count is not None:
            out["max_count"] = self.max_count
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Purge:
        """Decode and validate."""
        before = _check("before", _get(m, "before", None), (datetime, type(None)))
        return cls(before=before, max_count=_get(m, "max_count", None))


@dataclass(frozen=True, slots=True)
class Truncate:
    """Delete every user key; node and message records stay."""

    op: ClassVar[str] = "truncate"

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        return {"op": self.op}

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Truncate:
        """Decode (there is nothing to validate)."""
        return cls()


@dataclass(frozen=True, slots=True)
class Barrier:
    """Changes nothing: a read barrier through the log."""

    op: ClassVar[str] = "barrier"

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        return {"op": self.op}

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Barrier:
        """Decode (there is nothing to validate)."""
        return cls()


@dataclass(frozen=True, slots=True)
class Session:
    """Register a client session; the store answers with the id it assigned.

    Never carries ``req``: a session is what a ``req`` refers to.
    """

    op: ClassVar[str] = "session"

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        return {"op": self.op}

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Session:
        """Decode and validate."""
        if "req" in m:
            raise CommandError("a session command carries no req", field="req")
        return cls()


#: What a member change may do; "seed" fills an empty registry at once.
MEMBER_ACTIONS: Final = ("seed", "add", "promote", "remove")
#: Members a registry may hold (a hard cap: a seed is applied on the Raft thread).
MAX_MEMBERS: Final = 1024


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of the cluster's member registry: a node's name, addresses and vote."""

    name: str
    raft: str
    client: str
    voter: bool

    def __post_init__(self) -> None:
        for field_name in ("name", "raft", "client"):
            value = _check(field_name, getattr(self, field_name), str)
            if not 0 < len(value.encode("utf-8")) <= 255 or "\x00" in value:
                raise CommandError(f"member {field_name} must be 1-255 bytes of UTF-8 without NUL",
                                   field=field_name)
        if not isinstance(self.voter, bool):
            raise CommandError(f"member voter must be a boolean, not {type(self.voter).__name__}", field="voter")

    def to_map(self) -> dict[str, Any]:
        """As carried in commands and snapshots."""
        return {"name": self.name, "raft": self.raft, "client": self.client, "voter": self.voter}

    @classmethod
    def from_map(cls, m: Any) -> Member:
        """Decode and validate; raises CommandError naming the field."""
        _check("member", m, Mapping)
        return cls(name=_get(m, "name"), raft=_get(m, "raft"), client=_get(m, "client"), voter=_get(m, "voter"))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberChange:
    """Change the member registry (op ``member``), one node at a time.

    ``seed`` fills an empty registry with ``members`` (the cluster file's
    nodes, proposed by the first leader) and changes nothing once it holds
    any; ``add`` records ``members[0]``; ``promote`` makes the non-voter
    ``name`` a voter; ``remove`` drops ``name``. A change of a voter travels
    in the same Raft entry as pysyncobj's own membership change
    (``raftcoord.membership``), so the registry and the Raft configuration
    move together.
    """

    op: ClassVar[str] = "member"
    action: str
    members: tuple[Member, ...] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if self.action not in MEMBER_ACTIONS:
            raise CommandError(f"member action must be one of {', '.join(MEMBER_ACTIONS)}, not {self.action!r}",
                               field="action")
        if self.action == "seed":
            if not 0 < len(self.members) <= MAX_MEMBERS:
                raise CommandError(f"a seed holds 1 to {MAX_MEMBERS} members", field="members")
        elif self.action == "add":
            if len(self.members) != 1:
                raise CommandError("an add holds exactly one member", field="members")
        elif not isinstance(self.name, str) or not self.name:
            raise CommandError(f"a {self.action} names the member", field="name")
        for m in self.members:
            _check("members", m, Member)

    def to_map(self) -> dict[str, Any]:
        """The command as proposed."""
        out: dict[str, Any] = {"op": self.op, "action": self.action}
        if self.members:
            out["members"] = [m.to_map() for m in self.members]
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> MemberChange:
        """Decode and validate."""
        raw = _get(m, "members", [])
        _check("members", raw, list)
        if len(raw) > MAX_MEMBERS:
            raise CommandError(f"a member change holds at most {MAX_MEMBERS} members", field="members")
        name = _get(m, "name", None)
        if name is not None:
            _check("name", name, str)
        return cls(action=_check("action", _get(m, "action"), str),
                   members=tuple(Member.from_map(x) for x in raw), name=name)


Command = Union[Put, Delete, Txn, Post, NodeSet, Purge, Truncate, Barrier, Session, MemberChange]
_COMMANDS: Final[dict[str, Any]] = {
    cls.op: cls for cls in (Put, Delete, Txn, Post, NodeSet, Purge, Truncate, Barrier, Session, MemberChange)
}


def decode_command(m: Any) -> Command:
    """The command a decoded CBOR map stands for; raises CommandError naming the field."""
    if not isinstance(m, Mapping):
        raise CommandError(f"command must be a map, not {type(m).__name__}", field="command")
    op = _check("op", _get(m, "op"), str)
    kind = _COMMANDS.get(op)
    if kind is None:
        raise CommandError(f"unknown command op {op!r}", field="op")
    return kind.from_map(m)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Req:
    """A request id: the session, its sequence number, and the lowest it still awaits."""

    client: str
    seq: int
    low: int

    def to_list(self) -> list[Any]:
        """As carried in a command's ``req`` field."""
        return [self.client, self.seq, self.low]


def decode_req(m: Mapping[str, Any]) -> Req | None:
    """The command's ``req``, or None; raises CommandError if it is malformed."""
    req = m.get("req")
    if req is None:
        return None
    if (
        not isinstance(req, list)
        or len(req) != 3
        or not isinstance(req[0], str)
        or not req[0]
        or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK for v in req[1:])
    ):
        raise CommandError("req must be [client_id, seq, lowest_outstanding]", field="req")
    return Req(req[0], req[1], req[2])
