"""The node process: housekeeping that never stops the node, and start-up errors as one line."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cluster_support import free_ports
from raftcoord.config import ClusterConfig, load_config
from raftcoord.coordinator import Coordinator, MemoryBackend
from raftcoord.errors import ConfigError, RaftcoordError, UnavailableError
from raftcoord.server import HOUSEKEEPING_PERIOD, NodeServer


def write_config(tmp_path: Path, *, client: str | None = None, data_dir: str | None = None, extra: str = "") -> Path:
    """A one-node cluster file on free loopback ports."""
    raft_port, client_port = free_ports(2)
    lines = [
        "[cluster]",
        'name = "t"',
        'secret = "0123456789abcdef-secret"',
        f'data_dir = "{tmp_path / "data"}"',
        extra,
        "[[node]]",
        'name = "n1"',
        f'raft = "127.0.0.1:{raft_port}"',
        f'client = "{client or f"127.0.0.1:{client_port}"}"',
    ]
    if data_dir is not None:
        lines.append(f'data_dir = "{data_dir}"')
    path = tmp_path / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class StatusFails(MemoryBackend):
    """A backend whose status raises, as a replica's did when its Raft thread was busy."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exc = exc
        self.calls = 0

    def status(self) -> dict[str, Any]:
        """Raise."""
        self.calls += 1
        raise self.exc


def http_get(url: str) -> tuple[int, Any]:
    """GET ``url``; (status, JSON body)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    "exc", [UnavailableError("the Raft thread did not answer within 5 s"), ZeroDivisionError("a bug"), OverflowError()]
)
def test_issue6_d1_housekeeping_survives_status_errors(
    tmp_path: Path, exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose status raises keeps running, reports unhealthy on /health, and logs a throttled line."""
    config = load_config(write_config(tmp_path), env={})
    backend = StatusFails(exc)
    server = NodeServer(config, "n1", coordinator=Coordinator(backend, host="n1"))
    loop = asyncio.new_event_loop()
    task: list[Any] = []

    def run() -> None:
        task.append(loop.create_task(server.run()))
        try:
            loop.run_until_complete(task[0])
        except BaseException:  # noqa: BLE001 - inspected by the test
            pass

    thread = threading.Thread(target=run, daemon=True)
    with caplog.at_level("INFO"):
        thread.start()
        deadline = time.monotonic() + 10
        while backend.calls < 4 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert thread.is_alive(), f"the node stopped: {task[0].exception() if task else None!r}"
        assert backend.calls >= 3, "housekeeping stopped calling status"
        status, out = http_get(f"http://{config.node('n1').client}/health")
        assert status == 503 and out["health"] == "false", out
        loop.call_soon_threadsafe(server.request_stop)
        thread.join(10)
    assert not thread.is_alive() and task[0].exception() is None
    housekeeping = [r for r in caplog.records
                    if r.name == "raftcoord.housekeeping" and "housekeeping" in r.getMessage()]
    assert 1 <= len(housekeeping) <= 2, caplog.text  # throttled: not one per second
    loop.close()


def _start_error(config: ClusterConfig, **kwargs: Any) -> RaftcoordError:
    """The error NodeServer.start raises for ``config``; the server is left stopped."""

    async def go() -> RaftcoordError:
        server = NodeServer(config, "n1", **kwargs)
        try:
            await server.start()
        except RaftcoordError as exc:
            assert server.coordinator is None  # whatever was started is closed again
            return exc
        await server.stop()
        raise AssertionError("start did not fail")

    return asyncio.run(go())


def test_issue6_d12_client_port_in_use_is_one_clear_error(tmp_path: Path) -> None:
    """A client port already in use fails start with UnavailableError naming the address."""
    config = load_config(write_config(tmp_path), env={})
    with socket.socket() as busy:
        busy.bind(config.node("n1").client_address)
        busy.listen()
        exc = _start_error(config, coordinator=Coordinator.memory("n1"))
    assert isinstance(exc, UnavailableError) and config.node("n1").client in exc.message
    assert "in use" in exc.message


def test_issue6_d12_unresolvable_client_host_is_one_clear_error(tmp_path: Path) -> None:
    """A client host that does not resolve fails start with UnavailableError naming it."""
    config = load_config(write_config(tmp_path, client="no-such-host.invalid:2379"), env={})
    exc = _start_error(config, coordinator=Coordinator.memory("n1"))
    assert isinstance(exc, UnavailableError) and "no-such-host.invalid" in exc.message


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_issue6_d12_data_dir_not_a_directory_is_one_clear_error(tmp_path: Path, kind: str) -> None:
    """A data_dir that is a file (or lies under one) fails start with ConfigError naming data_dir."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = blocker if kind == "file" else blocker / "n1"
    config = load_config(write_config(tmp_path, data_dir=str(target)), env={})
    exc = _start_error(config)
    assert isinstance(exc, ConfigError) and "data_dir" in exc.message and str(target) in exc.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_issue6_d12_data_dir_not_writable_is_one_clear_error(tmp_path: Path) -> None:
    """A data_dir the node cannot write fails start with ConfigError naming data_dir."""
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    config = load_config(write_config(tmp_path, data_dir=str(target)), env={})
    exc = _start_error(config)
    assert isinstance(exc, ConfigError) and "not writable" in exc.message


def test_issue6_d12_cli_node_start_errors_are_one_line(tmp_path: Path) -> None:
    """`raftcoord node` prints one line and exits non-zero when its client port is taken."""
    path = write_config(tmp_path)
    config = load_config(path, env={})
    with socket.socket() as busy:
        busy.bind(config.node("n1").client_address)
        busy.listen()
        out = subprocess.run(
            [sys.executable, "-m", "raftcoord", "node", "--config", str(path), "--name", "n1", "--log-level", "ERROR"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "RAFTCOORD_SECRET": ""},
        )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and config.node("n1").client in errors[0], out.stderr


def test_housekeeping_period_is_short() -> None:
    """The housekeeping test above relies on a period of about a second."""
    assert HOUSEKEEPING_PERIOD <= 1.0


def test_issue6_d6_node_applies_client_connection_settings(tmp_path: Path) -> None:
    """A node closes a half-sent request head after client_header_timeout and answers a
    stalled body with 408 after client_body_timeout."""
    config = load_config(write_config(tmp_path, extra="client_header_timeout = 1\nclient_body_timeout = 1"), env={})

    async def go() -> None:
        server = NodeServer(config, "n1", coordinator=Coordinator.memory("n1"))
        await server.start()
        try:
            host, port = config.node("n1").client_address
            for head, expect in ((b"GET /version HTTP/1.1\r\nHost: x\r\nX-Slow:", b""),
                                 (b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{", b"HTTP/1.1 408")):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(head)
                started = time.monotonic()
                data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
                assert data.startswith(expect) and time.monotonic() - started < 5, data[:100]
                writer.close()
        finally:
            await server.stop()

    asyncio.run(go())


def test_issue8_3_node_server_records_joining_up_and_on_stop_leaving_down(tmp_path: Path) -> None:
    """The served node's housekeeper writes joining then up, and NodeServer.stop writes leaving then down."""
    from raftcoord.store import NodeStateSet

    config = load_config(write_config(tmp_path), env={})
    coord = Coordinator.memory("n1")
    seen: list[str] = []
    coord.backend.add_listener(lambda a: seen.extend(e.state.status.value for e in a.events
                                                     if isinstance(e, NodeStateSet)))

    async def go() -> None:
        server = NodeServer(config, "n1", coordinator=coord)
        await server.start()
        try:
            deadline = time.monotonic() + 10
            while seen != ["joining", "up"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert seen == ["joining", "up"]
        finally:
            await server.stop()

    asyncio.run(go())
    assert seen == ["joining", "up", "leaving", "down"]
