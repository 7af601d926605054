"""The client endpoint: HTTP/JSON over a coordinator, in etcd's v3 shapes.

:func:`make_app` builds an :class:`aiohttp.web.Application` for one node.
The JSON translation of etcd's messages lives in :mod:`raftcoord.etcd_json`;
this module does the HTTP: routes, authentication, error bodies, and
running the coordinator's blocking calls in a thread pool so the event loop
never waits on Raft.

Routes (etcd's gateway routes take POST with a JSON body)::

    POST /v3/kv/range            RangeRequest       -> RangeResponse
    POST /v3/kv/put              PutRequest         -> PutResponse
    POST /v3/kv/deleterange      DeleteRangeRequest -> DeleteRangeResponse
    POST /v3/kv/txn              TxnRequest         -> TxnResponse
    POST /v3/maintenance/status  {}                 -> StatusResponse
    POST /v3/cluster/member/list {}                 -> MemberListResponse
    GET  /version                {"etcdserver", "etcdcluster", "raftcoord"}
    GET  /health                 200 {"health": "true"} | 503 {"health": "false", "reason"}
    GET  /raftcoord/v1/status    this node's status, "node", "client_url", "voter"
    GET  /raftcoord/v1/nodes     {"nodes": [node state...], "revision"}
    GET  /raftcoord/v1/messages  ?since=CLOCK&limit=N&consistency=...  (limit: default 1000, max 10000)
                                 -> {"messages", "more", "revision", "clock", "floor"}
    POST /raftcoord/v1/messages  {"type", "event"?, "payload"?} -> {"message"}

Other ``/v3/`` paths (watch, leases, auth, ...) answer 501. etcd routes
read linearizably unless the request says ``serializable``; raftcoord's GET
routes take ``?consistency=serializable``. raftcoord's own JSON writes
integers as numbers, bytes as base64 text and times as RFC 3339.

Errors: every failure is a JSON body ``{"error", "code", "message"}`` plus
``"field"`` when one field was wrong; ``code`` is the gRPC code (an int)
under ``/v3/`` and ``/version``, and raftcoord's error code (a string)
elsewhere. With a token configured, every route but ``/health`` needs
``Authorization: Bearer <token>``. Refused requests are logged at INFO, at
most :data:`REFUSAL_LOG_BURST` lines a minute; an unexpected exception is a
bug: logged with its traceback, answered 500, and the node keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any, Final, TypeVar

from aiohttp import web

from raftcoord import etcd_json
from raftcoord.config import ClusterConfig, NodeConfig, stable_id
from raftcoord.coordinator import Coordinator
from raftcoord.errors import AuthError, InvalidInputError, RaftcoordError
from raftcoord.store import Store

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "REFUSAL_LOG_BURST", "RefusalLog", "make_app", "rfc3339", "to_json"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The largest request body accepted (a value near the command limit, in base64).
MAX_BODY_BYTES: Final = 2 * 1024 * 1024
#: The deepest JSON nesting accepted in a request.
MAX_JSON_DEPTH: Final = 64
#: Refused requests logged per minute, at most; the rest are counted.
REFUSAL_LOG_BURST: Final = 20
#: Messages returned by one GET /raftcoord/v1/messages when no limit is given.
DEFAULT_MESSAGE_LIMIT: Final = 1000
MAX_MESSAGE_LIMIT: Final = 10000
WORKER_THREADS: Final = 32

_ETCD_POST_ROUTES: Final = (
    "/v3/kv/range",
    "/v3/kv/put",
    "/v3/kv/deleterange",
    "/v3/kv/txn",
    "/v3/maintenance/status",
    "/v3/cluster/member/list",
)
_HTTP_CODES: Final = {401: "auth", 404: "not_found", 405: "method_not_allowed", 413: "too_large", 501: "unimplemented"}
_CONSISTENCIES: Final = ("linearizable", "serializable")


def _raftcoord_version() -> str:
    try:
        return dist_version("raftcoord")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def make_app(
    coordinator: Coordinator, config: ClusterConfig | None = None, node_name: str | None = None
) -> web.Application:
    """The client endpoint of one node, serving ``coordinator``.

    ``config`` gives the member list, the token and the request timeout;
    ``node_name`` (default: the coordinator's host) must be one of its nodes.
    The application owns a thread pool, shut down on cleanup; the
    coordinator stays the caller's to close.
    """
    endpoint = _Endpoint(coordinator, config, node_name)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[endpoint.middleware])
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
    app.router.add_route("*", "/v3/{tail:.*}", endpoint.unimplemented)
    app.on_cleanup.append(endpoint.cleanup)
    return app


class _Endpoint:
    """The handlers and their shared state; one per application."""

    def __init__(self, coordinator: Coordinator, config: ClusterConfig | None, node_name: str | None) -> None:
        self.coord = coordinator
        self.config = config
        self.node_name = node_name if node_name is not None else coordinator.host
        self.node: NodeConfig | None = config.node(self.node_name) if config is not None else None
        self.cluster_id = config.cluster_id if config is not None else stable_id(coordinator.cluster or "raftcoord")
        self.member_id = stable_id(self.node_name)
        self.token = config.token if config is not None else None
        self.timeout = config.request_timeout if config is not None else None
        self.version_info = {
            "etcdserver": etcd_json.ETCD_VERSION,
            "etcdcluster": etcd_json.ETCD_VERSION,
            "raftcoord": _raftcoord_version(),
        }
        self.executor = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="raftcoord-http")
        self.refusals = RefusalLog()

    async def cleanup(self, app: web.Application) -> None:
        """Stop the worker threads (running calls finish on their own)."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------- plumbing

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking coordinator call on the thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

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
            response = self.error(request, exc.http_status, exc.message, exc.code, exc.field, headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = {
                404: f"no route for {request.method} {request.path}",
                405: f"{request.method} is not allowed on {request.path}",
            }.get(exc.status, exc.text or exc.reason)
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = self.error(request, exc.status, reason, _HTTP_CODES.get(exc.status, "http_error"), None, allow)
        except Exception:
            log.exception("bug: unhandled exception answering %s %s", request.method, request.path)
            return self.error(request, 500, "internal error (a bug in raftcoord; see the node's log)", "internal", None)
        if response.status >= 400 and request.path != "/health":
            self.refusals.refused(request, response.status, reason)
        return response

    def authenticate(self, request: web.Request) -> None:
        """Raise AuthError unless the request carries the configured bearer token."""
        if self.token is None or request.path == "/health":
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
    ) -> web.Response:
        """The JSON error body, in etcd's shape under /v3/ and /version."""
        etcd = request.path.startswith("/v3/") or request.path == "/version"
        body: dict[str, Any] = {
            "error": message,
            "code": etcd_json.grpc_code(status) if etcd else code,
            "message": message,
        }
        if field is not None:
            body["field"] = field
        return web.json_response(body, status=status, headers=headers)

    async def body(self, request: web.Request) -> Any:
        """The request's JSON body; an empty body is ``{}``, as the gateway reads it."""
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError("body: the request body is not UTF-8", field="body") from None
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"body: not valid JSON: {exc}", field="body") from None
        except RecursionError:
            raise InvalidInputError(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", field="body") from None
        _check_depth(data)
        return data

    def header(self, revision: int) -> dict[str, Any]:
        """An etcd ResponseHeader at ``revision`` (blocking: asks the backend for the term)."""
        term = self.coord.status().get("term") or 0
        return etcd_json.header(
            cluster_id=self.cluster_id, member_id=self.member_id, revision=revision, raft_term=int(term)
        )

    def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        """Propose ``command`` and return its result with a header (blocking)."""
        result = self.coord.execute(command, timeout=self.timeout)
        return {"result": result, "header": self.header(int(result["revision"]))}

    # --------------------------------------------------------- etcd: KV

    async def kv_range(self, request: web.Request) -> web.Response:
        """POST /v3/kv/range."""
        query = etcd_json.parse_range(await self.body(request))
        consistency = "serializable" if query.serializable else "linearizable"

        def work() -> dict[str, Any]:
            out, revision = self.coord.read(lambda s: etcd_json.run_range(s, query), consistency=consistency)
            return {"header": self.header(revision), **out}

        return web.json_response(await self.run(work))

    async def kv_put(self, request: web.Request) -> web.Response:
        """POST /v3/kv/put."""
        command = etcd_json.put_command(await self.body(request))
        done = await self.run(self.execute, command)
        return web.json_response({"header": done["header"], **etcd_json.put_response(done["result"])})

    async def kv_delete(self, request: web.Request) -> web.Response:
        """POST /v3/kv/deleterange."""
        command = etcd_json.delete_command(await self.body(request))
        done = await self.run(self.execute, command)
        return web.json_response({"header": done["header"], **etcd_json.delete_response(done["result"])})

    async def kv_txn(self, request: web.Request) -> web.Response:
        """POST /v3/kv/txn."""
        command = etcd_json.txn_command(await self.body(request))
        done = await self.run(self.execute, command)
        return web.json_response({"header": done["header"], **etcd_json.txn_response(done["result"])})

    # ------------------------------------------ etcd: maintenance, cluster

    async def maintenance_status(self, request: web.Request) -> web.Response:
        """POST /v3/maintenance/status."""
        etcd_json.check_request(await self.body(request), "StatusRequest")

        def work() -> dict[str, Any]:
            status = self.coord.status()
            revision, size = self.coord.read(_revision_and_size, consistency="serializable")
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
        if self.config is not None:
            members = [_member_json(node) for node in self.config.nodes]
        else:
            members = [{"ID": etcd_json.uint_str(self.member_id), "name": self.node_name}]

        def work() -> dict[str, Any]:
            return self.header(self.coord.revision(consistency="serializable"))

        return web.json_response({"header": await self.run(work), "members": members})

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
        """GET /health: 200 only while this node knows a leader."""
        try:
            status = await self.run(self.coord.status)
        except RaftcoordError as exc:
            return web.json_response({"health": "false", "reason": exc.message}, status=503)
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
            voter=self.node.voter if self.node is not None else True,
        )
        return web.json_response(out)

    async def nodes(self, request: web.Request) -> web.Response:
        """GET /raftcoord/v1/nodes."""
        consistency = _check_query(request, ("consistency",))

        def work() -> dict[str, Any]:
            states, revision = self.coord.read(lambda s: (s.node_states(), s.revision), consistency=consistency)
            return {"nodes": [to_json(state.to_map()) for state in states], "revision": revision}

        return web.json_response(await self.run(work))

    async def get_messages(self, request: web.Request) -> web.Response:
        """GET /raftcoord/v1/messages."""
        consistency = _check_query(request, ("since", "limit", "consistency"))
        since = _query_uint(request, "since")
        limit = _query_uint(request, "limit")
        if limit is None:
            limit = DEFAULT_MESSAGE_LIMIT
        if not 1 <= limit <= MAX_MESSAGE_LIMIT:
            raise InvalidInputError(f"limit: must be 1-{MAX_MESSAGE_LIMIT}, got {limit}", field="limit")

        def read(store: Store) -> dict[str, Any]:
            messages = store.messages(since, limit=limit + 1)
            return {
                "messages": [to_json(m.to_map()) for m in messages[:limit]],
                "more": len(messages) > limit,
                "revision": store.revision,
                "clock": store.clock,
                "floor": store.message_floor,
            }

        return web.json_response(await self.run(lambda: self.coord.read(read, consistency=consistency)))

    async def post_message(self, request: web.Request) -> web.Response:
        """POST /raftcoord/v1/messages."""
        body = await self.body(request)
        if not isinstance(body, dict):
            raise InvalidInputError("body: must be a JSON object with type, event and payload", field="body")
        for name in body:
            if name not in ("type", "event", "payload"):
                raise InvalidInputError(f"{name}: unknown field (known: type, event, payload)", field=name)
        if body.get("type") is None:
            raise InvalidInputError("type: required (an int 0-255 or one character such as \"U\")", field="type")
        message = await self.run(self.coord.post_message, body["type"], body.get("event"), body.get("payload"))
        return web.json_response({"message": to_json(message.to_map())})


class RefusalLog:
    """Logs refused requests at INFO: at most ``burst`` lines per ``window`` seconds.

    Beyond that, refusals are counted and the count is logged when the next
    window opens, so a misbehaving client cannot flood the log.
    """

    def __init__(
        self, burst: int = REFUSAL_LOG_BURST, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self.started = clock()
        self.logged = 0
        self.suppressed = 0

    def refused(self, request: web.Request, status: int, reason: str) -> None:
        """Record one refused request."""
        now = self.clock()
        if now - self.started >= self.window:
            if self.suppressed:
                log.info("%d more refused requests were not logged", self.suppressed)
            self.started, self.logged, self.suppressed = now, 0, 0
        if self.logged >= self.burst:
            self.suppressed += 1
            return
        self.logged += 1
        log.info("refused %s %s from %s: %d %s", request.method, request.path, request.remote, status, reason)


def _revision_and_size(store: Store) -> tuple[int, int]:
    size = sum(len(kv.key) + len(kv.value) for kv in store.range(b"\x00", b"\x00").kvs)
    return store.revision, size


def _member_json(node: NodeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ID": etcd_json.uint_str(node.member_id),
        "name": node.name,
        "peerURLs": [f"tcp://{node.raft}"],
        "clientURLs": [node.client_url],
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
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInputError(f"{key}: given twice in one JSON object", field=key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise InvalidInputError(f"body: {name} is not valid JSON", field="body")


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
