"""scripts/local-cluster: start, status, kill, restart, stop on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "local-cluster"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_local_cluster_lifecycle(tmp_path: Path) -> None:
    """start writes a config and elects a leader; the CLI works with it; stop ends every node."""
    d = str(tmp_path / "lc")
    try:
        out = run("start", "3", "--dir", d)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "leader" in out.stdout
        cli = [sys.executable, "-m", "raftcoord", "--config", f"{d}/cluster.toml"]
        rows = json.loads(subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, check=True).stdout)
        assert [r["name"] for r in rows] == ["n1", "n2", "n3"]
        assert all(r["client_url"].startswith("http://127.0.0.1:") and r["role"] and r["term"] for r in rows)
        assert run("kill", "n1", "--dir", d).returncode == 0
        assert run("restart", "n1", "--dir", d).returncode == 0
        assert run("kill", "nope", "--dir", d).returncode == 2
    finally:
        stopped = run("stop", "--dir", d)
    assert stopped.returncode == 0 and stopped.stdout.count("stopped") == 3
