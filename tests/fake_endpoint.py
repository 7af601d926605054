"""Fake raftcoord client endpoints for client and CLI tests.

:class:`FakeCluster` runs a few tiny HTTP/1.1 servers (``http.server`` in
threads, on 127.0.0.1, ephemeral ports) that share one toy store with
sessions and request ids as contract C1 describes them, so a test can see
exactly what each node received and how often a write applied. A test
misbehaves a node by setting a hook: ``cluster.hooks[i] = fn`` where
``fn(stage, route, handler)`` is called at ``stage`` "before" (the request
is read, nothing applied) and "after" (applied, not answered) and returns
None to go on, ``"reset"`` to drop the connection with a TCP reset, a float
to sleep that long first, or ``(status, body)`` to answer that instead
(``body`` bytes, or anything JSON).

:func:`silent_listener` is a node whose process is paused: the kernel
accepts connections into the backlog, nobody ever reads them.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Hook = Callable[[str, str, "Handler"], Any]


@dataclass
class Seen:
    """One request a fake node received."""

    node: int
    method: str
    route: str
    headers: dict[str, str]
    body: Any


@dataclass
class ToyStore:
    """The shared state: key-values, messages and sessions with remembered results."""

    kv: dict[str, str] = field(default_factory=dict)
    revision: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    sessions: dict[str, dict[int, Any]] = field(default_factory=dict)
    applied: list[tuple[str, str | None]] = field(default_factory=list)
    next_session: int = 1


class Handler(BaseHTTPRequestHandler):
    """Serves one fake node; ``server.cluster`` and ``server.index`` say which."""

    protocol_version = "HTTP/1.1"  # so that Expect: 100-continue is answered

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.serve()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.serve()

    def reset(self) -> None:
        """Drop the connection with a TCP RST."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def answer(self, status: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def run_hook(self, stage: str, route: str) -> bool:
        """Apply the node's hook; True if it answered or dropped the request."""
        cluster: FakeCluster = self.server.cluster  # type: ignore[attr-defined]
        hook = cluster.hooks.get(self.server.index)  # type: ignore[attr-defined]
        outcome = hook(stage, route, self) if hook else None
        if isinstance(outcome, (int, float)) and not isinstance(outcome, bool):
            time.sleep(outcome)
            return False
        if outcome == "reset":
            self.reset()
            return True
        if isinstance(outcome, tuple):
            self.answer(*outcome)
            return True
        return False

    def serve(self) -> None:
        cluster: FakeCluster = self.server.cluster  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = {k.lower(): v for k, v in self.headers.items()}
        index: int = self.server.index  # type: ignore[attr-defined]
        with cluster.lock:
            cluster.seen.append(Seen(index, self.command, url.path, headers, body))
        if self.run_hook("before", url.path):
            return
        status, out = cluster.apply(self.command, url.path, parse_qs(url.query), headers, body)
        if self.run_hook("after", url.path):
            return
        self.answer(status, out)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on a slow node is what these tests provoke


class FakeCluster:
    """``n`` fake nodes over one toy store; see the module docstring."""

    def __init__(self, n: int = 2) -> None:
        self.lock = threading.Lock()
        self.store = ToyStore()
        self.seen: list[Seen] = []
        self.hooks: dict[int, Hook] = {}
        self.servers: list[ThreadingHTTPServer] = []
        for i in range(n):
            server = _Server(("127.0.0.1", 0), Handler)
            server.cluster = self  # type: ignore[attr-defined]
            server.index = i  # type: ignore[attr-defined]
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self.servers.append(server)

    def addr(self, i: int) -> str:
        """Node ``i`` as host:port."""
        host, port = self.servers[i].server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def requests(self, route: str) -> list[Seen]:
        """Every request received for ``route``, in arrival order."""
        with self.lock:
            return [s for s in self.seen if s.route == route]

    def writes_applied(self) -> int:
        """How many writes the toy store applied (a retried id counts once)."""
        with self.lock:
            return len(self.store.applied)

    # ---------------------------------------------------------------- store

    def apply(self, method: str, route: str, query: dict[str, list[str]], headers: dict[str, str],
              body: Any) -> tuple[int, Any]:
        with self.lock:
            st = self.store
            if route == "/raftcoord/v1/session":
                client = f"c{st.next_session}"
                st.next_session += 1
                st.sessions[client] = {}
                return 200, {"client": client}
            if route == "/v3/kv/range":
                key = base64.b64decode(body["key"]).decode()
                kvs = [{"key": body["key"], "value": base64.b64encode(st.kv[key].encode()).decode(),
                        "create_revision": "1", "mod_revision": "1", "version": "1"}] if key in st.kv else []
                return 200, {"header": {"revision": str(st.revision)}, "kvs": kvs, "count": str(len(kvs))}
            if method == "GET" and route == "/raftcoord/v1/status":
                return 200, {"name": f"n{id(self) % 100}", "role": "leader", "term": 1}
            if method == "GET" and route == "/raftcoord/v1/nodes":
                return 200, {"nodes": [], "revision": st.revision}
            if method == "GET" and route == "/raftcoord/v1/messages":
                since = int(query.get("since", ["0"])[0])
                out = [m for m in st.messages if m["clock"] > since]
                return 200, {"messages": out, "more": False, "revision": st.revision}
            if route not in ("/v3/kv/put", "/v3/kv/deleterange", "/raftcoord/v1/messages"):
                return 404, {"code": "not_found", "message": f"no route {route}"}
            req = headers.get("x-raftcoord-request")
            if req is not None:
                client, seq, _low = req.split(":")
                if client not in st.sessions:
                    return 409, {"code": "session_expired", "message": f"session {client} expired"}
                if int(seq) in st.sessions[client]:
                    return 200, st.sessions[client][int(seq)]
            st.revision += 1
            st.applied.append((route, req))
            if route == "/v3/kv/put":
                st.kv[base64.b64decode(body["key"]).decode()] = base64.b64decode(body["value"]).decode()
                result: Any = {"header": {"revision": str(st.revision)}}
            elif route == "/v3/kv/deleterange":
                deleted = int(st.kv.pop(base64.b64decode(body["key"]).decode(), None) is not None)
                result = {"header": {"revision": str(st.revision)}, **({"deleted": str(deleted)} if deleted else {})}
            else:
                message = {"clock": len(st.messages) + 1, "type": body["type"], "from": "fake"}
                st.messages.append(message)
                result = {"message": message}
            if req is not None:
                st.sessions[req.split(":")[0]][int(req.split(":")[1])] = result
            return 200, result


@contextmanager
def fake_cluster(n: int = 2) -> Iterator[FakeCluster]:
    """A :class:`FakeCluster`, shut down afterwards."""
    cluster = FakeCluster(n)
    try:
        yield cluster
    finally:
        cluster.close()


@contextmanager
def silent_listener() -> Iterator[str]:
    """host:port of a socket that accepts connections (kernel backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield "127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        sock.close()


def refused_addr() -> str:
    """host:port where nothing listens (connection refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"127.0.0.1:{port}"


@contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """host:port of a server that answers every connection with ``answer`` bytes, then closes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()
