"""The state machine against a plain reference model (hypothesis stateful testing).

The model is deliberately dumb: a dict from key to (value, create revision,
mod revision, version), a revision counter, a clock counter, the message
floor, and per client the request results still remembered. Every rule
applies one command to the real :class:`Store` and the same change to the
model, then the invariants compare the two. Message and node values in the
model are the CBOR maps DESIGN.md describes, encoded with the project's
canonical encoder.

One rule replaces the store by ``Store.restore(store.snapshot())`` and the
run goes on with the restored store, so everything after it also checks that
a restored replica behaves like the original.

Client sessions are modelled with small bounds (:class:`SmallStore`): a list
of live sessions, least recently used first, and per session the results
still remembered; a request of an evicted session must be refused, never
applied again.

The watch history is modelled too (issue 8): every rule that changes keys
writes the revision's events itself (put with its previous record, delete
with the record it removed, in the order the command made them), and the
model keeps them under the same small bounds, dropping the oldest first;
``Store.changes`` and ``Store.compact_revision`` must agree with it.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from raftcoord.errors import CompactedError
from raftcoord.keys import MESSAGE_PREFIX, NODE_PREFIX, MessageKey, NodeKey, is_reserved, prefix_end
from raftcoord.kvmap import KVMap
from raftcoord.store import Store
from raftcoord.values import decode_cbor, encode_cbor

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
STAMPS = [T0 + timedelta(seconds=s) for s in (0, 1, 2, 5, 10)]
USER_KEYS = [b"a", b"a/1", b"a/2", b"b", b"M", b"N", b"N\x12x", b"\x00", b"\xff"]
RESERVED_KEYS = [NODE_PREFIX, NODE_PREFIX + b"n1", MESSAGE_PREFIX, MessageKey(1, ord("U")).encode()]
PREFIXES = [b"a", b"a/", b"M", b"N", b"\x00"]  # b"\x00" stands for "every key"
HOSTS = ["n1", "n2", "db-3"]
STATUSES = ["up", "down", "joining", "unreachable"]
TYPES = [ord(c) for c in "OCDU"]
payloads = st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.binary(max_size=3) | st.lists(st.integers(0, 3), max_size=2)


def command(op: str, **fields: Any) -> bytes:
    """CBOR bytes of one command."""
    return encode_cbor({"op": op, **fields})


class TinyKVMap(KVMap):
    """Sublists of 2 to 4 keys: a model run splits and joins them (issue 9)."""

    load = 2


class SmallStore(Store):
    """A store with session, history and sublist bounds small enough for a model run to reach them."""

    kv_map = TinyKVMap
    max_sessions = 3
    max_results_per_session = 4
    history_revisions = 8
    history_bytes = 300


# A history event as the model writes it: ("PUT", key, value, create, mod,
# version, prev) or ("DELETE", key, revision, prev); prev is (value, create,
# mod, version) or None.
Ev = tuple[Any, ...]


def event_tuple(e: Any) -> Ev:
    """A store event in the model's shape."""
    def rec(kv: Any) -> tuple[bytes, int, int, int] | None:
        return None if kv is None else (kv.value, kv.create_revision, kv.mod_revision, kv.version)

    if hasattr(e, "kv"):
        return ("PUT", e.kv.key, e.kv.value, e.kv.create_revision, e.kv.mod_revision, e.kv.version, rec(e.prev))
    return ("DELETE", e.key, e.revision, rec(e.prev))


def event_size(e: Ev) -> int:
    """Key + value + previous value bytes, as the store counts them."""
    prev = e[-1]
    return len(e[1]) + (len(e[2]) if e[0] == "PUT" else 0) + (0 if prev is None else len(prev[0]))


def clock_of(message_key: bytes) -> int:
    """The clock inside a message key, read from the bytes (not through keys.py)."""
    return int.from_bytes(message_key[2:10], "big")


class StoreVersusModel(RuleBasedStateMachine):
    """Random command sequences: the store must agree with the model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.store: Store = SmallStore()
        self.kv: dict[bytes, tuple[bytes, int, int, int]] = {}
        self.revision = 1
        self.clock = 0
        self.floor = 0
        self.stamps: dict[bytes, datetime] = {}  # message key -> timestamp
        self.lows: dict[str, int] = {}
        self.next_seq: dict[str, int] = {}
        self.sent: list[tuple[str, int, bytes, dict[str, Any]]] = []  # client, seq, command, first result
        self.live: list[str] = []  # registered sessions, least recently used first
        self.clients: list[str] = []  # every id ever assigned
        self.kept: dict[str, dict[int, dict[str, Any]]] = {}  # client -> seq -> remembered result
        self.history: list[tuple[int, list[Ev]]] = []  # (revision, events), oldest first
        self.compact = 1

    # ------------------------------------------------------------ the model

    def m_put(self, key: bytes, value: bytes, rev: int) -> Ev:
        old = self.kv.get(key)
        self.kv[key] = new = (value, rev, rev, 1) if old is None else (value, old[1], rev, old[3] + 1)
        return ("PUT", key, *new, old)

    def m_del(self, key: bytes, rev: int) -> Ev:
        return ("DELETE", key, rev, self.kv.pop(key))

    def m_record(self, events: list[Ev]) -> None:
        """Keep one revision's events; drop the oldest past the bounds, never the newest."""
        assert events
        self.history.append((self.revision, events))
        while len(self.history) > 1 and (
            len(self.history) > SmallStore.history_revisions
            or sum(event_size(e) for _, evs in self.history for e in evs) > SmallStore.history_bytes
        ):
            self.compact = self.history.pop(0)[0] + 1

    def m_user_keys(self, key: bytes, range_end: bytes) -> list[bytes]:
        if range_end == b"\x00":
            inside = [k for k in self.kv if key == b"\x00" or k >= key]
        else:
            inside = [k for k in self.kv if key <= k < range_end]
        return sorted(k for k in inside if k[:2] not in (NODE_PREFIX, MESSAGE_PREFIX))

    def m_messages(self) -> list[bytes]:
        return sorted(k for k in self.kv if k[:2] == MESSAGE_PREFIX)

    def apply(self, raw: bytes) -> dict[str, Any]:
        return self.store.apply(raw).result

    def apply_refused(self, raw: bytes, code: str) -> None:
        before = decode_cbor(self.store.snapshot())
        res = self.apply(raw)
        assert res["ok"] is False and res["error"]["code"] == code, res
        after = decode_cbor(self.store.snapshot())
        assert after["applied"] == before["applied"] + 1
        before.pop("applied"), after.pop("applied")
        assert after == before

    # ---------------------------------------------------------------- rules

    @rule(key=st.sampled_from(USER_KEYS), value=st.binary(max_size=3), prev_kv=st.booleans())
    def put(self, key: bytes, value: bytes, prev_kv: bool) -> None:
        old = self.kv.get(key)
        res = self.apply(command("put", key=key, value=value, prev_kv=prev_kv))
        self.revision += 1
        self.m_record([self.m_put(key, value, self.revision)])
        expected: dict[str, Any] = {"ok": True, "revision": self.revision}
        if prev_kv and old is not None:
            expected["prev_kv"] = {"key": key, "value": old[0], "create_revision": old[1], "mod_revision": old[2], "version": old[3]}
        assert res == expected

    @rule(key=st.sampled_from(RESERVED_KEYS), value=st.binary(max_size=3))
    def put_reserved(self, key: bytes, value: bytes) -> None:
        self.apply_refused(command("put", key=key, value=value), "reserved_key")

    @rule(key=st.sampled_from(USER_KEYS + RESERVED_KEYS))
    def delete_key(self, key: bytes) -> None:
        if is_reserved(key):
            self.apply_refused(command("delete", key=key), "reserved_key")
            return
        res = self.apply(command("delete", key=key))
        if key in self.kv:
            self.revision += 1
            self.m_record([self.m_del(key, self.revision)])
            assert res == {"ok": True, "revision": self.revision, "deleted": 1}
        else:
            assert res == {"ok": True, "revision": self.revision, "deleted": 0}

    @rule(prefix=st.sampled_from(PREFIXES))
    def delete_prefix(self, prefix: bytes) -> None:
        key, end = (b"\x00", b"\x00") if prefix == b"\x00" else (prefix, prefix_end(prefix))
        doomed = self.m_user_keys(key, end)
        res = self.apply(command("delete", key=key, range_end=end, prev_kv=True))
        if doomed:
            self.revision += 1
        assert res["revision"] == self.revision
        assert [p["key"] for p in res["prev_kvs"]] == doomed
        if doomed:
            self.m_record([self.m_del(k, self.revision) for k in doomed])

    @rule(
        key=st.sampled_from(USER_KEYS[:4]),
        what=st.sampled_from(["value", "version", "create", "mod"]),
        result=st.sampled_from(["equal", "not_equal", "greater", "less"]),
        data=st.data(),
        success=st.tuples(st.sampled_from(["put", "delete", "range"]), st.sampled_from(USER_KEYS[:4]), st.binary(max_size=2)),
        failure=st.tuples(st.sampled_from(["put", "delete", "range"]), st.sampled_from(USER_KEYS[:4]), st.binary(max_size=2)),
    )
    def txn(self, key: bytes, what: str, result: str, data: st.DataObject, success: tuple, failure: tuple) -> None:
        target = what  # `target` is a reserved argument name of @rule
        if target == "value":
            value: Any = data.draw(st.binary(max_size=2) | st.sampled_from([v[0] for v in self.kv.values()] or [b""]))
        else:
            value = data.draw(st.integers(0, self.revision + 1))
        rec = self.kv.get(key)
        if rec is None:
            held = False if target == "value" else _holds(0, value, result)
        else:
            actual = {"value": rec[0], "create": rec[1], "mod": rec[2], "version": rec[3]}[target]
            held = _holds(actual, value, result)

        def op_map(op: tuple) -> dict[str, Any]:
            kind, k, v = op
            return {"op": kind, "key": k, "value": v} if kind == "put" else {"op": kind, "key": k}

        res = self.apply(
            command(
                "txn",
                compare=[{"key": key, "target": target, "result": result, "value": value}],
                success=[op_map(success)],
                failure=[op_map(failure)],
            )
        )
        assert res["ok"] and res["succeeded"] is held, res
        kind, k, v = success if held else failure
        if kind == "put":
            self.revision += 1
            self.m_record([self.m_put(k, v, self.revision)])
        elif kind == "delete" and k in self.kv:
            self.revision += 1
            self.m_record([self.m_del(k, self.revision)])
        elif kind == "range":
            rec = self.kv.get(k)
            assert res["responses"][0]["count"] == (0 if rec is None else 1)
        assert res["revision"] == self.revision

    @rule(
        sender=st.sampled_from(HOSTS),
        data=st.data(),
        type_=st.sampled_from(TYPES),
        ts=st.sampled_from(STAMPS),
        event=st.none() | st.sampled_from([ord(c) for c in "CUD"]),
        payload=payloads,
    )
    def post(self, sender: str, data: st.DataObject, type_: int, ts: datetime, event: int | None, payload: Any) -> None:
        sender_clock = data.draw(st.integers(0, self.clock + 4), label="sender_clock")
        fields: dict[str, Any] = {"from": sender, "clock": sender_clock, "type": type_, "timestamp": ts}
        if event is not None:
            fields["event"] = event
        if payload is not None:
            fields["payload"] = payload
        res = self.apply(command("post", **fields))
        self.clock = max(self.clock, sender_clock) + 1
        self.revision += 1
        stored = {k: v for k, v in fields.items() if k != "clock"}
        stored["clock"] = self.clock
        key = MESSAGE_PREFIX + self.clock.to_bytes(8, "big") + bytes([type_])
        assert key not in self.kv
        self.kv[key] = (encode_cbor(stored), self.revision, self.revision, 1)
        self.m_record([("PUT", key, *self.kv[key], None)])
        self.stamps[key] = ts
        assert res == {"ok": True, "revision": self.revision, "message": stored}

    @rule(
        host=st.sampled_from(HOSTS),
        status=st.sampled_from(STATUSES + ["bogus"]),
        clock=st.integers(0, 9),
        ts=st.sampled_from(STAMPS),
        expect=st.none() | st.just("current") | st.integers(0, 8),
    )
    def set_node_state(self, host: str, status: str, clock: int, ts: datetime, expect: int | str | None) -> None:
        state = {"host": host, "status": status, "clock": clock, "timestamp": ts}
        fields: dict[str, Any] = {"state": state}
        current = self.kv[NodeKey(host).encode()][2] if NodeKey(host).encode() in self.kv else 0
        if expect is not None:
            fields["expect_revision"] = current if expect == "current" else expect
        if status == "bogus":
            self.apply_refused(command("node", **fields), "command")
            return
        if fields.get("expect_revision", current) != current:
            self.apply_refused(command("node", **fields), "conflict")
            return
        res = self.apply(command("node", **fields))
        self.revision += 1
        self.m_record([self.m_put(NodeKey(host).encode(), encode_cbor({**state, "addr": "", "cluster": ""}), self.revision)])
        assert res == {"ok": True, "revision": self.revision}

    @rule(before=st.none() | st.sampled_from(STAMPS), max_count=st.none() | st.integers(0, 4))
    def purge(self, before: datetime | None, max_count: int | None) -> None:
        fields: dict[str, Any] = {}
        if before is not None:
            fields["before"] = before
        if max_count is not None:
            fields["max_count"] = max_count
        res = self.apply(command("purge", **fields))
        msgs = self.m_messages()
        cut = 0  # the longest prefix of clock order in which every message is older than `before`
        if before is not None:
            while cut < len(msgs) and self.stamps[msgs[cut]] < before:
                cut += 1
        if max_count is not None:
            cut = max(cut, len(msgs) - max_count)
        if cut:
            self.revision += 1
            self.m_record([self.m_del(k, self.revision) for k in msgs[:cut]])
            self.floor = max(self.floor, clock_of(msgs[cut - 1]))
        assert res == {"ok": True, "revision": self.revision, "purged": cut, "floor": self.floor}

    @rule()
    def truncate(self) -> None:
        doomed = self.m_user_keys(b"\x00", b"\x00")
        res = self.apply(command("truncate"))
        if doomed:
            self.revision += 1
            self.m_record([self.m_del(k, self.revision) for k in doomed])
        assert res == {"ok": True, "revision": self.revision, "deleted": len(doomed)}

    @rule()
    def snapshot_and_restore(self) -> None:
        self.store = SmallStore.restore(self.store.snapshot())

    def m_touch(self, client: str) -> None:
        self.live.remove(client)
        self.live.append(client)

    @rule()
    def register_session(self) -> None:
        expected = f"c{self.store.applied + 1}"
        res = self.apply(command("session"))
        assert res == {"ok": True, "revision": self.revision, "client": expected}
        self.live.append(expected)
        self.clients.append(expected)
        self.kept[expected] = {}
        if len(self.live) > SmallStore.max_sessions:
            del self.kept[self.live.pop(0)]

    @precondition(lambda self: bool(self.clients))
    @rule(data=st.data(), key=st.sampled_from(USER_KEYS[:3]), value=st.binary(max_size=2), gap=st.integers(0, 2))
    def put_with_request_id(self, data: st.DataObject, key: bytes, value: bytes, gap: int) -> None:
        client = data.draw(st.sampled_from(self.clients), label="client")
        seq = self.next_seq.get(client, 1)
        low = max(self.lows.get(client, 0), seq - gap)
        raw = command("put", key=key, value=value, req=[client, seq, low])
        if client not in self.live:
            self.apply_refused(raw, "session_expired")
            return
        self.next_seq[client] = seq + 1
        res = self.apply(raw)
        self.revision += 1
        self.m_record([self.m_put(key, value, self.revision)])
        assert res == {"ok": True, "revision": self.revision}
        self.lows[client] = low
        self.sent.append((client, seq, raw, res))
        self.m_touch(client)
        kept = self.kept[client]
        kept[seq] = res
        for old in [s for s in kept if s < low]:
            del kept[old]
        while len(kept) > SmallStore.max_results_per_session:
            del kept[min(kept)]

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def replay_request(self, data: st.DataObject) -> None:
        client, seq, raw, first = data.draw(st.sampled_from(self.sent), label="replayed")
        if client not in self.live:
            self.apply_refused(raw, "session_expired")
            return
        if seq not in self.kept[client]:
            self.apply_refused(raw, "duplicate_request")
            return
        before = decode_cbor(self.store.snapshot())
        assert self.apply(raw) == first
        self.m_touch(client)
        after = decode_cbor(self.store.snapshot())
        for snap in (before, after):
            del snap["applied"]
            snap["sessions"] = [[c, low, results] for c, _last_used, low, results in snap["sessions"]]
        assert after == before

    @rule(data=st.data())
    def garbage(self, data: st.DataObject) -> None:
        valid = command("put", key=b"a", value=b"1")
        raw = data.draw(st.binary(max_size=16) | st.integers(0, len(valid) - 1).map(lambda n: valid[:n]), label="garbage")
        before = decode_cbor(self.store.snapshot())
        res = self.apply(raw)
        assume(not res["ok"])  # random bytes that happen to be a valid command are not garbage
        after = decode_cbor(self.store.snapshot())
        before.pop("applied"), after.pop("applied")
        assert after == before

    # ----------------------------------------------------------- invariants

    @invariant()
    def everything_matches_the_model(self) -> None:
        got = [(x.key, x.value, x.create_revision, x.mod_revision, x.version) for x in self.store.range(b"\x00", b"\x00").kvs]
        assert got == [(k, *self.kv[k]) for k in sorted(self.kv)]
        assert len(self.store) == len(self.kv)

    @invariant()
    def counters_match_the_model(self) -> None:
        assert (self.store.revision, self.store.clock, self.store.message_floor) == (self.revision, self.clock, self.floor)

    @invariant()
    def messages_in_strictly_increasing_clock_order(self) -> None:
        clocks = [m.clock for m in self.store.messages()]
        assert all(a < b for a, b in zip(clocks, clocks[1:]))
        assert clocks == [clock_of(k) for k in self.m_messages()]
        assert all(c > self.floor for c in clocks)
        assert [m.clock for m in self.store.messages(since=self.floor)] == clocks
        if self.floor:
            try:
                self.store.messages(since=self.floor - 1)
            except CompactedError:
                pass
            else:
                raise AssertionError("messages() below the floor did not raise CompactedError")

    @invariant()
    def history_matches_the_model(self) -> None:
        assert self.store.compact_revision == self.compact
        got = [(c.revision, [event_tuple(e) for e in c.events]) for c in self.store.changes(self.compact)]
        assert got == self.history
        assert self.store.changes(self.revision + 1) == []
        if self.history:
            mid = self.history[len(self.history) // 2][0]
            tail = self.store.changes(mid, limit=2)
            assert [(c.revision, [event_tuple(e) for e in c.events]) for c in tail] == [
                h for h in self.history if h[0] >= mid
            ][:2]
        try:
            self.store.changes(self.compact - 1)
        except CompactedError as exc:
            assert exc.compact_revision == self.compact and exc.field == "start_revision"
        else:
            raise AssertionError("changes() below compact_revision did not raise CompactedError")

    @invariant()
    def sessions_match_the_model(self) -> None:
        assert self.store.sessions == self.live

    @invariant()
    def snapshot_restore_is_byte_identical(self) -> None:
        snap = self.store.snapshot()
        assert SmallStore.restore(snap).snapshot() == snap


def _holds(actual: Any, expected: Any, result: str) -> bool:
    return {
        "equal": actual == expected,
        "not_equal": actual != expected,
        "greater": actual > expected,
        "less": actual < expected,
    }[result]


StoreVersusModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreVersusModel = StoreVersusModel.TestCase
TestStoreVersusModel.__doc__ = "Random command sequences keep the store equal to the reference model."
