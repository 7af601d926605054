"""The chaos cluster and its faults: every fault heals into a healthy cluster that serves reads and writes.

Against real node processes: in network namespaces when run as root with
iproute2 (the default here), else through the fault proxy on 127.0.0.1.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from raftcoord.chaos import netns
from raftcoord.chaos.cluster import ChaosCluster, NetworkUnsupportedError
from raftcoord.chaos.nemesis import FAULTS, DelayFault, DropFault, KillFault, PartitionFault, faults_for
from raftcoord.errors import RaftcoordError

NETNS_WHY = netns.available()
needs_netns = pytest.mark.skipif(NETNS_WHY is not None, reason=f"network namespaces unavailable: {NETNS_WHY}")
HEAL_DEADLINE = 30.0
#: The namespace pytest started in (fixtures may move the main thread into a control namespace).
_HOME_NS = os.open("/proc/thread-self/ns/net", os.O_RDONLY)


def _home_addresses() -> str:
    """``ip -o addr`` of the namespace pytest started in."""
    return subprocess.run(["nsenter", f"--net=/proc/{os.getpid()}/fd/{_HOME_NS}", "ip", "-o", "addr"],
                          capture_output=True, text=True, check=True).stdout


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def assert_serves_everywhere(cluster: ChaosCluster, deadline: float = 10.0) -> None:
    """Every node takes a write and answers a linearizable read of it through its own endpoint."""
    for name in cluster.names:
        key, value = f"chaos/{name}/{uuid.uuid4().hex}".encode(), uuid.uuid4().hex.encode()
        end = time.monotonic() + deadline
        while True:
            try:
                client = cluster.client(name, timeout=5)
                client.put(key, value)
                got = client.get(key)
                assert got is not None and got["value"] == value, f"{name} read {got!r}"
                break
            except RaftcoordError as exc:
                if time.monotonic() > end:
                    raise AssertionError(f"{name} did not serve a write and read within {deadline} s: {exc}")
                time.sleep(0.2)


def _read_fails(cluster: ChaosCluster, name: str, key: bytes) -> bool:
    try:
        cluster.client(name, timeout=3).get(key)
    except RaftcoordError:
        return True
    return False


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    with ChaosCluster(tmp_path_factory.mktemp("chaos3"), 3, seed=1) as cluster:
        yield cluster


def test_faults_for_parses_kinds_and_refuses_unknown() -> None:
    """faults_for maps a comma list to classes, in order, once each; an unknown kind is a ValueError."""
    assert faults_for("kill,pause, partition,kill") == [FAULTS["kill"], FAULTS["pause"], FAULTS["partition"]]
    assert set(FAULTS) >= {"kill", "kill-leader", "kill-majority", "pause", "partition", "delay", "drop"}
    with pytest.raises(ValueError, match="bogus"):
        faults_for("kill,bogus")


def test_drop_program_shape() -> None:
    """The classic-BPF drop program checks IPv4, then each blocked address, and ends in pass/drop returns."""
    prog = netns.drop_program(["10.213.1.11"], ["10.213.1.12"], 0.25)
    count, *words = prog.split(",")
    assert int(count) == len(words)
    assert words[0] == "40 0 0 12" and words[-1] == "6 0 0 2"
    assert "21 " in words[3] and str(0x0AD5010B) in words[3]


FAULT_CASES = [
    pytest.param(lambda: FAULTS["kill"](), id="kill"),
    pytest.param(lambda: FAULTS["kill-leader"](), id="kill-leader"),
    pytest.param(lambda: FAULTS["kill-majority"](), id="kill-majority"),
    pytest.param(lambda: FAULTS["pause"](), id="pause"),
    pytest.param(lambda: PartitionFault("isolate-leader"), id="partition-isolate-leader"),
    pytest.param(lambda: PartitionFault("majority-minority"), id="partition-majority-minority"),
    pytest.param(lambda: FAULTS["partition"](), id="partition-random"),
    pytest.param(lambda: FAULTS["delay"](), id="delay"),
    pytest.param(lambda: FAULTS["drop"](), id="drop"),
]


def wait_leader_among(cluster: ChaosCluster, names: list[str], timeout: float = 15.0) -> str:
    """Poll until one of ``names`` says it is leader; fail naming who was asked."""
    end = time.monotonic() + timeout
    while True:
        for name in names:
            try:
                if cluster.alive(name) and cluster.status(name, timeout=1).get("role") == "leader":
                    return name
            except RaftcoordError:
                pass
        if time.monotonic() > end:
            raise AssertionError(f"none of {names} became leader within {timeout} s")
        time.sleep(0.1)


def assert_fault_bites(cluster: ChaosCluster, fault: Any, leader: str | None, dropped_before: int) -> None:
    """The fault did what it says: victims down, a new leader behind a cut, packets dropped."""
    if fault.kind.startswith("kill"):
        assert fault.victims and not any(cluster.alive(v) for v in fault.victims)
        survivors = [n for n in cluster.names if n not in fault.victims]
        if fault.kind == "kill-leader":
            assert fault.victims == [leader]
            wait_leader_among(cluster, survivors)
    elif fault.kind == "pause":
        assert fault.victim in cluster.paused
        if fault.victim == leader:
            wait_leader_among(cluster, [n for n in cluster.names if n != leader])
    elif fault.kind == "partition":
        small, big = sorted(fault.groups, key=len)
        assert cluster.blocked == {frozenset((a, b)) for a in small for b in big}
        if leader in small:  # the majority must elect its own leader: the cut really cuts
            wait_leader_among(cluster, big)
    elif fault.kind == "delay":
        client = cluster.client(cluster.leader() or cluster.names[0], timeout=10)
        started = time.monotonic()
        client.put(b"chaos/delayed", b"1")  # a commit needs a round trip to a follower and back
        assert time.monotonic() - started >= cluster.delay
    elif fault.kind == "drop":
        end = time.monotonic() + 5
        while cluster.dropped() <= dropped_before:
            assert time.monotonic() < end, "the drop fault dropped nothing"
            time.sleep(0.1)


@pytest.mark.cluster
@pytest.mark.parametrize("make", FAULT_CASES)
def test_fault_injects_and_heals(cluster3: ChaosCluster, make: Callable[[], Any]) -> None:
    """Each fault bites while injected, and once healed leaves a healthy cluster serving every node."""
    fault = make()
    why = fault.unsupported(cluster3)
    if why is not None:
        # Reported, not skipped silently: inject refuses with the reason.
        with pytest.raises(NetworkUnsupportedError):
            fault.inject(cluster3, random.Random(7))
        pytest.skip(f"{fault.kind} unsupported on the {cluster3.mode} network: {why}")
    cluster3.wait_healthy(HEAL_DEADLINE)
    leader, dropped_before = cluster3.leader(), cluster3.dropped()
    description = fault.inject(cluster3, random.Random(7))
    assert description.startswith(fault.kind)
    try:
        time.sleep(1.0)  # let the fault bite (elections, timeouts); the checks poll
        assert_fault_bites(cluster3, fault, leader, dropped_before)
    finally:
        fault.heal(cluster3)
    assert cluster3.blocked == set() and cluster3.loss == 0 and cluster3.delay == 0
    cluster3.wait_healthy(HEAL_DEADLINE)
    assert_serves_everywhere(cluster3)


@pytest.mark.cluster
def test_partitioned_minority_cannot_serve_linearizable_read_until_healed(cluster3: ChaosCluster) -> None:
    """A node cut off from the majority fails linearizable reads, and serves them again after the heal."""
    cluster3.wait_healthy(HEAL_DEADLINE)
    leader = cluster3.leader()
    victim = next(n for n in cluster3.names if n != leader)
    key = f"chaos/minority/{uuid.uuid4().hex}".encode()
    cluster3.client(leader or cluster3.names[0]).put(key, b"before")
    cluster3.partition([victim], [n for n in cluster3.names if n != victim])
    try:
        time.sleep(1.5)  # beyond an election timeout: the cut node has heard nothing since
        cluster3.client(leader or cluster3.names[0]).put(key, b"during")
        assert _read_fails(cluster3, victim, key), f"{victim} served a linearizable read while cut off"
    finally:
        cluster3.heal_network()
    cluster3.wait_healthy(HEAL_DEADLINE)
    got = cluster3.client(victim, timeout=10).get(key)
    assert got is not None and got["value"] == b"during"


@pytest.mark.cluster
def test_bridge_partition_on_five_nodes_heals(tmp_path: Path) -> None:
    """A bridge partition (A-B, B-C connected, A-C cut) on 5 nodes heals into a healthy, serving cluster."""
    with ChaosCluster(tmp_path, 5, seed=2) as cluster:
        fault = PartitionFault("bridge")
        description = fault.inject(cluster, random.Random(3))
        assert "bridge" in description
        (a, c) = fault.groups
        assert len(a) == 2 and len(c) == 2 and cluster.blocked == {frozenset((x, y)) for x in a for y in c}
        try:
            time.sleep(2.0)
            # Both sides hold a majority through the bridge node: writes still commit somewhere.
            bridge = next(n for n in cluster.names if n not in a + c)
            cluster.client(bridge, timeout=10).put(b"chaos/bridge", b"1")
        finally:
            fault.heal(cluster)
        cluster.wait_healthy(HEAL_DEADLINE)
        assert_serves_everywhere(cluster)


@pytest.mark.cluster
def test_context_exit_leaves_no_process_or_namespace(tmp_path: Path) -> None:
    """Leaving the cluster, even by an exception, kills every process and removes every namespace."""
    home = os.readlink("/proc/thread-self/ns/net")
    cluster = ChaosCluster(tmp_path, 3, seed=3)
    if cluster.mode == "netns":  # the namespaces exist now; none of their addresses may show at home
        assert "10.213." not in _home_addresses()
    with pytest.raises(RuntimeError, match="boom"):
        with cluster:
            KillFault().inject(cluster, random.Random(1))  # one dead, and a paused one too
            cluster.pause(next(n for n in cluster.names if cluster.alive(n)))
            pids, spaces = cluster.pids(), cluster.namespaces()
            assert len(pids) == 3
            assert cluster.mode == "proxy" or len(spaces) == 5  # switch, control and one per node
            raise RuntimeError("boom")
    assert not [pid for pid in pids if _pid_running(pid)]
    assert not set(spaces) & set(netns.namespaces() if NETNS_WHY is None else [])
    assert os.readlink("/proc/thread-self/ns/net") == home, "the thread was left in the control namespace"


@pytest.mark.cluster
@needs_netns
def test_stale_namespaces_of_a_dead_run_are_swept() -> None:
    """Namespaces with our prefix whose owner process is gone are deleted before a new cluster starts."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}{dead.pid}-0-n1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in netns.sweep_stale()
        assert stale not in netns.namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


@pytest.mark.cluster
def test_proxy_fallback_isolates_a_node_and_reports_drop_unsupported(tmp_path: Path) -> None:
    """Without namespaces, the fault proxy isolates one node (silently) and 'drop' is reported unsupported."""
    with ChaosCluster(tmp_path, 3, netns=False, seed=4) as cluster:
        assert cluster.mode == "proxy"
        assert DropFault().unsupported(cluster)
        with pytest.raises(NetworkUnsupportedError):
            DropFault().inject(cluster, random.Random(1))
        leader = cluster.leader()
        victim = next(n for n in cluster.names if n != leader)
        cluster.partition([victim], [n for n in cluster.names if n != victim])
        try:
            time.sleep(1.5)
            assert _read_fails(cluster, victim, b"chaos/proxy"), f"{victim} served a read while cut off"
        finally:
            cluster.heal_network()
        cluster.wait_healthy(HEAL_DEADLINE)
        assert_serves_everywhere(cluster)
        # The proxy can delay: a write now waits for at least one delayed raft round trip.
        delay = DelayFault()
        assert delay.unsupported(cluster) is None
        delay.inject(cluster, random.Random(2))
        try:
            started = time.monotonic()
            cluster.client(cluster.names[0], timeout=10).put(b"chaos/delayed", b"1")
            assert time.monotonic() - started >= cluster.delay
        finally:
            delay.heal(cluster)
        cluster.wait_healthy(HEAL_DEADLINE)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_random_fault_sequence_on_five_nodes(tmp_path: Path, seed: int) -> None:
    """Twelve random faults of every supported kind in a row, each healed, on 5 nodes: healthy after each."""
    rng = random.Random(seed)
    with ChaosCluster(tmp_path, 5, seed=seed) as cluster:
        kinds = [cls for cls in FAULTS.values() if cls().unsupported(cluster) is None]
        for _ in range(12):
            fault = rng.choice(kinds)()
            fault.inject(cluster, rng)
            try:
                time.sleep(rng.uniform(0.5, 3.0))
            finally:
                fault.heal(cluster)
            cluster.wait_healthy(HEAL_DEADLINE)
        assert_serves_everywhere(cluster)



_CRASHING_RUNNER = """
import json, sys, time, pathlib
from raftcoord.chaos.cluster import ChaosCluster
cluster = ChaosCluster(pathlib.Path(sys.argv[1]), 3)
cluster.__enter__()
print(json.dumps({"pids": cluster.pids(), "namespaces": cluster.namespaces()}), flush=True)
time.sleep(600)
"""


@pytest.mark.cluster
def test_a_runner_killed_midway_leaves_nothing_for_long(tmp_path: Path) -> None:
    """A runner SIGKILLed before cleaning up: its nodes kill themselves and the next sweep removes its namespaces."""
    import json
    import sys

    runner = subprocess.Popen([sys.executable, "-c", _CRASHING_RUNNER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        line = runner.stdout.readline() if runner.stdout else ""
        assert line, "the runner did not start its cluster"
        started = json.loads(line)
    finally:
        runner.kill()
        runner.wait()
    end = time.monotonic() + 10
    while [pid for pid in started["pids"] if _pid_running(pid)]:
        assert time.monotonic() < end, "nodes outlived their runner by 10 s"
        time.sleep(0.1)
    if started["namespaces"]:
        netns.sweep_stale()
        assert not set(started["namespaces"]) & set(netns.namespaces())


def _voters(cluster: ChaosCluster) -> list[tuple[str, str, str, bool]]:
    return sorted((m["name"], m["raft"], m["client"], m["voter"]) for m in cluster.members(timeout=10))


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_member_fault_removes_the_leader_and_heal_adds_it_back_whole(tmp_path: Path) -> None:
    """MemberFault removes the leader through the API (hand-over first): it stops by itself and its data goes;
    heal adds it back with --join, and the member list is whole again (every node a voter, same addresses)."""
    with ChaosCluster(tmp_path, 3, netns=False, seed=6) as cluster:
        whole = _voters(cluster)
        assert [m[0] for m in whole] == cluster.names and all(m[3] for m in whole)
        leader = cluster.leader()
        fault = FAULTS["member"]("leader")
        description = fault.inject(cluster, random.Random(5))
        assert description.startswith("member: removed") and not fault.skipped, description
        assert fault.victim == leader and fault.finding is None, description
        assert not cluster.alive(leader) and cluster.procs[leader].returncode == 0
        assert "was removed from the cluster" in cluster.log(leader)
        assert not cluster.data_dir(leader).exists()
        assert cluster.removed == {leader}
        rest = [m for m in whole if m[0] != leader]
        assert _voters(cluster) == rest
        with pytest.raises(RuntimeError, match="removed"):
            cluster.restart(leader)  # a removed node comes back only through rejoin
        fault.heal(cluster)
        assert cluster.removed == set() and fault.victim is None
        assert _voters(cluster) == whole
        assert "--join" in " ".join(cluster.procs[leader].args)
        cluster.wait_healthy(HEAL_DEADLINE)
        assert_serves_everywhere(cluster)


class _RefusingCluster:
    """A stand-in cluster whose every removal the "cluster" refuses (no leader, no majority)."""

    names = ["n1", "n2", "n3"]
    removed: set[str] = set()

    def leader(self) -> str | None:
        """No leader right now."""
        return None

    def remove_member(self, name: str, **_: Any) -> tuple[bool, float]:
        """Refused until the deadline, as a real cluster without a majority does."""
        from raftcoord.chaos.cluster import MemberChangeRefusedError

        raise MemberChangeRefusedError(f"remove {name}: not done before the deadline (last: no leader)")

    def rejoin(self, name: str, **_: Any) -> None:
        """Must not be called for a skipped fault."""
        raise AssertionError(f"rejoin({name}) after a skipped removal")


def test_member_fault_refused_is_skipped_not_failed() -> None:
    """A removal the cluster refuses until the deadline is a skipped fault; its heal changes nothing."""
    fault = FAULTS["member"]()
    description = fault.inject(_RefusingCluster(), random.Random(1))  # type: ignore[arg-type]
    assert fault.skipped and fault.victim is None and description.startswith("member: skipped")
    fault.heal(_RefusingCluster())  # type: ignore[arg-type]


def test_runner_counts_a_skipped_fault_apart() -> None:
    """The nemesis loop counts a skipped fault as '<kind>-skipped' and does not wait out its length."""
    import threading

    from raftcoord.chaos.runner import ChaosOptions, _nemesis, _Run

    state = _Run(ChaosOptions(fault_gap=(0.01, 0.02), fault_length=(5.0, 6.0)))
    started = time.monotonic()
    _nemesis(_RefusingCluster(), [FAULTS["member"]], random.Random(1), time.monotonic() + 5.3, threading.Event(),
             state)
    assert state.faults["member-skipped"] >= 2 and "member" not in state.faults
    assert time.monotonic() - started < 2.0


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_issue10_removing_a_voter_while_another_is_down_is_refused_not_wedging(tmp_path: Path) -> None:
    """With one of 3 voters down, removing a running follower must be refused at once (etcd's strict reconfig
    check): accepted, the leader's new configuration {leader, dead} has no majority and no write commits."""
    with ChaosCluster(tmp_path, 3, netns=False, seed=8) as cluster:
        leader = cluster.leader()
        assert leader is not None
        follower, down = [n for n in cluster.names if n != leader]
        cluster.kill(down)
        started = time.monotonic()
        with pytest.raises(RaftcoordError):
            cluster.client(leader, timeout=15).call("POST", "/raftcoord/v1/members",
                                                    {"action": "remove", "name": follower}, retry=False)
        refused_after = time.monotonic() - started
        cluster.client(leader, timeout=10).put(b"chaos/after-refused-removal", b"1")  # before the fix: no leader
        assert refused_after < 8, f"the removal took {refused_after:.1f} s to fail: it was not refused"
        assert [m["name"] for m in cluster.members()] == cluster.names
        # Adding a voter that is not running yet would leave 2 running of 4: refused as well.
        with pytest.raises(RaftcoordError, match="not a majority"):
            cluster.client(leader, timeout=15).call("POST", "/raftcoord/v1/members",
                                                    {"action": "add", "name": "n9", "raft": "127.0.0.1:9",
                                                     "client": "127.0.0.1:10"}, retry=False)
        assert [m["name"] for m in cluster.members()] == cluster.names
