"""The uint64 Lamport clock (raftcoord.clock): tick, merge, compare, overflow, input checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raftcoord.clock import MAX_CLOCK, LamportClock, compare, merge, tick
from raftcoord.errors import ClockOverflowError, InvalidInputError, RaftcoordError

MAX_U64 = 2**64 - 1
clocks = st.integers(min_value=0, max_value=MAX_U64)
below_max = st.integers(min_value=0, max_value=MAX_U64 - 1)

BAD_VALUES = [-1, -(2**64), 2**64, 2**80, True, False, 1.0, 0.5, "1", b"\x01", None, [1]]


# ---------------------------------------------------------------------------
# tick
# ---------------------------------------------------------------------------


def test_max_clock_is_uint64_max():
    """MAX_CLOCK is 2**64-1."""
    assert MAX_CLOCK == MAX_U64 == 18446744073709551615


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 1), (1, 2), (41, 42), (2**32 - 1, 2**32), (MAX_U64 - 1, MAX_U64)],
)
def test_tick_adds_one(value, expected):
    """tick(v) is v + 1, up to and including 2**64-1."""
    assert tick(value) == expected


@given(below_max)
def test_tick_is_successor(value):
    """tick(v) == v + 1 for every v below the maximum."""
    assert tick(value) == value + 1


def test_tick_at_max_overflows():
    """tick(2**64-1) raises ClockOverflowError instead of wrapping to 0."""
    with pytest.raises(ClockOverflowError) as info:
        tick(MAX_U64)
    assert info.value.field == "clock"
    assert isinstance(info.value, OverflowError)
    assert isinstance(info.value, RaftcoordError)
    assert not isinstance(info.value, InvalidInputError)


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_tick_refuses_invalid_input(value):
    """tick of a negative, bool, non-int or >uint64 value raises InvalidInputError."""
    with pytest.raises(InvalidInputError) as info:
        tick(value)
    assert info.value.field == "clock"


# ---------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "received", "expected"),
    [
        (0, 0, 1),
        (5, 3, 6),  # local ahead: local + 1
        (3, 5, 6),  # received ahead: received + 1
        (7, 7, 8),
        (0, MAX_U64 - 1, MAX_U64),
        (MAX_U64 - 1, 0, MAX_U64),
    ],
)
def test_merge_is_max_plus_one(local, received, expected):
    """merge(local, received) is max(local, received) + 1."""
    assert merge(local, received) == expected


@given(below_max, below_max)
def test_merge_property(local, received):
    """merge is max + 1, strictly after both inputs, and symmetric."""
    result = merge(local, received)
    assert result == max(local, received) + 1
    assert result > local and result > received
    assert merge(received, local) == result


@pytest.mark.parametrize(("local", "received"), [(MAX_U64, 0), (0, MAX_U64), (MAX_U64, MAX_U64)])
def test_merge_at_max_overflows(local, received):
    """merge raises ClockOverflowError when max(local, received) is 2**64-1."""
    with pytest.raises(ClockOverflowError):
        merge(local, received)


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_merge_refuses_invalid_input(value):
    """merge with an invalid local or received clock raises InvalidInputError naming it."""
    with pytest.raises(InvalidInputError) as info:
        merge(value, 1)
    assert info.value.field == "clock"
    with pytest.raises(InvalidInputError) as info:
        merge(1, value)
    assert info.value.field == "received clock"


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(1, 2, -1), (2, 1, 1), (3, 3, 0), (0, MAX_U64, -1), (MAX_U64, 0, 1), (MAX_U64, MAX_U64, 0)],
)
def test_compare_vectors(a, b, expected):
    """compare(a, b) is -1, 0 or 1 as a is before, equal to or after b."""
    assert compare(a, b) == expected


@given(clocks, clocks)
def test_compare_property(a, b):
    """compare agrees with integer order and is antisymmetric."""
    assert compare(a, b) == (a > b) - (a < b)
    assert compare(b, a) == -compare(a, b)
    assert (compare(a, b) == 0) == (a == b)


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_compare_refuses_invalid_input(value):
    """compare with an invalid clock on either side raises InvalidInputError."""
    with pytest.raises(InvalidInputError):
        compare(value, 1)
    with pytest.raises(InvalidInputError):
        compare(1, value)


# ---------------------------------------------------------------------------
# LamportClock
# ---------------------------------------------------------------------------


def test_lamport_clock_starts_at_zero():
    """A new LamportClock reads 0, or the value it was given."""
    assert LamportClock().value == 0
    assert LamportClock(42).value == 42
    assert LamportClock(MAX_U64).value == MAX_U64
    assert repr(LamportClock(7)) == "LamportClock(7)"


def test_lamport_clock_tick_and_merge():
    """LamportClock.tick adds one and merge takes max + 1, each returning the new value."""
    clock = LamportClock()
    assert clock.tick() == 1
    assert clock.tick() == 2
    assert clock.merge(10) == 11  # behind: jump past the received clock
    assert clock.merge(3) == 12  # ahead: still move forward by one
    assert clock.merge(12) == 13
    assert clock.value == 13


def test_lamport_clock_overflow_leaves_value_unchanged():
    """At 2**64-1, tick and merge raise ClockOverflowError and the clock keeps its value."""
    clock = LamportClock(MAX_U64 - 1)
    assert clock.tick() == MAX_U64
    with pytest.raises(ClockOverflowError):
        clock.tick()
    assert clock.value == MAX_U64
    other = LamportClock(5)
    with pytest.raises(ClockOverflowError):
        other.merge(MAX_U64)
    assert other.value == 5


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_lamport_clock_refuses_invalid_values(value):
    """LamportClock(v) and .merge(v) with invalid v raise InvalidInputError, leaving the clock as is."""
    with pytest.raises(InvalidInputError):
        LamportClock(value)
    clock = LamportClock(9)
    with pytest.raises(InvalidInputError):
        clock.merge(value)
    assert clock.value == 9


def test_lamport_clock_has_no_instance_dict():
    """LamportClock uses slots; its value cannot be assigned from outside."""
    clock = LamportClock(1)
    with pytest.raises(AttributeError):
        clock.value = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        clock.other = 1  # type: ignore[attr-defined]


@given(st.lists(st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)), max_size=50))
def test_lamport_clock_is_strictly_increasing(events):
    """Any sequence of ticks (None) and merges (int) gives strictly increasing values."""
    clock = LamportClock()
    previous = clock.value
    for event in events:
        value = clock.tick() if event is None else clock.merge(event)
        assert value > previous
        if event is not None:
            assert value > event
        assert value == clock.value
        previous = value


@given(st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=20))
def test_relay_gives_total_order(sender_clocks):
    """The state machine's rule, clock = max(coordinator, sender) + 1, gives strictly increasing, distinct clocks."""
    coordinator = 0
    assigned = []
    for sender in sender_clocks:
        coordinator = merge(coordinator, sender)
        assigned.append(coordinator)
        assert coordinator > sender
    assert assigned == sorted(set(assigned))
