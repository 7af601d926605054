"""Hypothesis strategies shared by the wire-format fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def mutated(draw, valid):
    """A valid encoding with a few bytes flipped, inserted, deleted or cut off."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and data:
            i = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[i] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "insert":
            i = draw(st.integers(min_value=0, max_value=len(data)))
            data.insert(i, draw(st.integers(min_value=0, max_value=255)))
        elif op == "delete" and data:
            del data[draw(st.integers(min_value=0, max_value=len(data) - 1))]
        elif op == "truncate":
            del data[draw(st.integers(min_value=0, max_value=len(data))) :]
    return bytes(data)
