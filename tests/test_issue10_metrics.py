"""Issue 10, item 5: GET /metrics (Prometheus text format), /livez and /readyz.

The metrics are parsed with prometheus-client's own parser. A real
three-node cluster shows the counters move with writes and /readyz turn 503
on a node cut off from its peers (SIGSTOP); an in-process replica and an
in-memory coordinator cover the collector and the probes' other answers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from replica_support import free_port, put, wait_for

from raftcoord.backends import MemoryBackend
from raftcoord.config import load_config
from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app
from raftcoord.errors import UnavailableError
from raftcoord.metrics import CONTENT_TYPE, NodeCollector
from raftcoord.replica import Replica, ReplicaSettings

from cluster_support import LocalCluster, wait_until

#: Every family GET /metrics has, whatever the node did so far.
FAMILIES = (
    "raftcoord_raft_term", "raftcoord_raft_role", "raftcoord_raft_commit_index", "raftcoord_raft_applied_index",
    "raftcoord_raft_leader_known", "raftcoord_healthy", "raftcoord_store_revision", "raftcoord_raft_leader_changes",
    "raftcoord_proposals_committed", "raftcoord_proposals_failed", "raftcoord_applied_commands",
    "raftcoord_apply_duration_seconds", "raftcoord_snapshots_written", "raftcoord_snapshot_last_size_bytes",
    "raftcoord_snapshot_last_duration_seconds", "raftcoord_messages_posted", "raftcoord_messages_delivered",
    "raftcoord_observers", "raftcoord_observer_clock_lag_max", "raftcoord_watches", "raftcoord_http_watches",
    "raftcoord_http_request_duration_seconds", "raftcoord_members", "raftcoord_raft_voters",
)


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The sum of the samples named ``sample`` whose labels include ``labels`` (0 if none)."""
        return sum(s.value for f in self.families.values() for s in f.samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    def has(self, sample: str, **labels: str) -> bool:
        """True if some sample named ``sample`` has ``labels``."""
        return any(s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
                   for f in self.families.values() for s in f.samples)


def http_get(addr: str, path: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """GET without credentials: (status, content type, body)."""
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def scrape(addr: str) -> Scrape:
    """GET /metrics from a node and parse it."""
    status, ctype, body = http_get(addr, "/metrics")
    assert status == 200 and ctype == CONTENT_TYPE, (status, ctype, body[:200])
    return Scrape(body)


# ------------------------------------------------------------ a real cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    # Snapshots every 20 commands, so the writes below make this node write some.
    c = LocalCluster(tmp_path, extra="compaction_entries = 20")
    try:
        c.start()
        c.wait_for_leader()
        for name in c.names:
            c.wait_healthy(name)
        yield c
    finally:
        for proc in c.procs.values():  # a SIGSTOPped node must run again to die cleanly
            proc.send_signal(signal.SIGCONT)
        c.stop_all()


@pytest.mark.cluster
def test_issue10_metrics_parse_and_move_with_writes(cluster: LocalCluster) -> None:
    """/metrics parses with prometheus-client's parser; N puts and posts move its counters by at least N."""
    n = 20
    addr, peer = cluster.client_addr["n1"], cluster.client_addr["n2"]
    before, peer_before = scrape(addr), scrape(peer)
    missing = [f for f in FAMILIES if f not in before.families]
    assert not missing, missing
    client = cluster.client("n1")
    for i in range(n):
        client.put(b"metrics/%d" % i, b"v")
        client.post("U", "C", {"i": i})
    after = scrape(addr)
    cluster.client("n2").get(b"metrics/%d" % (n - 1))  # linearizable: n2 applied every write first
    peer_after = scrape(peer)

    def moved(a: Scrape, b: Scrape, sample: str, **labels: str) -> float:
        return b.value(sample, **labels) - a.value(sample, **labels)

    assert moved(before, after, "raftcoord_proposals_committed_total") >= 2 * n
    assert moved(before, after, "raftcoord_messages_posted_total") >= n
    for a, b in ((before, after), (peer_before, peer_after)):  # the proposer and a replica that only applies
        assert moved(a, b, "raftcoord_applied_commands_total") >= 2 * n
        assert moved(a, b, "raftcoord_apply_duration_seconds_count") >= 2 * n
        # A log index, not a command count: concurrent commands share one
        # entry (issue 9's batching), and the status it comes from is cached.
        assert moved(a, b, "raftcoord_raft_applied_index") > 0
        assert b.value("raftcoord_apply_duration_seconds_count") == b.value(
            "raftcoord_apply_duration_seconds_bucket", le="+Inf")
    for route in ("/v3/kv/put", "/raftcoord/v1/messages"):
        assert moved(before, after, "raftcoord_http_request_duration_seconds_count",
                     route=route, method="POST", status="2xx") >= n
    # Raft: one leader among the three, every node knows it and is in the same term.
    scrapes = [scrape(cluster.client_addr[name]) for name in cluster.names]
    assert sum(s.value("raftcoord_raft_role", role="leader") for s in scrapes) == 1
    for s in scrapes:
        assert sum(x.value for x in s.families["raftcoord_raft_role"].samples) == 1
        assert s.value("raftcoord_raft_leader_known") == 1 and s.value("raftcoord_healthy") == 1
        assert s.value("raftcoord_raft_term") >= 1 and s.value("raftcoord_raft_leader_changes_total") >= 1
        assert s.value("raftcoord_raft_commit_index") >= s.value("raftcoord_raft_applied_index") > 0
        assert s.value("raftcoord_raft_voters") == 3
        assert s.value("raftcoord_members", kind="voter") == 3 and s.value("raftcoord_members", kind="non-voter") == 0
    # compaction_entries = 20: more than 40 commands applied, so n1 writes a snapshot (in the background).
    written = wait_until(lambda: (s := scrape(addr)).value("raftcoord_snapshots_written_total") >= 1 and s, 10,
                         "n1 to report a snapshot written")
    assert written.value("raftcoord_snapshot_last_size_bytes") > 0
    assert written.value("raftcoord_snapshot_last_duration_seconds") > 0


@pytest.mark.cluster
def test_issue10_readyz_needs_a_leader_and_livez_does_not(cluster: LocalCluster) -> None:
    """/readyz is 200 on a healthy node, 503 once its peers are stopped (no majority); /livez stays 200."""
    addr = cluster.client_addr["n1"]
    for name in cluster.names:
        status, _, body = http_get(cluster.client_addr[name], "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True, (name, body)
    for name in ("n2", "n3"):
        cluster.kill(name, signal.SIGSTOP)
    started = time.monotonic()

    def not_ready() -> dict[str, Any] | None:
        status, _, body = http_get(addr, "/readyz")
        return json.loads(body) if status == 503 else None

    answer = wait_until(not_ready, 15, "/readyz to answer 503 on the cut-off node")
    assert answer["ready"] is False and answer["reason"], answer
    assert time.monotonic() - started < 15
    status, _, body = http_get(addr, "/livez")
    assert status == 200 and json.loads(body) == {"live": True}
    status, _, body = http_get(addr, "/metrics")
    assert status == 200
    for name in ("n2", "n3"):
        cluster.kill(name, signal.SIGCONT)
    wait_until(lambda: http_get(addr, "/readyz")[0] == 200, 30, "/readyz to answer 200 again")


# ------------------------------------------------- in-process, no cluster


def test_issue10_replica_counters_in_the_collector(tmp_path: Path) -> None:
    """A one-node replica: leader change, proposals, applies and snapshots reach the collector."""
    settings = ReplicaSettings(compaction_entries=5)
    with Replica(f"127.0.0.1:{free_port()}", [], tmp_path, password=None, settings=settings) as r:
        wait_for(lambda: r.status()["role"] == "leader", 10, "leadership")
        coord = Coordinator(r, host="n1")
        try:
            for i in range(12):
                coord.put(b"k%d" % i, b"v")
            wait_for(lambda: r.stats.snapshots >= 1, 10, "a snapshot written")
            s = Scrape(_exposition(NodeCollector(coord)))
        finally:
            coord.close()
    assert s.value("raftcoord_raft_leader_changes_total") == 1
    assert s.value("raftcoord_raft_role", role="leader") == 1
    assert s.value("raftcoord_proposals_committed_total") >= 12
    assert s.value("raftcoord_applied_commands_total") >= 12
    assert s.value("raftcoord_apply_duration_seconds_count") >= 12
    assert s.value("raftcoord_apply_duration_seconds_sum") > 0
    assert s.value("raftcoord_snapshots_written_total") >= 1
    assert s.value("raftcoord_snapshot_last_size_bytes") > 0


def test_issue10_failed_proposals_counted_by_reason(tmp_path: Path) -> None:
    """A voter whose only partner never answers has no leader: its proposal fails as unavailable."""
    with Replica(f"127.0.0.1:{free_port()}", [f"127.0.0.1:{free_port()}"], tmp_path, password=None) as r:
        coord = Coordinator(r, host="n1")  # reads its clock serializably: no leader needed
        try:
            with pytest.raises(UnavailableError):
                r.propose(put(b"k", b"v"), 0.5)
            s = Scrape(_exposition(NodeCollector(coord)))
        finally:
            coord.close()
    assert s.value("raftcoord_proposals_failed_total", reason="unavailable") == 1
    assert s.value("raftcoord_proposals_committed_total") == 0
    assert s.value("raftcoord_raft_leader_known") == 0


def _exposition(collector: NodeCollector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return generate_latest(registry).decode()


TOKEN_TOML = """
[cluster]
name = "prod"
token = "s3cret-token"
[[node]]
name = "n1"
raft = "127.0.0.1:7001"
client = "127.0.0.1:2379"
"""


class _NoBarrier(MemoryBackend):
    """An in-memory backend whose linearizable reads fail, as on a node cut off from the majority."""

    def read(self, fn: Any, *, consistency: Any, timeout: float) -> Any:
        if consistency == "linearizable":
            raise UnavailableError("no raft leader within 2 s")
        return super().read(fn, consistency=consistency, timeout=timeout)


def _get_all(app: Any, requests: list[tuple[str, str]], between: Any = None) -> list[tuple[int, str]]:
    async def go() -> list[tuple[int, str]]:
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        out = []
        try:
            for method, path in requests:
                async with client.request(method, path) as resp:
                    out.append((resp.status, await resp.text()))
                if between is not None:
                    await asyncio.get_running_loop().run_in_executor(None, between)
        finally:
            await client.close()
        return out

    return asyncio.run(go())


def test_issue10_probes_and_metrics_need_no_token_and_count_posts(tmp_path: Path) -> None:
    """With a token set, /metrics, /livez, /readyz answer without it; posts, deliveries and routes are counted."""
    path = tmp_path / "cluster.toml"
    path.write_text(TOKEN_TOML)
    coord = Coordinator.memory("n1")
    got: list[Any] = []
    observer = coord.add_observer(got.append, include_own=True)
    watch = coord.watch(b"a", callback=lambda r: None)
    try:
        for i in range(5):
            coord.post_message("U", "C", {"i": i})
        wait_for(lambda: len(got) == 5, 5, "five deliveries")
        app = make_app(coord, load_config(path, env={}), "n1")
        answers = _get_all(app, [("GET", "/version"), ("GET", "/livez"), ("GET", "/readyz"), ("GET", "/nope/1"),
                                 ("GET", "/metrics")])
    finally:
        observer.close()
        watch.close()
        coord.close()
    (version, _), (livez, livez_body), (readyz, readyz_body), (nope, _), (metrics, text) = answers
    assert version == 401 and nope == 401  # the token still guards everything else
    assert (livez, json.loads(livez_body)) == (200, {"live": True})
    assert readyz == 200 and json.loads(readyz_body)["ready"] is True
    assert metrics == 200, text
    s = Scrape(text)
    assert s.value("raftcoord_messages_posted_total") == 5
    assert s.value("raftcoord_messages_delivered_total") == 5
    assert s.value("raftcoord_observers") == 1 and s.value("raftcoord_watches") == 1
    assert s.value("raftcoord_observer_clock_lag_max") == 0
    assert s.value("raftcoord_http_request_duration_seconds_count", route="/livez", method="GET", status="2xx") == 1
    assert s.value("raftcoord_http_request_duration_seconds_count", route="/version", method="GET",
                   status="4xx") == 1
    # An unknown path is one series, whatever the path: a client cannot make series without end.
    assert s.has("raftcoord_http_request_duration_seconds_count", route="/v3/{tail}") is False
    assert s.value("raftcoord_http_request_duration_seconds_count", route="unmatched", status="4xx") == 1


def test_issue10_observer_lag_is_the_clock_still_to_deliver() -> None:
    """An observer held in its callback lags by the store's clock minus the clock it is at."""
    coord = Coordinator.memory("n1")
    release = threading.Event()
    observer = coord.add_observer(lambda m: release.wait(10), include_own=True)
    try:
        first = coord.post_message("U").clock
        for _ in range(3):
            last = coord.post_message("U").clock
        assert first is not None and last is not None and last > first
        collector = NodeCollector(coord)
        wait_for(lambda: Scrape(_exposition(collector)).value("raftcoord_observer_clock_lag_max") == last - first,
                 5, "the lag of an observer held at the first message")
        release.set()
        wait_for(lambda: Scrape(_exposition(collector)).value("raftcoord_observer_clock_lag_max") == 0, 5,
                 "no lag once delivered")
    finally:
        release.set()
        observer.close()
        coord.close()


def test_issue10_readyz_503_when_the_read_barrier_fails() -> None:
    """A node that knows a leader but cannot pass a read barrier is not ready, with the reason."""
    coord = Coordinator(_NoBarrier(), host="n1")
    try:
        [(status, body)] = _get_all(make_app(coord), [("GET", "/readyz")])
    finally:
        coord.close()
    assert status == 503
    answer = json.loads(body)
    assert answer["ready"] is False and "no raft leader within 2 s" in answer["reason"]


class _CountingBarriers(MemoryBackend):
    """An in-memory backend that counts linearizable reads (each would be a barrier entry in a cluster)."""

    def __init__(self) -> None:
        super().__init__()
        self.barriers = 0

    def read(self, fn: Any, *, consistency: Any, timeout: float) -> Any:
        if consistency == "linearizable":
            self.barriers += 1
            time.sleep(0.05)  # a barrier's round trip, so that concurrent probes overlap it
        return super().read(fn, consistency=consistency, timeout=timeout)


def test_issue10_readyz_probes_share_one_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz needs no token, so a flood of probes shares one barrier instead of filling the log."""
    import raftcoord.metrics as metrics_mod

    backend = _CountingBarriers()
    coord = Coordinator(backend, host="n1")

    async def go() -> list[int]:
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(coord)))
        await client.start_server()

        async def probe() -> int:
            async with client.get("/readyz") as resp:
                assert (await resp.json())["ready"] is True
                return resp.status

        try:
            statuses = list(await asyncio.gather(*(probe() for _ in range(10))))
            statuses += [await probe() for _ in range(5)]  # right after: the same answer
            shared = backend.barriers
            monkeypatch.setattr(metrics_mod, "READY_REUSE", 0.0)
            statuses.append(await probe())
            return [*statuses, shared, backend.barriers]
        finally:
            await client.close()

    try:
        *statuses, shared, total = asyncio.run(go())
    finally:
        coord.close()
    assert statuses == [200] * 16
    assert (shared, total) == (1, 2)


def test_issue10_closed_watches_and_observers_are_forgotten() -> None:
    """Every HTTP watch or follow stream is a feed: a closed one must not stay in memory for the node's life."""
    from raftcoord.coordinator import Coordinator

    coord = Coordinator.memory("a")
    try:
        delivered = []
        coord.post_message("U", event="C")
        for _ in range(50):
            coord.watch(b"k", callback=lambda r: None).close()
            observer = coord.add_observer(delivered.append, since=0, include_own=True)
            deadline = time.monotonic() + 10
            while observer.delivered < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            observer.close()
        deadline = time.monotonic() + 10
        while coord._feeds and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not coord._feeds, f"{len(coord._feeds)} closed feeds still held"
        assert coord.feed_stats()["delivered"] == 50  # what forgotten observers delivered still counts
    finally:
        coord.close()
