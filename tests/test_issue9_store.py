"""Issue 9, item 3: memory, restart and snapshot cost of the state machine.

A node must hold 1,000,000 keys of 100 bytes in 400 MB and serve again within
5 s of a restart, and a snapshot taken on the Raft thread must not stop it
for long. The store therefore keeps one immutable bytes record per key (its
revisions, then its value) in parallel sorted lists (``raftcoord.kvmap``),
and snapshot format 4 is those lists as they are. These tests pin the layout
and its cost in work and bytes that do not depend on the machine's speed.
"""

from __future__ import annotations

import gc
import struct
import sys
import tracemalloc
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftcoord import store as store_module
from raftcoord.errors import ValueFormatError
from raftcoord.kvmap import KVMap
from raftcoord.store import Store
from raftcoord.values import decode_cbor, encode_cbor

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

#: Commands whose snapshot, made by the format-3 code (before issue 9), is below.
V3_COMMANDS: list[dict[str, Any]] = [
    {"op": "session"},
    {"op": "put", "key": b"a", "value": b"1", "req": ["c1", 1, 1]},
    {"op": "put", "key": b"b", "value": b"2"},
    {"op": "put", "key": b"a", "value": b"3"},
    {"op": "node", "state": {"host": "n1", "status": "up", "clock": 1, "timestamp": T0, "zone": "x"}},
    {"op": "post", "from": "n1", "clock": 4, "type": ord("O"), "timestamp": T0, "event": ord("C"), "payload": b"p"},
    {"op": "post", "from": "n1", "clock": 1, "type": ord("D"), "timestamp": T0},
    {"op": "delete", "key": b"b"},
    {"op": "txn", "compare": [{"key": b"a", "target": "version", "result": "equal", "value": 2}],
     "success": [{"op": "put", "key": b"c", "value": b"4"}], "failure": []},
    {"op": "purge", "max_count": 1},
]
V3_SNAPSHOT = bytes.fromhex(
    "a9636b767384854b4d110000000000000006445827a46466726f6d626e316474797065184465636c6f636b066974696d6573"
    "74616d70c11a6955b90007070185444e116e315840a764616464726064686f7374626e31647a6f6e65617865636c6f636b01"
    "6673746174757362757067636c7573746572606974696d657374616d70c11a6955b900050501854161413302040285416341"
    "3409090165636c6f636b0666666f726d617403676170706c6965640a67686973746f7279898202818600416141310201f682"
    "03818600416241320301f682048186004161413302028441310202018205818600444e116e315840a764616464726064686f"
    "7374626e31647a6f6e65617865636c6f636b016673746174757362757067636c7573746572606974696d657374616d70c11a"
    "6955b9000501f682068186004b4d1100000000000000054f5839a66466726f6d626e316474797065184f65636c6f636b0565"
    "6576656e741843677061796c6f616441706974696d657374616d70c11a6955b9000601f682078186004b4d11000000000000"
    "0006445827a46466726f6d626e316474797065184465636c6f636b066974696d657374616d70c11a6955b9000701f6820881"
    "830141628441320303018209818600416341340901f6820a8183014b4d1100000000000000054f845839a66466726f6d626e"
    "316474797065184f65636c6f636b05656576656e741843677061796c6f616441706974696d657374616d70c11a6955b90006"
    "0601687265766973696f6e0a6873657373696f6e73818462633102018182014fa2626f6bf5687265766973696f6e026d6d65"
    "73736167655f666c6f6f720570636f6d706163745f7265766973696f6e01"
)


class ShortHistoryStore(Store):
    """A store whose watch history stays small, so costs measured are the key map's."""

    history_revisions = 4


class TinyKVMap(KVMap):
    """Sublists of 2 to 4 keys, so a few keys split and join them."""

    load = 2


def _fill(store: Store, n: int, value_bytes: int = 100) -> Store:
    for i in range(n):
        # A fresh value per key, as commands decoded from the log give.
        assert store.apply(encode_cbor({"op": "put", "key": b"k%09d" % i, "value": b"%0*d" % (value_bytes, i)})).ok
    return store


def test_issue9_store_memory_per_key_is_compact() -> None:
    """A key of 10 bytes with a 100-byte value costs the store under 240 bytes (it was about 350)."""
    n = 20_000
    store = ShortHistoryStore()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _fill(store, n)
        gc.collect()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    # The floor is the key (48 bytes) and value (144) objects themselves.
    assert per_key < 240, f"{per_key:.0f} bytes per key"


def test_issue9_snapshot_format_4_is_the_records_as_held() -> None:
    """Format 4's kvs (kept by format 5) is [keys, records]: three big-endian uint64 revisions, then the value."""
    s = Store()
    s.apply_map({"op": "put", "key": b"b", "value": b"x"})
    s.apply_map({"op": "put", "key": b"a", "value": b"y"})
    s.apply_map({"op": "put", "key": b"b", "value": b"zz"})
    snap = decode_cbor(s.snapshot())
    assert snap["format"] == store_module.SNAPSHOT_FORMAT == 5  # 5 added the member registry (issue 10)
    assert snap["members"] == []
    assert snap["kvs"] == [[b"a", b"b"], [struct.pack(">QQQ", 3, 3, 1) + b"y", struct.pack(">QQQ", 2, 4, 2) + b"zz"]]


def test_issue9_format_3_snapshot_restores_to_the_state_its_commands_give() -> None:
    """A snapshot written before format 4 restores to exactly what replaying its commands gives now."""
    assert decode_cbor(V3_SNAPSHOT)["format"] == 3
    replayed = Store()
    for cmd in V3_COMMANDS:
        assert replayed.apply(encode_cbor(cmd)).ok
    restored = Store.restore(V3_SNAPSHOT)
    assert restored.snapshot() == replayed.snapshot()
    assert restored.range(b"\x00", b"\x00") == replayed.range(b"\x00", b"\x00")
    assert [m.clock for m in restored.messages()] == [6]
    # Still at-most-once: the session's remembered request answers, not re-applies.
    again = restored.apply(encode_cbor(V3_COMMANDS[1]))
    assert again.result == {"ok": True, "revision": 2} and restored.revision == 10


def _v4(kvs: Any, **more: Any) -> bytes:
    snap = {"format": 4, "revision": 9, "clock": 0, "message_floor": 0, "applied": 9, "kvs": kvs, "sessions": [],
            "compact_revision": 10, "history": []}
    snap.update(more)
    return encode_cbor(snap)


META = struct.pack(">QQQ", 2, 2, 1)


@pytest.mark.parametrize(
    "snap",
    [
        _v4([[b"b", b"a"], [META, META]]),  # not sorted
        _v4([[b"a", b"a"], [META, META]]),  # duplicate
        _v4([[b"a", b"b"], [META]]),  # lengths differ
        _v4([[b"a"], [META[:23]]]),  # record shorter than its revisions
        _v4([["a"], [META]]),  # text key
        _v4([[b"a"], ["x" * 24]]),  # text record
        _v4([[b"a"], [META], [META]]),  # not a pair
        _v4({"keys": [], "records": []}),
        _v4([[b"a"], META]),
        _v4([[b"a"], [META]], compact_revision=11),
    ],
)
def test_issue9_restore_refuses_bad_format_4_snapshots(snap: bytes) -> None:
    """restore() raises ValueFormatError for a malformed format-4 snapshot, nothing else."""
    with pytest.raises(ValueFormatError):
        Store.restore(snap)


def test_issue9_good_format_4_snapshot_loads() -> None:
    """A hand-made format-4 snapshot restores its keys with their revisions."""
    s = Store.restore(_v4([[b"a", b"b"], [META + b"1", struct.pack(">QQQ", 3, 9, 4)]]))
    kv = s.get(b"b")
    assert kv is not None and (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"", 3, 9, 4)
    assert s.count(b"\x00", b"\x00") == 2 and s.revision == 9


def _python_calls(fn: Any) -> int:
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_issue9_restore_and_snapshot_do_no_python_work_per_key() -> None:
    """restore() and snapshot() of 20,000 keys run no Python function per key (restore took 5 s per 1,000,000)."""
    store = _fill(ShortHistoryStore(), 20_000)
    snap = store.snapshot()
    assert _python_calls(lambda: ShortHistoryStore.restore(snap)) < 500
    assert _python_calls(store.snapshot) < 500
    assert ShortHistoryStore.restore(snap).snapshot() == snap


def test_issue9_image_encodes_later_what_snapshot_gave_then() -> None:
    """An image taken before more commands still encodes to the snapshot of that moment."""
    store = Store()
    store.apply(encode_cbor({"op": "session"}))
    _fill(store, 50, value_bytes=3)
    image, snap = store.image(), store.snapshot()
    assert (image.revision, image.applied, len(image)) == (store.revision, store.applied, 50)
    store.apply(encode_cbor({"op": "put", "key": b"k000000001", "value": b"new", "req": ["c1", 1, 1]}))
    store.apply(encode_cbor({"op": "delete", "key": b"k000000002"}))
    store.apply(encode_cbor({"op": "delete", "key": b"k0", "range_end": b"k000000010"}))
    assert image.encode() == snap != store.snapshot()


# ---------------------------------------------------------------- KVMap


def _check(m: KVMap, model: dict[bytes, bytes]) -> None:
    keys = sorted(model)
    assert len(m) == len(keys) and list(m) == keys
    assert m.flat() == (keys, [model[k] for k in keys])
    for i, k in enumerate(keys):
        assert m.key_at(i) == k and m.get(k) == model[k] and k in m
    for lo in range(len(keys) + 1):
        for hi in range(lo, len(keys) + 2):
            assert m.items_between(lo, hi) == (keys[lo:hi], [model[k] for k in keys[lo:hi]])
    assert m.keys_between(0, len(keys)) == keys


probe_keys = st.binary(max_size=2)


@settings(max_examples=150, deadline=None)
@given(
    start=st.lists(probe_keys, unique=True, max_size=12),
    ops=st.lists(st.tuples(st.sampled_from(["set", "pop"]), probe_keys, st.binary(max_size=2)), max_size=60),
)
def test_issue9_kvmap_agrees_with_a_sorted_dict(start: list[bytes], ops: list[tuple[str, bytes, bytes]]) -> None:
    """Sets and pops, through splits and joins of small sublists, agree with a plain dict kept sorted."""
    model = {k: b"v" + k for k in start}
    m = TinyKVMap.from_sorted(sorted(model), [model[k] for k in sorted(model)])
    for op, key, value in ops:
        if op == "set":
            m[key] = value
            model[key] = value
        elif key in model:
            assert m.pop(key) == model.pop(key)
        else:
            with pytest.raises(KeyError):
                m.pop(key)
        assert m.get(key) == model.get(key)
        ordered = sorted(model)
        for probe in (key, b"", b"\x00", key + b"\x00", b"\xff\xff\xff"):
            assert m.bisect_left(probe) == sum(k < probe for k in ordered)
            assert m.bisect_right(probe) == sum(k <= probe for k in ordered)
    _check(m, model)
    assert all(1 <= len(sub) <= 2 * TinyKVMap.load for sub in m._keys)
    assert m._maxes == [sub[-1] for sub in m._keys]


def test_issue9_watch_history_shares_records_with_the_map() -> None:
    """With a full watch history, a key put once costs under 420 bytes (it was about 535)."""
    n = 5_000
    store = Store()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        _fill(store, n)
        gc.collect()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(store.changes(store.compact_revision)) == n
    assert per_key < 420, f"{per_key:.0f} bytes per key"


def test_issue9_restored_history_shares_records_with_the_map() -> None:
    """After restore, a change's record that is still the key's current one is the map's object, not a copy."""
    store = Store()
    for first in range(0, 300, 100):
        ops = [{"op": "put", "key": b"k%03d" % i, "value": b"v%d" % first} for i in range(first, first + 100)]
        assert store.apply_map({"op": "txn", "success": ops}).ok
    assert store.apply_map({"op": "put", "key": b"k000", "value": b"again"}).ok
    restored = Store.restore(store.snapshot())
    kept = [c for change in restored._history._changes if change for c in change]
    assert len(kept) == 301
    for key, rec, prev in kept:
        assert rec is not None
        if key == b"k000" and prev is None:
            assert rec is not restored._data.get(key)  # overwritten since: its own record
        else:
            assert rec is restored._data.get(key)
    (_, rec0, prev0), = [c for c in kept if c[0] == b"k000" and c[2] is not None]
    first_put = next(rec for key, rec, prev in kept if key == b"k000" and prev is None)
    assert prev0 is first_put  # one object for the record and the next change's previous record
    assert restored.snapshot() == store.snapshot()


REC_2 = struct.pack(">QQQ", 2, 2, 1) + b"1"


def _snap4_history(history: Any) -> bytes:
    return _v4([[b"a"], [REC_2]], revision=2, applied=1, compact_revision=2, history=history)


@pytest.mark.parametrize(
    "history",
    [
        [[2, [[b"a", REC_2]]]],  # not a triple
        [[2, [["a", REC_2, None]]]],  # text key
        [[2, [[b"a", None, None]]]],  # neither record
        [[2, [[b"a", REC_2[:20], None]]]],  # short record
        [[2, [[b"a", "x" * 30, None]]]],  # text record
        [[2, [[b"a", struct.pack(">QQQ", 2, 1, 1), None]]]],  # mod is not the change's revision
        [[2, [[b"a", struct.pack(">QQQ", 3, 2, 1), None]]]],  # created after it
        [[2, [[b"a", struct.pack(">QQQ", 2, 2, 0), None]]]],  # version 0
        [[2, [[b"a", None, struct.pack(">QQQ", 2, 2, 1)]]]],  # previous record not older
        [[2, [[b"a", None, struct.pack(">QQQ", 1, 1, 0)]]]],  # previous version 0
        [[2, [[0, b"a", b"1", 2, 1, None]]]],  # a format 3 event in format 4
    ],
)
def test_issue9_restore_refuses_bad_format_4_history(history: Any) -> None:
    """A format-4 snapshot whose history is malformed raises ValueFormatError, nothing else."""
    assert Store.restore(_snap4_history([[2, [[b"a", REC_2, None]]]])).changes(2)
    with pytest.raises(ValueFormatError):
        Store.restore(_snap4_history(history))
