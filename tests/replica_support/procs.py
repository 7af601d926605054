"""Start, drive and kill ``node.py`` processes from a test."""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from raftcoord.values import decode_cbor

RUNNER = Path(__file__).with_name("node.py")


class NodeProcess:
    """One replica process: :meth:`start`, :meth:`call`, :meth:`kill` (SIGKILL)."""

    #: The script the process runs.
    runner: Path = RUNNER

    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._ready: Future[dict[str, Any]] = Future()

    @property
    def address(self) -> str:
        return self.config["self"]

    def start(self, timeout: float = 15.0) -> None:
        """Start the process and wait until its replica listens."""
        self._ready = Future()
        log = open(self.log_path, "a")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, str(self.runner), json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
        )
        log.close()
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        self._ready.result(timeout)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            msg = json.loads(line)
            if msg.get("ready"):
                self._ready.set_result(msg)
                continue
            with self._lock:
                fut = self._pending.pop(msg["id"], None)
            if fut is not None:
                fut.set_result(msg)
        gone = RuntimeError(f"node {self.address} exited")
        if not self._ready.done():
            self._ready.set_exception(gone)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(gone)

    def send(self, op: str, **kwargs: Any) -> Future[dict[str, Any]]:
        """Send one request; the future holds the node's answer."""
        assert self.proc is not None and self.proc.stdin is not None
        fut: Future[dict[str, Any]] = Future()
        with self._lock:
            rid = next(self._ids)
            self._pending[rid] = fut
        self.proc.stdin.write(json.dumps({"id": rid, "op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return fut

    def call(self, op: str, wait: float = 30.0, **kwargs: Any) -> dict[str, Any]:
        """Send one request and wait for the answer."""
        return self.send(op, **kwargs).result(wait)

    def propose(self, command: bytes, timeout: float = 5.0) -> dict[str, Any]:
        """The store's result for ``command``, or the error answer."""
        ans = self.call("propose", cmd=base64.b64encode(command).decode(), timeout=timeout, wait=timeout + 10)
        if ans["ok"]:
            ans["result"] = decode_cbor(base64.b64decode(ans["result"]))
        return ans

    def get(self, key: bytes, timeout: float = 5.0) -> bytes | None:
        """A linearizable read of ``key`` through this node."""
        ans = self.call("get", key=base64.b64encode(key).decode(), timeout=timeout, wait=timeout + 10)
        assert ans["ok"], ans
        return None if ans["value"] is None else base64.b64decode(ans["value"])

    def state(self) -> bytes:
        """The local store's snapshot bytes, as they are now."""
        return base64.b64decode(self.call("state")["snapshot"])

    def status(self) -> dict[str, Any]:
        return self.call("status")["status"]

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Ask the node to close its replica and exit; kill it if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"id": 0, "op": "exit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
