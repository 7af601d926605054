"""Issue 8 in the state machine: retention one bad clock cannot abuse, the
node command's ``expect_revision``, and the replicated watch history.

The history is checked against a plain model: every revision's key events
(with previous records), computed from a dict, never from the store.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftcoord import store as store_module
from raftcoord.commands import NodeSet, decode_command
from raftcoord.errors import CommandError, CompactedError, ValueFormatError
from raftcoord.events import Change, KeyDeleted, KeyPut
from raftcoord.keys import MessageKey, NodeKey
from raftcoord.store import Store
from raftcoord.values import NodeState, decode_cbor, encode_cbor

UTC = timezone.utc
NOW = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
U = ord("U")


def command(op: str, **fields: Any) -> bytes:
    """CBOR bytes of one command; ``from_`` stands for ``from``."""
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return encode_cbor({"op": op, **fields})


def run(store: Store, op: str, **fields: Any) -> dict[str, Any]:
    """Apply one command that must succeed; its result."""
    applied = store.apply(command(op, **fields))
    assert applied.ok, applied.result
    return applied.result


def post(store: Store, ts: datetime, sender: str = "n1") -> int:
    """Post one message stamped ``ts``; its clock."""
    res = store.apply_map({"op": "post", "from": sender, "clock": 0, "type": U, "timestamp": ts})
    assert res.ok, res.result
    return int(res.result["message"]["clock"])


def purge_all(store: Store, **fields: Any) -> int:
    """Purge until the store says there is no "more"; how many went."""
    total = 0
    while True:
        res = run(store, "purge", **fields)
        total += res["purged"]
        if not res.get("more"):
            return total


# ---------------------------------------------------------------------------
# Item 2: retention that one bad clock cannot abuse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, store_module.MAX_PURGE_PER_COMMAND - 1, 10_000])
def test_issue8_2_one_old_timestamp_does_not_wipe_newer_messages(n: int) -> None:
    """n messages stamped now and one stamped 1999 after them: a purge of what is over an hour old removes nothing."""
    s = Store()
    for _ in range(n):
        post(s, NOW)
    post(s, datetime(1999, 1, 1, tzinfo=UTC), sender="bad-clock")
    assert purge_all(s, before=NOW - timedelta(hours=1)) == 0
    assert len(s.messages()) == n + 1
    assert s.message_floor == 0


def test_issue8_2_purge_removes_the_old_prefix_and_stops_at_the_first_new_message() -> None:
    """A genuinely old prefix goes; the purge stops at the first message that is not older than the cut-off."""
    s = Store()
    old, new = NOW - timedelta(days=2), NOW
    for ts in (old, old, old, new, old, new, old):
        post(s, ts)
    res = run(s, "purge", before=NOW - timedelta(hours=1))
    assert (res["purged"], res["floor"]) == (3, 3)
    assert [m.clock for m in s.messages()] == [4, 5, 6, 7]
    # Nothing more goes by time while the newer message 4 heads the order ...
    assert run(s, "purge", before=NOW - timedelta(hours=1))["purged"] == 0
    # ... and the count limit still bounds the rest: it takes 4, then 5 is old.
    res = run(s, "purge", before=NOW - timedelta(hours=1), max_count=2)
    assert (res["purged"], res["floor"]) == (2, 5)
    assert [m.clock for m in s.messages()] == [6, 7]


def test_issue8_2_purge_prefix_stops_within_one_command_window() -> None:
    """The per-command cap and "more" still hold with the prefix rule."""
    s = Store()
    n = store_module.MAX_PURGE_PER_COMMAND + 5
    for _ in range(n):
        post(s, NOW - timedelta(days=1))
    post(s, NOW)
    post(s, NOW - timedelta(days=1))
    res = run(s, "purge", before=NOW - timedelta(hours=1))
    assert (res["purged"], res.get("more")) == (store_module.MAX_PURGE_PER_COMMAND, True)
    res = run(s, "purge", before=NOW - timedelta(hours=1))
    assert (res["purged"], "more" in res, res["floor"]) == (5, False, n)
    assert [m.clock for m in s.messages()] == [n + 1, n + 2]


def test_issue8_2_compacted_error_names_the_oldest_clock_kept() -> None:
    """messages() below the floor raises CompactedError whose oldest_clock and message name the oldest clock kept."""
    s = Store()
    for i in range(6):
        post(s, NOW + timedelta(seconds=i))
    assert s.oldest_clock == 1
    run(s, "purge", max_count=2)
    assert (s.message_floor, s.oldest_clock) == (4, 5)
    with pytest.raises(CompactedError) as exc:
        s.messages(since=2)
    err = exc.value
    assert (err.field, err.oldest_clock, err.compact_revision) == ("since", 5, None)
    assert "oldest clock kept is 5" in err.message
    assert err.to_dict()["oldest_clock"] == 5
    # Everything purged: the oldest clock kept is the next one to come.
    run(s, "purge", max_count=0)
    assert (s.message_floor, s.oldest_clock) == (6, 7)
    with pytest.raises(CompactedError) as exc:
        s.messages(since=5)
    assert exc.value.oldest_clock == 7 and "7" in exc.value.message
    assert s.messages(since=6) == []


def test_issue8_2_oldest_clock_survives_snapshot_restore() -> None:
    """A restored store names the same oldest clock kept."""
    s = Store()
    for i in range(4):
        post(s, NOW + timedelta(seconds=i))
    run(s, "purge", max_count=1)
    r = Store.restore(s.snapshot())
    assert r.oldest_clock == s.oldest_clock == 4
    assert MessageKey(4, U).encode() in {kv.key for kv in r.range(b"\x00", b"\x00").kvs}


# ---------------------------------------------------------------------------
# node command: expect_revision
# ---------------------------------------------------------------------------


def _state(host: str = "n1", status: str = "up") -> dict[str, Any]:
    return {"host": host, "status": status, "clock": 1, "timestamp": NOW}


def _state_of(s: Store) -> dict[str, Any]:
    snap = decode_cbor(s.snapshot())
    del snap["applied"]
    return snap


def test_issue8_node_expect_revision_zero_means_the_record_must_not_exist() -> None:
    """expect_revision=0 creates the record only if there is none; otherwise a conflict and no change."""
    s = Store()
    assert run(s, "node", state=_state(), expect_revision=0)["revision"] == 2
    before = _state_of(s)
    res = s.apply(command("node", state=_state(status="down"), expect_revision=0))
    assert not res.ok and res.events == ()
    assert res.result["error"]["code"] == "conflict" and res.result["error"]["field"] == "expect_revision"
    assert res.result["revision"] == 2
    assert _state_of(s) == before
    assert s.node_state("n1").status.value == "up"


def test_issue8_node_expect_revision_must_equal_the_records_mod_revision() -> None:
    """A node write with expect_revision applies only when the record's mod_revision equals it."""
    s = Store()
    run(s, "put", key=b"x", value=b"1")
    run(s, "node", state=_state())  # revision 3
    assert s.get(NodeKey("n1").encode()).mod_revision == 3
    for stale in (2, 4, 0):
        res = s.apply(command("node", state=_state(status="down"), expect_revision=stale))
        assert res.result["error"]["code"] == "conflict", res.result
        assert str(stale) in res.result["error"]["message"] and "3" in res.result["error"]["message"]
    assert run(s, "node", state=_state(status="down"), expect_revision=3)["revision"] == 4
    assert s.node_state("n1").status.value == "down"
    # Other nodes' records are not what is compared.
    assert run(s, "node", state=_state(host="n2"), expect_revision=0)["revision"] == 5


@pytest.mark.parametrize("bad", [-1, "3", True, 2**64, 1.5, [1]])
def test_issue8_node_expect_revision_malformed_is_refused(bad: Any) -> None:
    """A malformed expect_revision is refused naming the field, with no change."""
    s = Store()
    before = _state_of(s)
    res = s.apply(command("node", state=_state(), expect_revision=bad))
    assert res.result["error"]["code"] == "command" and res.result["error"]["field"] == "expect_revision"
    assert _state_of(s) == before


def test_issue8_node_expect_revision_round_trips_through_the_command_class() -> None:
    """NodeSet carries expect_revision in to_map only when set."""
    state = NodeState.from_map(_state())
    assert "expect_revision" not in NodeSet(state=state).to_map()
    cmd = NodeSet(state=state, expect_revision=7)
    assert cmd.to_map()["expect_revision"] == 7
    assert decode_command(cmd.to_map()) == cmd
    with pytest.raises(CommandError):
        NodeSet(state=state, expect_revision=-1)


# ---------------------------------------------------------------------------
# Item 4 (state machine side): the replicated watch history
# ---------------------------------------------------------------------------


class TinyHistory(Store):
    """At most 3 changes and 40 bytes of history."""

    history_revisions = 3
    history_bytes = 40


def _changes(s: Store, start: int, **kw: Any) -> list[tuple[int, list[tuple[Any, ...]]]]:
    out = []
    for c in s.changes(start, **kw):
        evs = []
        for e in c.events:
            if isinstance(e, KeyPut):
                evs.append(("PUT", e.kv.key, e.kv.value, None if e.prev is None else e.prev.value))
            else:
                evs.append(("DELETE", e.key, e.prev.value))
        out.append((c.revision, evs))
    return out


def test_issue8_history_keeps_every_revisions_key_events_in_command_order() -> None:
    """Each revision that changed keys is one Change: txn events in op order, message and node keys too."""
    s = Store()
    assert (s.compact_revision, s.changes(1)) == (1, [])
    run(s, "put", key=b"a", value=b"1")
    run(s, "txn", success=[{"op": "put", "key": b"b", "value": b"2"}, {"op": "delete", "key": b"a"}, {"op": "put", "key": b"c", "value": b"3"}])
    run(s, "delete", key=b"zzz")  # changes nothing: no revision, no change
    run(s, "barrier")
    clock = post(s, NOW)
    run(s, "node", state=_state())
    assert _changes(s, 1) == [
        (2, [("PUT", b"a", b"1", None)]),
        (3, [("PUT", b"b", b"2", None), ("DELETE", b"a", b"1"), ("PUT", b"c", b"3", None)]),
        (4, [("PUT", MessageKey(clock, U).encode(), s.get(MessageKey(clock, U).encode()).value, None)]),
        (5, [("PUT", NodeKey("n1").encode(), s.get(NodeKey("n1").encode()).value, None)]),
    ]
    assert all(isinstance(c, Change) for c in s.changes(1))
    assert [c.revision for c in s.changes(3)] == [3, 4, 5]
    assert [c.revision for c in s.changes(3, limit=1)] == [3]
    assert s.changes(6) == [] and s.changes(10**6) == []
    deleted = s.changes(3)[0].events[1]
    assert isinstance(deleted, KeyDeleted) and deleted.revision == 3 and deleted.prev.mod_revision == 2


def test_issue8_history_drops_the_oldest_past_the_revision_bound() -> None:
    """Past history_revisions the oldest changes go; compact_revision is one past the newest dropped."""
    s = TinyHistory()
    for i in range(5):
        run(s, "put", key=b"k", value=bytes([i]))  # revisions 2..6
    assert [c.revision for c in s.changes(s.compact_revision)] == [4, 5, 6]
    assert s.compact_revision == 4
    with pytest.raises(CompactedError) as exc:
        s.changes(3)
    assert (exc.value.field, exc.value.compact_revision, exc.value.oldest_clock) == ("start_revision", 4, None)
    assert "4" in exc.value.message and exc.value.to_dict()["compact_revision"] == 4
    assert [c.revision for c in s.changes(5)] == [5, 6]


def test_issue8_history_byte_bound_keeps_the_newest_change_however_large() -> None:
    """The byte bound drops the oldest first, but the newest change is always kept."""
    s = TinyHistory()
    run(s, "put", key=b"a", value=b"x")  # 2 bytes
    run(s, "put", key=b"big", value=b"y" * 100)  # 103 bytes: alone over the bound
    assert [c.revision for c in s.changes(s.compact_revision)] == [3]
    assert s.compact_revision == 3
    run(s, "put", key=b"b", value=b"z")
    assert [c.revision for c in s.changes(s.compact_revision)] == [4]
    # A delete counts its key and the value it removed.
    run(s, "put", key=b"c", value=b"1" * 30)  # 31 + 2 = 33 bytes kept
    run(s, "delete", key=b"c")  # 31 more: over 40, the oldest go
    assert [c.revision for c in s.changes(s.compact_revision)] == [6]


def test_issue8_history_survives_snapshot_restore_byte_for_byte() -> None:
    """restore(snapshot()) gives the same changes, compact_revision and snapshot bytes, and goes on alike."""
    s = TinyHistory()
    for i in range(4):
        run(s, "put", key=b"k%d" % i, value=b"v")
    run(s, "delete", key=b"k", range_end=b"l", prev_kv=True)
    r = TinyHistory.restore(s.snapshot())
    assert r.snapshot() == s.snapshot()
    assert r.compact_revision == s.compact_revision > 1
    assert r.changes(r.compact_revision) == s.changes(s.compact_revision)
    run(r, "put", key=b"x", value=b"1")
    run(s, "put", key=b"x", value=b"1")
    assert r.snapshot() == s.snapshot()


def test_issue8_history_from_a_format_2_snapshot_starts_after_its_revision() -> None:
    """A snapshot without history restores with compact_revision = revision + 1."""
    snap = {"format": 2, "revision": 7, "clock": 0, "message_floor": 0, "applied": 6, "sessions": [],
            "kvs": [[b"a", b"1", 2, 7, 3]]}
    s = Store.restore(encode_cbor(snap))
    assert (s.compact_revision, s.changes(8)) == (8, [])
    with pytest.raises(CompactedError):
        s.changes(7)
    run(s, "put", key=b"a", value=b"2")
    assert _changes(s, 8) == [(8, [("PUT", b"a", b"2", b"1")])]
    assert decode_cbor(s.snapshot())["format"] == store_module.SNAPSHOT_FORMAT


def _snap3(**over: Any) -> bytes:
    snap: dict[str, Any] = {
        "format": 3, "revision": 5, "clock": 0, "message_floor": 0, "applied": 4, "sessions": [],
        "kvs": [[b"a", b"2", 2, 5, 2]], "compact_revision": 2,
        "history": [[2, [[0, b"a", b"1", 2, 1, None]]], [5, [[0, b"a", b"2", 2, 2, [b"1", 2, 2, 1]]]]],
    }
    snap.update(over)
    return encode_cbor(snap)


def test_issue8_history_good_format_3_snapshot_loads() -> None:
    """The hand-written format 3 snapshot used below is valid (so each bad one is bad for its one change)."""
    s = Store.restore(_snap3())
    assert _changes(s, 2) == [(2, [("PUT", b"a", b"1", None)]), (5, [("PUT", b"a", b"2", b"1")])]


@pytest.mark.parametrize(
    "over",
    [
        {"compact_revision": 0},
        {"compact_revision": 7},
        {"compact_revision": -1},
        {"compact_revision": True},
        {"compact_revision": 3},  # a kept change older than compact_revision
        {"history": {}},
        {"history": [[2]]},
        {"history": [[2, []]]},
        {"history": [[5, [[0, b"a", b"2", 2, 2, None]]], [2, [[0, b"a", b"1", 2, 1, None]]]]},  # out of order
        {"history": [[2, [[0, b"a", b"1", 2, 1, None]]], [2, [[0, b"a", b"1", 2, 1, None]]]]},  # repeated
        {"history": [[6, [[0, b"a", b"1", 2, 1, None]]]]},  # newer than the store
        {"history": [[2, [[2, b"a", b"1", 2, 1, None]]]]},
        {"history": [[2, [[True, b"a", b"1", 2, 1, None]]]]},
        {"history": [[2, [[0, "a", b"1", 2, 1, None]]]]},
        {"history": [[2, [[0, b"a", "1", 2, 1, None]]]]},
        {"history": [[2, [[0, b"a", b"1", 2, 0, None]]]]},
        {"history": [[2, [[0, b"a", b"1", 3, 1, None]]]]},
        {"history": [[2, [[0, b"a", b"1", 2, 1]]]]},
        {"history": [[5, [[0, b"a", b"2", 2, 2, [b"1", 2, 5, 1]]]]]},  # prev not older than the change
        {"history": [[5, [[0, b"a", b"2", 2, 2, [b"1", 2, 2]]]]]},
        {"history": [[5, [[1, b"a"]]]]},
        {"history": [[5, [[1, b"a", None]]]]},
        {"history": [[5, [[1.0, b"a", [b"1", 2, 2, 1]]]]]},
        {"history": [[5, [[1, b"a", [b"1", 2, 2, 1], b"x"]]]]},
        {"history": [["5", [[1, b"a", [b"1", 2, 2, 1]]]]]},
    ],
)
def test_issue8_history_bad_format_3_snapshots_are_refused(over: dict[str, Any]) -> None:
    """A format 3 snapshot with a malformed history raises ValueFormatError, nothing else."""
    with pytest.raises(ValueFormatError):
        Store.restore(_snap3(**over))


def test_issue8_history_format_3_needs_its_history_fields() -> None:
    """A format 3 snapshot without compact_revision or history is refused."""
    for missing in ("compact_revision", "history"):
        snap = decode_cbor(_snap3())
        del snap[missing]
        with pytest.raises(ValueFormatError):
            Store.restore(encode_cbor(snap))


def test_issue8_history_trimming_does_not_keep_dead_slots() -> None:
    """Trimming from the left keeps the history's list within a small multiple of the bound (no growth)."""
    s = TinyHistory()
    for i in range(2000):
        run(s, "put", key=b"k", value=b"%d" % (i % 10))
    assert len(s.changes(s.compact_revision)) == 3
    assert len(s._history._changes) <= 2 * 3 + 65  # noqa: SLF001 - the amortized compaction


# A random mix of puts, deletes, txns, posts and purges; the model is the
# plain difference of the whole key space before and after each command.
_KEYS = [b"a", b"a/1", b"b", b"c"]
_commands = st.one_of(
    st.builds(lambda k, v: {"op": "put", "key": k, "value": v}, st.sampled_from(_KEYS), st.binary(max_size=6)),
    st.builds(lambda k: {"op": "delete", "key": k}, st.sampled_from(_KEYS)),
    st.builds(lambda k: {"op": "delete", "key": k, "range_end": b"\x00"}, st.sampled_from(_KEYS)),
    st.builds(
        lambda k, v, k2: {"op": "txn", "success": [{"op": "put", "key": k, "value": v}, {"op": "delete", "key": k2}]},
        st.sampled_from(_KEYS[:2]), st.binary(max_size=3), st.sampled_from(_KEYS[2:]),
    ),
    st.builds(lambda sec: {"op": "post", "from": "n1", "clock": 0, "type": U, "timestamp": NOW + timedelta(seconds=sec)}, st.integers(0, 5)),
    st.builds(lambda sec, m: {"op": "purge", "before": NOW + timedelta(seconds=sec), "max_count": m}, st.integers(0, 6), st.integers(0, 4)),
    st.just({"op": "restore"}),
)


class SmallHistory(Store):
    """Bounds a short run reaches."""

    history_revisions = 6
    history_bytes = 120


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmds=st.lists(_commands, min_size=1, max_size=40))
def test_issue8_history_matches_the_key_space_differences(cmds: list[dict[str, Any]]) -> None:
    """changes() holds, per revision, exactly what changed in the key space, bounded as the model says."""
    s = SmallHistory()
    model: list[tuple[int, dict[bytes, tuple[bytes | None, bytes | None]]]] = []
    compact = 1
    for cmd in cmds:
        if cmd["op"] == "restore":
            snap = s.snapshot()
            s = SmallHistory.restore(snap)
            assert s.snapshot() == snap
            continue
        before = {kv.key: kv for kv in s.range(b"\x00", b"\x00").kvs}
        assert s.apply_map(cmd).ok
        after = {kv.key: kv for kv in s.range(b"\x00", b"\x00").kvs}
        diff = {
            k: (None if k not in after else after[k].value, None if k not in before else before[k].value)
            for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)
        }
        if diff:
            model.append((s.revision, diff))
            size = lambda: sum(len(k) + len(n or b"") + len(p or b"") for _, d in model for k, (n, p) in d.items())  # noqa: E731
            while len(model) > 1 and (len(model) > SmallHistory.history_revisions or size() > SmallHistory.history_bytes):
                compact = model.pop(0)[0] + 1
        assert s.compact_revision == compact
        got = []
        for c in s.changes(compact):
            d: dict[bytes, tuple[bytes | None, bytes | None]] = {}
            for e in c.events:
                if isinstance(e, KeyPut):
                    assert e.kv.mod_revision == c.revision
                    d[e.kv.key] = (e.kv.value, d[e.kv.key][1] if e.kv.key in d else (None if e.prev is None else e.prev.value))
                else:
                    assert e.revision == c.revision
                    d[e.key] = (None, d[e.key][1] if e.key in d else e.prev.value)
            got.append((c.revision, dict(sorted(d.items()))))
        assert got == model
