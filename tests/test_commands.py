"""The command vocabulary (raftcoord.commands): build, encode, decode, validate.

Each command is a frozen dataclass that validates when built; ``to_map()`` is
what a proposer sends and :func:`decode_command` gives the same value back.
Anything else a decoder is handed raises the project's own error naming the
field, never another exception.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftcoord.commands import (
    MAX_TXN_OPS,
    Barrier,
    Compare,
    Delete,
    NodeSet,
    Post,
    Purge,
    Put,
    Range,
    Req,
    Session,
    Truncate,
    Txn,
    decode_command,
    decode_req,
)
from raftcoord.errors import CommandError, LimitExceededError, RaftcoordError, ReservedKeyError
from raftcoord.keys import NODE_PREFIX
from raftcoord.store import Store
from raftcoord.values import NodeState, decode_cbor, encode_cbor

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

EXAMPLES = [
    Put(key=b"a", value=b"1"),
    Put(key=b"a", value=b"", prev_kv=True),
    Delete(key=b"a"),
    Delete(key=b"a", range_end=b"\x00", prev_kv=True),
    Delete(key=b"a", range_end=NODE_PREFIX + b"zz"),
    Txn(),
    Txn(
        compare=(
            Compare(key=b"k", target="version", value=2, result="greater"),
            Compare(key=b"k", target="value", value=b"v", range_end=b"l"),
            Compare(key=b"k", target="keys", value=((b"k", 2), (b"k1", 3)), range_end=b"l"),
        ),
        success=(Put(key=b"x", value=b"1"), Range(key=b"a", range_end=b"b", limit=2, offset=1, descending=True)),
        failure=(Delete(key=b"x", prev_kv=True), Range(key=b"a", keys_only=True, count_only=True)),
    ),
    Post(from_host="n1", clock=3, type=ord("U"), timestamp=T0),
    Post(from_host="n1", clock=3, type=ord("O"), timestamp=T0, event=ord("C"), payload={"x": [1, b"2"]}),
    NodeSet(state=NodeState(host="n1", status="up", clock=1, timestamp=T0, addr="a:1", extra={"zone": "z"})),  # type: ignore[arg-type]
    Purge(),
    Purge(before=T0, max_count=3),
    Truncate(),
    Barrier(),
    Session(),
]


@pytest.mark.parametrize("cmd", EXAMPLES, ids=lambda c: type(c).__name__)
def test_every_command_round_trips_through_cbor(cmd: Any) -> None:
    """decode_command(decode(encode(cmd.to_map()))) is the same command, and its map is the same map."""
    m = cmd.to_map()
    assert m["op"] == cmd.op
    again = decode_command(decode_cbor(encode_cbor(m)))
    assert again == cmd and again.to_map() == m


@pytest.mark.parametrize("cmd", EXAMPLES, ids=lambda c: type(c).__name__)
def test_the_store_accepts_every_command_built_here(cmd: Any) -> None:
    """A proposer that builds commands here sends maps the store applies (no refusal)."""
    s = Store()
    s.apply_map({"op": "put", "key": b"k", "value": b"v"})
    assert s.apply(encode_cbor(cmd.to_map())).ok


def test_commands_are_frozen() -> None:
    """A command cannot be changed once built."""
    put = Put(key=b"a", value=b"1")
    with pytest.raises(AttributeError):
        put.key = b"b"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("build", "error", "field"),
    [
        (lambda: Put(key=b"", value=b""), CommandError, "key"),
        (lambda: Put(key="a", value=b""), CommandError, "key"),  # type: ignore[arg-type]
        (lambda: Put(key=b"a", value="1"), CommandError, "value"),  # type: ignore[arg-type]
        (lambda: Put(key=NODE_PREFIX + b"n1", value=b""), ReservedKeyError, "key"),
        (lambda: Delete(key=NODE_PREFIX + b"n1"), ReservedKeyError, "key"),
        (lambda: Range(key=b"a", limit=-1), CommandError, "limit"),
        (lambda: Compare(key=b"a", target="lease", value=1), CommandError, "target"),
        (lambda: Compare(key=b"a", target="keys", value=[], result="less"), CommandError, "result"),
        (lambda: Txn(success=(Put(key=b"a", value=b""), Put(key=b"a", value=b"2"))), CommandError, "success"),
        (lambda: Txn(failure=[Range(key=b"a")] * (MAX_TXN_OPS + 1)), LimitExceededError, "failure"),
        (lambda: Post(from_host="", clock=0, type=1, timestamp=T0), CommandError, "hostname"),
        (lambda: Post(from_host="n1", clock=0, type=256, timestamp=T0), CommandError, "type"),
        (lambda: Purge(max_count=-1), CommandError, "max_count"),
        (lambda: NodeSet(state={"host": "n1"}), CommandError, "state"),  # type: ignore[arg-type]
    ],
)
def test_commands_validate_when_built(build: Any, error: type, field: str) -> None:
    """Building an invalid command raises the project's error naming the field."""
    with pytest.raises(error) as info:
        build()
    assert info.value.field == field


@pytest.mark.parametrize(
    ("m", "field"),
    [
        ([], "command"),
        ({}, "op"),
        ({"op": 3}, "op"),
        ({"op": "range", "key": b"a"}, "op"),  # a range is a txn op, not a command
        ({"op": "put", "value": b""}, "key"),
        ({"op": "put", "key": b"a"}, "value"),
        ({"op": "put", "key": b"a", "value": b"", "prev_kv": 1}, "prev_kv"),
        ({"op": "delete", "key": b"a", "range_end": "b"}, "range_end"),
        ({"op": "txn", "success": [{"op": "range", "key": b"a", "sort_order": "up"}]}, "sort_order"),
        ({"op": "txn", "compare": [{"key": b"a", "target": "version"}]}, "value"),
        ({"op": "post", "from": "n1", "clock": 0, "type": 1}, "timestamp"),
        ({"op": "node", "state": {"host": "n1", "status": "up", "clock": 1}}, "timestamp"),
        ({"op": "purge", "before": 5}, "before"),
        ({"op": "session", "req": ["c1", 1, 0]}, "req"),
    ],
)
def test_decode_command_names_the_field(m: Any, field: str) -> None:
    """decode_command refuses a malformed map with CommandError naming the field."""
    with pytest.raises(CommandError) as info:
        decode_command(m)
    assert info.value.field == field


def test_op_cap_is_checked_before_the_ops_are_decoded() -> None:
    """A txn with too many entries is refused by count, whatever they hold (no work per entry)."""
    with pytest.raises(LimitExceededError) as info:
        decode_command({"op": "txn", "success": ["garbage"] * (MAX_TXN_OPS + 1)})
    assert info.value.field == "success" and info.value.code == "limit_exceeded"
    decode_command({"op": "txn", "success": [{"op": "range", "key": b"a"}] * MAX_TXN_OPS})


def test_overlap_error_names_the_smallest_key() -> None:
    """A key both written and in a deleted range: the message names the smallest such key, not a set-order one."""
    puts = [{"op": "put", "key": k, "value": b""} for k in (b"k9", b"k3", b"k5")]
    with pytest.raises(CommandError) as info:
        decode_command({"op": "txn", "success": [*puts, {"op": "delete", "key": b"k", "range_end": b"l"}]})
    assert "b'k3'" in info.value.message and "b'k5'" not in info.value.message


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        ({"op": "barrier"}, None),
        ({"op": "barrier", "req": ["c1", 2, 1]}, Req("c1", 2, 1)),
    ],
)
def test_decode_req(m: dict[str, Any], expected: Req | None) -> None:
    """decode_req: absent is None, a well-formed req is a Req."""
    assert decode_req(m) == expected
    if expected is not None:
        assert expected.to_list() == m["req"]


@pytest.mark.parametrize("req", ["c1", ["c1", 1], ["", 1, 1], ["c1", -1, 0], ["c1", True, 0], ["c1", 1, 2**64]])
def test_decode_req_refuses_malformed(req: Any) -> None:
    """A malformed req raises CommandError on field req."""
    with pytest.raises(CommandError) as info:
        decode_req({"op": "barrier", "req": req})
    assert info.value.field == "req"


_atoms = st.none() | st.booleans() | st.integers(-3, 2**64 + 1) | st.binary(max_size=4) | st.text(max_size=4)
_values = st.recursive(_atoms, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
_fields = st.sampled_from(
    ["key", "value", "range_end", "prev_kv", "compare", "success", "failure", "target", "result", "from", "clock",
     "type", "timestamp", "event", "payload", "state", "before", "max_count", "limit", "offset", "sort_order", "req"]
)
_ops = st.sampled_from(["put", "delete", "txn", "post", "node", "purge", "truncate", "barrier", "session", "range", "x"])
_txn_items = st.lists(st.dictionaries(_fields | st.just("op"), _values | _ops, max_size=5), max_size=3)


@settings(max_examples=400, deadline=None)
@given(op=_ops, fields=st.dictionaries(_fields, _values | _txn_items, max_size=6))
def test_decode_command_raises_only_project_errors(op: str, fields: dict[str, Any]) -> None:
    """Any map decodes to a command or raises a RaftcoordError; a decoded command re-encodes to a decodable map."""
    try:
        cmd = decode_command({"op": op, **fields})
    except RaftcoordError:
        return
    assert decode_command(cmd.to_map()) == cmd
