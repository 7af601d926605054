"""Serving the client endpoint: connection limits aiohttp does not give by itself.

:func:`serve` listens for one application with the limits of the design's
availability rules: a connection that is slow to send its request head is
closed, at most so many connections are open at once, and whatever a client
does wrong at the HTTP level (malformed heads, bodies that do not decode,
resets) is logged as a throttled line, never as a traceback. The routes and
their refusals are :mod:`raftcoord.endpoint`'s.

The endpoint's blocking calls (a proposal waits for a commit, a
linearizable read for a barrier) run on a :class:`WorkerPool`, which costs
the event loop less per call than ``run_in_executor``; concurrent reads of
single keys are gathered by a :class:`Batcher` into one call on the pool
(one read barrier, one turn of the replica's state lock for the lot).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, TypeVar

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

__all__ = [
    "HEADER_TIMEOUT",
    "LINGER_SECONDS",
    "MAX_BATCH",
    "MAX_CONNECTIONS",
    "REFUSAL_LOG_BURST",
    "Batcher",
    "Throttle",
    "WorkerPool",
    "one_line",
    "serve",
]

log = logging.getLogger("raftcoord.endpoint")

#: Seconds a connection may take to send a request's head; also the idle keep-alive time.
HEADER_TIMEOUT: Final = 10.0
#: Client connections open at once (at most a quarter of the file-handle
#: limit, so that the replica keeps handles for its peers and files).
MAX_CONNECTIONS: Final = 1024
#: Seconds an answered request's unread body is drained before the connection closes.
LINGER_SECONDS: Final = 2.0
#: Refused requests logged per minute, at most; the rest are counted.
REFUSAL_LOG_BURST: Final = 20
#: Items one :class:`Batcher` call takes at most (the rest go in the next call).
MAX_BATCH: Final = 256
#: Longest wait, when the server stops, for requests already taken to finish arriving.
DRAIN_SECONDS: Final = 1.0

T = TypeVar("T")
R = TypeVar("R")


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int | None = None,
) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` with the endpoint's connection limits.

    A connection that has not sent a whole request head ``header_timeout``
    seconds after it opened (or after its last answer) is closed: aiohttp's
    keep-alive timer closes a connection only while it waits for a head,
    which is exactly a header timeout. Beyond ``max_connections`` open
    connections (default: :data:`MAX_CONNECTIONS`; never more than a
    quarter of the process's file-handle limit), new ones are closed at
    once. Malformed HTTP is logged through the refusal throttle, without a
    traceback. Returns the runner; ``await runner.cleanup()`` stops serving.
    Raises OSError when the address cannot be listened on.
    """
    runner = _DrainingRunner(
        app,
        access_log=None,
        keepalive_timeout=header_timeout,
        lingering_time=min(LINGER_SECONDS, header_timeout),
        logger=_ServerLog(),  # type: ignore[arg-type]
    )
    await runner.setup()
    max_connections = _max_connections(max_connections)
    try:
        await _LimitedSite(runner, host, port, max_connections=max_connections).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def _max_connections(wanted: int | None) -> int:
    """``wanted`` (default :data:`MAX_CONNECTIONS`), but at most a quarter of the open-file limit."""
    wanted = MAX_CONNECTIONS if wanted is None else wanted
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return wanted
    return max(1, min(wanted, soft // 4))


class _DrainingRunner(web.AppRunner):
    """An AppRunner whose cleanup lets the requests it already took finish arriving (issue 10).

    aiohttp's cleanup stops reading every connection at once (``pre_shutdown``),
    so a request whose head came in just before and was answered ``100
    Continue`` (the client's two-step send) never gets its body: its handler
    waits, the node does not exit, and the client waits for it until it gives
    up on this node (4 s), although the other nodes could take the write: each
    leader's stop in a rolling restart stalled writes that long. So: stop
    listening, wait (at most :data:`DRAIN_SECONDS`) until no connection is
    still receiving a request, then clean up as aiohttp does.
    """

    async def cleanup(self) -> None:
        for site in list(self.sites):
            await site.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        # Two quiet checks in a row: a request just taken off a connection's
        # queue is in nobody's hands until its task runs.
        quiet = 0
        while quiet < 2 and loop.time() < deadline:
            server = self.server
            busy = server is not None and any(_receiving(conn) for conn in server.connections)
            quiet = 0 if busy else quiet + 1
            await asyncio.sleep(0.01)
        await super().cleanup()


def _receiving(conn: Any) -> bool:
    """True while a connection is still receiving a request: its head, or its body.

    Reads aiohttp's private state (3.14); an aiohttp without it gets False,
    and so aiohttp's own cleanup, as before.
    """
    try:
        if conn._request_count == 0 or conn._messages:  # no head yet, or heads not yet handled
            return True
        request = conn._current_request
        return request is not None and not request.content.is_eof()
    except Exception:  # noqa: BLE001
        return False


class _LimitedSite(web.TCPSite):
    """A TCP site that closes connections beyond ``max_connections`` as they come."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, max_connections: int) -> None:
        super().__init__(runner, host, port)
        self._max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= self._max_connections:
                _REFUSALS.note("closed a client connection: %d are open already", len(server.connections))
                return _Refuse()
            return server()

        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


class _Refuse(asyncio.Protocol):
    """Closes the connection it is given."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Throttle:
    """At most ``burst`` log lines per ``window`` seconds; the rest are counted."""

    def __init__(self, burst: int = REFUSAL_LOG_BURST, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self.started = clock()
        self.logged = 0
        self.suppressed = 0

    def allow(self) -> bool:
        """True if one more line may be logged now."""
        now = self.clock()
        if now - self.started >= self.window:
            if self.suppressed:
                log.info("%d more refused requests were not logged", self.suppressed)
            self.started, self.logged, self.suppressed = now, 0, 0
        if self.logged >= self.burst:
            self.suppressed += 1
            return False
        self.logged += 1
        return True

    def note(self, message: str, *args: Any) -> None:
        """Log ``message`` at INFO unless the throttle is spent."""
        if self.allow():
            log.info(message, *args)


#: Throttles what aiohttp reports about connections (malformed HTTP, resets).
_REFUSALS = Throttle()


class _ServerLog:
    """The logger aiohttp's request handler writes to.

    aiohttp logs malformed requests (a control byte in a header, a bad
    method) and unexpected handler failures with ``logger.exception``. A
    client can cause the former at will, so those become one throttled INFO
    line without a traceback; anything else keeps its traceback.
    """

    def __init__(self) -> None:
        self._log = logging.getLogger("aiohttp.server")

    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, RequestPayloadError):
            # A body that does not decode, met again while draining it after
            # the answer (which the refusal log already reported).
            self._log.debug("%s: %s", msg % args if args else msg, one_line(exc))
            return
        if isinstance(exc, (http_exceptions.HttpProcessingError, ConnectionError, asyncio.TimeoutError)):
            _REFUSALS.note("refused a malformed or broken request: %s", one_line(exc))
            return
        self._log.error(msg, *args, exc_info=exc_info, **kw)

    def debug(self, *args: Any, **kw: Any) -> None:
        self._log.debug(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


def one_line(exc: BaseException) -> str:
    """``exc`` as one short line of text, for logs and error messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


class WorkerPool:
    """Threads that run blocking calls for an event loop: ``await pool.run(fn)``.

    What ``loop.run_in_executor`` does, at less cost to the event loop per
    call: no concurrent future chained to an asyncio one, no executor lock,
    and outcomes handed back in bursts: when many calls end at once (a batch
    of writes committed together), the first wakes the event loop and the
    others join it, rather than one wake-up (a write to the loop's
    self-pipe, a turn of the loop) each. Threads start as calls need them, up
    to ``size``; beyond that calls wait in the queue. Each call takes a
    thread for as long as it blocks (a proposal until it commits), so
    ``size`` bounds the calls in flight.
    """

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], _Outbox, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self._outbox: _Outbox | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on a worker thread and return (or raise) what it did."""
        loop = asyncio.get_running_loop()
        outbox = self._outbox
        if outbox is None or outbox.loop is not loop:
            outbox = self._outbox = _Outbox(loop)
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            if self._idle:
                self._idle -= 1  # taken by this call: the next one starts a thread if none is left
            elif len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put((fn, outbox, fut))
        return await fut

    def shutdown(self) -> None:
        """Stop the threads once the calls queued so far are done (returns at once)."""
        with self._lock:
            self._closed = True
            n = len(self._threads)
        for _ in range(n):
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, outbox, fut = item
            if not fut.cancelled():  # a plain read of the flag: a late cancel only wastes the call
                try:
                    result = fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                    outbox.put(fut, False, exc)
                else:
                    outbox.put(fut, True, result)
            del item, fn, fut  # drop references before waiting again
            with self._lock:
                self._idle += 1


class _Outbox:
    """Outcomes on their way from worker threads to one event loop, delivered in bursts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._scheduled = False

    def put(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """From a worker: deliver ``value`` (a result, or an exception when not ``ok``) to ``fut``."""
        with self._lock:
            self._items.append((fut, ok, value))
            if self._scheduled:
                return  # a delivery is already on its way and will take this one too
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for fut, ok, value in items:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            elif isinstance(value, StopIteration):  # a future refuses it (TypeError), which would stop the rest
                fut.set_exception(RuntimeError(f"the call raised StopIteration: {value!r}"))
            else:
                fut.set_exception(value)


class Batcher(Generic[T, R]):
    """Gathers items that arrive while a call is in flight into the next call.

    ``call(items)`` is blocking, runs on ``pool`` and returns one answer per
    item, in order. Items arriving while no call is in flight go at once (a
    lone client waits for nothing); those arriving meanwhile wait for that
    call to end and then go together, at most ``max_batch`` per call, so a
    burst of N concurrent items costs about two calls, not N. A call that
    raises raises the same error to every item of its batch. One batch runs
    at a time, so each item's call starts after the item arrived (what a
    linearizable read needs of its barrier).
    """

    def __init__(self, pool: WorkerPool, call: Callable[[list[T]], Sequence[R]], *, max_batch: int = MAX_BATCH) -> None:
        self.pool = pool
        self.call = call
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Items waiting for the next call (not those of the call in flight)."""
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """The answer for ``item``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, fut))
        if self._task is None:
            self._task = loop.create_task(self._drain())  # held here: the loop keeps only a weak reference
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = [(item, fut) for item, fut in self._pending[: self.max_batch] if not fut.done()]
                del self._pending[: self.max_batch]
                if batch:
                    await self._one(batch)
        finally:
            self._task = None
            for _, fut in self._pending:  # left only when cancelled: nobody is left to serve them
                fut.cancel()
            self._pending.clear()

    async def _one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            answers = await self.pool.run(lambda: self.call(items))
            if len(answers) != len(batch):
                raise RuntimeError(f"a batched call answered {len(answers)} of {len(batch)} items")
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - each waiter gets it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), answer in zip(batch, answers):
            if not fut.done():
                fut.set_result(answer)
