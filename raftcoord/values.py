"""CBOR values: node-state and message objects, and the strict CBOR codec.

Every CBOR object raftcoord writes goes through :func:`encode_cbor`
(canonical: map keys sorted, shortest forms), so the same object always gives
the same bytes on every replica. Every CBOR object it reads goes through
:func:`decode_cbor`, which accepts exactly one data item: trailing bytes,
duplicate map keys and anything cbor2 cannot parse raise
:class:`ValueFormatError`, never an exception from inside cbor2.

Timestamps are written as CBOR tag 1 (epoch seconds) and read from tag 1 or
tag 0 (RFC 3339 text). This module does no I/O and reads no clock: a record's
timestamp is always given by whoever builds it.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Final

import cbor2

from raftcoord.errors import ValueFormatError
from raftcoord.keys import MAX_CLOCK, NodeKey

__all__ = [
    "Event",
    "Message",
    "MessageType",
    "NodeState",
    "NodeStatus",
    "cbor_bytes_head",
    "decode_cbor",
    "encode_cbor",
    "epoch_seconds",
    "from_epoch_seconds",
]


def encode_cbor(obj: Any) -> bytes:
    """Canonical CBOR bytes for ``obj``; datetimes become tag 1."""
    try:
        return cbor2.dumps(obj, canonical=True, datetime_as_timestamp=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise ValueFormatError(f"cannot encode as CBOR: {exc}", field="value") from None


def cbor_bytes_head(n: int) -> bytes:
    """The CBOR head of a byte string of ``n`` bytes (major type 2).

    For writers that stream a large byte string in pieces without joining
    them into one object (snapshot and backup files).
    """
    if n < 24:
        return bytes([0x40 + n])
    for code, size in ((0x58, 1), (0x59, 2), (0x5A, 4), (0x5B, 8)):
        if n < 1 << (8 * size):
            return bytes([code]) + n.to_bytes(size, "big")
    raise ValueError("byte string too long for CBOR")


def _keep_tag(tag: int) -> Callable[[Any, bool], Any]:
    return lambda value, immutable: cbor2.CBORTag(tag, value)


class _BigNum(int):
    """An integer that arrived as a tag 2/3 bignum (not allowed inside tag 1)."""


def _bignum(negative: bool) -> Callable[[Any, bool], Any]:
    def decode(value: Any, immutable: bool) -> int:
        if not isinstance(value, bytes):
            raise ValueFormatError("a bignum must hold a byte string", field="value")
        n = int.from_bytes(value, "big")
        return _BigNum(-1 - n if negative else n)

    return decode


def _epoch_time(value: Any, immutable: bool) -> datetime:
    # RFC 8949 3.4.2: tag 1 holds an integer (major type 0 or 1) or a float.
    if isinstance(value, (bool, _BigNum)) or not isinstance(value, (int, float)):
        raise ValueFormatError(f"tag 1 time must hold a number, not {type(value).__name__}", field="timestamp")
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, ValueError, OSError):
        raise ValueFormatError(f"tag 1 time {value!r} is out of range", field="timestamp") from None


# cbor2 decodes many tags into Python objects on its own (MIME messages,
# shared references that build cycles, sets that drop duplicates, ...). Data
# from peers and clients must round-trip unchanged and never pull in code we
# did not ask for, so only times (0, 1) and bignums (2, 3) are interpreted;
# every other tag stays a CBORTag and is re-encoded exactly as it came.
_SEMANTIC_DECODERS: Final = {
    **{tag: _keep_tag(tag) for tag in (4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)},
    1: _epoch_time,
    2: _bignum(False),
    3: _bignum(True),
}


def decode_cbor(data: bytes, *, what: str = "value") -> Any:
    """Decode exactly one CBOR data item from ``data``.

    ``what`` names the thing being decoded in the error message.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueFormatError(f"{what} must be bytes, not {type(data).__name__}", field=what)
    buf = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(buf, allow_duplicate_keys=False, semantic_decoders=_SEMANTIC_DECODERS).decode()
    except RecursionError:
        raise ValueFormatError(f"{what} is nested too deeply", field=what) from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes; any failure is the input's
        raise ValueFormatError(f"{what} is not valid CBOR: {exc}", field=what) from None
    if buf.tell() != len(data):
        raise ValueFormatError(
            f"{what} has {len(data) - buf.tell()} trailing bytes after the CBOR item", field=what
        )
    return obj


def epoch_seconds(ts: datetime) -> float:
    """A timezone-aware datetime as epoch seconds."""
    return ts.timestamp()


def from_epoch_seconds(value: float) -> datetime:
    """Epoch seconds as a UTC datetime."""
    return datetime.fromtimestamp(value, timezone.utc)


class NodeStatus(str, enum.Enum):
    """The states a PuzzleDB node reports about itself."""

    UNKNOWN = "unknown"
    IDLE = "idle"
    JOINING = "joining"
    UP = "up"
    DOWN = "down"
    LEAVING = "leaving"
    EXITING = "exiting"
    REMOVED = "removed"
    ABORTED = "aborted"
    UNREACHABLE = "unreachable"

    def __str__(self) -> str:
        return self.value


class MessageType(enum.IntEnum):
    """Message types known to PuzzleDB (their ASCII codes)."""

    OBJECT = ord("O")
    DATABASE = ord("D")
    COLLECTION = ord("C")
    USER = ord("U")


class Event(enum.IntEnum):
    """Events a message reports (their ASCII codes)."""

    CREATED = ord("C")
    UPDATED = ord("U")
    DELETED = ord("D")


def _require_map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueFormatError(f"{what} must be a CBOR map, not {type(obj).__name__}", field=what)
    for k in obj:
        if not isinstance(k, str):
            raise ValueFormatError(f"{what} map keys must be text, found {k!r}", field=what)
    return dict(obj)


def _timestamp(value: Any, field_name: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValueFormatError(
            f"{field_name} must be a CBOR tag 0 or tag 1 time, not {type(value).__name__}",
            field=field_name,
        )
    if value.tzinfo is None:
        raise ValueFormatError(f"{field_name} has no time zone", field=field_name)
    return value


def _uint(value: Any, field_name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueFormatError(f"{field_name} must be an integer 0-{maximum}, got {value!r}", field=field_name)
    return value


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise ValueFormatError(f"{field_name} must be text, got {type(value).__name__}", field=field_name)
    return value


_NODE_FIELDS: Final = ("host", "status", "clock", "timestamp", "addr", "cluster")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeState:
    """One node's state record: who it is, its status, and when it said so."""

    host: str
    status: NodeStatus
    clock: int
    timestamp: datetime
    addr: str = ""
    cluster: str = ""
    #: Keys beyond the known ones, kept as they came.
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The node's Raft role as the answering replica sees it ("leader",
    #: "follower", "candidate", "non-voter"), or None when unknown. Local
    #: annotation: never encoded, replicated or compared.
    role: str | None = field(default=None, compare=False)
    #: Seconds since the answering replica last heard from the node over
    #: Raft (0 for itself), or None when it cannot tell (only the leader
    #: hears every node). Local annotation like ``role``.
    heard_ago: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        NodeKey(self.host)  # validates the hostname, raising KeyFormatError
        try:
            object.__setattr__(self, "status", NodeStatus(self.status))
        except ValueError:
            choices = " ".join(s.value for s in NodeStatus)
            raise ValueFormatError(
                f"status {self.status!r} is not one of: {choices}", field="status"
            ) from None
        _uint(self.clock, "clock", MAX_CLOCK)
        _timestamp(self.timestamp, "timestamp")
        _text(self.addr, "addr")
        _text(self.cluster, "cluster")
        for name in self.extra:
            if not isinstance(name, str) or name in _NODE_FIELDS:
                raise ValueFormatError(f"extra field {name!r} is not allowed", field="extra")

    @property
    def key(self) -> bytes:
        """The record's key."""
        return NodeKey(self.host).encode()

    def to_map(self) -> dict[str, Any]:
        """The record as the CBOR map it is stored as."""
        out = dict(self.extra)
        out.update(
            host=self.host,
            status=self.status.value,
            clock=self.clock,
            timestamp=self.timestamp,
            addr=self.addr,
            cluster=self.cluster,
        )
        return out

    def encode(self) -> bytes:
        """Canonical CBOR bytes of the record."""
        return encode_cbor(self.to_map())

    @classmethod
    def from_map(cls, obj: Any) -> NodeState:
        """Build from a decoded CBOR map, checking every field."""
        m = _require_map(obj, "node state")
        for name in ("host", "status", "clock", "timestamp"):
            if name not in m:
                raise ValueFormatError(f"node state has no {name!r} field", field=name)
        host = _text(m.pop("host"), "host")
        try:
            NodeKey(host)
        except Exception as exc:  # KeyFormatError: report it as a value error on 'host'
            raise ValueFormatError(str(exc), field="host") from None
        return cls(
            host=host,
            status=_text(m.pop("status"), "status"),  # type: ignore[arg-type]
            clock=_uint(m.pop("clock"), "clock", MAX_CLOCK),
            timestamp=_timestamp(m.pop("timestamp"), "timestamp"),
            addr=_text(m.pop("addr", ""), "addr"),
            cluster=_text(m.pop("cluster", ""), "cluster"),
            extra=m,
        )

    @classmethod
    def decode(cls, data: bytes) -> NodeState:
        """Parse CBOR bytes; raises :class:`ValueFormatError` naming the field."""
        return cls.from_map(decode_cbor(data, what="node state"))


_MESSAGE_FIELDS: Final = ("type", "timestamp", "clock", "from", "event", "payload")


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A message in the message box.

    ``type`` and ``timestamp`` are required by the specification; the
    coordinator writes ``clock`` (its place in the total order) and
    ``from_host`` (``from`` on the wire); ``event`` and ``payload`` are the
    sender's.
    """

    type: int
    timestamp: datetime
    clock: int | None = None
    from_host: str | None = None
    event: int | None = None
    payload: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _uint(self.type, "type", 0xFF)
        _timestamp(self.timestamp, "timestamp")
        if self.clock is not None:
            _uint(self.clock, "clock", MAX_CLOCK)
        if self.from_host is not None:
            _text(self.from_host, "from")
        if self.event is not None:
            _uint(self.event, "event", 0xFF)
        for name in self.extra:
            if not isinstance(name, str) or name in _MESSAGE_FIELDS:
                raise ValueFormatError(f"extra field {name!r} is not allowed", field="extra")

    def to_map(self) -> dict[str, Any]:
        """The message as the CBOR map it is stored as (absent fields omitted)."""
        out = dict(self.extra)
        out["type"] = self.type
        out["timestamp"] = self.timestamp
        if self.clock is not None:
            out["clock"] = self.clock
        if self.from_host is not None:
            out["from"] = self.from_host
        if self.event is not None:
            out["event"] = self.event
        if self.payload is not None:
            out["payload"] = self.payload
        return out

    def encode(self) -> bytes:
        """Canonical CBOR bytes of the message."""
        return encode_cbor(self.to_map())

    @classmethod
    def from_map(cls, obj: Any) -> Message:
        """Build from a decoded CBOR map, checking every field."""
        m = _require_map(obj, "message")
        for name in ("type", "timestamp"):
            if name not in m:
                raise ValueFormatError(f"message has no {name!r} field", field=name)
        clock = m.pop("clock", None)
        from_host = m.pop("from", None)
        event = m.pop("event", None)
        return cls(
            type=_uint(m.pop("type"), "type", 0xFF),
            timestamp=_timestamp(m.pop("timestamp"), "timestamp"),
            clock=None if clock is None else _uint(clock, "clock", MAX_CLOCK),
            from_host=None if from_host is None else _text(from_host, "from"),
            event=None if event is None else _uint(event, "event", 0xFF),
            payload=m.pop("payload", None),
            extra=m,
        )

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Parse CBOR bytes; raises :class:`ValueFormatError` naming the field."""
        return cls.from_map(decode_cbor(data, what="message"))
