"""HTTP load on the client endpoint, beside etcd's JSON gateway: puts and gets at 1..64 clients.

    python benchmarks/http_load.py compare [--tree NAME=DIR ...] [--no-etcd] [--clients 1,64]
                                           [--workloads put,lget,sget] [--seconds 5] [--rounds 3]
                                           [--via leader|first] [--json PATH]
    python benchmarks/http_load.py url URL [--clients ...] [--workloads ...] [--seconds 5]
    python benchmarks/http_load.py serve [--tree DIR]      (a cluster to profile; prints pids and URLs)

``compare`` starts, on 127.0.0.1 with fresh ports, a 3-node raftcoord cluster
(node processes with a cluster secret, as users run them) for each
``--tree`` (a directory holding a ``raftcoord`` package, put first on
``PYTHONPATH``, so that two versions of the code run side by side in one
run; default: this checkout) and a 3-member etcd when ``etcd`` is on the
PATH. Then one asyncio/aiohttp load generator with keep-alive connections
drives each system in turn, row by row and round by round (interleaved, so
that noise on this shared machine falls on every system alike), through the
same etcd v3 JSON routes: ``/v3/kv/put`` (8-byte keys, 256-byte values) and
``/v3/kv/range`` linearizable (``lget``) and ``serializable`` (``sget``)
over 1,000 keys written beforehand. Each client sends its next request when
the previous one is answered (closed loop). Prints, per row, the median over
rounds of throughput, of p50/p99 latency and of the CPU time (user plus
system, from /proc) the member the load goes through ("via") and the whole
cluster ("all") spent per answered request, and the ratios to etcd. On a
machine shared with other work the CPU per request is the steadier figure:
it does not move with how much CPU the other processes leave over.
``--via first`` loads the first member (as issue 9's table did) rather than
the leader.

``url`` runs the same rows against one endpoint already running (e.g. while
``py-spy record --pid`` watches a node).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from raftcoord.bench.systems import b64, free_ports

KEYS = 1000
VALUE_BYTES = 256
HERE = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))] if s else float("nan")


@dataclass
class System:
    """A started cluster: its name, member client URLs, and its processes."""

    name: str
    kind: str  # "raftcoord" or "etcd"
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]
    via: str = ""


class Processes:
    """Every process this script started, killed by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=log.parent, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def start_raftcoord(name: str, tree: Path, root: Path, procs: Processes, extra_path: tuple[str, ...] = ()) -> System:
    """A 3-node raftcoord cluster (fresh ports and secret) running the code in ``tree``.

    ``extra_path`` goes on ``PYTHONPATH`` after ``tree`` (e.g. a directory with an optional dependency).
    """
    root.mkdir(parents=True)
    ports = free_ports(6)
    lines = ["[cluster]", 'name = "load"', f'secret = "{secrets.token_urlsafe(24)}"',
             f'data_dir = "{root / "data"}"', ""]
    names = ["n1", "n2", "n3"]
    for i, node in enumerate(names):
        lines += ["[[node]]", f'name = "{node}"', f'raft = "127.0.0.1:{ports[2 * i]}"',
                  f'client = "127.0.0.1:{ports[2 * i + 1]}"', ""]
    config = root / "cluster.toml"
    config.write_text("\n".join(lines))
    config.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *extra_path])
    started = [procs.start([sys.executable, "-m", "raftcoord", "node", "--config", str(config), "--name", node],
                           root / f"{node}.log", env) for node in names]
    check = subprocess.run([sys.executable, "-c", "import raftcoord; print(raftcoord.__file__)"], env=env, cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not check.startswith(str(tree)):
        raise RuntimeError(f"{name}: raftcoord comes from {check}, not from {tree}")
    return System(name, "raftcoord", [f"http://127.0.0.1:{ports[2 * i + 1]}" for i in range(3)], started)


def start_etcd(binary: str, root: Path, procs: Processes) -> System:
    """A 3-member etcd on 127.0.0.1 (fresh ports, its own data directories)."""
    root.mkdir(parents=True)
    names = ["e1", "e2", "e3"]
    ports = free_ports(6)
    peers = {n: f"http://127.0.0.1:{ports[2 * i]}" for i, n in enumerate(names)}
    clients = {n: f"http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names)}
    initial = ",".join(f"{n}={u}" for n, u in peers.items())
    token = f"load-{secrets.token_hex(6)}"
    started = []
    for n in names:
        argv = [binary, "--name", n, "--data-dir", str(root / n),
                "--listen-client-urls", clients[n], "--advertise-client-urls", clients[n],
                "--listen-peer-urls", peers[n], "--initial-advertise-peer-urls", peers[n],
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token, "--log-level", "warn"]
        started.append(procs.start(argv, root / f"{n}.log"))
    return System("etcd", "etcd", list(clients.values()), started)


async def leader_url(session: aiohttp.ClientSession, system: System, timeout: float = 60.0) -> str:
    """The client URL of the member that leads, once every member answers."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for proc in system.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{system.name}: a process exited with code {proc.returncode}")
        try:
            leaders = []
            for url in system.urls:
                if system.kind == "raftcoord":
                    async with session.get(f"{url}/raftcoord/v1/status") as r:
                        st = await r.json()
                    if st.get("role") == "leader" and st.get("healthy", True):
                        leaders.append(url)
                else:
                    async with session.post(f"{url}/v3/maintenance/status", json={}) as r:
                        st = await r.json()
                    if st.get("leader") and st["leader"] == st["header"]["member_id"]:
                        leaders.append(url)
            if len(leaders) == 1:
                # every member answered: the put below must also get through
                async with session.post(f"{leaders[0]}/v3/kv/put", json={"key": b64(b"warm"), "value": ""}) as r:
                    if r.status == 200:
                        return leaders[0]
                    last = await r.text()
        except (aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
            last = exc
        await asyncio.sleep(0.3)
    raise RuntimeError(f"{system.name}: no leader within {timeout:g} s (last: {last})")


def cpu_seconds(pids: list[int]) -> list[float]:
    """User plus system CPU seconds each process used so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            out.append(float("nan"))
    return out


def key(i: int) -> bytes:
    return b"k%07d" % (i % KEYS)  # 8 bytes


def bodies(workload: str) -> list[bytes]:
    """The request bodies one workload cycles through."""
    if workload == "put":
        rnd = secrets.token_bytes(VALUE_BYTES)
        return [json.dumps({"key": b64(key(i)), "value": b64(rnd)}).encode() for i in range(KEYS)]
    body: dict[str, Any] = {}
    if workload == "sget":
        body["serializable"] = True
    return [json.dumps({"key": b64(key(i)), **body}).encode() for i in range(KEYS)]


ROUTES = {"put": "/v3/kv/put", "lget": "/v3/kv/range", "sget": "/v3/kv/range"}
HEADERS = {"Content-Type": "application/json"}


async def run_row(url: str, workload: str, clients: int, seconds: float, warmup: float = 0.5) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``; throughput and latency (ms)."""
    target = url + ROUTES[workload]
    data = bodies(workload)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        stop = measure_from + seconds

        async def client(n: int) -> None:
            i = n * 7919
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                i += 1
                try:
                    async with session.post(target, data=data[i % KEYS], headers=HEADERS) as r:
                        await r.read()
                        ok = r.status == 200
                        why = str(r.status)
                except (aiohttp.ClientError, OSError) as exc:
                    ok, why = False, type(exc).__name__
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors[why] = errors.get(why, 0) + 1

        await asyncio.gather(*(client(n) for n in range(clients)))
    return {
        "workload": workload, "clients": clients, "ops": len(latencies),
        "rate": len(latencies) / seconds if seconds else 0.0,
        "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
        "errors": errors,
    }


async def fill(url: str) -> None:
    """Write every key the get workloads read."""
    data = bodies("put")
    async with aiohttp.ClientSession() as session:
        sem = asyncio.Semaphore(32)

        async def one(body: bytes) -> None:
            async with sem, session.post(url + "/v3/kv/put", data=body, headers=HEADERS) as r:
                r.raise_for_status()
                await r.read()

        await asyncio.gather(*(one(b) for b in data))


def fmt_row(r: dict[str, Any]) -> str:
    err = f"  errors {r['errors']}" if r.get("errors") else ""
    cpu = (f"  cpu/op {r['leader_cpu_ms']:.3f} ms via, {r['cluster_cpu_ms']:.3f} ms all"
           if "leader_cpu_ms" in r else "")
    return f"{r['rate']:9,.0f}/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms{cpu}{err}"


def cmd_url(args: argparse.Namespace) -> None:
    async def main() -> None:
        if "lget" in args.workloads or "sget" in args.workloads:
            await fill(args.url)
        for w in args.workloads:
            for c in args.clients:
                print(f"{w:5} {c:3} clients: {fmt_row(await run_row(args.url, w, c, args.seconds))}", flush=True)

    asyncio.run(main())


def parse_trees(items: list[str]) -> list[tuple[str, Path, tuple[str, ...]]]:
    """``NAME=DIR[:MORE:...]`` items: a name, the tree, and more PYTHONPATH entries."""
    out = []
    for item in items or [f"raftcoord={HERE}"]:
        name, _, paths = item.rpartition("=")
        path, *extra = paths.split(os.pathsep)
        out.append((name or Path(path).name, Path(path).resolve(), tuple(extra)))
    return out


def cmd_compare(args: argparse.Namespace) -> None:
    procs = Processes()
    root = Path(tempfile.mkdtemp(prefix="http-load-"))
    systems: list[System] = []
    try:
        for name, tree, extra in parse_trees(args.tree):
            systems.append(start_raftcoord(name, tree, root / name, procs, extra))
        etcd = None if args.no_etcd else shutil.which("etcd")
        if etcd:
            systems.append(start_etcd(etcd, root / "etcd", procs))
        else:
            print("etcd: skipped (not on the PATH, or --no-etcd)")
        results = asyncio.run(compare(systems, args))
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(systems, results, args)


async def compare(systems: list[System], args: argparse.Namespace) -> dict[tuple[str, str, int], list[dict]]:
    async with aiohttp.ClientSession() as session:
        for s in systems:
            s.via = await leader_url(session, s) if args.via == "leader" else s.urls[0]
            print(f"{s.name}: {s.kind}, load through {s.via} ({args.via})", flush=True)
    for s in systems:
        await fill(s.via)
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for w in args.workloads:
            for c in args.clients:
                order = systems if rnd % 2 == 0 else list(reversed(systems))
                for s in order:
                    pids = [p.pid for p in s.procs]
                    lead = s.urls.index(s.via) if s.via in s.urls else 0
                    before = cpu_seconds(pids)
                    r = await run_row(s.via, w, c, args.seconds, warmup=0.0)
                    spent = [b - a for a, b in zip(before, cpu_seconds(pids))]
                    # CPU per answered request: robust to what else runs on the machine
                    r["leader_cpu_ms"] = 1000 * spent[lead] / max(1, r["ops"])
                    r["cluster_cpu_ms"] = 1000 * sum(spent) / max(1, r["ops"])
                    results.setdefault((s.name, w, c), []).append(r)
                    print(f"round {rnd + 1} {s.name:10} {w:5} {c:3} clients: {fmt_row(r)}", flush=True)
    return results


def report(systems: list[System], results: dict[tuple[str, str, int], list[dict]], args: argparse.Namespace) -> None:
    def med(name: str, w: str, c: int, field: str) -> float:
        return statistics.median(r[field] for r in results[(name, w, c)])

    has_etcd = any(s.kind == "etcd" for s in systems)
    print(f"\nmedians over {args.rounds} rounds of {args.seconds:g} s; ratio = throughput / etcd's "
          f"(p50 ratio = p50 / etcd's)")
    out = []
    for w in args.workloads:
        for c in args.clients:
            for s in systems:
                rate, p50, p99, lcpu, ccpu = (med(s.name, w, c, f) for f in
                                              ("rate", "p50_ms", "p99_ms", "leader_cpu_ms", "cluster_cpu_ms"))
                line = (f"{w:5} {c:3} clients  {s.name:10} {rate:9,.0f}/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
                        f"cpu/op {lcpu:.3f} via {ccpu:.3f} all")
                row = {"system": s.name, "workload": w, "clients": c, "rate": rate, "p50_ms": p50, "p99_ms": p99,
                       "leader_cpu_ms": lcpu, "cluster_cpu_ms": ccpu}
                if has_etcd and s.kind != "etcd":
                    er, ep = med("etcd", w, c, "rate"), med("etcd", w, c, "p50_ms")
                    row.update(ratio=rate / er, p50_ratio=p50 / ep)
                    line += f"   {rate / er:5.2f} x etcd   p50 {p50 / ep:5.2f} x"
                print(line)
                out.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out, "raw": [
            {"system": k[0], "workload": k[1], "clients": k[2], "rounds": v} for k, v in results.items()]}, indent=1))


def cmd_serve(args: argparse.Namespace) -> None:
    procs = Processes()
    root = Path(tempfile.mkdtemp(prefix="http-load-serve-"))
    try:
        _, tree, extra = parse_trees([f"serve={args.tree}"])[0]
        s = start_raftcoord("serve", tree, root / "c", procs, extra)

        async def find() -> str:
            async with aiohttp.ClientSession() as session:
                return await leader_url(session, s)

        via = asyncio.run(find())
        print(json.dumps({"leader": via, "urls": s.urls, "pids": [p.pid for p in s.procs],
                          "leader_pid": s.procs[s.urls.index(via)].pid}), flush=True)
        def stop(*_: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.hold)
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def rows(p: argparse.ArgumentParser) -> None:
        p.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",")], default=[1, 64])
        p.add_argument("--workloads", type=lambda t: t.split(","), default=["put", "lget", "sget"])
        p.add_argument("--seconds", type=float, default=5.0)

    p = sub.add_parser("compare")
    rows(p)
    p.add_argument("--tree", action="append", default=[], help="NAME=DIR holding a raftcoord package")
    p.add_argument("--no-etcd", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--via", choices=("leader", "first"), default="leader")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("url")
    rows(p)
    p.add_argument("url")
    p.set_defaults(fn=cmd_url)
    p = sub.add_parser("serve")
    p.add_argument("--tree", default=str(HERE))
    p.add_argument("--hold", type=float, default=3600.0)
    p.set_defaults(fn=cmd_serve)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
