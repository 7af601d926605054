"""The fallback network for the chaos cluster: a TCP proxy in front of each node's raft port.

Used when network namespaces cannot be (not root, no ``ip netns``). Every
node listens on a hidden port and is reached by its peers only through its
proxy, whose port is the raft address in the cluster file. pysyncobj opens
one connection per pair of nodes, so for each accepted connection the proxy
finds which node opened it: the peer's source port is looked up in
``/proc/net/tcp`` and the socket's inode in the node processes' descriptors.
A cut pair's traffic then vanishes silently (read and discarded, the
connections stay open, as in a real partition, where neither side learns
anything until its own timeout); when the pair heals, the connections held
through the cut are closed so both sides reconnect. A delay holds each chunk
before forwarding. Random packet loss cannot be made on a TCP stream: the
"drop" fault is unsupported here.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def owner_of(port: int, pids: dict[str, int]) -> str | None:
    """Which of ``pids`` (name -> pid) owns the TCP socket bound to local 127.0.0.1:``port``."""
    inodes = set()
    # thread-self: /proc/net follows the main thread's namespace, the sockets are in this thread's.
    for table in ("/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{parts[9]}]")
        except OSError:
            continue
    if not inodes:
        return None
    for name, pid in pids.items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return name
            except OSError:
                continue
    return None


class _Conn:
    def __init__(self, src: str | None, a: socket.socket, b: socket.socket) -> None:
        self.src = src
        self.socks = (a, b)


class NodeProxy:
    """Listens on ``listen_port`` for node ``name`` and forwards to its hidden ``target_port``."""

    def __init__(self, name: str, listen_port: int, target_port: int, net: ProxyNetwork) -> None:
        self.name = name
        self.listen_port = listen_port
        self.target_port = target_port
        self._net = net
        self._conns: set[_Conn] = set()
        self._warned = False
        self._server = socket.create_server(("127.0.0.1", listen_port))
        self._thread = threading.Thread(target=self._accept_loop, name=f"chaos-proxy-{name}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, peer = self._server.accept()
            except OSError:
                return
            src = owner_of(peer[1], self._net.pids())
            if src is None and not self._warned:
                self._warned = True  # once per proxy: a peer must not be able to flood the log
                log.warning("proxy %s: could not tell which node opened a connection from port %d; "
                            "it is never cut", self.name, peer[1])
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            conn = _Conn(src, client, upstream)
            with self._net.lock:
                if self._net.closed:
                    _close(client)
                    _close(upstream)
                    return
                self._conns.add(conn)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(conn, a, b), daemon=True).start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                cut, delay = self._net.link(conn.src, self.name)
                if cut:
                    self._net.dropped += 1
                    continue  # silently lost; the connection stays open
                if delay:
                    time.sleep(delay)  # the link's latency, not a wait for an outcome
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._net.lock:
                self._conns.discard(conn)
            _close(src)
            _close(dst)

    def reset(self, pairs: Callable[[str | None], bool]) -> None:
        """Close the connections whose source ``pairs`` selects (held through a healed cut)."""
        with self._net.lock:
            doomed = [c for c in self._conns if pairs(c.src)]
            for c in doomed:
                self._conns.discard(c)
        for c in doomed:
            for s in c.socks:
                _close(s)

    def close(self) -> None:
        _close(self._server)
        self.reset(lambda src: True)
        self._thread.join(timeout=5)


class ProxyNetwork:
    """One :class:`NodeProxy` per node and the current cut pairs and delay."""

    def __init__(self, ports: dict[str, tuple[int, int]], pids: Callable[[], dict[str, int]]) -> None:
        self.lock = threading.Lock()
        self.closed = False
        #: Chunks discarded on cut links so far.
        self.dropped = 0
        self._pids = pids
        self._blocked: set[frozenset[str]] = set()
        self._delay = 0.0
        self.proxies: dict[str, NodeProxy] = {}
        try:
            for name, (listen, target) in ports.items():
                self.proxies[name] = NodeProxy(name, listen, target, self)
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        return self._pids()

    def link(self, src: str | None, dst: str) -> tuple[bool, float]:
        """Whether traffic between ``src`` and ``dst`` is cut, and its delay."""
        with self.lock:
            cut = src is not None and frozenset((src, dst)) in self._blocked
            return cut, self._delay

    def set_faults(self, blocked: set[frozenset[str]], *, loss: float = 0.0, delay: float = 0.0) -> None:
        """Cut exactly ``blocked`` pairs and delay every chunk by ``delay`` s; ``loss`` is unsupported."""
        if loss:
            raise NotImplementedError("the proxy network cannot drop single packets of a TCP stream")
        with self.lock:
            healed = self._blocked - set(blocked)
            self._blocked = set(blocked)
            self._delay = delay
        for pair in healed:
            a, b = sorted(pair)
            self.proxies[a].reset(lambda src, b=b: src == b)
            self.proxies[b].reset(lambda src, a=a: src == a)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        for proxy in self.proxies.values():
            proxy.close()
