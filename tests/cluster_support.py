"""Real node processes on 127.0.0.1 for cluster tests.

:class:`LocalCluster` writes a cluster file with fresh ephemeral ports and a
fresh secret, starts ``python -m raftcoord node`` processes, and kills every
process it started, by pid, when the test ends. Waits poll with deadlines.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftcoord.chaos.cluster import free_ports
from raftcoord.client import Client
from raftcoord.errors import RaftcoordError


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (RaftcoordError, OSError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc})")
        time.sleep(interval)


class LocalCluster:
    """A cluster of node processes described by one cluster file."""

    def __init__(self, root: Path, n: int = 3, *, secret: str | None = None, extra: str = "",
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.root = root
        self.preexec_fn = preexec_fn  # run in each node process before exec (e.g. resource limits)
        self.names = [f"n{i + 1}" for i in range(n)]
        ports = free_ports(2 * n)
        self.raft = {name: f"127.0.0.1:{ports[2 * i]}" for i, name in enumerate(self.names)}
        self.client_addr = {name: f"127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(self.names)}
        self.secret = secret or secrets.token_urlsafe(24)
        self.config_path = root / "cluster.toml"
        self.write_config(self.config_path, self.secret, extra)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._all_pids: list[int] = []

    def write_config(self, path: Path, secret: str, extra: str = "", names: list[str] | None = None) -> None:
        lines = [
            "[cluster]",
            'name = "test"',
            f'secret = "{secret}"',
            f'data_dir = "{self.root / "data"}"',
            "request_timeout = 10",
            extra,
            "",
        ]
        for name in names or self.names:
            lines += ["[[node]]", f'name = "{name}"', f'raft = "{self.raft[name]}"', f'client = "{self.client_addr[name]}"', ""]
        path.write_text("\n".join(lines))

    # ------------------------------------------------------------ processes

    def start(self, *names: str, config: Path | None = None,
              argv: Callable[[str], list[str]] | None = None) -> None:
        """Start the named nodes (all by default).

        ``argv(name)`` replaces the ``raftcoord node`` command line, e.g. to
        run a node that embeds its coordinator.
        """
        for name in names or self.names:
            log = open(self.root / f"{name}.log", "ab")
            env = {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}
            command = argv(name) if argv is not None else [
                sys.executable, "-m", "raftcoord", "node", "--config", str(config or self.config_path), "--name", name]
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=self.preexec_fn,
            )
            self.procs[name] = proc
            self._all_pids.append(proc.pid)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a node and, for kill/term, wait until it is gone."""
        proc = self.procs[name]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        """Kill every process this cluster ever started."""
        for pid in self._all_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def log(self, name: str) -> str:
        """What a node wrote to its log so far."""
        return (self.root / f"{name}.log").read_text(errors="replace")

    # -------------------------------------------------------------- clients

    def client(self, *names: str, timeout: float = 10.0) -> Client:
        """A client of the named nodes (all by default)."""
        return Client([self.client_addr[n] for n in names or self.names], timeout=timeout)

    def status(self, name: str) -> dict[str, Any]:
        """One node's status, or raise."""
        return self.client(name, timeout=2).status()

    def leader(self, among: list[str] | None = None) -> str | None:
        """The node the given nodes agree is leader, if they see one."""
        for name in among or self.names:
            if name in self.procs and self.procs[name].poll() is None:
                try:
                    st = self.status(name)
                except RaftcoordError:
                    continue
                if st.get("role") == "leader":
                    return name
        return None

    def wait_for_leader(self, among: list[str] | None = None, timeout: float = 30.0) -> str:
        """Wait until one of ``among`` is leader and it answers writes."""
        return str(wait_until(lambda: self.leader(among), timeout, "a leader"))

    def wait_healthy(self, name: str, timeout: float = 30.0) -> None:
        """Wait until a node's /health answers 200."""
        import urllib.request

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://{self.client_addr[name]}/health", timeout=2) as r:
                return r.status == 200

        wait_until(healthy, timeout, f"{name} to be healthy")
