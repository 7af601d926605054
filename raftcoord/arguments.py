"""Checks of the arguments the embedded API takes, shared by its callers.

:class:`~raftcoord.coordinator.Coordinator` and
:class:`~raftcoord.transaction.Transaction` refuse a bad key, value, order
or message code here, with a :class:`CommandError` (or
:class:`ReservedKeyError`) naming the field, before anything is sent. The
state machine checks the commands again (``commands.py``): these checks are
for the caller's sake, so a mistake fails at the call, not in the log.
"""

from __future__ import annotations

from typing import Any

from raftcoord.errors import CommandError, ReservedKeyError
from raftcoord.keys import is_reserved, prefix_end

__all__ = ["check_key", "check_order", "check_value", "check_writable_key", "message_code", "prefix_range"]


def check_key(key: Any) -> bytes:
    """``key`` if it is non-empty bytes; else :class:`CommandError`."""
    if not isinstance(key, bytes):
        raise CommandError(f"key must be bytes, not {type(key).__name__}", field="key")
    if not key:
        raise CommandError("key must not be empty", field="key")
    return key


def check_writable_key(key: Any) -> bytes:
    """``key`` if it is a key a caller may write; else :class:`ReservedKeyError` (or as :func:`check_key`)."""
    check_key(key)
    if is_reserved(key):
        raise ReservedKeyError(f"key {key!r} is under a coordinator header", field="key")
    return key


def check_value(value: Any) -> bytes:
    """``value`` if it is bytes; else :class:`CommandError`."""
    if not isinstance(value, bytes):
        raise CommandError(f"value must be bytes, not {type(value).__name__}", field="value")
    return value


def check_order(order: str) -> None:
    """Refuse an ``order`` other than ``"asc"`` or ``"desc"``."""
    if order not in ("asc", "desc"):
        raise CommandError(f"order must be 'asc' or 'desc', not {order!r}", field="order")


def prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """The ``(key, range_end)`` covering every key under ``prefix`` (every key for ``b""``)."""
    if not isinstance(prefix, bytes):
        raise CommandError(f"prefix must be bytes, not {type(prefix).__name__}", field="prefix")
    return (prefix, prefix_end(prefix)) if prefix else (b"\x00", b"\x00")


def message_code(value: int | str, name: str) -> int:
    """A message ``type`` or ``event`` code as an int 0-255, from an int or one character."""
    if isinstance(value, str):
        if len(value) != 1 or ord(value) > 0xFF:
            raise CommandError(f"{name} must be one character or an int 0-255, got {value!r}", field=name)
        return ord(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise CommandError(f"{name} must be an int 0-255 or one character, got {value!r}", field=name)
    return value
