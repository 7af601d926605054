"""Write throughput and latency of three replica processes on 127.0.0.1.

    python benchmarks/replica_bench.py [--settings JSON] [--no-secret] [--in-flight 1,32]
                                       [--seconds 5] [--system replica|repldict|both]

Starts three ``tests/replica_support/node.py`` processes (each one Replica over
the real Store, in its own process), waits for a leader, and has the leader's
process run the load itself: N threads, each proposing a 100-byte put and
waiting for it before the next. Prints writes/s, p50 and p99 latency.

``--system repldict`` runs the floor this library starts from instead: three
processes of plain pysyncobj ``ReplDict`` with the same persistence (journal
and dump files), the same secret and ``appendEntriesUseBatch=False``, the
leader's threads calling ``set(key, value, sync=True)``; ``both`` runs the two
one after the other, row by row, in one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from replica_support import free_port, wait_for  # noqa: E402
from replica_support.procs import NodeProcess  # noqa: E402

SECRET = "benchmark secret"


def _replica_rows(args: argparse.Namespace, settings: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-"))
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [NodeProcess({"self": a, "partners": [b for b in addrs if b != a], "data_dir": str(tmp / str(i)),
                          "password": None if args.no_secret else SECRET, "settings": settings,
                          "log_level": "WARNING"}, tmp / f"{i}.log")
             for i, a in enumerate(addrs)]
    try:
        for n in nodes:
            n.start()
        leader = wait_for(lambda: next((n for n in nodes if n.status()["role"] == "leader"), None), 15, "a leader")
        leader.call("bench", concurrency=4, seconds=1)  # warm-up
        return [leader.call("bench", concurrency=c, seconds=args.seconds, wait=args.seconds + 60) for c in counts]
    finally:
        for n in nodes:
            n.kill()


def _repldict_node(cfg: dict[str, Any]) -> None:
    """One ReplDict process; the one that becomes leader runs the load and prints its rows."""
    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    d = ReplDict()
    conf = SyncObjConf(password=cfg["password"], appendEntriesUseBatch=False, journalFile=cfg["dir"] + "/journal",
                       fullDumpFile=cfg["dir"] + "/dump", logCompactionMinEntries=10000, dynamicMembershipChange=False)
    obj = SyncObj(cfg["self"], cfg["partners"], consumers=[d], conf=conf)
    while obj.getStatus()["leader"] is None:
        time.sleep(0.05)
    if not obj._isLeader():
        time.sleep(3600)
        return
    rows = []
    for c in [4, *cfg["counts"]]:
        lats: list[float] = []
        stop = time.monotonic() + (cfg["seconds"] if rows else 1)  # the first row is a warm-up

        def writer(t: int) -> None:
            i = 0
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                d.set(b"bench/%d/%d" % (t, i % 100), bytes(100), sync=True, timeout=10)
                lats.append(time.perf_counter() - t0)
                i += 1

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(c)]
        started = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - started
        lats.sort()
        rows.append({"writes": len(lats), "per_second": len(lats) / elapsed,
                     "p50_ms": lats[len(lats) // 2] * 1000, "p99_ms": lats[int(len(lats) * 0.99)] * 1000})
    print(json.dumps(rows[1:]), flush=True)
    obj.destroy()


def _repldict_rows(args: argparse.Namespace, counts: list[int]) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="repldict-bench-"))
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    procs = []
    for i, a in enumerate(addrs):
        (tmp / str(i)).mkdir()
        cfg = {"self": a, "partners": [b for b in addrs if b != a], "dir": str(tmp / str(i)),
               "password": None if args.no_secret else SECRET, "counts": counts, "seconds": args.seconds}
        with open(tmp / f"{i}.log", "w") as log:  # pysyncobj logs hazard 5 there, many times a second
            procs.append(subprocess.Popen([sys.executable, __file__, "--repldict-node", json.dumps(cfg)],
                                          stdout=subprocess.PIPE, stderr=log, text=True))
    out: list[Any] = []
    try:
        readers = [threading.Thread(target=lambda p=p: out.append(p.stdout.readline()), daemon=True) for p in procs]
        for r in readers:
            r.start()
        wait_for(lambda: any(line.strip() for line in out), len(counts) * args.seconds + 90, "the ReplDict leader")
        return json.loads(next(line for line in out if line.strip()))
    finally:
        for p in procs:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="{}", help="ReplicaSettings keyword arguments as JSON")
    ap.add_argument("--no-secret", action="store_true", help="run without a cluster secret (no encryption)")
    ap.add_argument("--in-flight", default="1,32", help="comma-separated writer counts")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--system", choices=("replica", "repldict", "both"), default="replica")
    ap.add_argument("--repldict-node", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repldict_node:
        _repldict_node(json.loads(args.repldict_node))
        return
    settings = json.loads(args.settings)
    counts = [int(x) for x in args.in_flight.split(",")]
    secret = "no" if args.no_secret else "yes"
    systems = ["replica", "repldict"] if args.system == "both" else [args.system]
    for system in systems:
        rows = _replica_rows(args, settings, counts) if system == "replica" else _repldict_rows(args, counts)
        label = f"settings={settings}" if system == "replica" else "plain ReplDict, appendEntriesUseBatch=False"
        for c, r in zip(counts, rows):
            print(f"{system:8s} in flight {c:3d}: {r['per_second']:7.0f} writes/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  ({r['writes']} writes; secret={secret}, {label})", flush=True)


if __name__ == "__main__":
    main()
