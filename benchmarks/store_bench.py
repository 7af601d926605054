"""Memory, snapshot and restore cost of the state machine alone (issue 9, item 3).

    python benchmarks/store_bench.py [--keys 100000,1000000] [--value-bytes 100] [--txn-ops 1]
                                     [--repeat 3] [--baseline DIR] [--tracemalloc]

For each key count, a fresh process builds a :class:`raftcoord.store.Store`
through ``Store.apply`` (one CBOR put per key: ``k`` + 9 digits, a value of
``--value-bytes``; or txns of ``--txn-ops`` puts), then reports the resident size it holds (VmRSS, after a
full collection), the time of ``snapshot()`` and of ``restore()`` (median of
``--repeat``), the snapshot's size, and the resident size of a process that
only restored that snapshot (what a restarted node holds).

``--baseline DIR`` runs the same measurements, interleaved, against the
``raftcoord`` package found in DIR (e.g. an old checkout made with ``git
archive HEAD raftcoord | tar -x -C DIR``) and prints both with their ratio.
``--tracemalloc`` adds where the bytes go (top allocation sites) at the
smallest key count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(n: int, value_bytes: int, txn_ops: int):  # noqa: ANN202 - runs in the child, against either package
    import cbor2

    from raftcoord.store import Store

    store = Store()
    value = b"v" * value_bytes
    if txn_ops <= 1:
        for i in range(n):
            store.apply(cbor2.dumps({"op": "put", "key": b"k%09d" % i, "value": value}))
        return store
    for first in range(0, n, txn_ops):
        ops = [{"op": "put", "key": b"k%09d" % i, "value": value} for i in range(first, min(n, first + txn_ops))]
        assert store.apply(cbor2.dumps({"op": "txn", "success": ops})).result["ok"]
    return store


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    if args.baseline:
        sys.path.insert(0, args.baseline)
    else:
        sys.path.insert(0, str(ROOT))
    import raftcoord.store as store_mod

    out: dict[str, object] = {"package": str(Path(store_mod.__file__).parent), "keys": args.n}
    if args.mode == "restore-rss":
        blob = Path(args.snapshot).read_bytes()
        gc.collect()
        base = _rss_mb()
        started = time.perf_counter()
        store = store_mod.Store.restore(blob)
        out["restore_s"] = time.perf_counter() - started
        del blob
        gc.collect()
        out["rss_restored_mb"] = _rss_mb()
        out["rss_restored_delta_mb"] = out["rss_restored_mb"] - base
        assert len(store) == args.n
        print(json.dumps(out), flush=True)
        return
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)
    gc.collect()
    base = _rss_mb()
    started, cpu = time.perf_counter(), time.process_time()
    store = _build(args.n, args.value_bytes, args.txn_ops)
    out["apply_per_s"] = args.n / (time.perf_counter() - started)
    out["apply_per_cpu_s"] = args.n / (time.process_time() - cpu)
    gc.collect()
    out["rss_mb"] = _rss_mb()
    out["rss_delta_mb"] = out["rss_mb"] - base
    if args.tracemalloc:
        snap = tracemalloc.take_snapshot()
        out["top"] = [f"{s.size / 2**20:7.1f} MiB {s.count:9d} blocks  {s.traceback[0]}"
                      for s in snap.statistics("lineno")[:12]]
        tracemalloc.stop()
    snap_times, snap_cpu, restore_times, restore_cpu = [], [], [], []
    blob = b""
    for _ in range(args.repeat):
        started, cpu = time.perf_counter(), time.process_time()
        blob = store.snapshot()
        snap_times.append(time.perf_counter() - started)
        snap_cpu.append(time.process_time() - cpu)
    for _ in range(args.repeat):
        started, cpu = time.perf_counter(), time.process_time()
        restored = store_mod.Store.restore(blob)
        restore_times.append(time.perf_counter() - started)
        restore_cpu.append(time.process_time() - cpu)
        del restored
    # Medians; CPU time too, as other processes share this machine's cores.
    out["snapshot_s"] = statistics.median(snap_times)
    out["snapshot_cpu_s"] = statistics.median(snap_cpu)
    out["restore_s_inproc"] = statistics.median(restore_times)
    out["restore_cpu_s"] = statistics.median(restore_cpu)
    out["snapshot_mb"] = len(blob) / 2**20
    Path(args.snapshot).write_bytes(blob)
    print(json.dumps(out), flush=True)


def _run(argv: list[str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(argv)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="100000,1000000", help="comma-separated key counts")
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--txn-ops", type=int, default=1,
                    help="puts per command (a txn of that many puts, as `raftcoord bench` loads keys)")
    ap.add_argument("--repeat", type=int, default=3, help="snapshot/restore timings per size (median)")
    ap.add_argument("--baseline", default="", help="a directory holding another raftcoord package to compare")
    ap.add_argument("--tracemalloc", action="store_true", help="where the bytes go, at the smallest size")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="build", help=argparse.SUPPRESS)
    ap.add_argument("--snapshot", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    counts = [int(x) for x in args.keys.split(",")]
    variants = [("after", "")] + ([("before", args.baseline)] if args.baseline else [])
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
    rows: dict[tuple[str, int], dict[str, object]] = {}
    try:
        for i, n in enumerate(counts):
            # Interleaved: both variants of one size run back to back.
            for name, base in variants if i % 2 == 0 else list(reversed(variants)):
                snap = tmp / f"{name}-{n}.snap"
                common = ["--n", str(n), "--value-bytes", str(args.value_bytes), "--txn-ops", str(args.txn_ops),
                          "--snapshot", str(snap),
                          "--repeat", str(args.repeat)] + (["--baseline", base] if base else [])
                trace = ["--tracemalloc"] if args.tracemalloc and n == min(counts) else []
                row = _run(common + trace)
                row.update({k: v for k, v in _run(common + ["--mode", "restore-rss"]).items() if k != "package"})
                rows[(name, n)] = row
                print(f"{name:6s} {n:>9,d} keys: RSS {row['rss_mb']:7.1f} MB (+{row['rss_delta_mb']:.1f}), "
                      f"{row['apply_per_cpu_s']:7,.0f} puts/cpu-s, snapshot {row['snapshot_s'] * 1000:5.0f} ms "
                      f"(cpu {row['snapshot_cpu_s'] * 1000:5.0f}, {row['snapshot_mb']:.1f} MB), "
                      f"restore {row['restore_s_inproc'] * 1000:5.0f} ms (cpu {row['restore_cpu_s'] * 1000:5.0f}; "
                      f"fresh process {row['restore_s'] * 1000:5.0f}), "
                      f"restored RSS {row['rss_restored_mb']:7.1f} MB", flush=True)
                for line in row.get("top", []):  # type: ignore[union-attr]
                    print("    " + line)
        if args.baseline:
            print("\nratios after/before:")
            for n in counts:
                a, b = rows[("after", n)], rows[("before", n)]
                print(f"  {n:>9,d} keys: RSS {a['rss_mb'] / b['rss_mb']:.2f} x, "  # type: ignore[operator]
                      f"snapshot cpu {a['snapshot_cpu_s'] / b['snapshot_cpu_s']:.2f} x, "  # type: ignore[operator]
                      f"restore cpu {a['restore_cpu_s'] / b['restore_cpu_s']:.2f} x, "  # type: ignore[operator]
                      f"apply {a['apply_per_cpu_s'] / b['apply_per_cpu_s']:.2f} x")  # type: ignore[operator]
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
