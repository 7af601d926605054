"""Coordinator keys: the 2-byte key header, node keys and message keys.

Byte layouts (fixed; tests pin them byte for byte)::

    header      category(1) | version(4 bits) value_type(4 bits)
    node key    b"N" 0x11 | hostname, UTF-8, 1-255 bytes, no NUL
    message key b"M" 0x11 | clock, uint64 big-endian (8) | message type (1)

Message keys therefore sort by clock, and a scan of ``MESSAGE_PREFIX``
returns messages in their total order. This module does no I/O and reads no
clock; every decoder is strict and raises :class:`KeyFormatError` naming the
field that was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from raftcoord.errors import KeyFormatError

__all__ = [
    "CATEGORY_MESSAGE",
    "CATEGORY_NODE",
    "HEADER_SIZE",
    "MESSAGE_KEY_SIZE",
    "MESSAGE_PREFIX",
    "NODE_PREFIX",
    "RESERVED_PREFIXES",
    "VALUE_TYPE_CBOR",
    "VERSION",
    "KeyHeader",
    "MessageKey",
    "NodeKey",
    "decode_key",
    "is_reserved",
    "prefix_end",
]

CATEGORY_NODE: Final = 0x4E  # "N"
CATEGORY_MESSAGE: Final = 0x4D  # "M"
VERSION: Final = 1
VALUE_TYPE_CBOR: Final = 1
HEADER_SIZE: Final = 2
MESSAGE_KEY_SIZE: Final = HEADER_SIZE + 8 + 1
MAX_HOSTNAME_BYTES: Final = 255
MAX_CLOCK: Final = 2**64 - 1

_CATEGORIES: Final = {CATEGORY_NODE: "node", CATEGORY_MESSAGE: "message"}
# Versions 1-7 are valid by the specification; only 1 has a layout today.
_KNOWN_VERSIONS: Final = frozenset({1})
_KNOWN_VALUE_TYPES: Final = frozenset({VALUE_TYPE_CBOR})


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyHeader:
    """The 2-byte header before every coordinator key."""

    category: int
    version: int = VERSION
    value_type: int = VALUE_TYPE_CBOR

    def __post_init__(self) -> None:
        if self.category not in _CATEGORIES:
            raise KeyFormatError(
                f"unknown key category 0x{self.category:02x} (expected N or M)",
                field="category",
            )
        if not 1 <= self.version <= 7:
            raise KeyFormatError(
                f"key version {self.version} is reserved or out of range (1-7)", field="version"
            )
        if self.version not in _KNOWN_VERSIONS:
            raise KeyFormatError(f"unsupported key version {self.version}", field="version")
        if self.value_type not in _KNOWN_VALUE_TYPES:
            reason = "reserved" if self.value_type == 0 else "unknown"
            raise KeyFormatError(
                f"{reason} key value type {self.value_type} (1 is CBOR)", field="value_type"
            )

    def encode(self) -> bytes:
        """The header's two bytes."""
        return bytes((self.category, (self.version << 4) | self.value_type))

    @classmethod
    def decode(cls, data: bytes) -> KeyHeader:
        """Parse the first two bytes of ``data``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise KeyFormatError(f"key must be bytes, not {type(data).__name__}", field="key")
        if len(data) < HEADER_SIZE:
            raise KeyFormatError(
                f"key of {len(data)} bytes is too short for the 2-byte header", field="header"
            )
        return cls(category=data[0], version=data[1] >> 4, value_type=data[1] & 0x0F)


NODE_PREFIX: Final = KeyHeader(category=CATEGORY_NODE).encode()
MESSAGE_PREFIX: Final = KeyHeader(category=CATEGORY_MESSAGE).encode()
RESERVED_PREFIXES: Final = (NODE_PREFIX, MESSAGE_PREFIX)


def _validate_hostname(host: str) -> bytes:
    if not isinstance(host, str):
        raise KeyFormatError(f"hostname must be text, not {type(host).__name__}", field="hostname")
    try:
        raw = host.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KeyFormatError(f"hostname is not valid UTF-8: {exc.reason}", field="hostname") from None
    if not 1 <= len(raw) <= MAX_HOSTNAME_BYTES:
        raise KeyFormatError(
            f"hostname must be 1-{MAX_HOSTNAME_BYTES} bytes of UTF-8, got {len(raw)}",
            field="hostname",
        )
    if b"\x00" in raw:
        raise KeyFormatError("hostname must not contain NUL", field="hostname")
    return raw


@dataclass(frozen=True, slots=True)
class NodeKey:
    """The key of one node's state record."""

    host: str

    def __post_init__(self) -> None:
        _validate_hostname(self.host)

    def encode(self) -> bytes:
        """Header ``N 0x11`` followed by the hostname in UTF-8."""
        return NODE_PREFIX + self.host.encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> NodeKey:
        """Parse a node key; raises :class:`KeyFormatError` on any defect."""
        header = KeyHeader.decode(data)
        if header.category != CATEGORY_NODE:
            raise KeyFormatError("not a node key", field="category")
        raw = bytes(data[HEADER_SIZE:])
        if not raw:
            raise KeyFormatError("node key has no hostname", field="hostname")
        try:
            host = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KeyFormatError(f"hostname is not valid UTF-8: {exc.reason}", field="hostname") from None
        return cls(host)


@dataclass(frozen=True, slots=True)
class MessageKey:
    """The key of one message: its Lamport clock, then its type."""

    clock: int
    type: int

    def __post_init__(self) -> None:
        if isinstance(self.clock, bool) or not isinstance(self.clock, int) or not 0 <= self.clock <= MAX_CLOCK:
            raise KeyFormatError(f"clock {self.clock!r} is not a uint64", field="clock")
        if isinstance(self.type, bool) or not isinstance(self.type, int) or not 0 <= self.type <= 0xFF:
            raise KeyFormatError(f"message type {self.type!r} is not a byte (0-255)", field="type")

    def encode(self) -> bytes:
        """Header ``M 0x11``, the clock as 8 big-endian bytes, the type byte."""
        return MESSAGE_PREFIX + self.clock.to_bytes(8, "big") + bytes((self.type,))

    @classmethod
    def decode(cls, data: bytes) -> MessageKey:
        """Parse a message key; raises :class:`KeyFormatError` on any defect."""
        header = KeyHeader.decode(data)
        if header.category != CATEGORY_MESSAGE:
            raise KeyFormatError("not a message key", field="category")
        if len(data) != MESSAGE_KEY_SIZE:
            part = "clock" if len(data) < HEADER_SIZE + 8 else "type"
            raise KeyFormatError(
                f"message key must be {MESSAGE_KEY_SIZE} bytes, got {len(data)}", field=part
            )
        return cls(int.from_bytes(data[2:10], "big"), data[10])


def decode_key(data: bytes) -> NodeKey | MessageKey:
    """Decode any coordinator key by its category byte."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KeyFormatError(f"key must be bytes, not {type(data).__name__}", field="key")
    data = bytes(data)
    header = KeyHeader.decode(data)
    if header.category == CATEGORY_NODE:
        return NodeKey.decode(data)
    return MessageKey.decode(data)


def is_reserved(key: bytes) -> bool:
    """True when ``key`` lies under a header the coordinator owns."""
    return key[:HEADER_SIZE] in RESERVED_PREFIXES


def prefix_end(prefix: bytes) -> bytes:
    """The etcd-style ``range_end`` that selects every key starting with ``prefix``.

    Returns ``b"\\0"`` (meaning "to the end of the key space", as etcd does)
    when the prefix is empty or all ``0xff``.
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"
