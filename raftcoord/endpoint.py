"""The client endpoint: HTTP/JSON over a coordinator, in etcd's v3 shapes.

:func:`make_app` builds an :class:`aiohttp.web.Application` for one node.
The JSON translation of etcd's messages lives in :mod:`raftcoord.etcd_json`;
this module does the HTTP: routes, authentication, error bodies, and
running the coordinator's blocking calls in a thread pool so the event loop
never waits on Raft. Concurrent reads of single keys (``/v3/kv/range``
without ``range_end``, the common case) are gathered into one coordinator
call per consistency (:meth:`Coordinator.get_many`: one read barrier and one
turn of the state lock for the batch); response headers take the Raft term
from the replica's cached status, looked at most every
:data:`TERM_REFRESH` seconds, and the revision from the answer itself.

Routes (etcd's gateway routes take POST with a JSON body)::

    POST /v3/kv/range            RangeRequest       -> RangeResponse
    POST /v3/kv/put              PutRequest         -> PutResponse
    POST /v3/kv/deleterange      DeleteRangeRequest -> DeleteRangeResponse
    POST /v3/kv/txn              TxnRequest         -> TxnResponse
    POST /v3/maintenance/status  {}                 -> StatusResponse
    POST /v3/cluster/member/list {}                 -> MemberListResponse
    POST /v3/watch               WatchRequest...    -> a stream of {"result": WatchResponse} lines
    GET  /version                {"etcdserver", "etcdcluster", "raftcoord"}
    GET  /health                 200 {"health": "true"} | 503 {"health": "false", "reason"}
    GET  /livez, /readyz, /metrics  probes and Prometheus metrics (:mod:`raftcoord.metrics`)
    GET  /raftcoord/v1/status    this node's status, "node", "client_url", "voter", "formats"
    GET  /raftcoord/v1/nodes     {"nodes": [node state + "raft_role", "heard_ago"...], "revision",
                                  "node", "role", "leader_client_url"}
    GET  /raftcoord/v1/messages  ?since=CLOCK&limit=N&consistency=...  (limit: default 1000, max 10000)
                                 -> {"messages", "more", "revision", "clock", "floor"}
                                 ?since=CLOCK&follow=1 -> a stream: one message per line, then new ones
    POST /raftcoord/v1/messages  {"type", "event"?, "payload"?} -> {"message"}
    POST /raftcoord/v1/session   {}                 -> {"client"}
    GET  /raftcoord/v1/digest    {"revision", "applied", "sha256"} of this replica's snapshot
    GET  /raftcoord/v1/members   the member registry; POST one change (:mod:`raftcoord.member_http`)
    GET  /raftcoord/v1/snapshot  a backup file of one revision (:mod:`raftcoord.backup_http`)

The two streams are :mod:`raftcoord.watch_http`'s. Other ``/v3/`` paths
(leases, auth, ...) answer 501. etcd routes
read linearizably unless the request says ``serializable``; raftcoord's GET
routes take ``?consistency=serializable``. raftcoord's own JSON writes
integers as numbers, bytes as base64 text and times as RFC 3339.

Writes at most once: ``POST /raftcoord/v1/session`` registers a client
session with the state machine; a write route (put, deleterange, txn, POST
messages) may then carry ``X-Raftcoord-Request: <client>:<seq>:<lowest
outstanding>``, passed on as the command's request id, so a client can retry
a write on another node without applying it twice. Without the header the
node's own session is used.

Errors: every failure is a JSON body ``{"error", "code", "message"}`` plus
``"field"`` when one field was wrong; ``code`` is the gRPC code (an int)
under ``/v3/`` and ``/version`` (where ``"raftcoord_code"`` carries
raftcoord's code), and raftcoord's error code (a string) elsewhere. A write
whose outcome is unknown (it may have applied) is 504 with code
``unknown_outcome``. With a token configured, every route but ``/health``
and the probes (``/livez``, ``/readyz``, ``/metrics``) needs
``Authorization: Bearer <token>``.

Limits (settings of the cluster file, see ``cluster.example.toml``): request
bodies beyond ``max_request_bytes`` get 413 before they are read in full;
txns beyond ``max_txn_ops`` and answers beyond ``max_response_bytes`` get
400 naming the setting. A connection must deliver a request's head within
:data:`HEADER_TIMEOUT` seconds and its body within :data:`BODY_TIMEOUT`
(408 then), and idle keep-alive connections close after
:data:`HEADER_TIMEOUT`; at most :data:`MAX_CONNECTIONS` are open at once
(:func:`serve` sets these up).

Logging: refused requests, malformed HTTP and clients that go away are
logged at INFO, at most :data:`REFUSAL_LOG_BURST` lines a minute, never with
a traceback; an unexpected exception is a bug: logged with its traceback,
answered 500, and the node keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any, Final, TypeVar

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

from raftcoord import etcd_json
from raftcoord.config import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_TXN_OPS,
    ClusterConfig,
    NodeConfig,
    stable_id,
)
from raftcoord.commands import Member
from raftcoord.coordinator import Coordinator
from raftcoord.errors import (
    AuthError,
    CompactedError,
    InvalidInputError,
    LimitExceededError,
    RaftcoordError,
    RequestTooLargeError,
)
from raftcoord.httpserve import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    REFUSAL_LOG_BURST,
    Batcher,
    Throttle,
    WorkerPool,
    one_line,
    serve,
)
from raftcoord.keys import MAX_CLOCK, MESSAGE_PREFIX, MessageKey, prefix_end
from raftcoord.member_http import add_member_routes
from raftcoord.metrics import PROBE_PATHS, Metrics
from raftcoord.store import KeyValue, Store
from raftcoord.values import Message
from raftcoord.watch_http import PROGRESS_INTERVAL, STREAMS, Streams

__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_JSON_DEPTH",
    "REFUSAL_LOG_BURST",
    "REQUEST_HEADER",
    "RefusalLog",
    "make_app",
    "rfc3339",
    "serve",
    "to_json",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The largest request body accepted without a config (``max_request_bytes``'s default).
MAX_BODY_BYTES: Final = DEFAULT_MAX_REQUEST_BYTES
#: Seconds a request may take to send its body once its head arrived.
BODY_TIMEOUT: Final = 30.0
#: The header that carries a client's own request id on write routes.
REQUEST_HEADER: Final = "X-Raftcoord-Request"
#: The deepest JSON nesting accepted in a request.
MAX_JSON_DEPTH: Final = 64
#: Messages returned by one GET /raftcoord/v1/messages when no limit is given.
DEFAULT_MESSAGE_LIMIT: Final = 1000
MAX_MESSAGE_LIMIT: Final = 10000
#: Threads for the coordinator's blocking calls: each write in flight holds one until it commits.
WORKER_THREADS: Final = 128
#: Seconds a response header may show a Raft term already seen (the replica refreshes its status every 10 ms).
TERM_REFRESH: Final = 0.01
#: Bytes of a single key's value beyond which its answer is encoded on the pool, not on the event loop.
INLINE_VALUE_BYTES: Final = 64 * 1024
#: The most keys a store may hold for GET /raftcoord/v1/digest: the snapshot is
#: encoded under the state lock, which the Raft thread waits on meanwhile.
DIGEST_MAX_KEYS = 100_000

_ETCD_POST_ROUTES: Final = (
    "/v3/kv/range",
    "/v3/kv/put",
    "/v3/kv/deleterange",
    "/v3/kv/txn",
    "/v3/maintenance/status",
    "/v3/cluster/member/list",
    "/v3/watch",
)
_HTTP_CODES: Final = {
    401: "auth",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    501: "unimplemented",
}
_CONSISTENCIES: Final = ("linearizable", "serializable")


def _raftcoord_version() -> str:
    try:
        return dist_version("raftcoord")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def make_app(
    coordinator: Coordinator,
    config: ClusterConfig | None = None,
    node_name: str | None = None,
    *,
    body_timeout: float | None = None,
    watch_progress_interval: float = PROGRESS_INTERVAL,
) -> web.Application:
    """The client endpoint of one node, serving ``coordinator``.

    ``config`` gives the member list, the token, the request timeout and the
    limits; ``node_name`` (default: the coordinator's host) must be one of
    its nodes. A request body must arrive within ``body_timeout`` seconds
    (default: the config's ``client_body_timeout``, else :data:`BODY_TIMEOUT`).
    A watch asking ``progress_notify`` hears of progress after
    ``watch_progress_interval`` seconds without events.
    The application owns a thread pool, shut down on cleanup; the
    coordinator stays the caller's to close. Serve it with :func:`serve`.
    """
    if body_timeout is None:
        body_timeout = config.client_body_timeout if config is not None else BODY_TIMEOUT
    endpoint = _Endpoint(coordinator, config, node_name, body_timeout, watch_progress_interval)
    metrics = Metrics(endpoint)  # its middleware first: it times the answer the client gets, errors included
    app = web.Application(client_max_size=endpoint.max_request_bytes,
                          middlewares=[metrics.middleware, endpoint.middleware])
    for path, handler in (
        ("/v3/kv/range", endpoint.kv_range),
        ("/v3/kv/put", endpoint.kv_put),
        ("/v3/kv/deleterange", endpoint.kv_delete),
        ("/v3/kv/txn", endpoint.kv_txn),
        ("/v3/maintenance/status", endpoint.maintenance_status),
        ("/v3/cluster/member/list", endpoint.member_list),
    ):
        app.router.add_post(path, handler)
    app.router.add_get("/version", endpoint.version)
    app.router.add_get("/health", endpoint.health)
    app.router.add_get("/raftcoord/v1/status", endpoint.node_status)
    app.router.add_get("/raftcoord/v1/nodes", endpoint.nodes)
    app.router.add_get("/raftcoord/v1/messages", endpoint.get_messages)
    app.router.add_post("/raftcoord/v1/messages", endpoint.post_message)
    app.router.add_post("/raftcoord/v1/session", endpoint.session)
    app.router.add_get("/raftcoord/v1/digest", endpoint.digest)
    add_member_routes(app, endpoint)
    app.router.add_get("/metrics", metrics.scrape)
    app.router.add_get("/livez", metrics.livez)
    app.router.add_get("/readyz", metrics.readyz)
    from raftcoord.backup_http import SNAPSHOT_PATH, SnapshotRoute  # noqa: PLC0415 - issue 10 backup (H2)
    app.router.add_get(SNAPSHOT_PATH, SnapshotRoute(endpoint).get)
    app.router.add_post("/v3/watch", endpoint.streams.watch)
    app.router.add_route("*", "/v3/{tail:.*}", endpoint.unimplemented)
    app.on_shutdown.append(endpoint.streams.shutdown)
    app[STREAMS] = endpoint.streams
    app.on_cleanup.append(endpoint.cleanup)
    return app


class _Endpoint:
    """The handlers and their shared state; one per application."""

    def __init__(
        self,
        coordinator: Coordinator,
        config: ClusterConfig | None,
        node_name: str | None,
        body_timeout: float,
        watch_progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.coord = coordinator
        self.config = config
        self.node_name = node_name if node_name is not None else coordinator.host
        self.node: NodeConfig | None = config.node(self.node_name) if config is not None else None
        self.cluster_id = config.cluster_id if config is not None else stable_id(coordinator.cluster or "raftcoord")
        self.member_id = stable_id(self.node_name)
        self.token = config.token if config is not None else None
        self.timeout = config.request_timeout if config is not None else None
        self.body_timeout = body_timeout
        self.max_request_bytes = config.max_request_bytes if config is not None else MAX_BODY_BYTES
        self.max_txn_ops = int(
            config.max_txn_ops if config is not None else getattr(coordinator, "max_txn_ops", DEFAULT_MAX_TXN_OPS)
        )
        self.max_response_bytes = int(
            config.max_response_bytes
            if config is not None
            else getattr(coordinator, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)
        )
        # The last Raft term seen, for response headers (and when status is unavailable).
        self.last_term = 0
        self._term_at = -math.inf  # when last_term was read from the status
        self.version_info = {
            "etcdserver": etcd_json.ETCD_VERSION,
            "etcdcluster": etcd_json.ETCD_VERSION,
            "raftcoord": _raftcoord_version(),
        }
        self.pool = WorkerPool(WORKER_THREADS, "raftcoord-http")
        self.key_reads = {
            level: Batcher(self.pool, functools.partial(self.read_keys, level)) for level in _CONSISTENCIES
        }
        self.refusals = RefusalLog()
        self.streams = Streams(self, progress_interval=watch_progress_interval)

    async def cleanup(self, app: web.Application) -> None:
        """Stop the worker threads (running calls finish on their own)."""
        self.pool.shutdown()

    # ---------------------------------------------------------- plumbing

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking coordinator call on the thread pool."""
        return await self.pool.run(functools.partial(fn, *args) if args else fn)

    async def run_json(self, fn: Callable[[], Any]) -> web.Response:
        """Run ``fn`` on the thread pool and answer its result as JSON.

        The encoding happens on the pool too: an answer of tens of megabytes
        must not hold the event loop.
        """

        def work() -> bytes:
            return json.dumps(fn()).encode("utf-8")

        return web.Response(body=await self.run(work), content_type="application/json")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Authenticate, then turn every failure into a JSON error body."""
        reason = ""
        try:
            self.authenticate(request)
            response: web.StreamResponse = await handler(request)
        except RaftcoordError as exc:
            reason = exc.message
            headers = {"WWW-Authenticate": 'Bearer realm="raftcoord"'} if exc.http_status == 401 else None
            details = {k: v for k, v in exc.to_dict().items() if k not in ("code", "message", "field")}
            response = self.error(request, exc.http_status, exc.message, exc.code, exc.field, headers, details)
            if request.get(_BODY_UNREAD):
                response.force_close()  # the rest of the body is not worth waiting for
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = {
                404: f"no route for {request.method} {request.path}",
                405: f"{request.method} is not allowed on {request.path}",
            }.get(exc.status, exc.text or exc.reason)
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = self.error(request, exc.status, reason, _HTTP_CODES.get(exc.status, "http_error"), None, allow)
            if exc.status == 408:
                response.force_close()
        except Exception:
            log.exception("bug: unhandled exception answering %s %s", request.method, request.path)
            return self.error(request, 500, "internal error (a bug in raftcoord; see the node's log)", "internal", None)
        if response.status >= 400 and request.path not in PROBE_PATHS:
            self.refusals.refused(request, response.status, reason)
        return response

    def authenticate(self, request: web.Request) -> None:
        """Raise AuthError unless the request carries the configured bearer token."""
        if self.token is None or request.path in PROBE_PATHS:
            return
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode("utf-8", "replace"), self.token.encode("utf-8")
        ):
            raise AuthError("missing or wrong bearer token (Authorization: Bearer <token>)", field="authorization")

    def error(
        self,
        request: web.Request,
        status: int,
        message: str,
        code: str,
        field: str | None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> web.Response:
        """The JSON error body, in etcd's shape under /v3/ and /version.

        ``details`` are what the error carries beyond its message (a
        CompactedError's ``oldest_clock`` or ``compact_revision``).
        """
        etcd = request.path.startswith("/v3/") or request.path == "/version"
        body: dict[str, Any] = {
            "error": message,
            "code": etcd_json.grpc_code(status) if etcd else code,
            "message": message,
        }
        if etcd:
            body["raftcoord_code"] = code
        if field is not None:
            body["field"] = field
        for name, value in (details or {}).items():
            body.setdefault(name, value)
        return web.json_response(body, status=status, headers=headers)

    async def body(self, request: web.Request) -> Any:
        """The request's JSON body; an empty body is ``{}``, as the gateway reads it.

        Bounded in size (``max_request_bytes``: 413, before the body is read
        when its length is announced) and in time (``body_timeout``: 408).
        """
        too_large = RequestTooLargeError(
            f"body: the request body is larger than {self.max_request_bytes} bytes (max_request_bytes)",
            field="max_request_bytes",
        )
        length = request.content_length
        request[_BODY_UNREAD] = True
        if length is not None and length > self.max_request_bytes:
            raise too_large
        try:
            if request.content.is_eof():
                # All of it is here already (a small body): take it as it lies, no timer to arm.
                raw = request.content.read_nowait()
                if len(raw) > self.max_request_bytes:
                    raise too_large
            else:
                async with asyncio.timeout(self.body_timeout):
                    raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"body: the request body did not arrive within {self.body_timeout:g} seconds"
            ) from None
        except (http_exceptions.HttpProcessingError, RequestPayloadError) as exc:
            # e.g. a Content-Encoding the body does not decode with
            raise InvalidInputError(f"body: cannot decode the request body: {one_line(exc)}", field="body") from None
        except ConnectionError:
            # Nobody will read the answer; the refusal log notes it (throttled).
            raise InvalidInputError(
                "body: the client closed the connection before sending the body", field="body"
            ) from None
        request[_BODY_UNREAD] = False
        if not raw.strip():
            return {}
        return self.parse_json(raw)

    @staticmethod
    def body_unread(request: web.Request, unread: bool) -> None:
        """Mark whether ``request``'s body is still being sent (an error answer then closes the connection)."""
        request[_BODY_UNREAD] = unread

    def parse_json(self, raw: bytes) -> Any:
        """One JSON request object from ``raw``: UTF-8, no duplicate names, no NaN, bounded depth."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError("body: the request body is not UTF-8", field="body") from None
        try:
            data = _DECODER.decode(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"body: not valid JSON: {exc}", field="body") from None
        except RecursionError:
            raise InvalidInputError(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body") from None
        except ValueError as exc:  # an integer of more than 4,300 digits, among others
            raise InvalidInputError(f"body: not valid JSON: {one_line(exc)}", field="body") from None
        if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH:  # else it cannot nest deeper
            _check_depth(data)
        return data

    def header(self, revision: int) -> dict[str, Any]:
        """An etcd ResponseHeader at ``revision``; never fails.

        The term comes from the replica's cached status, looked at most every
        :data:`TERM_REFRESH` seconds (not once per request); if even that is
        unavailable, from the last one seen: an answer that is ready (a
        committed write above all) must never fail for want of a header.
        """
        return etcd_json.header(
            cluster_id=self.cluster_id, member_id=self.member_id, revision=revision, raft_term=self.raft_term()
        )

    def raft_term(self) -> int:
        """The Raft term for a response header: the last seen, refreshed from the status when stale."""
        now = time.monotonic()
        if now - self._term_at >= TERM_REFRESH:
            try:
                term = int(self.coord.status().get("term") or 0)
            except Exception:  # noqa: BLE001 - the header is decoration, the answer is not
                return self.last_term
            self._term_at = now
            self.last_term = max(self.last_term, term)
        return self.last_term

    def read_keys(self, consistency: str, keys: list[bytes]) -> list[tuple[Any, int]]:
        """Single keys gathered from concurrent range requests: ``(kv or None, revision)`` each (blocking)."""
        kvs, revision = self.coord.get_many(keys, consistency=consistency)  # type: ignore[arg-type]
        return [(kv, revision) for kv in kvs]

    def execute(self, command: dict[str, Any], req: list[Any] | None = None) -> dict[str, Any]:
        """Propose ``command`` (under the client's request id ``req``, if any) and
        return its result with a header (blocking)."""
        result = self.coord.execute(command, timeout=self.timeout, req=req)
        return {"result": result, "header": self.header(int(result["revision"]))}

    # --------------------------------------------------------- etcd: KV

    async def kv_range(self, request: web.Request) -> web.Response:
        """POST /v3/kv/range: a read-only txn of one range, read off the Raft thread."""
        query = etcd_json.parse_range(await self.body(request))
        consistency = "serializable" if query.serializable else "linearizable"
        if query.single_key:
            kv, revision = await self.key_reads[consistency].submit(query.key)

            def answer() -> bytes:
                result = etcd_json.key_result(query, kv, revision, max_bytes=self.coord.max_response_bytes)
                out = {"header": self.header(revision), **etcd_json.range_response(query, result)}
                return json.dumps(out).encode("utf-8")

            big = kv is not None and len(kv.value) > INLINE_VALUE_BYTES
            body = await self.run(answer) if big else answer()
            return web.Response(body=body, content_type="application/json")

        def work() -> dict[str, Any]:
            result = self.coord.read_txn(etcd_json.range_txn(query), consistency=consistency)
            out = etcd_json.range_response(query, result)
            return {"header": self.header(int(result["revision"])), **out}

        return await self.run_json(work)

    async def kv_put(self, request: web.Request) -> web.Response:
        """POST /v3/kv/put."""
        req = _request_id(request)
        command = etcd_json.put_command(await self.body(request))
        done = await self.run(self.execute, command, req)
        return web.json_response({"header": done["header"], **etcd_json.put_response(done["result"])})

    async def kv_delete(self, request: web.Request) -> web.Response:
        """POST /v3/kv/deleterange."""
        req = _request_id(request)
        command = etcd_json.delete_command(await self.body(request))
        done = await self.run(self.execute, command, req)
        return web.json_response({"header": done["header"], **etcd_json.delete_response(done["result"])})

    async def kv_txn(self, request: web.Request) -> web.Response:
        """POST /v3/kv/txn (a txn without writes is answered as a read, never proposed)."""
        req = _request_id(request)
        command = etcd_json.txn_command(await self.body(request), max_ops=self.max_txn_ops)

        def work() -> dict[str, Any]:
            done = self.execute(command, req)
            return {"header": done["header"], **etcd_json.txn_response(done["result"])}

        return await self.run_json(work)

    async def session(self, request: web.Request) -> web.Response:
        """POST /raftcoord/v1/session: register a client session for X-Raftcoord-Request."""
        body = await self.body(request)
        if body != {}:
            raise InvalidInputError("body: must be an empty JSON object", field="body")
        client = await self.run(lambda: self.coord.new_session(timeout=self.timeout))
        return web.json_response({"client": client})

    # ------------------------------------------ etcd: maintenance, cluster

    async def maintenance_status(self, request: web.Request) -> web.Response:
        """POST /v3/maintenance/status."""
        etcd_json.check_request(await self.body(request), "StatusRequest")

        def work() -> dict[str, Any]:
            status = self.coord.status()
            revision, size = self.revision_and_size()
            term = int(status.get("term") or 0)
            out: dict[str, Any] = {
                "header": etcd_json.header(
                    cluster_id=self.cluster_id, member_id=self.member_id, revision=revision, raft_term=term
                ),
                "version": etcd_json.ETCD_VERSION,
            }
            leader = self.leader_id(status)
            numbers = {
                "dbSize": size,
                "leader": leader,
                "raftIndex": status.get("commit_index") or 0,
                "raftTerm": term,
                "raftAppliedIndex": status.get("last_applied") or 0,
                "dbSizeInUse": size,
            }
            out.update({name: etcd_json.uint_str(v) for name, v in numbers.items() if v})
            if not leader:
                out["errors"] = ["no leader known to this member"]
            if self.node is not None and not self.node.voter:
                out["isLearner"] = True
            return out

        return web.json_response(await self.run(work))

    def revision_and_size(self) -> tuple[int, int]:
        """The local revision and the bytes of all keys and values (blocking).

        Walked through a view a page at a time, so the Raft thread is never
        held for more than a page; past :data:`_SIZE_SAMPLE` keys the size is
        estimated from them, so a status request costs little however large
        the store (etcd's dbSize is a file size, an estimate too).
        """
        size = walked = 0
        with self.coord.view(consistency="serializable") as reader:
            count = reader.range(b"\x00", b"\x00", limit=1).count
            while walked < min(count, _SIZE_SAMPLE):
                page = reader.range(b"\x00", b"\x00", limit=_SIZE_PAGE, offset=walked).kvs
                if not page:
                    break
                size += sum(len(kv.key) + len(kv.value) for kv in page)
                walked += len(page)
            revision = reader.revision
        return revision, (size if walked >= count or not walked else size * count // walked)

    def leader_id(self, status: Mapping[str, Any]) -> int:
        """The member ID of the leader this node believes in, or 0 for none."""
        leader = status.get("leader")
        if leader is None or leader == "":
            return 0
        if status.get("role") == "leader":
            return self.member_id
        text = str(leader)
        for node in self.config.nodes if self.config is not None else ():
            if text in (node.name, node.raft):
                return node.member_id
        return stable_id(text)

    async def member_list(self, request: web.Request) -> web.Response:
        """POST /v3/cluster/member/list."""
        etcd_json.check_request(await self.body(request), "MemberListRequest")
        membership = getattr(self.coord, "membership", None)

        def work() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            if membership is not None:
                # The replicated registry (issue 10), not this node's file.
                members = [_member_json(m) for m in membership.members(consistency="serializable")]
            elif self.config is not None:
                members = [_member_json(node) for node in self.config.nodes]
            else:
                members = [{"ID": etcd_json.uint_str(self.member_id), "name": self.node_name}]
            return self.header(self.coord.revision(consistency="serializable")), members

        header, members = await self.run(work)
        return web.json_response({"header": header, "members": members})

    async def version(self, request: web.Request) -> web.Response:
        """GET /version."""
        return web.json_response(self.version_info)

    async def unimplemented(self, request: web.Request) -> web.Response:
        """Any other /v3/ path: 405 for a known route's wrong method, else 501."""
        if request.path in _ETCD_POST_ROUTES:
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        raise web.HTTPNotImplemented(text=f"raftcoord does not implement {request.path}")

    # ------------------------------------------------------- health, own

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: 200 only while this node knows a leader and its replica keeps up."""
        try:
            status = await self.run(self.coord.status)
        except RaftcoordError as exc:
            return web.json_response({"health": "false", "reason": exc.message}, status=503)
        except Exception as exc:  # noqa: BLE001 - unhealthy, whatever the cause
            log.warning("health check: status failed: %s", one_line(exc))
            return web.json_response({"health": "false", "reason": f"status failed: {one_line(exc)}"}, status=503)
        if status.get("healthy") is False:
            stalled = status.get("stalled_for")
            reason = f"replica {status.get('role') or 'unhealthy'}" + (
                f": the Raft thread has not ticked for {stalled} s" if stalled else ""
            )
            return web.json_response({"health": "false", "reason": reason}, status=503)
        if not self.leader_id(status):
            return web.json_response({"health": "false", "reason": "no leader known to this node"}, status=503)
        return web.json_response({"health": "true"})

    async def node_status(self, request: web.Request) -> web.Response:
        """GET /raftcoord/v1/status."""
        _check_query(request, ())
        out = to_json(await self.run(self.coord.status))
        out.update(
            node=self.node_name,
            client_url=self.node.client_url if self.node is not None else None,
            # What the replica runs as: a promoted node's file may still say otherwise.
            voter=out.get("role") != "learner" if "role" in out else True,
        )
        from raftcoord.formats import known_formats  # issue 10: what a rolling upgrade checks, node by node

        out["formats"] = known_formats()
        return web.json_response(out)

    async def nodes(self, request: web.Request) -> web.Response:
        """GET /raftcoord/v1/nodes: records with this node's view of each ("raft_role", "heard_ago").

        Only the leader hears every node, so the answer also names this
        node ("node", "role") and the leader's client URL ("leader_client_url",
        from the config) for a client that wants the leader's view.
        """
        from raftcoord.housekeeping import annotate_states

        consistency = _check_query(request, ("consistency",))

        def work() -> dict[str, Any]:
            states, revision = self.coord.read(lambda s: (s.node_states(), s.revision), consistency=consistency)
            status = self.coord.status()
            leader = status.get("leader")
            membership = getattr(self.coord, "membership", None)
            known = (membership.members(consistency="serializable") if membership is not None
                     else self.config.nodes if self.config is not None else ())
            leader_url = next((f"http://{n.client}" for n in known if leader and n.raft == leader), None)
            return {
                "nodes": [{**to_json(s.to_map()), "raft_role": s.role, "heard_ago": s.heard_ago}
                          for s in annotate_states(states, status)],
                "revision": revision,
                "node": self.node_name,
                "role": status.get("role"),
                "leader_client_url": leader_url,
            }

        return web.json_response(await self.run(work))

    async def get_messages(self, request: web.Request) -> web.StreamResponse:
        """GET /raftcoord/v1/messages (with ``follow=1``: a stream, see :mod:`raftcoord.watch_http`)."""
        consistency = _check_query(request, ("since", "limit", "consistency", "follow"))
        since = _query_uint(request, "since")
        follow = request.query.get("follow", "0")
        if follow not in ("0", "1", "true", "false"):
            raise InvalidInputError(f"follow: {follow[:40]!r} is not 1 or 0", field="follow")
        if follow in ("1", "true"):
            if "limit" in request.query:
                raise InvalidInputError("limit: not with follow (a stream has no end)", field="limit")
            return await self.streams.follow(request, since, consistency)
        limit = _query_uint(request, "limit")
        if limit is None:
            limit = DEFAULT_MESSAGE_LIMIT
        if not 1 <= limit <= MAX_MESSAGE_LIMIT:
            raise InvalidInputError(f"limit: must be 1-{MAX_MESSAGE_LIMIT}, got {limit}", field="limit")

        def read(store: Store) -> dict[str, Any]:
            # Only references under the state lock: decoding and encoding
            # happen after it, within the response budget.
            if since is not None and since < store.message_floor:
                oldest = store.oldest_clock
                raise CompactedError(
                    f"messages up to clock {store.message_floor} were purged; the oldest clock kept is "
                    f"{oldest}; cannot resume from {since}",
                    field="since",
                    oldest_clock=oldest,
                )
            if since is not None and since >= MAX_CLOCK:
                kvs: tuple[KeyValue, ...] = ()
            else:
                start = MESSAGE_PREFIX if since is None else MessageKey(since + 1, 0).encode()
                kvs = store.range(start, prefix_end(MESSAGE_PREFIX), limit=limit + 1).kvs
            return {"kvs": kvs, "revision": store.revision, "clock": store.clock, "floor": store.message_floor}

        def work() -> dict[str, Any]:
            found = self.coord.read(read, consistency=consistency)
            messages: list[Any] = []
            size = 0
            more = len(found["kvs"]) > limit
            for kv in found["kvs"][:limit]:
                item = to_json(Message.decode(kv.value).to_map())
                size += len(json.dumps(item))
                if messages and size > self.max_response_bytes:
                    more = True  # the rest in the next page: max_response_bytes
                    break
                messages.append(item)
            return {
                "messages": messages,
                "more": more,
                "revision": found["revision"],
                "clock": found["clock"],
                "floor": found["floor"],
            }

        return await self.run_json(work)

    async def post_message(self, request: web.Request) -> web.Response:
        """POST /raftcoord/v1/messages."""
        req = _request_id(request)
        body = await self.body(request)
        if not isinstance(body, dict):
            raise InvalidInputError("body: must be a JSON object with type, event and payload", field="body")
        for name in body:
            if name not in ("type", "event", "payload"):
                raise InvalidInputError(f"{name}: unknown field (known: type, event, payload)", field=name)
        if body.get("type") is None:
            raise InvalidInputError("type: required (an int 0-255 or one character such as \"U\")", field="type")
        args = (body["type"], body.get("event"), body.get("payload"))
        message = await self.run(lambda: self.coord.post_message(*args, req=req))
        return web.json_response({"message": to_json(message.to_map())})

    async def digest(self, request: web.Request) -> web.Response:
        """GET /raftcoord/v1/digest: this replica's revision, applied count and snapshot sha256.

        Always the local state (a linearizable read would append a barrier to
        the log and so move ``applied``): replicas that applied the same
        number of commands must report the same sha256 (issue 7, agreement).
        """
        _check_query(request, ())

        def read(store: Store) -> tuple[int, int, bytes]:
            if len(store) > DIGEST_MAX_KEYS:
                raise LimitExceededError(
                    f"digest: the store holds {len(store)} keys, more than {DIGEST_MAX_KEYS}, "
                    "too many to encode under the state lock",
                    field="keys",
                )
            return store.revision, store.applied, store.snapshot()

        def work() -> dict[str, Any]:
            revision, applied, snapshot = self.coord.read(read, consistency="serializable")
            return {"revision": revision, "applied": applied, "sha256": hashlib.sha256(snapshot).hexdigest()}

        return await self.run_json(work)


class RefusalLog:
    """Logs refused requests at INFO: at most ``burst`` lines per ``window`` seconds.

    Beyond that, refusals are counted and the count is logged when the next
    window opens, so a misbehaving client cannot flood the log.
    """

    def __init__(
        self, burst: int = REFUSAL_LOG_BURST, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.throttle = Throttle(burst, window, clock)

    def refused(self, request: web.Request, status: int, reason: str) -> None:
        """Record one refused request."""
        if self.throttle.allow():
            log.info("refused %s %s from %s: %d %s", request.method, request.path, request.remote, status, reason)


_SIZE_PAGE: Final = 4096
_SIZE_SAMPLE: Final = 65536
#: Request key: the body was not read to its end (the connection is closed after the answer).
_BODY_UNREAD: Final[Any] = (
    web.RequestKey("raftcoord_body_unread", bool) if hasattr(web, "RequestKey") else "raftcoord_body_unread"
)


def _request_id(request: web.Request) -> list[Any] | None:
    """The client's request id from X-Raftcoord-Request, or None; malformed is a 400."""
    values = request.headers.getall(REQUEST_HEADER, [])
    if not values:
        return None
    field = REQUEST_HEADER.lower()
    shape = f"{REQUEST_HEADER}: must be <client>:<seq>:<lowest outstanding seq>, as from POST /raftcoord/v1/session"
    if len(values) > 1:
        raise InvalidInputError(f"{REQUEST_HEADER}: given {len(values)} times", field=field)
    parts = values[0].strip().rsplit(":", 2)
    if len(parts) != 3:
        raise InvalidInputError(shape, field=field)
    client, seq_text, low_text = parts
    if not client or len(client) > 128 or not client.isascii() or not client.isprintable() or " " in client:
        raise InvalidInputError(f"{shape} (the client id is 1-128 printable ASCII characters)", field=field)
    numbers = []
    for text in (seq_text, low_text):
        if not text.isascii() or not text.isdigit() or len(text) > 20 or int(text) > MAX_CLOCK:
            raise InvalidInputError(f"{shape} ({text[:40]!r} is not an unsigned 64-bit integer)", field=field)
        numbers.append(int(text))
    seq, low = numbers
    if low > seq:
        raise InvalidInputError(f"{shape} (the lowest outstanding seq {low} is above seq {seq})", field=field)
    return [client, seq, low]


def _member_json(node: NodeConfig | Member) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ID": etcd_json.uint_str(stable_id(node.name)),
        "name": node.name,
        "peerURLs": [f"tcp://{node.raft}"],
        "clientURLs": [f"http://{node.client}"],
    }
    if not node.voter:
        out["isLearner"] = True
    return out


def _check_query(request: web.Request, allowed: tuple[str, ...]) -> Any:
    """Refuse unknown query parameters; returns the ``consistency`` asked for."""
    for name in request.query:
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise InvalidInputError(f"{name}: unknown query parameter (known: {known})", field=name)
    consistency = request.query.get("consistency", "linearizable")
    if consistency not in _CONSISTENCIES:
        raise InvalidInputError(
            f"consistency: {consistency!r} is not linearizable or serializable", field="consistency"
        )
    return consistency


def _query_uint(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 20 or int(text) > 2**64 - 1:
        raise InvalidInputError(f"{name}: {text[:40]!r} is not an unsigned 64-bit integer", field=name)
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidInputError(f"{key}: given twice in one JSON object", field=key)
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise InvalidInputError(f"body: {name} is not valid JSON", field="body")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 would become infinity, stored, and read back as the text "inf"
        raise InvalidInputError(f"body: the number {text[:40]} is too large for a float", field="body")
    return value


#: One decoder for every request (``json.loads`` with hooks builds a new one per call).
_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite_float
)


def _check_depth(data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise InvalidInputError(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


def rfc3339(ts: datetime) -> str:
    """A timestamp as RFC 3339 text in UTC, e.g. ``2026-01-01T00:00:00.5Z``."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    text = ts.astimezone(timezone.utc).isoformat()
    return text.removesuffix("+00:00") + "Z"


def to_json(obj: Any, _depth: int = 0) -> Any:
    """``obj`` (CBOR-decoded data, a status dict) as JSON-ready data.

    Times become RFC 3339 text, bytes base64 text, CBOR tags
    ``{"tag": n, "value": ...}``; non-finite floats and anything else their
    ``str``; map keys text. Nesting deeper than :data:`MAX_JSON_DEPTH`
    (or a cycle, which CBOR's shared references can build) is cut to ``"..."``.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, datetime):
        return rfc3339(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return etcd_json.b64(bytes(obj))
    if _depth >= MAX_JSON_DEPTH:
        return "..."
    if isinstance(obj, Mapping):
        return {
            k if isinstance(k, str) else str(to_json(k, _depth + 1)): to_json(v, _depth + 1) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json(v, _depth + 1) for v in obj]
    tag, value = getattr(obj, "tag", None), getattr(obj, "value", None)
    if isinstance(tag, int):
        return {"tag": tag, "value": to_json(value, _depth + 1)}
    return str(obj)
