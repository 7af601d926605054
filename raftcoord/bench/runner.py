"""One benchmark run: start the clusters, run every workload against every system in turn, report.

Rows are interleaved (for each workload and client count, every system in
turn), so that noise from other work on the machine falls on all systems
alike. The 3-voter + 7-non-voter cluster is the exception: its ten processes
live only for a phase of their own, where each of its rows is paired with the
same puts on 3 voters alone. Every process is killed by its pid when the run ends, also on Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from raftcoord.bench import report as _report
from raftcoord.bench import workloads as _w
from raftcoord.bench.systems import (
    Cluster,
    Processes,
    Worker,
    find_leader,
    free_ports,
    start_etcd,
    start_raftcoord,
    start_workers,
    wait_learners,
    worker_leader,
    write_cluster_file,
)

__all__ = ["NONVOTERS", "NONVOTER_CLIENTS", "RUNS", "SYSTEMS", "WORKLOADS", "BenchOptions", "run"]

#: raftcoord with 3 voters and 7 non-voters: put latency beside 3 voters alone (issue 10).
NONVOTERS = "raftcoord+7nv"
#: How many non-voters that system has, and the client counts of its rows (latency is its question).
NON_VOTER_COUNT = 7
NONVOTER_CLIENTS = (1, 16)
SYSTEMS = ("raftcoord", "embedded", "etcd", "pysyncobj", "pysyncobj-batch", NONVOTERS)
WORKLOADS = ("puts", "get-linearizable", "get-serializable", "cas", "messages", "failover", "restart", "memory")
#: What each system runs (restart and memory: a raftcoord cluster of their own).
RUNS = {"raftcoord": set(WORKLOADS), "embedded": {"puts", "get-linearizable", "get-serializable", "cas", "messages"},
        "etcd": {"puts", "get-linearizable", "get-serializable", "cas", "messages", "failover"},
        "pysyncobj": {"puts"}, "pysyncobj-batch": {"puts"}, NONVOTERS: {"puts"}}


@dataclass
class BenchOptions:
    """What to run; the defaults are a full run, :meth:`quick_run` the short one."""

    quick: bool = False
    systems: tuple[str, ...] = SYSTEMS
    workloads: tuple[str, ...] = WORKLOADS
    out: Path = Path("bench-results")
    clients: tuple[int, ...] = (1, 16, 64)
    #: Measured seconds per row, after ``warmup`` seconds not counted.
    seconds: float = 5.0
    warmup: float = 1.0
    failovers: int = 20
    #: Key counts at which a node is restarted; the last is where memory is measured.
    restart_keys: tuple[int, ...] = (100_000, 1_000_000)
    etcd: str | None = field(default_factory=lambda: shutil.which("etcd"))

    @classmethod
    def quick_run(cls, **kwargs: Any) -> BenchOptions:
        """The ``--quick`` settings: short rows, 2 failovers, 100,000 keys (memory extrapolated)."""
        return cls(**{"quick": True, "seconds": 0.5, "warmup": 0.2, "failovers": 2, "restart_keys": (100_000,),
                      **kwargs})


class _Progress:
    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self.done = 0
        self.total = total
        self.echo = echo

    def __call__(self, text: str, step: bool = False) -> None:
        self.done += step
        self.echo(f"[{time.monotonic() - self.t0:5.0f} s {self.done}/{self.total}] {text}")


def _short(r: dict[str, Any]) -> str:
    if r.get("per_second") is None:
        return f"no figures: {r.get('first_error') or r.get('failed')}"
    text = f"{r['per_second']:,.0f}/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms"
    if "delivery_ms" in r:
        text += f", delivery p99 {r['delivery_ms']['p99']} ms ({r['missing']} missing)"
    if "vs_3_voters" in r:
        b = r["baseline"]
        text += (f"; 3 voters alone p50 {b['p50_ms']} ms p99 {b['p99_ms']} ms: "
                 f"ratio p50 {r['vs_3_voters']['p50']}x p99 {r['vs_3_voters']['p99']}x")
    return text + (f", {r['errors']} errors ({r['first_error']})" if r.get("errors") else "")


async def _bench(opts: BenchOptions, root: Path, procs: Processes, echo: Callable[[str], None]) -> dict[str, Any]:
    run_id = secrets.token_hex(4)
    systems = [s for s in SYSTEMS if s in opts.systems]
    report: dict[str, Any] = {"options": {**asdict(opts), "out": str(opts.out)}, "systems": {}, "skipped": {},
                              "rows": [], "failover": {}, "keys": None,
                              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "platform": platform.platform()}, "unix_time": time.time()}
    if "etcd" in systems and opts.etcd is None:
        systems.remove("etcd")
        report["skipped"]["etcd"] = "no `etcd` on the PATH; apt-get install etcd-server"
        echo("etcd: skipped (no `etcd` on the PATH; apt-get install etcd-server): no etcd figures, no ratios")
    rows = [(w, c, s) for w in ("puts", "get-linearizable", "get-serializable", "cas", "messages")
            if w in opts.workloads for c in opts.clients for s in systems if w in RUNS[s] and s != NONVOTERS]
    # Ten more processes would load the machine under every other row: they run in a phase of their own.
    nonvoter_rows = list(NONVOTER_CLIENTS) if NONVOTERS in systems and "puts" in opts.workloads else []
    failover_systems = [s for s in systems if "failover" in RUNS[s]] if "failover" in opts.workloads else []
    keys_wanted = "raftcoord" in systems and bool({"restart", "memory"} & set(opts.workloads))
    progress = _Progress(len(rows) + len(nonvoter_rows) + opts.failovers * len(failover_systems) + keys_wanted,
                         echo)

    clusters: dict[str, Cluster] = {}
    workers: dict[str, dict[str, Worker]] = {}
    secret = secrets.token_urlsafe(24)
    from raftcoord import __version__

    pysyncobj_version = importlib.metadata.version("pysyncobj")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=30))
    streams = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
    try:
        progress(f"starting {', '.join(s for s in systems if s != NONVOTERS)}")
        if "raftcoord" in systems:
            clusters["raftcoord"] = start_raftcoord(root / "raftcoord", procs)
        if "etcd" in systems:
            clusters["etcd"] = start_etcd(opts.etcd, root / "etcd", procs)  # type: ignore[arg-type]
        if "embedded" in systems:
            names = ["m1", "m2", "m3"]
            config, _ = write_cluster_file(root / "embedded", names)
            workers["embedded"] = await start_workers(
                "embedded", {m: {"config": str(config), "name": m, "run": run_id} for m in names},
                root / "embedded", procs)
        for s in ("pysyncobj", "pysyncobj-batch"):
            if s in systems:
                addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
                (root / s).mkdir(parents=True)
                workers[s] = await start_workers("plain", {
                    f"p{i + 1}": {"self": a, "partners": [b for b in addrs if b != a],
                                  "dir": str(root / s / f"p{i + 1}"), "password": secret,
                                  "batch": s.endswith("batch")} for i, a in enumerate(addrs)},
                    root / s, procs)
        for name, c in clusters.items():
            await find_leader(session, c, 90)
            report["systems"][name] = {"version": c.version}
        for name, ws in workers.items():
            await worker_leader(ws, 90)
            report["systems"][name] = {"version": str(__version__) if name == "embedded"
                                       else pysyncobj_version}
        progress("clusters up")
        prepared: dict[str, set[str]] = {s: set() for s in systems}
        counter = itertools.count(1)
        for workload, clients, system in rows:
            try:
                if system in clusters:
                    await find_leader(session, clusters[system], 30)
                    if workload == "messages":
                        row = await _w.http_messages(session, streams, clusters[system], run_id, clients,
                                                     opts.seconds, opts.warmup, counter)
                    else:
                        row = await _w.http_row(session, clusters[system], workload, clients, opts.seconds,
                                                opts.warmup, prepared[system])
                else:
                    leader = await worker_leader(workers[system], 30)
                    if workload == "messages":
                        row = await _w.worker_messages(workers[system], leader, clients, opts.seconds, opts.warmup)
                    else:
                        row = await _w.worker_row(workers[system][leader], workload, clients, opts.seconds,
                                                  opts.warmup)
            except (RuntimeError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                row = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
            report["rows"].append({"system": system, "workload": workload, "clients": clients, **row})
            progress(f"{_report.LABELS[system]}: {workload}, {clients} clients: {_short(row)}", step=True)
        if nonvoter_rows:
            await _nonvoter_phase(opts, root, procs, session, clusters.get("raftcoord"), report, progress)
        times: dict[str, list[float]] = {s: [] for s in failover_systems}
        for k in range(opts.failovers):
            for s in failover_systems:
                try:
                    times[s].append(await _w.failover(session, clusters[s], procs))
                    progress(f"{_report.LABELS[s]}: failover {k + 1}/{opts.failovers}: {times[s][-1]:.3f} s", step=True)
                except (RuntimeError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    report["failover"].setdefault("errors", []).append(f"{s}: {exc}")
                    progress(f"{_report.LABELS[s]}: failover {k + 1} failed: {exc}", step=True)
        for s in failover_systems:
            report["failover"][s] = _w.failover_summary(times[s])
        if keys_wanted:
            keys = start_raftcoord(root / "keys", procs, system="raftcoord-keys", extra={"max_txn_ops": 1000})
            report["keys"] = await _w.keys_phase(session, keys, procs, list(opts.restart_keys),
                                                 opts.restart_keys[-1], progress,
                                                 restart="restart" in opts.workloads)
            mem = report["keys"]["memory"]
            if mem and mem["keys"] < 1_000_000:
                # Linear in the keys held, from the node's empty size: said so wherever it is shown.
                node = max(mem["rss_bytes"], key=mem["rss_bytes"].get)
                base = report["keys"]["baseline_rss_bytes"].get(node, 0)
                mem["estimate_1m_bytes"] = int(base + (mem["rss_bytes"][node] - base) * 1_000_000 / mem["keys"])
            progress("restart and memory done", step=True)
    finally:
        await session.close()
        await streams.close()
        # Worker processes belong to this event loop: they are killed and reaped inside it.
        for ws in workers.values():
            for w in ws.values():
                if w.reader is not None:
                    w.reader.cancel()
                if w.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                await w.proc.wait()
                with contextlib.suppress(ValueError):
                    procs.pids.remove(w.proc.pid)
    report["targets"] = _report.targets(report)
    return report


async def _nonvoter_phase(opts: BenchOptions, root: Path, procs: Processes, session: aiohttp.ClientSession,
                          alone: Cluster | None, report: dict[str, Any], progress: _Progress) -> None:
    """Rows of :data:`NONVOTERS`: a 3-voter + 7-non-voter cluster started for them and killed after them, each row
    paired with puts on the 3-voter raftcoord cluster (one of its own when that system is not in the run)."""
    from raftcoord import __version__

    report["systems"][NONVOTERS] = {"version": str(__version__)}
    started: list[Cluster] = []
    try:
        progress(f"starting {NONVOTERS}: 3 voters and {NON_VOTER_COUNT} non-voters")
        if alone is None:
            alone = start_raftcoord(root / "raftcoord-3v", procs)
            started.append(alone)
        cluster = start_raftcoord(root / "nonvoters", procs, n=3 + NON_VOTER_COUNT, voters=3, system=NONVOTERS)
        started.append(cluster)
        await find_leader(session, alone, 90)
        await wait_learners(session, cluster, NON_VOTER_COUNT, 90)
        failed = None
    except (RuntimeError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        failed = f"{type(exc).__name__}: {str(exc)[:300]}"
    try:
        for clients in NONVOTER_CLIENTS:
            if failed is None:
                try:
                    row = await _w.nonvoter_row(session, alone, cluster, clients, opts.seconds, opts.warmup)
                except (RuntimeError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    row = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
            else:
                row = {"failed": failed}
            report["rows"].append({"system": NONVOTERS, "workload": "puts", "clients": clients, **row})
            progress(f"{_report.LABELS[NONVOTERS]}: puts, {clients} clients: {_short(row)}", step=True)
    finally:
        for c in started:
            for m in c.members.values():
                m.kill()


def run(opts: BenchOptions, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; writes ``bench.json``, ``bench.md`` (and ``bench.png``) under ``opts.out``."""
    def default_echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    echo = echo or default_echo
    opts.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="raftcoord-bench-"))
    procs = Processes()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        report = asyncio.run(_bench(opts, root, procs, echo))
    finally:
        procs.stop()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(root, ignore_errors=True)
    report["files"] = {"json": str(opts.out / "bench.json"), "markdown": str(opts.out / "bench.md")}
    (opts.out / "bench.md").write_text(_report.format_markdown(report))
    if _report.plot(report, opts.out / "bench.png"):
        report["files"]["png"] = str(opts.out / "bench.png")
    _report.write_json(report, opts.out / "bench.json")
    return report
