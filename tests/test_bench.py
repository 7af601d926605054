"""``raftcoord bench``: every system it finds produces figures. No test asserts a speed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from raftcoord.bench.report import format_table, targets
from raftcoord.bench.runner import NONVOTER_CLIENTS, NONVOTERS, RUNS, SYSTEMS
from raftcoord.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _bench(tmp_path: Path, *args: str, timeout: float) -> tuple[dict[str, Any], str, str]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}
    proc = subprocess.run([sys.executable, "-m", "raftcoord", "bench", *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), proc.stdout, proc.stderr


def _check_every_system_measured(report: dict[str, Any], workloads: set[str], stdout: str) -> None:
    found = [s for s in SYSTEMS if s not in report["skipped"]]
    if shutil.which("etcd") is None:
        assert "etcd" in report["skipped"] and "etcd: skipped" in stdout
    else:
        assert "etcd" in found
    for system in found:
        for workload in workloads & RUNS[system] & {"puts", "get-linearizable", "get-serializable", "cas", "messages"}:
            rows = [r for r in report["rows"] if r["system"] == system and r["workload"] == workload]
            expected = list(NONVOTER_CLIENTS) if system == NONVOTERS else [1, 16, 64]
            assert sorted(r["clients"] for r in rows) == expected, (system, workload)
            for r in rows:
                assert "failed" not in r, r
                assert r["ops"] > 0 and r["p99_ms"] is not None, r
                if workload == "messages":
                    assert r["delivered"] > 0 and r["delivery_ms"]["p99"] is not None, r
                if system == NONVOTERS:
                    assert r["baseline"]["ops"] > 0 and r["vs_3_voters"]["p50"] is not None, r


@pytest.mark.cluster
def test_bench_quick_gives_figures_for_every_system_and_workload(tmp_path: Path) -> None:
    """``raftcoord bench --quick``: every workload of every system found has figures, also failover, restart and
    memory (extrapolated, and said so); a table with ratios, a JSON file and progress lines."""
    report, stdout, stderr = _bench(tmp_path, "--quick", timeout=600)
    _check_every_system_measured(report, set(RUNS["raftcoord"]), stdout)
    assert "ratios" in stdout and "figures written to" in stdout
    assert "clients" in stderr  # the progress lines
    for system in ("raftcoord", "etcd"):
        if system not in report["skipped"]:
            assert report["failover"][system]["kills"] == 2
    assert [r["keys"] for r in report["keys"]["restart"]] == [100_000]
    assert report["keys"]["memory"]["estimate_1m_bytes"] > 0
    assert "EXTRAPOLATED" in stdout
    assert NONVOTERS not in report["skipped"]
    for clients in NONVOTER_CLIENTS:  # the issue 10 row: 3 voters + 7 non-voters against 3 voters alone
        assert f"non-voters: puts at {clients} clients, p50/p99 ms: 3 voters + 7 non-voters" in stdout
    assert "3v+7nv/3v p50" in stdout


def test_bench_refuses_an_unknown_system_in_one_line() -> None:
    """An unknown system name is a usage error (exit 2) on one line, before anything starts."""
    result = CliRunner().invoke(main, ["bench", "--systems", "raftcoord,mongodb"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "mongodb" in result.output


def test_report_of_a_run_without_etcd_says_so_and_names_no_ratio() -> None:
    """A report whose etcd was skipped prints the skip line, its rows, and leaves etcd's targets unmeasured."""
    row = {"ops": 10, "per_second": 20.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
    report: dict[str, Any] = {
        "options": {"quick": True, "seconds": 0.5, "warmup": 0.2, "clients": [1, 16, 64]},
        "systems": {"raftcoord": {"version": "0.1.0"}, "pysyncobj": {"version": "0.3.17"}},
        "skipped": {"etcd": "no `etcd` on the PATH"},
        "rows": [{"system": s, "workload": "puts", "clients": c, **row} for s in ("raftcoord", "pysyncobj")
                 for c in (1, 16, 64)],
        "failover": {}, "keys": None,
    }
    report["targets"] = targets(report)
    text = format_table(report)
    assert "etcd: skipped (no `etcd` on the PATH)" in text
    assert "20/s 1.00/2.00" in text
    etcd_targets = [t for t in report["targets"] if "etcd" in t["name"]]
    assert etcd_targets and all(t["met"] is None for t in etcd_targets)


def test_issue10_report_shows_the_non_voter_row_and_its_ratio() -> None:
    """A run with the 3-voter + 7-non-voter system prints its cells, the ratios to 3 voters alone on the puts rows,
    and one line per client count naming both latencies."""
    def row(p50: float, p99: float) -> dict[str, Any]:
        return {"ops": 100, "per_second": 200.0, "p50_ms": p50, "p99_ms": p99, "errors": 0}

    nv_rows = [{"system": NONVOTERS, "workload": "puts", "clients": c, **row(2.2, 4.4), "baseline": row(2.0, 4.0),
                "vs_3_voters": {"p50": 1.1, "p99": 1.1, "per_second": 1.0}} for c in NONVOTER_CLIENTS]
    report: dict[str, Any] = {
        "options": {"quick": True, "seconds": 0.5, "warmup": 0.2, "clients": [1, 16, 64]},
        "systems": {"raftcoord": {"version": "0.1.0"}, NONVOTERS: {"version": "0.1.0"}},
        "skipped": {}, "failover": {}, "keys": None,
        "rows": [{"system": "raftcoord", "workload": "puts", "clients": c, **row(2.0, 4.0)} for c in (1, 16, 64)]
        + nv_rows,
    }
    report["targets"] = targets(report)
    text = format_table(report)
    assert "raftcoord 3v+7nv" in text and "3v+7nv/3v p50 1.1x p99 1.1x" in text
    assert ("non-voters: puts at 16 clients, p50/p99 ms: 3 voters + 7 non-voters 2.20/4.40 (200/s), "
            "3 voters alone 2.00/4.00 (200/s): ratio p50 1.1x, p99 1.1x, throughput 1.0x") in text
    failed = {**report, "rows": report["rows"][:3] + [{"system": NONVOTERS, "workload": "puts", "clients": 1,
                                                       "failed": "RuntimeError: boom"}]}
    assert "non-voters: puts at 1 clients: no figures (RuntimeError: boom)" in format_table(failed)
