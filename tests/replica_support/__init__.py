"""Helpers for the replica tests: ports, waits, commands, a fault proxy, a node runner."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from raftcoord.values import encode_cbor


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def put(key: bytes, value: bytes, req: tuple[str, int] | None = None) -> bytes:
    """A store ``put`` command, with an at-most-once request id if ``req`` is given."""
    cmd: dict[str, Any] = {"op": "put", "key": key, "value": value}
    if req is not None:
        cmd["req"] = [req[0], req[1], req[1]]
    return encode_cbor(cmd)


def put_keys(applied: Any) -> list[bytes]:
    """The keys an Applied's events put."""
    return [e.kv.key for e in applied.events if type(e).__name__ == "KeyPut"]
