"""The uint64 Lamport clock.

Pure functions (:func:`tick`, :func:`merge`, :func:`compare`) and a small
mutable :class:`LamportClock` holder for a node's local clock. Passing
2**64-1 raises :class:`ClockOverflowError`; a clock never wraps silently,
since a wrapped clock would reorder every message after it.

The rules (DESIGN.md): posting ticks the sender's clock; the state machine
assigns ``max(coordinator, sender) + 1``; a node receiving a message sets
``max(local, message) + 1``.
"""

from __future__ import annotations

from raftcoord.errors import ClockOverflowError, InvalidInputError
from raftcoord.keys import MAX_CLOCK

__all__ = ["MAX_CLOCK", "LamportClock", "compare", "merge", "tick"]


def _check(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CLOCK:
        raise InvalidInputError(f"{name} {value!r} is not a uint64 clock", field=name)
    return value


def tick(value: int) -> int:
    """The clock after one local event: ``value + 1``."""
    _check(value, "clock")
    if value == MAX_CLOCK:
        raise ClockOverflowError("Lamport clock would pass 2**64-1", field="clock")
    return value + 1


def merge(local: int, received: int) -> int:
    """The clock after receiving ``received``: ``max(local, received) + 1``."""
    _check(local, "clock")
    _check(received, "received clock")
    return tick(max(local, received))


def compare(a: int, b: int) -> int:
    """-1, 0 or 1 as ``a`` is before, equal to or after ``b``."""
    _check(a, "clock")
    _check(b, "clock")
    return (a > b) - (a < b)


class LamportClock:
    """A node's local Lamport clock. Not thread-safe: the owner locks."""

    __slots__ = ("_value",)

    def __init__(self, value: int = 0) -> None:
        self._value = _check(value, "clock")

    @property
    def value(self) -> int:
        """The current clock value."""
        return self._value

    def tick(self) -> int:
        """Advance by one local event and return the new value."""
        self._value = tick(self._value)
        return self._value

    def merge(self, received: int) -> int:
        """Take in a received clock and return the new value."""
        self._value = merge(self._value, received)
        return self._value

    def __repr__(self) -> str:
        return f"LamportClock({self._value})"
