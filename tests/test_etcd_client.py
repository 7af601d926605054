"""An existing etcd v3 JSON client (etcd3gw) against the endpoint on a real socket."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import etcd3gw
import pytest
import requests
from aiohttp import web
from etcd3gw import exceptions

from raftcoord.config import load_config, stable_id
from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app


class ServerThread:
    """The endpoint served on 127.0.0.1 (ephemeral port) by an event loop in a thread."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="endpoint-test", daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app)
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        assert host == "127.0.0.1"
        return int(port)

    def stop(self) -> None:
        """Shut the server down and join the thread."""
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def coord() -> Iterator[Coordinator]:
    """A memory coordinator for node n1."""
    c = Coordinator.memory("n1", cluster="etcd-test")
    yield c
    c.close()


@pytest.fixture
def server(coord: Coordinator) -> Iterator[ServerThread]:
    """The endpoint over ``coord`` on a real socket."""
    s = ServerThread(make_app(coord))
    yield s
    s.stop()


@pytest.fixture
def client(server: ServerThread) -> Any:
    """An etcd3gw client for the server."""
    return etcd3gw.client(host="127.0.0.1", port=server.port, api_path="/v3/", timeout=10)


def test_put_get_delete(client: Any) -> None:
    """put, get, get with metadata and delete work through etcd3gw."""
    assert client.put("foo", "bar") is True
    assert client.get("foo") == [b"bar"]
    assert client.get("missing") == []
    ((value, meta),) = client.get("foo", metadata=True)
    assert value == b"bar" and meta["key"] == b"foo"
    assert meta["create_revision"] == meta["mod_revision"] == "2" and meta["version"] == "1"
    assert client.delete("foo") is True
    assert client.delete("foo") is False  # nothing deleted: "deleted" is left out
    assert client.get("foo") == []


def test_get_prefix_and_delete_prefix(client: Any) -> None:
    """get_prefix returns the prefix's keys in order; delete_prefix removes them."""
    for key in ("dir/b", "dir/a", "dir/c", "dis", "other"):
        client.put(key, key.upper())
    got = client.get_prefix("dir/")
    assert [(meta["key"], value) for value, meta in got] == [
        (b"dir/a", b"DIR/A"),
        (b"dir/b", b"DIR/B"),
        (b"dir/c", b"DIR/C"),
    ]
    assert [m["key"] for _, m in client.get_prefix("dir/", sort_order="descend")] == [b"dir/c", b"dir/b", b"dir/a"]
    assert [m["key"] for _, m in client.get_all()] == [b"dir/a", b"dir/b", b"dir/c", b"dis", b"other"]
    assert client.delete_prefix("dir/") is True
    assert client.get_prefix("dir/") == []
    assert client.get("dis") == [b"DIS"]


def test_compare_and_swap(client: Any) -> None:
    """replace() is a CAS txn: it succeeds once, then fails on the stale value."""
    client.put("cas", "one")
    assert client.replace("cas", "one", "two") is True
    assert client.replace("cas", "one", "three") is False
    assert client.get("cas") == [b"two"]
    assert client.create("fresh", "x") is True
    assert client.create("fresh", "y") is False
    assert client.get("fresh") == [b"x"]


def test_explicit_transaction(client: Any) -> None:
    """A hand-written txn with a MOD compare and mixed operations returns etcd's shapes."""
    client.put("k", "v1")
    ((_, meta),) = client.get("k", metadata=True)
    txn = {
        "compare": [{"key": "aw==", "target": "MOD", "result": "EQUAL", "mod_revision": meta["mod_revision"]}],
        "success": [
            {"request_put": {"key": "aw==", "value": "djI="}},
            {"request_range": {"key": "aw=="}},
        ],
        "failure": [],
    }
    result = client.transaction(txn)
    assert result["succeeded"] is True
    assert "response_put" in result["responses"][0]
    assert result["responses"][1]["response_range"]["kvs"][0]["value"] == "djI="
    assert "succeeded" not in client.transaction(txn)  # the mod revision moved on


def test_status_members_and_version_discovery(server: ServerThread) -> None:
    """status() and members() parse; without api_path, /version discovery picks /v3/."""
    client = etcd3gw.client(host="127.0.0.1", port=server.port, timeout=10)
    assert client.api_path == "/v3/"
    status = client.status()
    assert status["version"] == "3.5.0" and status["leader"] == str(stable_id("n1"))
    assert client.members() == [{"ID": str(stable_id("n1")), "name": "n1"}]


def test_unsupported_calls_fail_cleanly(client: Any) -> None:
    """Leases are not implemented: etcd3gw gets an error, not a hang or a crash."""
    with pytest.raises(exceptions.Etcd3Exception) as info:
        client.lease(ttl=5)
    body = json.loads(info.value.detail_text)
    assert body["code"] == 12 and "/v3/lease/grant" in body["error"]
    assert client.put("still", "works") is True


def test_bearer_token_through_a_session(tmp_path: Path, coord: Coordinator) -> None:
    """With a token configured, etcd3gw works through a session carrying the header."""
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[cluster]\nname = "c"\ntoken = "tok-123"\n'
        '[[node]]\nname = "n1"\nraft = "127.0.0.1:7001"\nclient = "127.0.0.1:2379"\n'
    )
    server = ServerThread(make_app(coord, load_config(path, env={})))
    try:
        anonymous = etcd3gw.client(host="127.0.0.1", port=server.port, api_path="/v3/", timeout=10)
        with pytest.raises(exceptions.Etcd3Exception) as info:
            anonymous.put("k", "v")
        assert json.loads(info.value.detail_text)["code"] == 16
        session = requests.Session()
        session.headers["Authorization"] = "Bearer tok-123"
        authed = etcd3gw.client(host="127.0.0.1", port=server.port, api_path="/v3/", timeout=10, session=session)
        assert authed.put("k", "v") is True and authed.get("k") == [b"v"]
        session.close()
    finally:
        server.stop()
