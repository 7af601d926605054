"""The client endpoint's streams: ``POST /v3/watch`` and the messages follow stream.

Theory of operation
-------------------
A stream is one HTTP response that stays open: chunked, one JSON object per
chunk, each ending in a newline (etcd3gw, like grpc-gateway clients, parses
each chunk it receives as one JSON document).

* ``POST /v3/watch`` reads a stream of ``WatchRequest`` objects from the
  request body (create, cancel, progress), as etcd's JSON gateway does, and
  answers with ``{"result": WatchResponse}`` lines: ``created`` first, then
  the events of each revision (one line per revision, so a revision is never
  split), progress notifications, ``canceled`` answers, and
  ``compact_revision`` (with ``canceled``) for a start revision older than the
  kept history. A malformed first request is an ordinary 4xx answer; a
  malformed later one ends the stream with grpc-gateway's ``{"error": ...}``.
* ``GET /raftcoord/v1/messages?follow=1&since=N`` answers every message with
  a clock above N, then every new one, one message per line (the node's own
  included); a ``since`` below what is kept is a 410 before the stream starts.

Each watch (observer) is the coordinator's: its callback runs on a thread of
its own and hands finished lines (encoded there, not on the event loop) to
the stream's :class:`Outbox`. The outbox is bounded: when a client stops
reading, the writer stops draining it, it fills, and the feed threads wait,
which holds back that client's watches and nothing else (the coordinator's
feeds pull from the store, so nothing piles up elsewhere). Control lines
(created, canceled, progress answers) bypass the bound; the request reader
stops reading while the outbox is over it, so they are bounded too.

A stream ends, and its watches are closed, when the client goes away (a
failed write, or a closed transport noticed within :data:`TICK` seconds),
when the server shuts down, when the coordinator closes a watch under it,
or, for the follow stream, when its observer fails. A stream costs a
connection of the endpoint's connection limit and one thread per watch, so
watches are bounded per stream (:data:`MAX_WATCHES_PER_STREAM`) and per node
(:data:`MAX_WATCHES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import web

from raftcoord import etcd_json
from raftcoord.coordinator import Coordinator
from raftcoord.errors import (
    CompactedError,
    InvalidInputError,
    LimitExceededError,
    RaftcoordError,
    RequestTooLargeError,
)
from raftcoord.httpserve import Throttle, one_line

__all__ = [
    "MAX_WATCHES",
    "MAX_WATCHES_PER_STREAM",
    "OUTBOX_BYTES",
    "OUTBOX_LINES",
    "PROGRESS_INTERVAL",
    "STREAMS",
    "TICK",
    "Outbox",
    "Streams",
]

log = logging.getLogger("raftcoord.endpoint")

#: Watches one watch stream may hold at once.
MAX_WATCHES_PER_STREAM: Final = 64
#: Watches and message streams one node serves at once (each is a thread).
MAX_WATCHES: Final = 1024
#: Lines buffered per stream before the feed threads wait for the client.
OUTBOX_LINES: Final = 256
#: Bytes buffered per stream before the feed threads wait (one line is always let in).
OUTBOX_BYTES: Final = 4 * 1024 * 1024
#: Default seconds without events before a watch with ``progress_notify`` gets a progress notification.
PROGRESS_INTERVAL: Final = 10.0
#: Seconds between a quiet stream's checks that its client is still there.
TICK: Final = 1.0
#: Seconds between the coordinator's progress notices used to track how far a watch has got.
_TRACK_INTERVAL: Final = 1.0
#: Seconds a watch stream's header term is reused before the status is asked again.
_TERM_TTL: Final = 1.0


class _Endpoint(Protocol):
    """What the streams need of :class:`raftcoord.endpoint._Endpoint`."""

    coord: Coordinator
    body_timeout: float
    max_request_bytes: int
    cluster_id: int
    member_id: int
    last_term: int

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def header(self, revision: int) -> dict[str, Any]: ...

    def parse_json(self, raw: bytes) -> Any: ...

    def body_unread(self, request: web.Request, unread: bool) -> None: ...


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


class Outbox:
    """Lines from feed threads to one stream's writer on the event loop.

    :meth:`put` (from a feed thread) waits while the outbox holds
    ``max_lines`` lines or ``max_bytes`` bytes; :meth:`put_control` never
    waits. :meth:`take` (on the loop) empties it; :attr:`ready` is set when
    there is something to take.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_lines: int = OUTBOX_LINES,
                 max_bytes: int = OUTBOX_BYTES) -> None:
        self._loop = loop
        self._cond = threading.Condition(threading.Lock())
        self._lines: deque[bytes] = deque()
        self._bytes = 0
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.closed = False
        self.ready = asyncio.Event()

    @property
    def full(self) -> bool:
        """True while the outbox is at or over its bound."""
        return len(self._lines) >= self.max_lines or self._bytes >= self.max_bytes

    def put(self, line: bytes, alive: Callable[[], bool] = lambda: True) -> bool:
        """Add ``line``, waiting while full; False (and dropped) once closed or ``alive()`` is false."""
        with self._cond:
            while self._lines and self.full and not self.closed and alive():
                self._cond.wait(0.5)
            if self.closed or not alive():
                return False
            self._add(line)
        return True

    def put_control(self, line: bytes) -> None:
        """Add ``line`` at once, whatever the bound (dropped once closed)."""
        with self._cond:
            if not self.closed:
                self._add(line)

    def _add(self, line: bytes) -> None:
        self._lines.append(line)
        self._bytes += len(line)
        try:
            self._loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is closed: nobody will read this stream again
            self.closed = True

    def take(self) -> list[bytes]:
        """Every line waiting, in order (on the event loop)."""
        self.ready.clear()
        with self._cond:
            lines = list(self._lines)
            self._lines.clear()
            self._bytes = 0
            self._cond.notify_all()
        return lines

    def wake(self) -> None:
        """Wake feed threads waiting in :meth:`put` so they look at their ``alive`` again."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Drop what is waiting and refuse more; waiting feed threads return."""
        with self._cond:
            self.closed = True
            self._lines.clear()
            self._bytes = 0
            self._cond.notify_all()


class _Splitter:
    """Cuts a byte stream into top-level JSON objects without parsing them twice.

    Tracks only string and nesting state, so each byte is looked at once
    however slowly the objects arrive; one object may not pass ``max_bytes``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._start = -1
        self._scanned = 0
        #: Set once the stream went wrong; raised by :meth:`feed` from then on.
        self.error: InvalidInputError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """The objects completed by ``data``, in order."""
        if self.error is not None:
            raise self.error
        self._buf += data
        out: list[bytes] = []
        buf, i = self._buf, self._scanned
        while i < len(buf):
            c = buf[i]
            if self._depth == 0:
                if c in b" \t\r\n":
                    i += 1
                    continue
                if c != 0x7B:  # "{": the objects before it still count, the error comes after them
                    self.error = InvalidInputError("body: a watch stream is a sequence of JSON objects", field="body")
                    break
                self._start, self._depth = i, 1
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:  # quote
                    self._in_string = False
            elif c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    del buf[:i + 1]
                    self._start, i = -1, 0
                    continue
            i += 1
        self._scanned = i
        if len(buf) > self.max_bytes:
            raise RequestTooLargeError(
                f"body: a watch request is larger than {self.max_bytes} bytes (max_request_bytes)",
                field="max_request_bytes",
            )
        return out

    @property
    def pending(self) -> bool:
        """True if an object was started and not finished."""
        return self._depth > 0


class _Requests:
    """The JSON objects of a request body, one at a time."""

    def __init__(self, request: web.Request, endpoint: _Endpoint) -> None:
        self.content = request.content
        self.endpoint = endpoint
        self.splitter = _Splitter(endpoint.max_request_bytes)
        self.ready: deque[bytes] = deque()

    async def next(self, timeout: float | None) -> Any | None:
        """The next object, or None at the end of the body; InvalidInputError if malformed."""
        async with asyncio.timeout(timeout):
            while not self.ready:
                if self.splitter.error is not None:
                    raise self.splitter.error
                try:
                    chunk = await self.content.readany()
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    if self.splitter.pending:
                        raise InvalidInputError("body: the request body ended inside a JSON object", field="body")
                    return None
                self.ready.extend(self.splitter.feed(chunk))
        return self.endpoint.parse_json(self.ready.popleft())


class _Stream:
    """One open response and the writer that drains its outbox into it."""

    def __init__(self, streams: Streams, request: web.Request, response: web.StreamResponse) -> None:
        self.streams = streams
        self.request = request
        self.response = response
        self.outbox = Outbox(asyncio.get_running_loop())
        self.ending = asyncio.Event()
        #: Why the stream ended, for the log.
        self.reason = ""

    def end(self, reason: str) -> None:
        """End the stream (on the loop); the writer stops after what it is writing."""
        if not self.ending.is_set():
            self.reason = reason
            self.ending.set()
            self.outbox.ready.set()

    def gone(self) -> bool:
        """True once the client's connection is closing."""
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def check(self) -> None:
        """Called every tick and after each write: end the stream if it should end."""

    async def pump(self) -> None:
        """Write lines until the stream ends."""
        while not self.ending.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self.outbox.ready.wait()
            for line in self.outbox.take():
                try:
                    await self.response.write(line)
                except (ConnectionError, RuntimeError) as exc:  # RuntimeError: aiohttp's closed payload writer
                    self.end(f"the client went away ({one_line(exc)})")
                    return
                if self.ending.is_set():
                    return
            if self.gone():
                self.end("the client went away")
            self.check()

    async def finish(self) -> None:
        """Close the outbox (waiting feed threads return); subclasses close their feeds."""
        self.outbox.close()


class _StreamWatch:
    """One watch of a watch stream."""

    def __init__(self, watch_id: int, create: etcd_json.WatchCreate) -> None:
        self.watch_id = watch_id
        self.create = create
        self.watch: Any = None
        #: The revision every event up to which has been put in the outbox.
        self.delivered = 0
        #: When the last line for this watch went to the outbox (for progress_notify).
        self.last_line = time.monotonic()
        self.cancelled = False
        #: Set from the feed thread when the coordinator ended the watch (compaction).
        self.failed = False
        #: True once its place in the node's MAX_WATCHES was given back.
        self.released = False

    def alive(self) -> bool:
        watch = self.watch
        return not self.cancelled and not self.failed and not (watch is not None and watch.closed)


class _WatchStream(_Stream):
    """``POST /v3/watch``: many watches over one response."""

    def __init__(self, streams: Streams, request: web.Request, response: web.StreamResponse,
                 requests: _Requests) -> None:
        super().__init__(streams, request, response)
        self.requests = requests
        self.watches: dict[int, _StreamWatch] = {}
        self.next_id = 0
        self._end_when_empty = False
        self._term_at = 0.0
        self._term = streams.endpoint.last_term

    def header(self, revision: int) -> dict[str, Any]:
        """A response header; the term is refreshed at most every :data:`_TERM_TTL` seconds."""
        ep = self.streams.endpoint
        now = time.monotonic()
        if now - self._term_at >= _TERM_TTL:
            self._term_at = now
            self._term = int(ep.header(revision).get("raft_term", self._term) or 0)
        return etcd_json.header(cluster_id=ep.cluster_id, member_id=ep.member_id, revision=revision,
                                raft_term=self._term)

    def revision(self) -> int:
        """This replica's revision (blocking)."""
        return self.streams.endpoint.coord.revision(consistency="serializable")

    def control(self, watch_id: int, revision: int, **fields: Any) -> None:
        """Queue a response that answers a request (past the outbox's bound)."""
        self.outbox.put_control(_line(etcd_json.watch_response(self.header(revision), watch_id, **fields)))

    async def read_requests(self, first: Any) -> None:
        """Handle ``first`` and every later request of the body; a bad one ends the stream."""
        request: Any = first
        try:
            while True:
                await self.handle(etcd_json.parse_watch_request(request))
                while self.outbox.full and not self.ending.is_set():
                    await asyncio.sleep(0.05)  # the client is not reading: read no more requests
                request = await self.requests.next(None)
                if request is None:
                    return  # the body ended; the watches go on (etcd3gw sends one request and stops)
        except RaftcoordError as exc:
            self.outbox.put_control(_line(etcd_json.stream_error(exc.http_status, exc.message)))
            self.streams.refused(self.request, exc.message)
            await asyncio.sleep(0)
            self.end_after_flush()
        except Exception:  # a bug: end this stream, keep serving the others
            log.exception("bug: the watch stream's request reader failed")
            self.end("internal error")

    def end_after_flush(self) -> None:
        """End once the lines waiting now are written."""
        self._end_when_empty = True
        self.outbox.ready.set()

    def check(self) -> None:
        """Drop watches the coordinator ended; end the stream if it should end."""
        if self._end_when_empty and not self.outbox._lines:
            self.end("a malformed watch request")
            return
        for sw in list(self.watches.values()):
            if sw.failed:
                del self.watches[sw.watch_id]
            elif sw.watch is not None and sw.watch.closed and sw.watch.error is None and not sw.cancelled:
                # The coordinator closed it under us (the node is stopping): the
                # client should resume elsewhere, so the stream ends.
                self.end("the node closed a watch")
                return

    async def handle(self, req: etcd_json.WatchCreate | etcd_json.WatchCancel | etcd_json.WatchProgress) -> None:
        """Answer one request of the stream."""
        ep = self.streams.endpoint
        if isinstance(req, etcd_json.WatchProgress):
            live = [sw.delivered for sw in self.watches.values() if sw.alive()]
            revision = min(live) if live else await ep.run(self.revision)
            # The lowest revision every watch of the stream has been brought to:
            # no event at or below it will follow on this stream.
            self.control(-1, revision)
            return
        if isinstance(req, etcd_json.WatchCancel):
            sw = self.watches.pop(req.watch_id, None)
            if sw is None:
                return  # as etcd: cancelling an unknown watch answers nothing
            sw.cancelled = True
            self.outbox.wake()
            if sw.watch is not None:
                sw.watch.close()
            self.streams.release_watch(sw)
            self.control(req.watch_id, await ep.run(self.revision), canceled=True)
            return
        await self.create(req)

    async def create(self, req: etcd_json.WatchCreate) -> None:
        """Start a watch, or answer created+canceled with the reason it cannot be."""
        ep = self.streams.endpoint
        watch_id = req.watch_id
        refusal = ""
        if watch_id and watch_id in self.watches:
            refusal = f"watch_id {watch_id} is in use on this stream"
        elif req.range_end not in (b"", b"\0") and req.key >= req.range_end:
            refusal = "the watch range is empty (key is not below range_end)"
        elif len(self.watches) >= MAX_WATCHES_PER_STREAM:
            refusal = f"a watch stream holds at most {MAX_WATCHES_PER_STREAM} watches"
        elif not self.streams.reserve(1):
            refusal = f"this node serves at most {MAX_WATCHES} watches at once"
        if refusal:
            revision = await ep.run(self.revision)
            self.control(-1, revision, created=True, canceled=True, cancel_reason=refusal)
            self.streams.refused(self.request, refusal)
            return
        if not watch_id:
            while self.next_id in self.watches:
                self.next_id += 1
            watch_id = self.next_id
            self.next_id += 1
        sw = _StreamWatch(watch_id, req)
        self.watches[watch_id] = sw
        try:
            await ep.run(self._start, sw)
        except RaftcoordError as exc:
            self.watches.pop(watch_id, None)
            self.streams.release_watch(sw)
            self.control(watch_id, 0, canceled=True, cancel_reason=exc.message)

    def _start(self, sw: _StreamWatch) -> None:
        """Answer ``created``, then start the coordinator's watch (on the thread pool).

        The created line goes to the outbox before the watch exists, so it
        precedes every event of the watch.
        """
        coord = self.streams.endpoint.coord
        req = sw.create
        revision = coord.revision(consistency="serializable")
        start = req.start_revision or revision + 1
        sw.delivered = start - 1
        self.control(sw.watch_id, revision, created=True)
        sw.watch = coord.watch(
            req.key,
            req.range_end or None,
            start_revision=start,
            prev_kv=req.prev_kv,
            filters=req.filters,
            progress_interval=min(_TRACK_INTERVAL, self.streams.progress_interval),
            callback=lambda resp: self._deliver(sw, resp),
            on_error=lambda exc: self._failed(sw, exc),
        )
        if sw.cancelled:  # the stream ended while the watch was being made: it must not outlive it
            sw.watch.close()

    def _deliver(self, sw: _StreamWatch, resp: Any) -> None:
        """The coordinator's callback (on the watch's thread)."""
        if resp.events:
            line = _line(etcd_json.watch_response(self.header(resp.revision), sw.watch_id, events=resp.events))
        elif sw.create.progress_notify and time.monotonic() - sw.last_line >= self.streams.progress_interval:
            line = _line(etcd_json.watch_response(self.header(resp.revision), sw.watch_id))
        else:
            sw.delivered = max(sw.delivered, resp.revision)
            return
        if self.outbox.put(line, sw.alive):
            sw.last_line = time.monotonic()
            sw.delivered = max(sw.delivered, resp.revision)

    def _failed(self, sw: _StreamWatch, exc: BaseException) -> None:
        """The coordinator ended the watch (on its thread): say so and cancel it."""
        fields: dict[str, Any] = {"canceled": True}
        if isinstance(exc, CompactedError) and exc.compact_revision:
            fields["compact_revision"] = exc.compact_revision
        else:
            fields["cancel_reason"] = exc.message if isinstance(exc, RaftcoordError) else one_line(exc)
        if not sw.cancelled:
            self.control(sw.watch_id, max(sw.delivered, 0), **fields)
        self.streams.release_watch(sw)
        sw.failed = True

    async def finish(self) -> None:
        """Close every watch of the stream and give back their places."""
        await super().finish()
        for sw in self.watches.values():
            sw.cancelled = True
            if sw.watch is not None:
                sw.watch.close()
            self.streams.release_watch(sw)
        self.watches.clear()


class _FollowStream(_Stream):
    """``GET /raftcoord/v1/messages?follow=1``: one message per line."""

    observer: Any = None
    failed = False

    def _deliver(self, message: Any) -> None:
        from raftcoord.endpoint import to_json

        self.outbox.put(_line(to_json(message.to_map())), lambda: not self.failed)

    def _failed(self, exc: BaseException) -> None:
        error = exc.to_dict() if isinstance(exc, RaftcoordError) else {"code": "internal", "message": one_line(exc)}
        self.outbox.put_control(_line({"error": error}))
        self.failed = True

    def check(self) -> None:
        """End once an observer's error line is written, or when the node closed the observer."""
        if self.failed and not self.outbox._lines:
            self.end("the observer stopped")
        elif (self.observer is not None and self.observer.closed and self.observer.error is None
              and not self.failed):
            self.end("the node closed the observer")

    async def finish(self) -> None:
        """Close the observer and give back its place."""
        await super().finish()
        if self.observer is not None:
            self.observer.close()
        self.streams.release(1)


class Streams:
    """The streaming routes of one endpoint, and every stream open on it.

    ``app[STREAMS]`` is the application's (for status and tests).
    """

    def __init__(self, endpoint: _Endpoint, *, progress_interval: float = PROGRESS_INTERVAL) -> None:
        self.endpoint = endpoint
        self.progress_interval = progress_interval
        self.open: set[_Stream] = set()
        self._lock = threading.Lock()
        self._watches = 0
        self._log = Throttle()

    def reserve(self, n: int) -> bool:
        """Take ``n`` of the node's :data:`MAX_WATCHES`; False if they are not free."""
        with self._lock:
            if self._watches + n > MAX_WATCHES:
                return False
            self._watches += n
            return True

    def release(self, n: int) -> None:
        """Give back ``n`` watches."""
        with self._lock:
            self._watches = max(0, self._watches - n)

    @property
    def watches(self) -> int:
        """Watches and message streams open now."""
        return self._watches

    def release_watch(self, sw: _StreamWatch) -> None:
        """Give back the place of one stream watch, once however often asked."""
        with self._lock:
            if sw.released:
                return
            sw.released = True
            self._watches = max(0, self._watches - 1)

    def refused(self, request: web.Request, reason: str) -> None:
        """Log a refusal inside a stream (throttled)."""
        self._log.note("refused a request on the stream %s %s from %s: %s", request.method, request.path,
                       request.remote, reason)

    async def shutdown(self, app: web.Application) -> None:
        """End every open stream (the server is stopping)."""
        for stream in list(self.open):
            stream.end("the server is stopping")

    async def _serve(self, stream: _Stream, work: Any = None) -> web.StreamResponse:
        self.open.add(stream)
        task = asyncio.create_task(work) if work is not None else None
        try:
            await stream.pump()
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            self.open.discard(stream)
            await stream.finish()
            log.debug("stream %s %s ended: %s", stream.request.method, stream.request.path, stream.reason)
        return stream.response

    @staticmethod
    async def _open(request: web.Request, content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        return response

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """POST /v3/watch (see the module docstring)."""
        ep = self.endpoint
        requests = _Requests(request, ep)
        ep.body_unread(request, True)  # an error answer before the stream starts closes the connection
        try:
            first = await requests.next(ep.body_timeout)
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"body: no watch request arrived within {ep.body_timeout:g} seconds") from None
        if first is None:
            raise InvalidInputError("body: a WatchRequest (create_request) is required", field="body")
        etcd_json.parse_watch_request(first)  # a bad first request is a plain 400
        ep.body_unread(request, False)
        stream = _WatchStream(self, request, await self._open(request, "application/json"), requests)
        return await self._serve(stream, stream.read_requests(first))

    async def follow(self, request: web.Request, since: int | None, consistency: str) -> web.StreamResponse:
        """GET /raftcoord/v1/messages?follow=1: every message above ``since`` (or from now), then new ones."""
        ep = self.endpoint
        coord = ep.coord

        def start(store: Any) -> int:
            if since is None:
                return int(store.clock)
            if since < store.message_floor:
                oldest = store.oldest_clock
                raise CompactedError(
                    f"messages up to clock {store.message_floor} were purged; the oldest clock kept is "
                    f"{oldest}; cannot resume from {since}",
                    field="since",
                    oldest_clock=oldest,
                )
            return since

        first = await ep.run(lambda: coord.read(start, consistency=consistency))
        if not self.reserve(1):
            raise LimitExceededError(f"this node serves at most {MAX_WATCHES} watches at once", field="watches")
        try:
            response = await self._open(request, "application/x-ndjson")
        except BaseException:
            self.release(1)
            raise
        stream = _FollowStream(self, request, response)
        try:
            stream.observer = await ep.run(lambda: coord.add_observer(
                stream._deliver, since=first, include_own=True, on_error=stream._failed))
        except RaftcoordError as exc:  # purged since the check, or the coordinator closed
            stream._failed(exc)
        except Exception as exc:  # a bug: this stream ends with an error line, the node serves on
            log.exception("bug: starting the observer of a follow stream failed")
            stream._failed(exc)
        return await self._serve(stream)


#: The application key of an endpoint's :class:`Streams`.
STREAMS: Final = web.AppKey("raftcoord_streams", Streams)
