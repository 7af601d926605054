"""A delay line for kernels without ``netem``: frames leave a node's ``eth0`` late.

In node namespace N, a ``tc`` filter on ``eth0`` egress redirects the frames
for the other nodes (``mirred``) to a tap device ``dly0``; a thread of the
runner reads them from the tap, holds each for the delay, and sends it out of
``eth0`` through a packet socket with PACKET_QDISC_BYPASS, so that it skips
the egress filters (no loop) and reaches the bridge as it was. Frames keep
their order (a packet's due time never precedes the one before it), so TCP
sees latency, not reordering. Closing the tap's descriptor removes the device.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time

from raftcoord.chaos.netns import ThreadNetns

log = logging.getLogger(__name__)

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_SOL_PACKET = 263
_PACKET_QDISC_BYPASS = 20
#: Frames held at once before new ones are dropped (a bounded queue, as a real link's).
MAX_HELD = 10000
TAP = "dly0"


class DelayLine:
    """Holds the frames redirected to ``dly0`` in namespace ``ns`` for ``delay`` s, then sends them on."""

    def __init__(self, ns: str, delay: float) -> None:
        self.ns = ns
        self.delay = delay
        self._stop = threading.Event()
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._ready = threading.Condition()
        self._tap = -1
        self._out: socket.socket | None = None
        opened = threading.Event()
        failure: list[BaseException] = []

        def open_in_namespace() -> None:
            # A thread of its own: setns moves only it, and the sockets it makes stay in the namespace.
            where = ThreadNetns(ns)
            try:
                where.enter()
                try:
                    self._tap = os.open("/dev/net/tun", os.O_RDWR)
                    fcntl.ioctl(self._tap, _TUNSETIFF, struct.pack("16sH22x", TAP.encode(), _IFF_TAP | _IFF_NO_PI))
                    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                    out.setsockopt(_SOL_PACKET, _PACKET_QDISC_BYPASS, 1)
                    out.bind(("eth0", 0))
                    self._out = out
                finally:
                    where.leave()
            except BaseException as exc:  # noqa: BLE001 - handed to the constructor's thread
                failure.append(exc)
            finally:
                opened.set()

        t = threading.Thread(target=open_in_namespace, daemon=True)
        t.start()
        opened.wait(10)
        t.join(5)
        if failure or self._out is None:
            self.close()
            raise OSError(f"delay line in {ns}: {failure[0] if failure else 'did not open'}")
        self._threads = [threading.Thread(target=self._read, name=f"delay-read-{ns}", daemon=True),
                         threading.Thread(target=self._send, name=f"delay-send-{ns}", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        last_due = 0.0
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._tap], [], [], 0.2)
                if not ready:
                    continue
                frame = os.read(self._tap, 65536)
            except OSError:
                return
            due = max(time.monotonic() + self.delay, last_due)
            last_due = due
            with self._ready:
                if len(self._queue) < MAX_HELD:
                    self._queue.append((due, frame))
                    self._ready.notify()

    def _send(self) -> None:
        while not self._stop.is_set():
            with self._ready:
                while not self._queue and not self._stop.is_set():
                    self._ready.wait(0.2)
                if self._stop.is_set():
                    return
                due, frame = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._ready.wait(min(wait, 0.2))  # the link's latency, not a wait for an outcome
                    continue
                self._queue.popleft()
            try:
                assert self._out is not None
                self._out.send(frame)
            except OSError:
                pass  # a frame the link could not carry is lost, as on a real one

    def close(self) -> None:
        """Stop the threads and close the tap (the device goes with its descriptor)."""
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        for thread in getattr(self, "_threads", []):
            thread.join(timeout=2)
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._tap >= 0:
            os.close(self._tap)
            self._tap = -1
