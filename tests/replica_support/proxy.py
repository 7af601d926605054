"""A tiny TCP fault proxy on 127.0.0.1: forwards connections, slowly if asked, or cuts them.

pysyncobj opens one connection per pair of nodes, from the node whose
address sorts higher to the one whose address sorts lower. A node whose
public address sorts lowest therefore only ever accepts connections, all
through its own proxy: cutting that proxy cuts the node off from everyone.
"""

from __future__ import annotations

import socket
import threading
import time


class FaultProxy:
    """Listens on ``listen_port`` and forwards to ``target_port``; :meth:`cut` drops all."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        self._rate: float | None = None
        self._socks: set[socket.socket] = set()
        self._server = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{listen_port}", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Close every forwarded connection and refuse new ones until :meth:`heal`."""
        with self._lock:
            self._cut = True
            socks, self._socks = self._socks, set()
        for s in socks:
            _close(s)

    def heal(self, bytes_per_second: float | None = None) -> None:
        """Forward new connections again, at most ``bytes_per_second`` each way if given."""
        with self._lock:
            self._cut = False
            self._rate = bytes_per_second

    def close(self) -> None:
        """Stop listening and drop everything."""
        with self._lock:
            self._closed = True
        self.cut()
        _close(self._server)
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _close(client)
                    return
                refuse = self._cut
            if refuse:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._cut:
                    _close(client)
                    _close(upstream)
                    continue
                self._socks.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                rate = self._rate
                if rate:
                    time.sleep(len(data) / rate)  # the link's speed, not a wait for an outcome
        except OSError:
            pass
        finally:
            with self._lock:
                self._socks.discard(src)
                self._socks.discard(dst)
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
