"""Fault-test helpers: node processes (proxied bind address, file limit, memory and log reads)
and a proxy whose cut behaves like a network partition."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from replica_support.procs import NodeProcess
from replica_support.proxy import FaultProxy, _close

RUNNER = Path(__file__).with_name("bound_node.py")


class FaultNode(NodeProcess):
    """A NodeProcess run by ``bound_node.py`` (config keys ``bind`` and ``nofile`` too)."""

    runner = RUNNER

    @property
    def raft_port(self) -> int:
        """Where the replica itself listens (behind its proxy, if it has one)."""
        return int((self.config.get("bind") or self.address).rsplit(":", 1)[1])

    def rss(self) -> int:
        """Resident memory of the process, in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def open_files(self) -> int:
        assert self.proc is not None
        return len(list(Path(f"/proc/{self.proc.pid}/fd").iterdir()))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def barrier(self, timeout: float) -> bool:
        """Whether a linearizable read through this node succeeded within ``timeout``."""
        try:
            ans: dict[str, Any] = self.call("get", key="cHJvYmU=", timeout=timeout, wait=timeout + 10)
        except RuntimeError:
            return False
        return bool(ans["ok"])


class PartitionProxy(FaultProxy):
    """A FaultProxy with :meth:`partition`: traffic vanishes, connections stay open.

    A real partition drops packets: no side learns that the other closed its
    connection, so each finds out only by its own timeout. :meth:`cut`
    instead closes everything at once. :meth:`heal` closes what was held.
    """

    def __init__(self, listen_port: int, target_port: int) -> None:
        self._dropping = False
        super().__init__(listen_port, target_port)

    def partition(self) -> None:
        """Drop all traffic from now on and refuse new connections; close nothing."""
        with self._lock:
            self._dropping = True
            self._cut = True

    def heal(self, bytes_per_second: float | None = None) -> None:
        """Close the connections held through the partition and forward new ones."""
        with self._lock:
            self._dropping = False
        self.cut()
        super().heal(bytes_per_second)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                if not self._dropping:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks.discard(src)
                keep = self._dropping  # the far side must not learn of it
                if not keep:
                    self._socks.discard(dst)
            _close(src)
            if not keep:
                _close(dst)
