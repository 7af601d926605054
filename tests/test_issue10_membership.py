"""Issue 10: membership changes through the log, on real node processes.

Grow 1 -> 3 -> 5 voters and shrink back to 3 under a steady write load;
replace a node whose data directory was deleted; remove the leader. Every
acknowledged write must survive, and every node (and every restart) must
agree on the members.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from raftcoord.client import Client
from raftcoord.errors import RaftcoordError, UnknownOutcomeError
from tests.cluster_support import LocalCluster, wait_until

pytestmark = pytest.mark.timeout(300)


def cli(cluster: LocalCluster, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``raftcoord --config FILE ARGS``, as an operator types it."""
    return subprocess.run([sys.executable, "-m", "raftcoord", "--config", str(cluster.config_path), *args],
                          capture_output=True, text=True, timeout=timeout)


def node_block(cluster: LocalCluster, name: str, voter: bool = True) -> str:
    lines = ["[[node]]", f'name = "{name}"', f'raft = "{cluster.raft[name]}"', f'client = "{cluster.client_addr[name]}"']
    if not voter:
        lines.append("voter = false")
    return "\n".join(lines) + "\n\n"


def start_joining(cluster: LocalCluster, name: str) -> None:
    cluster.start(name, argv=lambda n: [sys.executable, "-m", "raftcoord", "node", "--config",
                                        str(cluster.config_path), "--name", n, "--join"])


def add_member(cluster: LocalCluster, name: str, *, voter: bool = True) -> None:
    """What ``scripts/local-cluster add`` does: the file, ``member add``, then ``node --join``."""
    with cluster.config_path.open("a") as f:
        f.write(node_block(cluster, name, voter))
    args = ["member", "add", name, "--raft", cluster.raft[name], "--client", cluster.client_addr[name]]
    done = cli(cluster, *args, *([] if voter else ["--non-voter"]))
    assert done.returncode == 0, done.stderr + done.stdout
    start_joining(cluster, name)
    cluster.wait_healthy(name, timeout=60)


def remove_member(cluster: LocalCluster, name: str, *, voter: bool = True) -> None:
    done = cli(cluster, "member", "remove", name)
    assert done.returncode == 0, done.stderr + done.stdout
    # The removed node learns it and stops by itself, saying why.
    cluster.procs[name].wait(timeout=60)
    assert "was removed from the cluster" in cluster.log(name)
    rest = [n for n in cluster.procs if n != name and cluster.procs[n].poll() is None]

    def recorded_removed() -> bool:
        states = {n["host"]: n["status"] for n in cluster.client(*rest).nodes()}
        return states.get(name) == "removed"

    wait_until(recorded_removed, 30, f"{name}'s state record to say removed")
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace(node_block(cluster, name, voter), ""))


def members_seen_by(cluster: LocalCluster, name: str) -> list[tuple[str, bool]]:
    out = Client([cluster.client_addr[name]], timeout=5).call("GET", "/raftcoord/v1/members?consistency=serializable")
    return sorted((m["name"], m["voter"]) for m in out["members"])


def wait_agreed(cluster: LocalCluster, running: list[str], expected: list[tuple[str, bool]]) -> None:
    def agreed() -> bool:
        return all(members_seen_by(cluster, n) == expected for n in running)

    wait_until(agreed, 60, f"every node to list the members {expected}", interval=0.2)

    def raft_agreed() -> bool:
        voters = sorted(cluster.raft[n] for n, v in expected if v)
        return all(cluster.status(n).get("voters") == voters for n in running if (n, True) in expected)

    wait_until(raft_agreed, 60, "every voter's raft configuration to match the registry", interval=0.2)


class Writer:
    """Puts key w/i through every node's endpoint, one at a time, recording each outcome."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.client = Client(list(cluster.client_addr.values()), timeout=20, dial_timeout=0.5)
        self.acked: list[bytes] = []
        self.unknown: list[bytes] = []
        self.failed = 0
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            key = f"w/{i:06d}".encode()
            i += 1
            try:
                self.client.put(key, b"v")
                self.acked.append(key)
                self.last_ok = time.monotonic()
            except UnknownOutcomeError:
                self.unknown.append(key)
            except RaftcoordError:
                self.failed += 1
            time.sleep(0.01)

    def wait_progress(self, n: int = 5) -> None:
        before = len(self.acked)
        wait_until(lambda: len(self.acked) >= before + n, 60, f"{n} more acknowledged writes")


def check_writes(cluster: LocalCluster, names: list[str], writer: Writer) -> None:
    for name in names:
        client = Client([cluster.client_addr[name]], timeout=20)
        answer = client.range(b"w/", b"w0")
        have = {kv["key"] for kv in answer.get("kvs", [])}
        lost = [k for k in writer.acked if k not in have]
        assert not lost, f"{name} lost {len(lost)} acknowledged writes, e.g. {lost[:3]}"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = LocalCluster(tmp_path, 5)
    yield c
    c.stop_all()


def test_issue10_grow_1_3_5_and_shrink_to_3_under_writes_then_full_restart(cluster: LocalCluster) -> None:
    # Snapshots every 40 commands: membership changes land on both sides of
    # snapshots, and a restart must take the log's changes after its snapshot
    # (pysyncobj issue 133: a snapshot's topology must not hide them).
    cluster.write_config(cluster.config_path, cluster.secret, "compaction_entries = 40", names=["n1"])
    cluster.start("n1")
    cluster.wait_for_leader(["n1"])
    with Writer(cluster) as writer:
        writer.wait_progress()
        for name in ("n2", "n3"):
            add_member(cluster, name)  # n2: the one-node cluster's second voter (pysyncobj issue 51)
            writer.wait_progress()
        wait_agreed(cluster, ["n1", "n2", "n3"], [("n1", True), ("n2", True), ("n3", True)])
        for name in ("n4", "n5"):
            add_member(cluster, name)
            writer.wait_progress()
        five = [(f"n{i}", True) for i in range(1, 6)]
        wait_agreed(cluster, cluster.names, five)
        for name in ("n4", "n5"):
            remove_member(cluster, name)
            writer.wait_progress()
        three = [("n1", True), ("n2", True), ("n3", True)]
        wait_agreed(cluster, ["n1", "n2", "n3"], three)
    assert len(writer.acked) > 20
    check_writes(cluster, ["n1", "n2", "n3"], writer)

    # A full restart: each node starts from its own data, and the log
    # decides; nobody may come back with another idea of the members, not
    # even with a stale cluster file that still lists n4 and n5 as voters.
    for name in ("n1", "n2", "n3"):
        cluster.kill(name)
    cluster.write_config(cluster.config_path, cluster.secret, "compaction_entries = 40")
    cluster.start("n1", "n2", "n3")
    cluster.wait_for_leader(["n1", "n2", "n3"], timeout=60)
    wait_agreed(cluster, ["n1", "n2", "n3"], three)
    check_writes(cluster, ["n1", "n2", "n3"], writer)


def test_issue10_remove_the_leader_hands_over_first(cluster: LocalCluster) -> None:
    cluster.write_config(cluster.config_path, cluster.secret, names=["n1", "n2", "n3"])
    cluster.start("n1", "n2", "n3")
    leader = cluster.wait_for_leader(["n1", "n2", "n3"])
    with Writer(cluster) as writer:
        writer.wait_progress()
        remove_member(cluster, leader)
        rest = [n for n in ("n1", "n2", "n3") if n != leader]
        new = cluster.wait_for_leader(rest)
        assert new != leader
        writer.wait_progress()
        wait_agreed(cluster, rest, sorted((n, True) for n in rest))
    check_writes(cluster, rest, writer)


def test_issue10_replace_a_node_whose_data_directory_was_deleted(cluster: LocalCluster) -> None:
    cluster.write_config(cluster.config_path, cluster.secret, names=["n1", "n2", "n3"])
    cluster.start("n1", "n2", "n3")
    leader = cluster.wait_for_leader(["n1", "n2", "n3"])
    victim = next(n for n in ("n1", "n2", "n3") if n != leader)
    with Writer(cluster) as writer:
        writer.wait_progress()
        cluster.kill(victim)
        shutil.rmtree(cluster.root / "data" / victim)
        writer.wait_progress()
        # The operator's steps: remove the dead member, add it back, start it with --join.
        done = cli(cluster, "member", "remove", victim)
        assert done.returncode == 0, done.stderr + done.stdout
        text = cluster.config_path.read_text()
        cluster.config_path.write_text(text.replace(node_block(cluster, victim), ""))
        add_member(cluster, victim)
        writer.wait_progress()
        wait_agreed(cluster, ["n1", "n2", "n3"], [("n1", True), ("n2", True), ("n3", True)])
    check_writes(cluster, ["n1", "n2", "n3"], writer)
    listed = json.loads(cli(cluster, "member", "list", "--json").stdout)
    assert sorted(m["name"] for m in listed["members"]) == ["n1", "n2", "n3"]


def test_issue10_a_non_voter_is_added_promoted_and_removed(cluster: LocalCluster) -> None:
    cluster.write_config(cluster.config_path, cluster.secret, names=["n1", "n2", "n3"])
    cluster.start("n1", "n2", "n3")
    cluster.wait_for_leader(["n1", "n2", "n3"])
    cluster.client("n1").put(b"before", b"1")
    with Writer(cluster) as writer:
        add_member(cluster, "n4", voter=False)
        assert cluster.status("n4")["role"] == "learner"
        wait_until(lambda: cluster.client("n4").get(b"before", serializable=True), 30, "n4 to catch up")
        assert cluster.client("n4").get(b"before")["value"] == b"1"  # linearizable, through the leader
        voters3 = [("n1", True), ("n2", True), ("n3", True)]
        wait_agreed(cluster, ["n1", "n2", "n3", "n4"], [*voters3, ("n4", False)])
        writer.wait_progress()

        done = cli(cluster, "member", "promote", "n4")
        assert done.returncode == 0, done.stderr + done.stdout
        wait_until(lambda: cluster.status("n4")["role"] in ("follower", "leader"), 60, "n4 to vote")
        wait_agreed(cluster, ["n1", "n2", "n3", "n4"], [*voters3, ("n4", True)])
        assert "was promoted to voter" in cluster.log("n4")
        writer.wait_progress()

        remove_member(cluster, "n4", voter=False)
        wait_agreed(cluster, ["n1", "n2", "n3"], voters3)
        writer.wait_progress()
    check_writes(cluster, ["n1", "n2", "n3"], writer)


def test_issue10_a_node_that_is_not_a_member_cannot_join(cluster: LocalCluster) -> None:
    """pysyncobj issue 89: only a node the cluster added may take part, at the address it was added with."""
    cluster.write_config(cluster.config_path, cluster.secret, names=["n1", "n2", "n3"])
    cluster.start("n1", "n2", "n3")
    cluster.wait_for_leader(["n1", "n2", "n3"])
    with cluster.config_path.open("a") as f:
        f.write(node_block(cluster, "n4"))
    start_joining(cluster, "n4")
    assert cluster.procs["n4"].wait(timeout=60) != 0
    assert "node n4 is not a member of the cluster: add it first with `raftcoord member add n4" in cluster.log("n4")
    assert members_seen_by(cluster, "n1") == [("n1", True), ("n2", True), ("n3", True)]


def test_issue10_an_embedded_node_joins_with_open_coordinator(cluster: LocalCluster) -> None:
    """What a PuzzleDB node does: open_coordinator(..., join=True) after ``member add``, then it serves."""
    from raftcoord.server import open_coordinator

    cluster.write_config(cluster.config_path, cluster.secret, names=["n1", "n2", "n3"])
    cluster.start("n1", "n2", "n3")
    cluster.wait_for_leader(["n1", "n2", "n3"])
    cluster.client("n1").put(b"before", b"1")
    # The file says non-voter; the registry says voter: joining, the registry wins.
    with cluster.config_path.open("a") as f:
        f.write(node_block(cluster, "n4", voter=False))
    done = cli(cluster, "member", "add", "n4", "--raft", cluster.raft["n4"], "--client", cluster.client_addr["n4"])
    assert done.returncode == 0, done.stderr + done.stdout
    coord = open_coordinator(str(cluster.config_path), node="n4", join=True)
    try:
        wait_until(lambda: coord.status()["role"] in ("follower", "leader"), 30, "n4 to vote")
        assert coord.get(b"before") == b"1"  # linearizable
        coord.put(b"from-n4", b"2")  # forwarded to the leader
        assert cluster.client("n1").get(b"from-n4")["value"] == b"2"
    finally:
        coord.close()
