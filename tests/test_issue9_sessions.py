"""Issue 9: a retried request whose result is large still gets its answer.

A session's results are bounded in bytes; a txn of 1,000 puts has a result of
about 20 KB, so before the fix only about three fitted and the retry of an
outstanding one (same bytes, same request id, as the replica re-proposes
after a stall) got ``duplicate_request``: UnknownOutcomeError, though the
command had applied once and its answer could be known. Results over a size
are now kept in a compact form from which the answer is rebuilt; what cannot
be rebuilt (range kvs, prev_kv) gives a clear error, never a wrong answer.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftcoord.coordinator import Coordinator, MemoryBackend
from raftcoord.errors import UnknownOutcomeError
from raftcoord.sessions import MAX_RESULT_BYTES_PER_SESSION
from raftcoord.store import Store
from raftcoord.values import decode_cbor, encode_cbor
from store_script import apply_to_replicas

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def command(op: str, **fields: Any) -> bytes:
    """CBOR bytes of one command; ``from_`` stands for ``from``."""
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return encode_cbor({"op": op, **fields})


def session(store: Store) -> str:
    """Register a client session and return its id."""
    result = store.apply(command("session")).result
    assert result["ok"], result
    return str(result["client"])


def put_txn(n: int, tag: int, **extra: Any) -> dict[str, Any]:
    """A txn of ``n`` puts (8-byte keys), all under prefix ``t<tag>/``."""
    ops = [{"op": "put", "key": b"t%d/%05d" % (tag, i), "value": b"v"} for i in range(n)]
    return {"op": "txn", "compare": [], "success": ops, "failure": [], **extra}


def test_issue9_retry_of_a_large_txn_after_later_large_txns_gets_its_result() -> None:
    """Several 1,000-put txns of one session while the first is outstanding: its retry answers, applies nothing."""
    s = Store()
    c = session(s)
    first_raw = encode_cbor({**put_txn(1000, 1), "req": [c, 1, 1]})
    first = s.apply(first_raw).result
    assert first["ok"] and len(first["responses"]) == 1000
    assert len(encode_cbor(first)) * 4 > MAX_RESULT_BYTES_PER_SESSION  # only about three full ones fit
    for seq in range(2, 8):
        assert s.apply(encode_cbor({**put_txn(1000, seq), "req": [c, seq, 1]})).ok
    rev = s.revision
    again = s.apply(first_raw)
    assert again.result == first
    assert again.events == () and s.revision == rev
    assert s.get(b"t1/00000").version == 1  # type: ignore[union-attr]


def test_issue9_retry_after_snapshot_restore_and_on_replicas_is_identical() -> None:
    """Compact results are state: replicas agree byte for byte, and a restored store answers the retry."""
    s = Store()
    c = session(s)
    cmds = [encode_cbor({**put_txn(600, seq), "req": [c, seq, 1]}) for seq in range(1, 9)]
    for raw in cmds:
        s.apply(raw)
    snap = s.snapshot()
    restored = Store.restore(snap)
    assert restored.snapshot() == snap
    assert restored.apply(cmds[0]).result["responses"][0] == {"op": "put", "revision": 2}
    apply_to_replicas([command("session"), *[encode_cbor({**put_txn(600, seq), "req": ["c1", seq, 1]}) for seq in range(1, 9)],
                       encode_cbor({**put_txn(600, 1), "req": ["c1", 1, 1]})], restore_every=2)


def test_issue9_retry_of_a_large_post_gets_its_message_back() -> None:
    """A post with a large payload: the retry answers the same message, payload included."""
    s = Store()
    c = session(s)
    raw = command("post", from_="n1", clock=0, type=0x55, timestamp=T0, payload=b"p" * 3000, req=[c, 1, 1])
    first = s.apply(raw).result
    for seq in range(2, 40):
        s.apply(command("post", from_="n1", clock=0, type=0x55, timestamp=T0, payload=b"q" * 3000, req=[c, seq, 1]))
    assert s.apply(raw).result == first
    # The same request id with another command is not answered with a made-up message.
    other = command("post", from_="n2", clock=0, type=0x55, timestamp=T0, payload=b"p" * 3000, req=[c, 1, 1])
    res = s.apply(other).result
    assert not res["ok"] and res["error"]["code"] == "duplicate_request"


def test_issue9_retry_of_a_large_range_in_a_write_txn_is_a_clear_error_not_empty_kvs() -> None:
    """A write txn whose range read is too large to keep: the retry says it applied and names what is gone."""
    s = Store()
    c = session(s)
    for i in range(50):
        s.apply(command("put", key=b"r/%03d" % i, value=b"x" * 300))
    raw = encode_cbor({"op": "txn", "compare": [], "failure": [], "req": [c, 1, 1],
                       "success": [{"op": "put", "key": b"w", "value": b"1"},
                                   {"op": "range", "key": b"r/", "range_end": b"r0"}]})
    first = s.apply(raw).result
    assert len(first["responses"][1]["kvs"]) == 50
    rev = s.revision
    res = s.apply(raw).result
    assert not res["ok"] and res["error"]["code"] == "duplicate_request"
    assert f"revision {first['revision']}" in res["error"]["message"] and "kvs" in res["error"]["message"]
    assert s.revision == rev and s.get(b"w").version == 1  # type: ignore[union-attr]


def test_issue9_session_results_stay_bounded_in_bytes() -> None:
    """Many large results of one outstanding session: the remembered bytes stay under the bound."""
    s = Store()
    c = session(s)
    for seq in range(1, 60):
        s.apply(command("put", key=b"k", value=b"x" * 2000, prev_kv=True, req=[c, seq, 1]))
    sessions = decode_cbor(s.snapshot())["sessions"]
    kept = [r for _, r in sessions[0][3] if r is not None]
    assert len(kept) == 59
    assert sum(len(r) for r in kept) <= MAX_RESULT_BYTES_PER_SESSION


class RetryingBackend(MemoryBackend):
    """Applies a proposal, lets ``between`` run other traffic of the same session, then applies it again."""

    proposes_once = False

    def __init__(self) -> None:
        super().__init__(Store())
        self.between: Any = None

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Apply; with ``between`` armed, apply the same bytes a second time after it."""
        between, self.between = self.between, None
        if between is None:
            return super().propose(command, timeout=timeout)
        super().propose(command, timeout=timeout)
        with self._lock:
            between(self.store, decode_cbor(command))
        return super().propose(command, timeout=timeout)


@pytest.mark.parametrize("n", [1000])
def test_issue9_coordinator_retry_of_a_large_txn_gets_its_response(n: int) -> None:
    """Through the coordinator: a retried 1,000-put txn answers its responses, not UnknownOutcomeError."""
    backend = RetryingBackend()
    with Coordinator(backend, host="n1", max_txn_ops=n) as coord:
        coord.put(b"warm", b"up")

        def others(store: Store, cmd: dict[str, Any]) -> None:
            client, seq, low = cmd["req"]
            for k in range(1, 6):  # the same coordinator's other callers
                assert store.apply(encode_cbor({**put_txn(n, 10 + k), "req": [client, seq + k, low]})).ok

        backend.between = others
        result = coord.execute(put_txn(n, 1))
        assert result["ok"] and result["succeeded"] and len(result["responses"]) == n
        assert result["responses"][0] == {"op": "put", "revision": result["revision"]}
        assert coord.get_kv(b"t1/00000").version == 1  # type: ignore[union-attr]


def test_issue9_coordinator_retry_of_a_large_range_txn_is_an_error_never_a_wrong_answer() -> None:
    """Through the coordinator: when the range kvs are gone the caller gets an error, never empty kvs."""
    backend = RetryingBackend()
    with Coordinator(backend, host="n1") as coord:
        for i in range(50):
            coord.put(b"r/%03d" % i, b"x" * 300)
        backend.between = lambda store, cmd: None
        txn = {"op": "txn", "compare": [], "failure": [],
               "success": [{"op": "put", "key": b"w", "value": b"1"}, {"op": "range", "key": b"r/", "range_end": b"r0"}]}
        with pytest.raises(UnknownOutcomeError) as info:
            coord.execute(txn)
        assert "kvs" in info.value.message
        assert coord.get_kv(b"w").version == 1  # type: ignore[union-attr]


def test_issue9_compact_form_of_a_put_txn_is_a_few_bytes() -> None:
    """What is kept of a 1,000-put txn: ok, revision, succeeded, and one run of 1,000 put responses."""
    s = Store()
    c = session(s)
    s.apply(encode_cbor({**put_txn(1000, 1), "req": [c, 1, 1]}))
    (_, _, _, results), = decode_cbor(s.snapshot())["sessions"]
    (seq, data), = results
    assert decode_cbor(data) == [1, {"ok": True, "revision": 2, "succeeded": True}, [[1000, {"op": "put", "revision": 2}]]]
    assert len(data) < 64


def test_issue9_compact_error_result_keeps_code_and_field() -> None:
    """A refused request with a long error message: the retry gets the same code and field, the message cut."""
    from raftcoord.sessions import compact_result, expand_result

    result = {"ok": False, "revision": 7, "error": {"code": "limit_exceeded", "message": "m" * 9000, "field": "success"}}
    again = expand_result(encode_cbor(compact_result(result)), None, "c1/1")
    assert again["ok"] is False and again["revision"] == 7
    assert again["error"]["code"] == "limit_exceeded" and again["error"]["field"] == "success"
    assert again["error"]["message"].startswith("mmm") and len(again["error"]["message"]) < 300


class SmallResults(Store):
    """Bounds small enough that a few commands reach them."""

    max_full_result_bytes = 120
    max_result_bytes_per_session = 600


_ops = st.one_of(
    st.builds(lambda k, v, p: {"op": "put", "key": k, "value": v, "prev_kv": p},
              st.sampled_from([b"a", b"b", b"c"]), st.binary(max_size=200), st.booleans()),
    st.builds(lambda k, p: {"op": "delete", "key": k, "range_end": b"\x00", "prev_kv": p}, st.sampled_from([b"a", b"b"]), st.booleans()),
    st.builds(lambda k: {"op": "range", "key": k, "range_end": b"\x00"}, st.sampled_from([b"a", b"b"])),
)
_commands = st.one_of(
    _ops.filter(lambda o: o["op"] != "range"),
    st.builds(lambda ops, n: {"op": "txn", "compare": [], "success": ops * n, "failure": []},
              st.lists(_ops, min_size=1, max_size=3), st.integers(1, 20)),
    st.builds(lambda p: {"op": "post", "from": "n1", "clock": 0, "type": 0x55, "timestamp": T0, "payload": p},
              st.binary(max_size=300)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmds=st.lists(_commands, min_size=1, max_size=12), retries=st.lists(st.integers(0, 11), max_size=12))
def test_issue9_a_retry_answers_its_first_result_or_refuses_and_never_applies_again(
    cmds: list[dict[str, Any]], retries: list[int]
) -> None:
    """Any mix of results, every seq outstanding: a retry gets exactly its first answer or duplicate_request."""
    stores = [SmallResults(), SmallResults()]
    c = session(stores[0])
    assert session(stores[1]) == c
    sent = []
    for seq, cmd in enumerate(cmds, 1):
        raw = encode_cbor({**cmd, "req": [c, seq, 1]})
        firsts = [st_.apply(raw).result for st_ in stores]
        assert firsts[0] == firsts[1]
        sent.append((raw, firsts[0]))
    stores[1] = SmallResults.restore(stores[1].snapshot())
    for i in [*retries, *range(len(sent))]:
        if i >= len(sent):
            continue
        raw, first = sent[i]
        before = stores[0].revision
        answers = [st_.apply(raw) for st_ in stores]
        assert answers[0].result == answers[1].result
        assert stores[0].revision == before and answers[0].events == ()
        got = answers[0].result
        if got != first:
            assert got["error"]["code"] == "duplicate_request", (got, first)
        assert stores[0].snapshot() == stores[1].snapshot()
    sessions = decode_cbor(stores[0].snapshot())["sessions"]
    assert sum(len(r) for _, r in sessions[0][3] if r is not None) <= SmallResults.max_result_bytes_per_session


def test_issue9_http_retry_of_a_large_txn_answers_the_same_responses() -> None:
    """Over HTTP with the client's own request ids: the retried 1,000-put txn answers 200 and the same body."""
    import base64

    from test_endpoint import Api

    from raftcoord.endpoint import make_app

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    def body(tag: int) -> dict[str, Any]:
        return {"success": [{"request_put": {"key": b64(b"t%d/%05d" % (tag, i)), "value": b64(b"v")}} for i in range(1000)]}

    with Coordinator(MemoryBackend(), host="n1", max_txn_ops=1000) as c:
        api = Api(make_app(c))
        try:
            client = api.ok("/raftcoord/v1/session", {})["client"]
            first = api.post("/v3/kv/txn", body(1), **{"X-Raftcoord-Request": f"{client}:1:1"})
            assert first[0] == 200 and len(first[1]["responses"]) == 1000, first
            for seq in range(2, 8):
                status, out = api.post("/v3/kv/txn", body(seq), **{"X-Raftcoord-Request": f"{client}:{seq}:1"})
                assert status == 200, out
            again = api.post("/v3/kv/txn", body(1), **{"X-Raftcoord-Request": f"{client}:1:1"})
            assert again[0] == 200, again
            assert again[1]["responses"] == first[1]["responses"] and again[1]["succeeded"] is True
            assert c.get_kv(b"t1/00000").version == 1  # type: ignore[union-attr]
        finally:
            api.close()
