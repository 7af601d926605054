"""Prometheus metrics and health probes of one node (issue 10).

Routes, wired by :func:`raftcoord.endpoint.make_app`, none of them behind the
bearer token (like ``/health``: a probe or a scraper has no secret)::

    GET /metrics  the Prometheus text format 0.0.4
    GET /livez    200 {"live": true} while the process and its event loop run
    GET /readyz   200 {"ready": true, "revision"} once this node knows a leader
                  and applied everything committed before the probe; else
                  503 {"ready": false, "reason"}

Theory of operation: the components keep plain counters (the replica its
:class:`~raftcoord.stats.ReplicaStats`, the Proposer its ``committed`` and
``failed``, the coordinator and its observers theirs), updated on their own
paths at the cost of an addition, and nothing here runs until a scrape asks:
:class:`NodeCollector` then reads them, with the replica's cached status,
into metric families. Every application has a registry of its own (never
prometheus-client's global one): tests run several nodes in one process.
The one metric written as requests pass, the request latency by route, is
a histogram kept by :meth:`Metrics.middleware`.

Readiness passes a read barrier (:data:`READY_TIMEOUT` at most): the
barrier commits in the current leader's term after the probe began and is
applied here, so everything committed before the probe is applied here too.
A node cut off from the majority, or one whose Raft thread is stuck, is not
ready. A probe costs one barrier entry in the log, and /readyz needs no
token: so probes that arrive while one is running, or within
:data:`READY_REUSE` seconds of its answer, get that answer, and a flood of
probes adds at most a couple of entries a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from raftcoord.errors import RaftcoordError
from raftcoord.httpserve import one_line
from raftcoord.stats import LatencyCounts

if TYPE_CHECKING:
    from raftcoord.coordinator import Coordinator

__all__ = ["CONTENT_TYPE", "PROBE_PATHS", "READY_REUSE", "READY_TIMEOUT", "REQUEST_BUCKETS", "Metrics",
           "NodeCollector"]

log = logging.getLogger(__name__)

#: The media type of GET /metrics: Prometheus's text format 0.0.4.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Paths served without the bearer token.
PROBE_PATHS: Final = frozenset({"/health", "/livez", "/readyz", "/metrics"})
#: The longest a readiness probe waits for its read barrier (seconds).
READY_TIMEOUT: Final = 2.0
#: Seconds a readiness answer is given again instead of probing anew.
READY_REUSE: Final = 0.5
#: Upper bounds (seconds) of the request-latency buckets.
REQUEST_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The roles reported by raftcoord_raft_role (1 for this node's, 0 for the rest).
ROLES: Final = ("leader", "follower", "candidate", "learner", "starting", "failed", "stopped")
#: The methods reported as they are in raftcoord_http_request_duration_seconds; others are "other".
_METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
#: Seconds a scrape waits for the local store's clock (a serializable read).
_SCRAPE_READ_TIMEOUT: Final = 1.0


class Metrics:
    """The metrics of one application: its registry, its middleware and the three routes.

    Build it before the application (its :meth:`middleware` goes first in
    the middlewares list, so it times what the client gets, error answers
    included), then route GET /metrics, /livez and /readyz to
    :meth:`scrape`, :meth:`livez` and :meth:`readyz`.
    """

    def __init__(self, endpoint: Any) -> None:
        # raftcoord.endpoint._Endpoint: .coord, .streams, .run(fn) on the worker pool
        self.endpoint = endpoint
        self.registry = CollectorRegistry(auto_describe=True)
        #: (route, method, status class) -> latencies; written on the event loop only.
        self.requests: dict[tuple[str, str, str], LatencyCounts] = {}
        self.registry.register(NodeCollector(endpoint.coord, streams=getattr(endpoint, "streams", None),
                                             requests=self.requests))
        self._probe: asyncio.Future[tuple[int, dict[str, Any]]] | None = None  # the last readiness probe
        self._probed_at = -float("inf")  # when it answered

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Time each request into raftcoord_http_request_duration_seconds."""
        started = time.perf_counter()
        status = 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            resource = request.match_info.route.resource
            # The route's pattern, never the path itself, and known methods
            # only: a client cannot make series without end.
            key = (resource.canonical if resource is not None else "unmatched",
                   request.method if request.method in _METHODS else "other", f"{status // 100}xx")
            counts = self.requests.get(key)
            if counts is None:
                counts = self.requests[key] = LatencyCounts(REQUEST_BUCKETS)
            counts.observe(time.perf_counter() - started)

    async def scrape(self, request: web.Request) -> web.Response:
        """GET /metrics: every family in the text format 0.0.4 (encoded on the worker pool)."""
        body = await self.endpoint.run(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def livez(self, request: web.Request) -> web.Response:
        """GET /livez: answered by the event loop itself, so an answer means it runs."""
        return web.json_response({"live": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """GET /readyz: 200 once a leader is known and everything committed before the probe is applied here."""
        probe = self._probe
        if probe is None or (probe.done() and time.monotonic() - self._probed_at >= READY_REUSE):
            probe = self._probe = asyncio.ensure_future(self._ready())
            probe.add_done_callback(self._probe_done)
        status, body = await asyncio.shield(probe)  # one client going away does not cancel the others' probe
        return web.json_response(body, status=status)

    def _probe_done(self, probe: asyncio.Future[Any]) -> None:
        self._probed_at = time.monotonic()

    async def _ready(self) -> tuple[int, dict[str, Any]]:
        coord = self.endpoint.coord

        def not_ready(reason: str) -> tuple[int, dict[str, Any]]:
            return 503, {"ready": False, "reason": reason}

        try:
            status = await self.endpoint.run(coord.status)
        except RaftcoordError as exc:
            return not_ready(exc.message)
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the cause
            log.warning("readiness probe: status failed: %s", one_line(exc))
            return not_ready(f"status failed: {one_line(exc)}")
        if status.get("healthy") is False:
            stalled = status.get("stalled_for")
            return not_ready(f"replica {status.get('role') or 'unhealthy'}"
                             + (f": the Raft thread has not ticked for {stalled} s" if stalled else ""))
        if not _leader_known(status):
            return not_ready("no leader known to this node")

        def barrier() -> int:
            return coord.backend.read(lambda s: s.revision, consistency="linearizable", timeout=READY_TIMEOUT)

        try:
            revision = await self.endpoint.run(barrier)
        except RaftcoordError as exc:
            return not_ready(f"not caught up with the leader's commit index: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the cause
            log.warning("readiness probe: read barrier failed: %s", one_line(exc))
            return not_ready(f"read barrier failed: {one_line(exc)}")
        return 200, {"ready": True, "revision": revision}


def _leader_known(status: Mapping[str, Any]) -> bool:
    return bool(status.get("leader")) and status.get("role") not in ("failed", "stopped")


class NodeCollector:
    """Reads a node's counters and status into metric families at scrape time.

    ``coord`` is the node's coordinator; its backend's ``stats`` (a
    :class:`~raftcoord.stats.ReplicaStats`; the in-memory backend has none)
    gives the replica's counters. ``streams`` is the HTTP endpoint's
    :class:`~raftcoord.watch_http.Streams`, if any; ``requests`` the request
    latencies by (route, method, status class) (:attr:`Metrics.requests`).
    """

    def __init__(self, coord: Coordinator, *, streams: Any = None,
                 requests: Mapping[tuple[str, str, str], LatencyCounts] | None = None) -> None:
        self.coord = coord
        self.streams = streams
        self.requests = requests if requests is not None else {}

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (so registering reads nothing)."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """The families with this moment's samples."""
        return list(self._families(self._read()))

    def _read(self) -> dict[str, Any]:
        coord = self.coord
        out: dict[str, Any] = {"status": coord.status(), "stats": getattr(coord.backend, "stats", None)}
        feed_stats = getattr(coord, "feed_stats", None)
        out["feeds"] = feed_stats() if feed_stats is not None else None
        try:
            out["clock"] = coord.backend.read(lambda s: s.clock, consistency="serializable",
                                              timeout=_SCRAPE_READ_TIMEOUT)
        except RaftcoordError:
            out["clock"] = None  # a failed or closed replica: no lag to report
        membership = getattr(coord, "membership", None)
        try:
            out["members"] = membership.members(consistency="serializable") if membership is not None else None
        except RaftcoordError:
            out["members"] = None
        out["http_watches"] = getattr(self.streams, "watches", None)
        out["requests"] = dict(self.requests)  # one copy in one step: the event loop adds keys meanwhile
        return out

    def _families(self, data: dict[str, Any] | None) -> Iterator[Metric]:
        live = data is not None
        status: Mapping[str, Any] = data["status"] if live else {}
        stats = data["stats"] if live else None
        feeds: Mapping[str, Any] | None = data["feeds"] if live else None

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], value)
            return family

        def counter(name: str, doc: str, value: float | None) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], value)
            return family

        # --- Raft, from the replica's cached status (never waits for the Raft thread)
        yield gauge("raftcoord_raft_term", "The Raft term this node is in", status.get("term"))
        role = GaugeMetricFamily("raftcoord_raft_role", "This node's Raft role: 1 for the role it has, 0 for the others",
                                 labels=("role",))
        if live:
            current = str(status.get("role") or "unknown")
            for name in ROLES if current in ROLES else (*ROLES, current):
                role.add_metric([name], 1 if name == current else 0)
        yield role
        yield gauge("raftcoord_raft_commit_index", "The highest Raft log index this node knows committed",
                    status.get("commit_index"))
        yield gauge("raftcoord_raft_applied_index", "The highest Raft log index applied to this node's store",
                    status.get("last_applied"))
        yield gauge("raftcoord_raft_leader_known", "1 while this node knows a Raft leader, else 0",
                    int(_leader_known(status)) if live else None)
        yield gauge("raftcoord_healthy",
                    "1 while this node's replica works and its Raft thread ticks (as GET /health), else 0",
                    int(status.get("healthy", True) is not False) if live else None)
        yield gauge("raftcoord_store_revision", "The revision of this node's store", status.get("revision"))
        members = GaugeMetricFamily("raftcoord_members", "Members in the replicated member registry, by kind",
                                    labels=("kind",))
        if live and data["members"] is not None:
            voting = sum(1 for m in data["members"] if m.voter)
            members.add_metric(["voter"], voting)
            members.add_metric(["non-voter"], len(data["members"]) - voting)
        yield members
        yield gauge("raftcoord_raft_voters", "Voters in this node's Raft configuration (a change counts once appended)",
                    len(status["voters"]) if live and status.get("voters") is not None else None)

        # --- replica counters
        yield counter("raftcoord_raft_leader_changes", "Times this node saw a new Raft leader",
                      stats.leader_changes if stats is not None else None)
        proposer = stats.proposals if stats is not None else None
        yield counter("raftcoord_proposals_committed",
                      "Commands (read barriers aside) proposed on this node, committed and applied here",
                      proposer.committed if proposer is not None else None)
        failed = CounterMetricFamily("raftcoord_proposals_failed",
                                     "Commands proposed on this node that failed, by error code (unknown_outcome: "
                                     "may have applied)", labels=("reason",))
        if proposer is not None:
            for reason, n in sorted(dict(proposer.failed).items()):
                failed.add_metric([reason], n)
        yield failed
        yield counter("raftcoord_applied_commands", "Commands applied to this node's store (each of a batch)",
                      stats.applied_commands if stats is not None else None)
        apply = HistogramMetricFamily("raftcoord_apply_duration_seconds",
                                      "Seconds the Raft thread took to apply one log entry (a batch counts once), "
                                      "waiting for the state lock included")
        if stats is not None:
            buckets, _count, total = stats.apply.cumulative()
            apply.add_metric([], [(_le(bound), n) for bound, n in buckets], total)
        yield apply
        yield counter("raftcoord_snapshots_written", "Snapshots this node wrote itself",
                      stats.snapshots if stats is not None else None)
        has_snapshot = stats is not None and stats.snapshots > 0
        yield gauge("raftcoord_snapshot_last_size_bytes", "Size of the last snapshot this node wrote",
                    stats.snapshot_bytes if has_snapshot else None)
        yield gauge("raftcoord_snapshot_last_duration_seconds",
                    "Seconds the last snapshot this node wrote took (encode, write, rename)",
                    stats.snapshot_seconds if has_snapshot else None)

        # --- messages, observers, watches
        yield counter("raftcoord_messages_posted", "Messages posted through this node",
                      feeds["posted"] if feeds is not None else None)
        yield counter("raftcoord_messages_delivered", "Messages handed to this node's observers (each observer counts)",
                      feeds["delivered"] if feeds is not None else None)
        yield gauge("raftcoord_observers", "Message observers open on this node (embedded or HTTP streams)",
                    feeds["observers"] if feeds is not None else None)
        lag = None
        if feeds is not None and live and data["clock"] is not None:
            lag = max((max(0, data["clock"] - c) for c in feeds["observer_clocks"]), default=0)
        yield gauge("raftcoord_observer_clock_lag_max",
                    "The store's Lamport clock minus the clock of the last message handed to an observer, for "
                    "the observer furthest behind (each message moves the clock by one or more)", lag)
        yield gauge("raftcoord_watches", "Key watches open on this node (embedded or HTTP)",
                    feeds["watches"] if feeds is not None else None)
        yield gauge("raftcoord_http_watches",
                    "Watches and message streams open on the HTTP endpoint (bounded by MAX_WATCHES)",
                    data["http_watches"] if live else None)

        # --- HTTP
        requests = HistogramMetricFamily(
            "raftcoord_http_request_duration_seconds",
            "Seconds from a request's head to its answer (a stream: to its end), by route pattern, method and "
            "status class (4xx for a client that went away)", labels=("route", "method", "status"))
        for (route, method, status_class), counts in sorted(data["requests"].items()) if live else ():
            buckets, _count, total = counts.cumulative()
            requests.add_metric([route, method, status_class], [(_le(bound), n) for bound, n in buckets], total)
        yield requests


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
