"""Serving the client endpoint: connection limits aiohttp does not give by itself.

:func:`serve` listens for one application with the limits of the design's
availability rules: a connection that is slow to send its request head is
closed, at most so many connections are open at once, and whatever a client
does wrong at the HTTP level (malformed heads, bodies that do not decode,
resets) is logged as a throttled line, never as a traceback. The routes and
their refusals are :mod:`raftcoord.endpoint`'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

__all__ = ["HEADER_TIMEOUT", "LINGER_SECONDS", "MAX_CONNECTIONS", "REFUSAL_LOG_BURST", "Throttle", "one_line", "serve"]

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
    runner = web.AppRunner(
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
