"""scripts/local-cluster: start (with non-voters), status, kill, restart, stop on 127.0.0.1."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

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


def _script() -> Any:
    """The script as a module (it has no .py suffix), for its pure helpers."""
    loader = importlib.machinery.SourceFileLoader("local_cluster_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_issue10_default_voters_and_the_cluster_file(tmp_path: Path) -> None:
    """Every node votes up to 7 nodes, 3 beyond; ``--voters K`` makes the first K vote and marks the rest
    ``voter = false``; ``remove_block`` drops exactly one [[node]] table."""
    lc = _script()
    assert [lc.default_voters(n) for n in (1, 3, 7, 8, 10, 20)] == [1, 3, 7, 3, 3, 3]
    lc.write_config(tmp_path, 5, 2)
    with open(tmp_path / "cluster.toml", "rb") as f:
        nodes = tomllib.load(f)["node"]
    assert [(n["name"], n.get("voter", True)) for n in nodes] == [
        ("n1", True), ("n2", True), ("n3", False), ("n4", False), ("n5", False)]
    assert lc.non_voters(tmp_path) == ["n3", "n4", "n5"]
    text = (tmp_path / "cluster.toml").read_text()
    left = tomllib.loads(lc.remove_block(text, "n3"))
    assert [n["name"] for n in left["node"]] == ["n1", "n2", "n4", "n5"] and left["cluster"]["name"] == "local"
    assert lc.next_name(tmp_path) == "n6"


def test_issue10_start_refuses_more_voters_than_nodes(tmp_path: Path) -> None:
    """``start 3 --voters 4`` is a usage error before anything is written."""
    out = run("start", "3", "--voters", "4", "--dir", str(tmp_path / "lc"))
    assert out.returncode == 2 and "--voters" in out.stderr
    assert not (tmp_path / "lc" / "cluster.toml").exists()


def test_issue10_start_10_is_3_voters_and_7_non_voters(tmp_path: Path) -> None:
    """``start 10`` (no --voters) starts 3 voters and 7 non-voters, names the non-voters, and status shows
    each node's role: a leader and followers among n1-n3, learners n4-n10."""
    d = str(tmp_path / "lc")
    try:
        out = run("start", "10", "--dir", d)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "non-voters (voter = false): n4, n5, n6, n7, n8, n9, n10" in out.stdout
        cli = [sys.executable, "-m", "raftcoord", "--config", f"{d}/cluster.toml"]
        rows = json.loads(subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, check=True).stdout)
        roles = {r["name"]: r["role"] for r in rows}
        assert sorted(roles[n] for n in ("n1", "n2", "n3")) == ["follower", "follower", "leader"], roles
        assert {roles[f"n{i}"] for i in range(4, 11)} == {"learner"}, roles
        status = run("status", "--dir", d)
        assert status.returncode == 0 and "learner" in status.stdout
        assert "voters: n1, n2, n3; non-voters" in status.stdout
    finally:
        stopped = run("stop", "--dir", d)
    assert stopped.returncode == 0 and stopped.stdout.count("stopped") == 10


def test_issue10_add_and_remove_a_voter_and_a_non_voter(tmp_path: Path) -> None:
    """``add`` records the member, starts it with --join and waits for it; ``remove`` undoes that."""
    d = str(tmp_path / "lc")
    cli = [sys.executable, "-m", "raftcoord", "--config", f"{d}/cluster.toml"]

    def members() -> list[tuple[str, bool]]:
        out = subprocess.run([*cli, "member", "list", "--json"], capture_output=True, text=True, check=True).stdout
        return sorted((m["name"], m["voter"]) for m in json.loads(out)["members"])

    try:
        assert run("start", "3", "--dir", d).returncode == 0
        added = run("add", "--dir", d)
        assert added.returncode == 0, added.stdout + added.stderr
        added = run("add", "--non-voter", "--dir", d)
        assert added.returncode == 0, added.stdout + added.stderr
        assert members() == [("n1", True), ("n2", True), ("n3", True), ("n4", True), ("n5", False)]
        removed = run("remove", "n2", "--dir", d)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        assert members() == [("n1", True), ("n3", True), ("n4", True), ("n5", False)]
        with open(f"{d}/cluster.toml", "rb") as f:
            assert [n["name"] for n in tomllib.load(f)["node"]] == ["n1", "n3", "n4", "n5"]
        assert "was removed from the cluster" in Path(f"{d}/logs/n2.log").read_text()
        written = subprocess.run([*cli, "put", "after", "x"], capture_output=True, text=True)
        assert written.returncode == 0, written.stderr
    finally:
        run("stop", "--dir", d)
