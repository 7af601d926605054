"""Write throughput and latency of three replica processes on 127.0.0.1.

    python benchmarks/replica_bench.py [--settings JSON] [--no-secret] [--in-flight 1,32] [--seconds 5]

Starts three ``tests/replica_support/node.py`` processes (each one Replica over
the real Store, in its own process), waits for a leader, and has the leader's
process run the load itself: N threads, each proposing a 100-byte put and
waiting for it before the next. Prints writes/s, p50 and p99 latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from replica_support import free_port, wait_for  # noqa: E402
from replica_support.procs import NodeProcess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="{}", help="ReplicaSettings keyword arguments as JSON")
    ap.add_argument("--no-secret", action="store_true", help="run without a cluster secret (no encryption)")
    ap.add_argument("--in-flight", default="1,32", help="comma-separated writer counts")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    settings = json.loads(args.settings)
    tmp = Path(tempfile.mkdtemp(prefix="replica-bench-"))
    addrs = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    nodes = [NodeProcess({"self": a, "partners": [b for b in addrs if b != a], "data_dir": str(tmp / str(i)),
                          "password": None if args.no_secret else "benchmark secret", "settings": settings,
                          "log_level": "WARNING"}, tmp / f"{i}.log")
             for i, a in enumerate(addrs)]
    try:
        for n in nodes:
            n.start()
        leader = wait_for(lambda: next((n for n in nodes if n.status()["role"] == "leader"), None), 15, "a leader")
        leader.call("bench", concurrency=4, seconds=1)  # warm-up
        for c in (int(x) for x in args.in_flight.split(",")):
            r = leader.call("bench", concurrency=c, seconds=args.seconds, wait=args.seconds + 60)
            print(f"in flight {c:3d}: {r['per_second']:7.0f} writes/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  ({r['writes']} writes; secret={'no' if args.no_secret else 'yes'}, "
                  f"settings={settings})", flush=True)
    finally:
        for n in nodes:
            n.kill()


if __name__ == "__main__":
    main()
