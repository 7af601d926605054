"""The client endpoint over an in-memory coordinator: etcd v3 JSON shapes and raftcoord's routes."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftcoord import etcd_json
from raftcoord.config import load_config, stable_id
from raftcoord.coordinator import Coordinator, MemoryBackend
from raftcoord.endpoint import MAX_BODY_BYTES, RefusalLog, make_app, rfc3339, to_json
from raftcoord.errors import CompactedError, InvalidInputError, UnavailableError, UnknownOutcomeError
from raftcoord.keys import NODE_PREFIX
from raftcoord.store import Store, read_txn

_NO_BODY = object()
_T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def b64(text: str | bytes) -> str:
    """Standard base64 of text or bytes."""
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def unb64(text: str) -> bytes:
    """Decode standard base64."""
    return base64.b64decode(text)


class Api:
    """A synchronous client for the endpoint, on an event loop of its own."""

    def __init__(self, app: Any, headers: dict[str, str] | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.headers = headers or {}

        async def start() -> TestClient[Any, Any]:
            client: TestClient[Any, Any] = TestClient(TestServer(app))
            await client.start_server()
            return client

        self.client = self.loop.run_until_complete(start())

    def request(
        self, method: str, path: str, body: Any = _NO_BODY, *, data: bytes | str | None = None, **headers: str
    ) -> tuple[int, Any, Any]:
        """Send one request; returns (status, JSON body or None, headers)."""

        async def go() -> tuple[int, Any, Any]:
            kwargs: dict[str, Any] = {"headers": {**self.headers, **headers}}
            if body is not _NO_BODY:
                kwargs["json"] = body
            if data is not None:
                kwargs["data"] = data
            async with self.client.request(method, path, **kwargs) as resp:
                text = await resp.text()
                return resp.status, (json.loads(text) if text else None), resp.headers

        return self.loop.run_until_complete(go())

    def post(self, path: str, body: Any = _NO_BODY, **kwargs: Any) -> tuple[int, Any]:
        """POST JSON; returns (status, body)."""
        status, out, _ = self.request("POST", path, body, **kwargs)
        return status, out

    def get(self, path: str, **headers: str) -> tuple[int, Any]:
        """GET; returns (status, body)."""
        status, out, _ = self.request("GET", path, **headers)
        return status, out

    def ok(self, path: str, body: Any = _NO_BODY) -> Any:
        """POST (or GET without a body) and expect 200."""
        status, out = self.post(path, body) if body is not _NO_BODY else self.get(path)
        assert status == 200, out
        return out

    def close(self) -> None:
        """Stop the server and the loop."""
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


class SpyCoordinator(Coordinator):
    """A memory coordinator that records the consistency of each read."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(MemoryBackend(), host="n1", cluster="test", **kwargs)
        self.consistencies: list[str | None] = []

    def read(self, fn: Any, *, consistency: Any = None) -> Any:
        """Record, then read."""
        self.consistencies.append(consistency)
        return super().read(fn, consistency=consistency)

    def view(self, *, consistency: Any = None) -> Any:
        """Record, then open a view."""
        self.consistencies.append(consistency)
        return super().view(consistency=consistency)


class FlakyBackend(MemoryBackend):
    """A memory backend whose status can lose the leader, fail, or break."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.gate: threading.Event | None = None

    def status(self) -> dict[str, Any]:
        """The memory status, changed by ``mode``."""
        if self.mode == "bug":
            raise ZeroDivisionError("a bug")
        if self.mode == "unavailable":
            raise UnavailableError("the replica is stopped")
        out = super().status()
        if self.mode == "no-leader":
            out.update(role="follower", leader=None)
        return out

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Wait for ``gate`` (when set) before applying."""
        if self.gate is not None:
            assert self.gate.wait(10)
        return super().propose(command, timeout=timeout)


@pytest.fixture
def coord() -> Any:
    """A memory coordinator for host n1 of cluster "test"."""
    c = SpyCoordinator()
    yield c
    c.close()


@pytest.fixture
def api(coord: Coordinator) -> Any:
    """The endpoint over ``coord``, without a config."""
    client = Api(make_app(coord))
    yield client
    client.close()


CLUSTER_TOML = """
[cluster]
name = "prod"
token = "s3cret-token"
request_timeout = 5
[[node]]
name = "n1"
raft = "127.0.0.1:7001"
client = "127.0.0.1:2379"
[[node]]
name = "n2"
raft = "127.0.0.1:7002"
client = "127.0.0.1:2380"
voter = false
"""


@pytest.fixture
def configured(tmp_path: Path, coord: Coordinator) -> Any:
    """The endpoint with a two-node config and a bearer token."""
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER_TOML)
    client = Api(make_app(coord, load_config(path, env={}), "n1"), headers={"Authorization": "Bearer s3cret-token"})
    yield client
    client.close()


def put(api: Api, key: str, value: str, **extra: Any) -> Any:
    """Put through the endpoint."""
    return api.ok("/v3/kv/put", {"key": b64(key), "value": b64(value), **extra})


# ------------------------------------------------------------- etcd: KV


def test_put_and_range_shapes(api: Api) -> None:
    """Put then range: base64 bytes, int64 fields as strings, a full header."""
    out = put(api, "foo", "bar")
    header = {
        "cluster_id": str(stable_id("test")),
        "member_id": str(stable_id("n1")),
        "revision": "2",
        "raft_term": "1",
    }
    assert out == {"header": header}
    out = api.ok("/v3/kv/range", {"key": b64("foo")})
    assert out == {
        "header": header,
        "kvs": [{"key": "Zm9v", "create_revision": "2", "mod_revision": "2", "version": "1", "value": "YmFy"}],
        "count": "1",
    }


def test_range_of_missing_key_is_empty_not_404(api: Api) -> None:
    """A range with no match answers 200 with no kvs and no count, as the gateway omits defaults."""
    out = api.ok("/v3/kv/range", {"key": b64("nothing")})
    assert out == {"header": out["header"]} and out["header"]["revision"] == "1"


def test_range_prefix_limit_order_and_flags(api: Api) -> None:
    """range_end, limit/more, DESCEND, keys_only and count_only behave as in etcd."""
    for k in ("a/1", "a/2", "a/3", "b/1"):
        put(api, k, "v" + k)
    q = {"key": b64("a/"), "range_end": b64("a0")}
    out = api.ok("/v3/kv/range", {**q, "limit": 2})
    assert [unb64(kv["key"]) for kv in out["kvs"]] == [b"a/1", b"a/2"]
    assert out["more"] is True and out["count"] == "3"
    out = api.ok("/v3/kv/range", {**q, "sort_order": "DESCEND", "limit": "1"})
    assert [unb64(kv["key"]) for kv in out["kvs"]] == [b"a/3"]
    out = api.ok("/v3/kv/range", {**q, "keys_only": True})
    assert all("value" not in kv for kv in out["kvs"]) and "more" not in out
    out = api.ok("/v3/kv/range", {**q, "count_only": True})
    assert "kvs" not in out and out["count"] == "3"
    out = api.ok("/v3/kv/range", {"key": b64("\0"), "range_end": b64("\0")})
    assert out["count"] == "4"


def test_range_sort_targets_and_revision_filters(api: Api) -> None:
    """Sorting by VALUE or MOD and min/max revision filters read the whole range first."""
    put(api, "k1", "z")  # revision 2
    put(api, "k2", "a")  # revision 3
    put(api, "k3", "m")  # revision 4
    put(api, "k1", "y")  # revision 5
    q = {"key": b64("k"), "range_end": b64("l")}
    out = api.ok("/v3/kv/range", {**q, "sort_target": "VALUE"})
    assert [unb64(kv["value"]) for kv in out["kvs"]] == [b"a", b"m", b"y"]
    out = api.ok("/v3/kv/range", {**q, "sort_target": "MOD", "sort_order": "DESCEND", "limit": 2})
    assert [unb64(kv["key"]) for kv in out["kvs"]] == [b"k1", b"k3"] and out["more"] is True
    out = api.ok("/v3/kv/range", {**q, "min_mod_revision": "3", "max_mod_revision": 4})
    assert [unb64(kv["key"]) for kv in out["kvs"]] == [b"k2", b"k3"] and out["count"] == "3"
    out = api.ok("/v3/kv/range", {**q, "max_create_revision": 2, "sort_order": "DESCEND"})
    assert [unb64(kv["key"]) for kv in out["kvs"]] == [b"k1"]


def test_lenient_proto3_json_input(api: Api) -> None:
    """Numbers as strings, enums as numbers, camelCase names and URL-safe base64 are read."""
    put(api, "\xff\xfe", "v")  # key bytes c3 bf c3 be: base64 "w7_Dvg" URL-safe
    key = base64.urlsafe_b64encode("\xff\xfe".encode()).decode().rstrip("=")
    assert "_" in key
    out = api.ok("/v3/kv/range", {"key": key, "sortOrder": 2, "sort_target": 0, "limit": "10", "keysOnly": False})
    assert unb64(out["kvs"][0]["key"]) == "\xff\xfe".encode()


def test_serializable_range_reads_locally(coord: SpyCoordinator, api: Api) -> None:
    """serializable=true reads serializably; the default is linearizable."""
    api.ok("/v3/kv/range", {"key": b64("x"), "serializable": True})
    api.ok("/v3/kv/range", {"key": b64("x")})
    assert coord.consistencies == ["serializable", "linearizable"]


def test_range_at_a_revision(api: Api) -> None:
    """Only the current revision can be read: older is compacted (410), newer is refused (400)."""
    put(api, "k", "v")
    assert api.ok("/v3/kv/range", {"key": b64("k"), "revision": 2})["count"] == "1"
    assert api.ok("/v3/kv/range", {"key": b64("k"), "revision": -1})["count"] == "1"
    status, out = api.post("/v3/kv/range", {"key": b64("k"), "revision": 1})
    assert (status, out["code"], out["field"]) == (410, 11, "revision") and "compacted" in out["error"]
    status, out = api.post("/v3/kv/range", {"key": b64("k"), "revision": "99"})
    assert (status, out["code"], out["field"]) == (400, 3, "revision") and "future" in out["error"]


def test_put_prev_kv_and_empty_value(api: Api) -> None:
    """prev_kv returns the old pair; an empty value is left out of the JSON."""
    put(api, "k", "")
    assert "kvs" in api.ok("/v3/kv/range", {"key": b64("k")})
    assert "value" not in api.ok("/v3/kv/range", {"key": b64("k")})["kvs"][0]
    out = put(api, "k", "new", prev_kv=True)
    assert out["prev_kv"] == {"key": b64("k"), "create_revision": "2", "mod_revision": "2", "version": "1"}
    assert "prev_kv" not in put(api, "fresh", "x", prev_kv=True)


def test_put_to_a_reserved_key_is_refused(api: Api) -> None:
    """A raw write under a coordinator header is a 400 naming the key."""
    status, out = api.post("/v3/kv/put", {"key": b64(NODE_PREFIX + b"n1"), "value": b64("x")})
    assert (status, out["code"], out["field"]) == (400, 3, "key")


def test_deleterange(api: Api) -> None:
    """Delete one key, a range with prev_kvs, and a missing key (deleted left out)."""
    for k in ("a", "b", "c"):
        put(api, k, k.upper())
    assert api.ok("/v3/kv/deleterange", {"key": b64("a")})["deleted"] == "1"
    out = api.ok("/v3/kv/deleterange", {"key": b64("b"), "range_end": b64("d"), "prev_kv": True})
    assert out["deleted"] == "2" and [unb64(kv["value"]) for kv in out["prev_kvs"]] == [b"B", b"C"]
    assert out["header"]["revision"] == "6"
    out = api.ok("/v3/kv/deleterange", {"key": b64("a")})
    assert "deleted" not in out and out["header"]["revision"] == "6"


# ------------------------------------------------------------ etcd: txn


def cas(old: str, new: str) -> dict[str, Any]:
    """A compare-and-swap txn on key "cas", reading the key on failure."""
    return {
        "compare": [{"key": b64("cas"), "target": "VALUE", "result": "EQUAL", "value": b64(old)}],
        "success": [{"request_put": {"key": b64("cas"), "value": b64(new), "prev_kv": True}}],
        "failure": [{"request_range": {"key": b64("cas")}}],
    }


def test_txn_compare_and_swap_success(api: Api) -> None:
    """A CAS whose compare holds applies its success branch in one revision."""
    put(api, "cas", "one")
    out = api.ok("/v3/kv/txn", cas("one", "two"))
    assert out["succeeded"] is True and out["header"]["revision"] == "3"
    (resp,) = out["responses"]
    assert resp == {
        "response_put": {
            "header": {"revision": "3"},
            "prev_kv": {
                "key": b64("cas"),
                "create_revision": "2",
                "mod_revision": "2",
                "version": "1",
                "value": b64("one"),
            },
        }
    }
    assert unb64(api.ok("/v3/kv/range", {"key": b64("cas")})["kvs"][0]["value"]) == b"two"


def test_txn_compare_and_swap_failure(api: Api) -> None:
    """A CAS whose compare fails runs the failure branch; succeeded is left out (false)."""
    put(api, "cas", "one")
    out = api.ok("/v3/kv/txn", cas("stale", "two"))
    assert "succeeded" not in out and out["header"]["revision"] == "2"
    (resp,) = out["responses"]
    assert unb64(resp["response_range"]["kvs"][0]["value"]) == b"one"
    assert resp["response_range"]["count"] == "1"


def test_txn_create_if_absent_and_revision_compares(api: Api) -> None:
    """CREATE == 0 creates once (as etcd3gw's create); MOD/VERSION compare numbers."""
    create = {
        "compare": [{"key": b64("lock"), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
        "success": [{"request_put": {"key": b64("lock"), "value": b64("me")}}],
        "failure": [],
    }
    assert api.ok("/v3/kv/txn", create)["succeeded"] is True
    assert "succeeded" not in api.ok("/v3/kv/txn", create)
    newer = {"compare": [{"key": b64("lock"), "target": "MOD", "result": "GREATER", "mod_revision": "1"}]}
    assert api.ok("/v3/kv/txn", newer) == {"header": api.ok("/v3/kv/txn", newer)["header"], "succeeded": True}
    # target defaults to VERSION and result to EQUAL, as proto3 enums default to 0
    version = {
        "compare": [{"key": b64("lock"), "version": 1}],
        "success": [{"request_delete_range": {"key": b64("lock")}}],
    }
    out = api.ok("/v3/kv/txn", version)
    assert out["succeeded"] is True and out["responses"][0]["response_delete_range"]["deleted"] == "1"


@pytest.mark.parametrize(
    ("txn", "field"),
    [
        ({"compare": [{"key": b64("k"), "target": "LEASE", "lease": 1}]}, "compare[0].target"),
        ({"compare": [{"key": b64("k"), "target": "MOD", "version": 1}]}, "compare[0].version"),
        ({"compare": [{"key": b64("k"), "target": "VALIE"}]}, "compare[0].target"),
        ({"compare": [{"key": b64("k"), "target": "MOD", "mod_revision": -1}]}, "compare[0].mod_revision"),
        ({"compare": [{"target": "MOD"}]}, "compare[0].key"),
        ({"compare": {}}, "compare"),
        ({"success": [{}]}, "success[0]"),
        ({"success": [{"request_txn": {}}]}, "success[0].request_txn"),
        ({"failure": [{"request_put": {"key": b64("k"), "lease": "7"}}]}, "failure[0].request_put.lease"),
        ({"success": [{"request_range": {"key": b64("k"), "sort_target": "MOD"}}]}, "success[0].request_range"),
        ({"success": [{"request_put": {"key": "@@"}}]}, "success[0].request_put.key"),
        ({"success": [{"request_put": {"key": b64("k")}}, {"request_put": {"key": b64("k")}}]}, "success"),
    ],
)
def test_txn_mistakes_name_the_field(api: Api, txn: dict[str, Any], field: str) -> None:
    """A malformed or unsupported txn is a 400 whose field is the path of the mistake."""
    status, out = api.post("/v3/kv/txn", txn)
    assert (status, out["code"], out["field"]) == (400, 3, field), out
    assert out["error"] == out["message"]
    assert api.ok("/v3/kv/range", {"key": b64("k")}).get("count") is None  # nothing was written


# -------------------------------------------------------- request errors


@pytest.mark.parametrize(
    ("body", "field", "phrase"),
    [
        ('{"key": ', "body", "not valid JSON"),
        ("[1, 2]", "body", "must be a JSON object"),
        ('{"key": "YQ==", "key": "Yg=="}', "key", "given twice"),
        ('{"key": NaN}', "body", "NaN is not valid JSON"),
        ("[" * 100 + "]" * 100, "body", "nested deeper"),
        ('{"key": 5}', "key", "must be a base64 string"),
        ('{"key": "not base64!"}', "key", "not valid base64"),
        ('{"key": "YQ=", "value": "A"}', "value", "not valid base64"),
        ("{}", "key", "key is not provided"),
        ('{"key": "YQ==", "vaule": "YQ=="}', "vaule", "unknown field in PutRequest"),
        ('{"key": "YQ==", "prev_kv": "yes"}', "prev_kv", "must be true or false"),
        ('{"key": "YQ==", "lease": "12"}', "lease", "leases are not supported"),
    ],
)
def test_bad_put_requests_are_400_naming_the_field(api: Api, body: str, field: str, phrase: str) -> None:
    """Malformed JSON, wrong types, bad base64 and missing fields give 400 naming the field."""
    status, out = api.post("/v3/kv/put", data=body)
    assert status == 400 and out["code"] == 3 and out["field"] == field, out
    assert phrase in out["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key": b64("a"), "limit": -1}, "limit"),
        ({"key": b64("a"), "limit": 1.5}, "limit"),
        ({"key": b64("a"), "limit": "12x"}, "limit"),
        ({"key": b64("a"), "limit": str(2**64)}, "limit"),
        ({"key": b64("a"), "sort_order": "UP"}, "sort_order"),
        ({"key": b64("a"), "sort_order": 7}, "sort_order"),
        ({"key": b64("a"), "keysOnly": True, "keys_only": True}, "keys_only"),
    ],
)
def test_bad_range_requests(api: Api, body: dict[str, Any], field: str) -> None:
    """Bad numbers, enums and doubled names in a range are 400 naming the field."""
    status, out = api.post("/v3/kv/range", body)
    assert (status, out["field"]) == (400, field), out


def test_non_utf8_and_oversized_bodies(api: Api) -> None:
    """A body that is not UTF-8 is 400; one over the size limit is 413, both JSON."""
    status, out, _ = api.request("POST", "/v3/kv/put", data=b'{"key": "\xff"}')
    assert (status, out["field"]) == (400, "body")
    status, out, _ = api.request("POST", "/v3/kv/put", data=b" " * (MAX_BODY_BYTES + 1))
    assert status == 413 and out["code"] == 8


def test_empty_body_is_an_empty_request(api: Api) -> None:
    """No body reads as {}, as the gateway does: status works, put names the missing key."""
    assert api.ok("/v3/maintenance/status", None)["version"] == "3.5.0"
    status, out = api.post("/v3/kv/put")
    assert (status, out["field"]) == (400, "key")


def test_unknown_routes_and_methods(api: Api) -> None:
    """Other /v3/ paths are 501, a wrong method 405 with Allow, unknown paths 404: all JSON."""
    status, out = api.post("/v3/lease/grant", {})
    assert (status, out["code"]) == (501, 12) and "/v3/lease/grant" in out["error"]
    status, out = api.post("/v3/watch", {})  # empty: no WatchRequest in it
    assert (status, out["code"], out["field"]) == (400, 3, "body")
    status, out, headers = api.request("GET", "/v3/kv/put")
    assert (status, out["code"], headers["Allow"]) == (405, 12, "POST")
    status, out = api.get("/nowhere")
    assert (status, out["code"]) == (404, "not_found")


# -------------------------------------------- etcd: status, members, version


def test_maintenance_status(api: Api) -> None:
    """Status reports version, leader, raft index and term as strings, and the db size."""
    put(api, "key", "value")
    out = api.ok("/v3/maintenance/status", {})
    assert out["version"] == "3.5.0"
    assert out["leader"] == str(stable_id("n1"))
    # the put, after the coordinator registered its client session
    assert out["raftTerm"] == "1" and out["raftIndex"] == out["raftAppliedIndex"] == "2"
    assert out["dbSize"] == "8" and out["header"]["revision"] == "2"
    assert "isLearner" not in out and "errors" not in out


def test_member_list_from_config(configured: Api) -> None:
    """Members come from the config: stable IDs, URLs, learners for non-voters."""
    out = configured.ok("/v3/cluster/member/list", {})
    assert out["header"]["cluster_id"] == str(stable_id("prod"))
    assert out["members"] == [
        {
            "ID": str(stable_id("n1")),
            "name": "n1",
            "peerURLs": ["tcp://127.0.0.1:7001"],
            "clientURLs": ["http://127.0.0.1:2379"],
        },
        {
            "ID": str(stable_id("n2")),
            "name": "n2",
            "peerURLs": ["tcp://127.0.0.1:7002"],
            "clientURLs": ["http://127.0.0.1:2380"],
            "isLearner": True,
        },
    ]


def test_member_list_without_config(api: Api) -> None:
    """Without a config the member list is this node alone."""
    assert api.ok("/v3/cluster/member/list", {})["members"] == [{"ID": str(stable_id("n1")), "name": "n1"}]


def test_version(api: Api) -> None:
    """GET /version names the etcd API version and raftcoord's."""
    out = api.ok("/version")
    assert out["etcdserver"] == out["etcdcluster"] == "3.5.0" and out["raftcoord"]


# ----------------------------------------------------------------- health


def test_health_with_and_without_leader() -> None:
    """/health is 200 with a known leader, 503 with a reason otherwise."""
    backend = FlakyBackend()
    with Coordinator(backend, host="n1") as c:
        api = Api(make_app(c))
        try:
            assert api.get("/health") == (200, {"health": "true"})
            backend.mode = "no-leader"
            status, out = api.get("/health")
            assert status == 503 and out["health"] == "false" and "no leader" in out["reason"]
            status, out = api.post("/v3/maintenance/status", {})
            assert status == 200 and "leader" not in out and out["errors"]
            backend.mode = "unavailable"
            status, out = api.get("/health")
            assert status == 503 and out == {"health": "false", "reason": "the replica is stopped"}
        finally:
            api.close()


def test_unavailable_is_503_with_code_14() -> None:
    """A closed coordinator answers 503 with gRPC code Unavailable."""
    c = Coordinator.memory("n1")
    api = Api(make_app(c))
    try:
        c.close()
        status, out = api.post("/v3/kv/put", {"key": b64("k")})
        assert (status, out["code"]) == (503, 14)
    finally:
        api.close()


# ------------------------------------------------------------------- auth


def test_token_required_on_every_route_but_health(configured: Api) -> None:
    """With a token set, requests without it or with a wrong one are 401 JSON; /health is open."""
    for method, path in (("POST", "/v3/kv/range"), ("GET", "/version"), ("GET", "/raftcoord/v1/status")):
        status, out, headers = configured.request(method, path, {"key": b64("k")}, Authorization="")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), out
        assert out["code"] == ("auth" if path.startswith("/raftcoord/") else 16)
        status, _, _ = configured.request(method, path, {"key": b64("k")}, Authorization="Bearer wrong")
        assert status == 401
    status, _, _ = configured.request("GET", "/health", Authorization="")
    assert status == 200
    assert configured.ok("/v3/kv/range", {"key": b64("k")})["header"]["member_id"] == str(stable_id("n1"))
    status, _, _ = configured.request("GET", "/version", Authorization="bearer s3cret-token")
    assert status == 200


def test_node_must_be_in_config(tmp_path: Path, coord: Coordinator) -> None:
    """make_app refuses a node name the config does not list."""
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER_TOML)
    with pytest.raises(Exception, match="node 'n7' is not in the file"):
        make_app(coord, load_config(path, env={}), "n7")


# -------------------------------------------------------- raftcoord routes


def test_raftcoord_status(configured: Api) -> None:
    """/raftcoord/v1/status merges the coordinator's status with node name, URL and role."""
    out = configured.ok("/raftcoord/v1/status")
    assert out["node"] == "n1" and out["client_url"] == "http://127.0.0.1:2379" and out["voter"] is True
    assert out["host"] == "n1" and out["term"] == 1 and out["role"] == "leader"


def test_nodes_as_json(coord: Coordinator, api: Api) -> None:
    """Node states are JSON with RFC 3339 timestamps and extra fields kept."""
    coord.set_node_state("up", addr="127.0.0.1:7001", zone="a", blob=b"\x01")
    out = api.ok("/raftcoord/v1/nodes?consistency=serializable")
    (node,) = out["nodes"]
    assert node["host"] == "n1" and node["status"] == "up" and node["addr"] == "127.0.0.1:7001"
    assert node["zone"] == "a" and node["blob"] == "AQ=="
    assert datetime.fromisoformat(node["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    assert node["timestamp"].endswith("Z") and out["revision"] == 2


def test_post_and_list_messages(api: Api) -> None:
    """Posted messages get clocks; GET pages them with since and limit."""
    first = api.ok("/raftcoord/v1/messages", {"type": "U", "event": "C", "payload": {"user": "alice"}})["message"]
    assert (first["type"], first["event"], first["from"], first["payload"]) == (85, 67, "n1", {"user": "alice"})
    second = api.ok("/raftcoord/v1/messages", {"type": 68})["message"]
    assert second["clock"] > first["clock"] and "event" not in second and "payload" not in second
    out = api.ok("/raftcoord/v1/messages")
    assert [m["clock"] for m in out["messages"]] == [first["clock"], second["clock"]] and out["more"] is False
    out = api.ok(f"/raftcoord/v1/messages?since={first['clock']}")
    assert [m["clock"] for m in out["messages"]] == [second["clock"]]
    out = api.ok("/raftcoord/v1/messages?since=0&limit=1")
    assert [m["clock"] for m in out["messages"]] == [first["clock"]] and out["more"] is True
    assert out["clock"] == second["clock"] and out["floor"] == 0


def test_messages_compacted_is_410(coord: Coordinator, api: Api) -> None:
    """Asking for messages older than the purge floor is 410 "compacted"."""
    for i in range(3):
        coord.post_message("U", "C", i)
    coord.purge_messages(max_count=1)
    status, out = api.get("/raftcoord/v1/messages?since=0")
    assert (status, out["code"], out["field"]) == (410, "compacted", "since")


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", "/raftcoord/v1/messages?since=-1", _NO_BODY, "since"),
        ("GET", "/raftcoord/v1/messages?limit=0", _NO_BODY, "limit"),
        ("GET", "/raftcoord/v1/messages?sinse=1", _NO_BODY, "sinse"),
        ("GET", "/raftcoord/v1/nodes?consistency=eventual", _NO_BODY, "consistency"),
        ("POST", "/raftcoord/v1/messages", {"event": "C"}, "type"),
        ("POST", "/raftcoord/v1/messages", {"type": "UU"}, "type"),
        ("POST", "/raftcoord/v1/messages", {"type": 300}, "type"),
        ("POST", "/raftcoord/v1/messages", {"type": True}, "type"),
        ("POST", "/raftcoord/v1/messages", {"type": "U", "event": 1.5}, "event"),
        ("POST", "/raftcoord/v1/messages", {"type": "U", "paylaod": 1}, "paylaod"),
        ("POST", "/raftcoord/v1/messages", ["U"], "body"),
    ],
)
def test_raftcoord_route_mistakes(api: Api, method: str, path: str, body: Any, field: str) -> None:
    """Bad query parameters and message bodies are 400 with raftcoord's error code and the field."""
    status, out, _ = api.request(method, path, body)
    assert status == 400 and out["field"] == field and isinstance(out["code"], str), out


# -------------------------------------------------------------- robustness


def test_a_bug_is_a_500_and_the_node_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception is logged as a bug and answered 500 JSON; the next request works."""
    backend = FlakyBackend()
    with Coordinator(backend, host="n1") as c:
        api = Api(make_app(c))
        try:
            backend.mode = "bug"
            with caplog.at_level(logging.ERROR, logger="raftcoord.endpoint"):
                status, out = api.post("/v3/maintenance/status", {})
            assert (status, out["code"]) == (500, 13)
            assert "ZeroDivisionError" in caplog.text and "bug" in caplog.text
            backend.mode = "ok"
            assert api.ok("/v3/maintenance/status", {})["version"] == "3.5.0"
        finally:
            api.close()


def test_blocking_calls_do_not_block_the_event_loop() -> None:
    """While a write waits on the cluster, other requests are still answered."""
    backend = FlakyBackend()
    backend.gate = threading.Event()
    with Coordinator(backend, host="n1") as c:
        api = Api(make_app(c))
        try:

            async def both() -> tuple[int, int]:
                write = asyncio.ensure_future(api.client.post("/v3/kv/put", json={"key": b64("k"), "value": b64("v")}))
                version = await api.client.get("/version")
                assert not write.done()  # the write is still waiting for the gate
                backend.gate.set()  # type: ignore[union-attr]
                return version.status, (await write).status

            assert api.loop.run_until_complete(both()) == (200, 200)
        finally:
            backend.gate.set()
            api.close()


def test_refused_requests_logged_without_flooding(caplog: pytest.LogCaptureFixture, api: Api) -> None:
    """Refusals are logged at INFO, at most a burst per window, then counted."""
    with caplog.at_level(logging.INFO, logger="raftcoord.endpoint"):
        api.post("/v3/kv/put", {})
    assert "refused POST /v3/kv/put" in caplog.text and "400" in caplog.text
    assert not [r for r in caplog.records if r.levelno > logging.INFO]
    caplog.clear()
    now = [0.0]
    limiter = RefusalLog(burst=3, window=60, clock=lambda: now[0])
    request: Any = type("R", (), {"method": "GET", "path": "/x", "remote": "127.0.0.1"})()
    with caplog.at_level(logging.INFO, logger="raftcoord.endpoint"):
        for _ in range(10):
            limiter.refused(request, 400, "bad")
        assert len(caplog.records) == 3
        now[0] = 61.0
        limiter.refused(request, 400, "bad")
    assert "7 more refused requests were not logged" in caplog.text and len(caplog.records) == 5


def test_successes_are_not_logged(caplog: pytest.LogCaptureFixture, api: Api) -> None:
    """A successful request writes nothing to the endpoint's log."""
    with caplog.at_level(logging.DEBUG, logger="raftcoord.endpoint"):
        put(api, "k", "v")
        api.ok("/v3/kv/range", {"key": b64("k")})
    assert not [r for r in caplog.records if r.name == "raftcoord.endpoint"]


def test_to_json_conversions() -> None:
    """to_json turns CBOR-decoded data into JSON-ready data."""
    t = datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=timezone(timedelta(hours=2)))
    data = {1: b"\x00\xff", "t": t, "tag": cbor2.CBORTag(99, [1]), "f": float("nan"), "s": {3}}
    assert to_json(data) == {
        "1": "AP8=",
        "t": "2026-01-02T01:04:05.500000Z",
        "tag": {"tag": 99, "value": [1]},
        "f": "nan",
        "s": [3],
    }
    assert rfc3339(datetime(2026, 1, 1)) == "2026-01-01T00:00:00Z"
    cycle: list[Any] = []
    cycle.append(cycle)  # CBOR shared references can decode to a cycle
    assert json.dumps(to_json(cycle)).count("[") == 64


# ------------------------------------------------------------------ fuzzing

_FIELD_NAMES = [
    "key", "range_end", "rangeEnd", "value", "limit", "revision", "sort_order", "sort_target", "serializable",
    "keys_only", "count_only", "prev_kv", "lease", "compare", "success", "failure", "target", "result",
    "version", "create_revision", "mod_revision", "min_mod_revision", "max_create_revision", "request_put",
    "request_range", "request_delete_range", "request_txn", "ignore_value", "type", "event", "payload", "zz",
]  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(
        ["YQ==", "YWI=", "AA==", "Tg==", "TRE=", "", "-_8", "EQUAL", "GREATER", "VALUE", "MOD", "CREATE", "LEASE",
         "DESCEND", "-1", "2", "18446744073709551616"]
    ),  # fmt: skip
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.sampled_from(_FIELD_NAMES), children, max_size=4)
    ),
    max_leaves=16,
)
_B64 = st.one_of(st.sampled_from(["YQ==", "YWI=", "Yg==", "Tg==", "TRF4", "AA=="]), st.binary(max_size=3).map(b64))
_INT = st.one_of(st.integers(-2, 8), st.integers(0, 8).map(str), st.integers(-(2**64), 2**64))
_RANGE = st.fixed_dictionaries(
    {"key": _B64},
    optional={
        "range_end": _B64,
        "limit": _INT,
        "revision": _INT,
        "sort_order": st.sampled_from(["NONE", "ASCEND", "DESCEND", 2]),
        "sort_target": st.sampled_from(["KEY", "VERSION", "CREATE", "MOD", "VALUE", 4]),
        "keys_only": st.booleans(),
        "count_only": st.booleans(),
        "min_mod_revision": _INT,
        "max_create_revision": _INT,
    },
)
_PUT = st.fixed_dictionaries({"key": _B64}, optional={"value": _B64, "prev_kv": st.booleans(), "lease": _INT})
_DELETE = st.fixed_dictionaries({"key": _B64}, optional={"range_end": _B64, "prev_kv": st.booleans()})
_COMPARE = st.fixed_dictionaries(
    {"key": _B64},
    optional={
        "target": st.sampled_from(["VERSION", "CREATE", "MOD", "VALUE", "LEASE", 1]),
        "result": st.sampled_from(["EQUAL", "NOT_EQUAL", "GREATER", "LESS", 3]),
        "version": _INT,
        "mod_revision": _INT,
        "value": _B64,
        "range_end": _B64,
    },
)
_OP = st.one_of(
    _PUT.map(lambda r: {"request_put": r}),
    _RANGE.map(lambda r: {"request_range": r}),
    _DELETE.map(lambda r: {"request_delete_range": r}),
)
_TXN = st.fixed_dictionaries(
    {},
    optional={
        "compare": st.lists(_COMPARE, max_size=2),
        "success": st.lists(_OP, max_size=3),
        "failure": st.lists(_OP, max_size=2),
    },
)
_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(_FIELD_NAMES), _JSON, max_size=6), _JSON, _RANGE, _PUT, _DELETE, _TXN
)


def _seeded_store() -> Store:
    """A store with a few user keys and one node record."""
    store = Store()
    for key in (b"a", b"ab", b"b"):
        store.apply_map({"op": "put", "key": key, "value": key * 2})
    store.apply_map({"op": "node", "state": {"host": "x", "status": "up", "clock": 0, "timestamp": _T0}})
    return store


@settings(max_examples=400, deadline=None)
@given(body=_BODIES)
def test_fuzz_translation_refuses_cleanly(body: Any) -> None:
    """Any JSON body is either refused with InvalidInputError or becomes a command the store never chokes on."""
    for parse in (etcd_json.put_command, etcd_json.delete_command, etcd_json.txn_command):
        store = _seeded_store()
        try:
            command = parse(body)
        except InvalidInputError as exc:
            assert exc.field
            continue
        result = store.apply_map(command).result
        assert result["ok"] or result["error"]["code"] != "internal", result
        if result["ok"]:
            translate = {"put": etcd_json.put_response, "delete": etcd_json.delete_response}.get(
                command["op"], etcd_json.txn_response
            )
            json.dumps(translate(result))
    try:
        query = etcd_json.parse_range(body)
    except InvalidInputError as exc:
        assert exc.field
        return
    try:
        result = read_txn(_seeded_store(), etcd_json.range_txn(query), max_result_bytes=1 << 20)
        out = etcd_json.range_response(query, result)
    except (InvalidInputError, CompactedError):
        return
    json.dumps(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BODIES, path=st.sampled_from(["/v3/kv/range", "/v3/kv/put", "/v3/kv/deleterange", "/v3/kv/txn",
                                           "/v3/maintenance/status", "/v3/cluster/member/list",
                                           "/raftcoord/v1/messages"]))  # fmt: skip
def test_fuzz_http_never_500(body: Any, path: str) -> None:
    """Whatever JSON a client sends to a route, the answer is never a 500 and errors are JSON."""
    with Coordinator.memory("n1") as c:
        api = Api(make_app(c))
        try:
            status, out = api.post(path, body)
        finally:
            api.close()
    assert status in (200, 400, 410), (status, out)
    if status != 200:
        assert out["error"] == out["message"] and "code" in out


# ------------------------------------------------------------ issue 6


def _ranges(n: int, key: bytes, **extra: Any) -> dict[str, Any]:
    """A txn of ``n`` range ops over ``key``."""
    op = {"request_range": {"key": b64(key), **extra}}
    return {"success": [op] * n}


def test_issue6_d2_txn_over_max_txn_ops_is_400() -> None:
    """129 ops (etcd's default limit is 128) is a 400 naming max_txn_ops; 128 is fine."""
    with Coordinator.memory("n1") as c:
        api = Api(make_app(c))
        try:
            assert api.post("/v3/kv/txn", _ranges(128, b"k"))[0] == 200
            for body in (_ranges(129, b"k"), {"compare": [{"key": b64("k"), "target": "VERSION"}] * 129}):
                status, out = api.post("/v3/kv/txn", body)
                assert status == 400 and out["field"] == "max_txn_ops" and "max_txn_ops" in out["message"], out
        finally:
            api.close()


def test_issue6_d2_thousand_ranges_over_a_large_value_refused_quickly() -> None:
    """1,000 ranges over one 1 MiB value (a 40 KB request) is a quick 4xx, not a 1.3 GB answer."""
    import resource
    import time

    with Coordinator.memory("n1") as c:
        c.put(b"big", b"v" * (1 << 20))
        api = Api(make_app(c))
        try:
            body = _ranges(1000, b"big")
            assert len(json.dumps(body)) < 41_000
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            started = time.monotonic()
            status, out = api.post("/v3/kv/txn", body)
            took = time.monotonic() - started
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            assert 400 <= status < 500, out
            assert took < 2.0 and grown_kib < 100 * 1024, (took, grown_kib)
            # Within the op limit, the answer's size is what is refused.
            status, out = api.post("/v3/kv/txn", _ranges(100, b"big"))
            assert status == 400 and "max_response_bytes" in out["message"], out
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            assert grown_kib < 200 * 1024, grown_kib
        finally:
            api.close()


def test_issue6_d2_range_over_max_response_bytes_is_400_naming_it() -> None:
    """A range whose answer passes max_response_bytes is a 400 naming it; a limit or keys_only fits."""
    with Coordinator.memory("n1", max_response_bytes=4 << 20) as c:
        for i in range(6):
            c.put(f"k{i}".encode(), b"v" * (1 << 20))
        api = Api(make_app(c))
        try:
            status, out = api.post("/v3/kv/range", {"key": b64("k"), "range_end": b64("l")})
            assert status == 400 and "max_response_bytes" in out["message"], out
            out = api.ok("/v3/kv/range", {"key": b64("k"), "range_end": b64("l"), "limit": 2})
            assert len(out["kvs"]) == 2 and out["more"] and out["count"] == "6"
            out = api.ok("/v3/kv/range", {"key": b64("k"), "range_end": b64("l"), "keys_only": True})
            assert len(out["kvs"]) == 6 and "value" not in out["kvs"][0]
            out = api.ok("/v3/kv/range", {"key": b64("k"), "range_end": b64("l"), "count_only": True})
            assert out["count"] == "6" and "kvs" not in out
            status, out = api.post("/v3/kv/range", {"key": b64("k"), "range_end": b64("l"), "sort_target": "MOD"})
            assert status == 400 and "max_response_bytes" in out["message"], out
        finally:
            api.close()


def test_issue6_d2_body_over_max_request_bytes_is_413_naming_it(tmp_path: Path, coord: Coordinator) -> None:
    """max_request_bytes from the config bounds request bodies: 413 naming the setting."""
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER_TOML.replace("request_timeout = 5", "request_timeout = 5\nmax_request_bytes = 65536"))
    api = Api(make_app(coord, load_config(path, env={}), "n1"), headers={"Authorization": "Bearer s3cret-token"})
    try:
        ok, _ = api.post("/v3/kv/put", {"key": b64("k"), "value": b64("v" * 40_000)})
        assert ok == 200
        status, out = api.post("/v3/kv/put", {"key": b64("k"), "value": b64("v" * 60_000)})
        assert status == 413 and "max_request_bytes" in out["message"], out
    finally:
        api.close()


def test_issue6_d2_messages_page_bounded_in_bytes() -> None:
    """GET messages stops a page at max_response_bytes (more: true); the next pages bring the rest."""
    with Coordinator.memory("n1", max_response_bytes=4 << 20) as c:
        for _ in range(8):
            c.post_message("U", "C", "p" * 1_000_000)
        api = Api(make_app(c))
        try:
            seen: list[int] = []
            since = 0
            for _ in range(8):
                out = api.ok(f"/raftcoord/v1/messages?since={since}")
                assert len(json.dumps(out)) < (4 << 20) + 1_100_000
                seen += [m["clock"] for m in out["messages"]]
                since = seen[-1]
                if not out["more"]:
                    break
            assert len(seen) == 8 and len(set(seen)) == 8
            first = api.ok("/raftcoord/v1/messages")
            assert first["more"] and 1 <= len(first["messages"]) < 8
        finally:
            api.close()


class _UnknownBackend(MemoryBackend):
    """A backend whose every proposal ends with an unknown outcome."""

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Maybe applied, maybe not (session registrations apply)."""
        if cbor2.loads(command).get("op") == "session":
            return super().propose(command, timeout=timeout)
        raise UnknownOutcomeError("the leader changed while the command was in flight")


def test_issue6_d15_unknown_outcome_reaches_http_clients_as_its_code() -> None:
    """A write with an unknown outcome is 504 with code unknown_outcome (raftcoord_code under /v3/)."""
    with Coordinator(_UnknownBackend(), host="n1") as c:
        api = Api(make_app(c))
        try:
            status, out = api.post("/raftcoord/v1/messages", {"type": "U"})
            assert (status, out["code"]) == (504, "unknown_outcome"), out
            status, out = api.post("/v3/kv/put", {"key": b64("k")}, **{"X-Raftcoord-Request": "c1:1:1"})
            assert (status, out["code"], out["raftcoord_code"]) == (504, 4, "unknown_outcome"), out
        finally:
            api.close()


def test_issue6_d15_committed_write_not_503_when_status_fails() -> None:
    """A committed write is answered 200 even when status is unavailable or broken."""
    backend = FlakyBackend()
    with Coordinator(backend, host="n1") as c:
        api = Api(make_app(c))
        try:
            term = put(api, "a", "1")["header"]["raft_term"]
            for mode in ("unavailable", "bug"):
                backend.mode = mode
                out = put(api, "k", mode)
                assert int(out["header"]["revision"]) >= 2 and out["header"]["raft_term"] == term
            assert c.get(b"k") == b"bug"
        finally:
            api.close()


def test_issue6_d7_http_request_id_applies_once() -> None:
    """POST /raftcoord/v1/session gives a client id; a write retried under the same
    X-Raftcoord-Request applies once; an unknown session is 409 session_expired."""
    with Coordinator.memory("n1") as c:
        api = Api(make_app(c))
        try:
            client = api.ok("/raftcoord/v1/session", {})["client"]
            assert isinstance(client, str) and client
            header = {"X-Raftcoord-Request": f"{client}:1:1"}
            first = api.post("/v3/kv/put", {"key": b64("k"), "value": b64("v1")}, **header)
            again = api.post("/v3/kv/put", {"key": b64("k"), "value": b64("v1")}, **header)
            assert first[0] == again[0] == 200 and first[1]["header"]["revision"] == again[1]["header"]["revision"]
            assert c.get_kv(b"k").version == 1  # type: ignore[union-attr]
            status, out = api.post("/raftcoord/v1/messages", {"type": "U"}, **{"X-Raftcoord-Request": f"{client}:2:1"})
            assert status == 200, out
            status, out = api.post("/raftcoord/v1/messages", {"type": "U"}, **{"X-Raftcoord-Request": f"{client}:2:1"})
            assert status == 200 and len(c.messages()) == 1, out
            status, out = api.post("/v3/kv/put", {"key": b64("k")}, **{"X-Raftcoord-Request": "nobody:1:1"})
            assert status == 409 and out["raftcoord_code"] == "session_expired", out
            assert c.get(b"k") == b"v1"
        finally:
            api.close()


@pytest.mark.parametrize(
    "value", ["", "c1", "c1:1", "c1:x:1", "c1:1:2", ":1:1", "c1:-1:0", "c 1:1:1", "c1:1:" + "9" * 25, "c1:1:1:1x"]
)
def test_issue6_d7_malformed_request_header_is_400(value: str) -> None:
    """A malformed X-Raftcoord-Request is a 400 naming the header; nothing is written."""
    with Coordinator.memory("n1") as c:
        api = Api(make_app(c))
        try:
            for path, body in (("/v3/kv/put", {"key": b64("k")}), ("/raftcoord/v1/messages", {"type": "U"})):
                status, out = api.post(path, body, **{"X-Raftcoord-Request": value})
                assert status == 400 and out["field"] == "x-raftcoord-request", (value, out)
            assert c.get_kv(b"k") is None and not c.messages()
        finally:
            api.close()


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" * 400 + ".0"])
def test_issue6_d15_non_finite_json_number_refused(number: str) -> None:
    """A JSON number too large for a float (1e400) is a 400, not a payload read back as "inf"."""
    with Coordinator.memory("n1") as c:
        api = Api(make_app(c))
        try:
            status, out, _ = api.request("POST", "/raftcoord/v1/messages", data='{"type": "U", "payload": %s}' % number,
                                         **{"Content-Type": "application/json"})
            assert status == 400 and out["field"] == "body", out
            assert not c.messages()
            assert api.post("/raftcoord/v1/messages", {"type": "U", "payload": 1.5e300})[0] == 200
        finally:
            api.close()


# ------------------------------------------------------------ digest (issue 7)


def test_digest_is_the_sha256_of_the_local_snapshot(coord: Coordinator, api: Api) -> None:
    """GET /raftcoord/v1/digest: revision, applied and the sha256 of the store's canonical snapshot."""
    import hashlib

    put(api, "a", "1")
    coord.post_message("U", "C", {"id": 1})
    out = api.ok("/raftcoord/v1/digest")
    snapshot, revision, applied = coord.read(lambda s: (s.snapshot(), s.revision, s.applied),
                                             consistency="serializable")
    assert out == {"revision": revision, "applied": applied, "sha256": hashlib.sha256(snapshot).hexdigest()}
    assert out["applied"] >= 2
    # Reading it changes nothing: it is a local read, not a barrier through the log.
    assert api.ok("/raftcoord/v1/digest") == out
    put(api, "a", "2")
    after = api.ok("/raftcoord/v1/digest")
    assert after["sha256"] != out["sha256"] and after["applied"] > out["applied"]


def test_digest_refused_over_max_keys(coord: Coordinator, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past DIGEST_MAX_KEYS keys the digest is refused with 400, since it is taken under the state lock."""
    from raftcoord import endpoint

    monkeypatch.setattr(endpoint, "DIGEST_MAX_KEYS", 2)
    put(api, "a", "1")
    put(api, "b", "1")
    assert api.get("/raftcoord/v1/digest")[0] == 200
    put(api, "c", "1")
    status, out = api.get("/raftcoord/v1/digest")
    assert status == 400 and out["code"] == "limit_exceeded" and "more than 2," in out["message"], out
    assert api.get("/raftcoord/v1/digest?consistency=linearizable")[1]["field"] == "consistency"


# ----------------------------------------------------------------- issue 8: watch requests


@pytest.mark.parametrize("body, field", [
    ({"create_request": {"key": "YQ==", "fragment": True}}, "create_request.fragment"),
    ({"create_request": {"key": "YQ==", "filters": ["NOPE"]}}, "create_request.filters[0]"),
    ({"create_request": {"key": "YQ==", "start_revision": "-1"}}, "create_request.start_revision"),
    ({"create_request": {"key": "YQ==", "nope": 1}}, "create_request.nope"),
    ({"create_request": {"range_end": "Yg=="}}, "create_request.key"),
    ({"cancel_request": {"watch_id": "x"}}, "cancel_request.watch_id"),
    ({"progress_request": {"x": 1}}, "progress_request.x"),
    ({"create_request": {"key": "YQ=="}, "cancel_request": {}}, "body"),
    ({}, "body"),
], ids=["fragment", "filter", "negative-start", "unknown", "no-key", "cancel-id", "progress-field", "two", "none"])
def test_issue8_4_bad_watch_requests_name_the_field(body: Any, field: str) -> None:
    """Each malformed WatchRequest is an InvalidInputError naming the field that is wrong."""
    with pytest.raises(InvalidInputError) as info:
        etcd_json.parse_watch_request(body)
    assert info.value.field == field


def test_issue8_4_watch_request_shapes() -> None:
    """create (camelCase too, numeric filters, key "" with range_end "\\0" = every key), cancel and progress."""
    create = etcd_json.parse_watch_request({"create_request": {
        "key": "", "rangeEnd": "AA==", "startRevision": 5, "prevKv": True, "filters": [1, "NOPUT", 1]}})
    assert create == etcd_json.WatchCreate(key=b"\0", range_end=b"\0", start_revision=5, prev_kv=True,
                                           filters=("NODELETE", "NOPUT"))
    assert etcd_json.parse_watch_request({"cancel_request": {"watch_id": "3"}}) == etcd_json.WatchCancel(3)
    assert etcd_json.parse_watch_request({"progress_request": {}}) == etcd_json.WatchProgress()
