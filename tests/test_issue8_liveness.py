"""Node liveness (issue 8, item 3): own states on start and stop, the leader's unreachable marks.

Unit tests drive a :class:`Housekeeper` over an in-memory coordinator whose
status is made up (peer ages, role, term); cluster tests run real node
processes on 127.0.0.1 (``cluster_support``) with ``node_timeout = 2`` and
assert the deadlines the issue names (marked within node_timeout + 2 s).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cluster_support import LocalCluster, wait_until
from raftcoord.cli import main
from raftcoord.coordinator import Coordinator
from raftcoord.errors import UnavailableError
from raftcoord.housekeeping import Housekeeper, annotate_states
from raftcoord.keys import NodeKey
from raftcoord.store import NodeStateSet
from raftcoord.values import NodeState

NODE_TIMEOUT = 2.0
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Config:
    """The few settings a Housekeeper reads (duck-typed like ClusterConfig)."""

    node_timeout = NODE_TIMEOUT
    message_retention_seconds = 3600.0
    message_retention_count = 10000

    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = [type("Node", (), {"name": n, "raft": a})() for n, a in nodes.items()]


class Leader:
    """A memory coordinator that reports a made-up Raft status: leader n1 hearing peers as told."""

    def __init__(self) -> None:
        self.coord = Coordinator.memory("n1", addr="10.0.0.1:1")
        self.peers: dict[str, float] = {}
        self.term = 1
        self.role = "leader"
        self.writes: list[tuple[str, str, bool]] = []  # (host, status, with expect_revision)
        self.coord.backend.add_listener(self._on_applied)
        self._fail_next: BaseException | None = None

    def _on_applied(self, applied: Any) -> None:
        for e in applied.events:
            if isinstance(e, NodeStateSet):
                self.writes.append((e.state.host, e.state.status.value, False))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.coord, name)

    def status(self) -> dict[str, Any]:
        out = self.coord.status()
        out.update(backend="raft", role=self.role, term=self.term, self="10.0.0.1:1",
                   leader="10.0.0.1:1" if self.role == "leader" else "10.0.0.2:1",
                   partners={"10.0.0.2:1": True, "10.0.0.3:1": True}, peers=dict(self.peers),
                   leader_commit_index=out["commit_index"])
        return out

    def execute(self, command: Any, **kwargs: Any) -> dict[str, Any]:
        if "expect_revision" in command:
            host = command["state"]["host"]
            self.writes.append((host, "expect:" + command["state"]["status"], True))
        return self.coord.execute(command, **kwargs)

    def record(self, host: str, status: str, addr: str) -> None:
        self.coord.execute({"op": "node", "state": NodeState(host=host, status=status, clock=3, timestamp=T0,  # type: ignore[arg-type]
                                                             addr=addr, cluster="memory").to_map()})

    def statuses(self) -> dict[str, str]:
        return {s.host: s.status.value for s in self.coord.get_cluster_state()}


@pytest.fixture
def leader() -> Iterator[Leader]:
    lead = Leader()
    yield lead
    lead.coord.close()


def keeper(coord: Any, **kwargs: Any) -> Housekeeper:
    return Housekeeper(coord, Config({"n1": "10.0.0.1:1", "n2": "10.0.0.2:1", "n3": "10.0.0.3:1"}), "n1", **kwargs)


# ------------------------------------------------------------------ unit


def test_issue8_3_own_states_joining_up_then_leaving_down() -> None:
    """A node writes joining, then up once caught up; a clean stop writes leaving, then down."""
    coord = Coordinator.memory("n1", addr="127.0.0.1:7001")
    seen: list[str] = []
    coord.backend.add_listener(lambda a: seen.extend(e.state.status.value for e in a.events
                                                     if isinstance(e, NodeStateSet)))
    hk = keeper(coord, period=0.05)
    hk.start()
    try:
        wait_until(lambda: hk.phase == "up", 10, "the node to be up")
        assert seen == ["joining", "up"]
        state = coord.get_node_state("n1")
        assert state is not None and state.addr == "127.0.0.1:7001" and state.cluster == "memory"
        hk.stop(5)
        assert seen == ["joining", "up", "leaving", "down"]
        hk.stop(5)  # idempotent
        assert seen == ["joining", "up", "leaving", "down"]
    finally:
        coord.close()


def test_issue8_3_no_leader_no_own_state_and_stop_writes_nothing() -> None:
    """Without a leader nothing is written, and a stop that never announced writes no goodbye."""
    coord = Coordinator.memory("n1")
    coord.backend.status = lambda: {"backend": "raft", "role": "follower", "leader": None}  # type: ignore[method-assign]
    hk = keeper(coord, period=0.01)
    for _ in range(5):
        hk.run_once()
    hk.stop(1)
    assert coord.get_cluster_state() == [] and hk.phase == "new"
    coord.close()


def test_issue8_3_leader_marks_unheard_node_unreachable_and_heard_again_up(leader: Leader) -> None:
    """After the grace, a node not heard for node_timeout is marked unreachable, and up once heard."""
    leader.record("n2", "up", "10.0.0.2:1")
    leader.record("n3", "up", "10.0.0.3:1")
    leader.peers = {"10.0.0.2:1": 0.1, "10.0.0.3:1": 0.1}
    hk = keeper(leader)
    hk.run_once()
    hk._leader_since -= NODE_TIMEOUT  # the grace is over
    leader.peers["10.0.0.3:1"] = NODE_TIMEOUT + 0.5
    hk.run_once()
    assert leader.statuses() == {"n1": "up", "n2": "up", "n3": "unreachable"}
    assert ("n3", "expect:unreachable", True) in leader.writes  # written with expect_revision
    leader.peers["10.0.0.3:1"] = 0.2
    hk.run_once()
    assert leader.statuses() == {"n1": "up", "n2": "up", "n3": "up"}


def test_issue8_3_only_changes_are_written(leader: Leader) -> None:
    """While everyone is heard, rounds write nothing (no log entry per node per second)."""
    leader.record("n2", "up", "10.0.0.2:1")
    leader.peers = {"10.0.0.2:1": 0.1}
    hk = keeper(leader)
    hk.run_once()  # joining, up, and the first purge
    hk._leader_since -= 10 * NODE_TIMEOUT
    revision = leader.coord.revision()
    writes = len(leader.writes)
    for _ in range(20):
        hk.run_once()
    assert leader.coord.revision() == revision and len(leader.writes) == writes
    leader.peers["10.0.0.2:1"] = 60.0
    for _ in range(5):
        hk.run_once()
    assert [w for w in leader.writes[writes:] if w[0] == "n2"] == [("n2", "expect:unreachable", True),
                                                                  ("n2", "unreachable", False)]


def test_issue8_3_a_new_leader_gives_every_node_a_grace(leader: Leader) -> None:
    """A leader marks nobody within node_timeout of taking over (a new term restarts the grace)."""
    leader.record("n2", "up", "10.0.0.2:1")
    hk = keeper(leader)
    hk.run_once()  # leader since now; n2 never heard
    assert leader.statuses()["n2"] == "up"
    hk._leader_since -= NODE_TIMEOUT
    leader.term = 2  # re-elected in a new term: the grace starts again
    hk.run_once()
    assert leader.statuses()["n2"] == "up"
    hk._leader_since -= NODE_TIMEOUT
    hk.run_once()
    assert leader.statuses()["n2"] == "unreachable"


def test_issue8_3_followers_and_stopped_nodes_are_not_marked(leader: Leader) -> None:
    """A follower marks nobody; a node that said down, or that this leader cannot hear, keeps its record."""
    leader.record("n2", "down", "10.0.0.2:1")
    leader.record("n4", "up", "10.0.0.4:1")  # a non-voter that never named itself to this leader
    leader.record("n3", "up", "10.0.0.3:1")
    hk = keeper(leader)
    leader.role = "follower"
    hk.run_once()
    hk._leader_since = -1e9
    for _ in range(3):
        hk.run_once()
    assert leader.statuses()["n3"] == "up"  # a follower judges nobody
    leader.role = "leader"
    hk.run_once()
    hk._leader_since -= NODE_TIMEOUT
    hk.run_once()
    assert leader.statuses() == {"n1": "up", "n2": "down", "n3": "unreachable", "n4": "up"}


def test_issue8_3_mark_does_not_overwrite_a_newer_record(leader: Leader) -> None:
    """The mark carries the mod_revision it judged: a record the node rewrote meanwhile stays."""
    leader.record("n3", "up", "10.0.0.3:1")
    hk = keeper(leader)
    hk.run_once()
    hk._leader_since -= NODE_TIMEOUT
    judged = hk._records()
    leader.record("n3", "joining", "10.0.0.3:1")  # n3 restarted and wrote its own record
    records = hk._records
    hk._records = lambda: judged  # type: ignore[method-assign]
    hk._judge(leader.status(), grace_over=True)
    hk._records = records  # type: ignore[method-assign]
    (cmd,) = [w for w in leader.writes if w[0] == "n3" and w[2]]
    assert cmd == ("n3", "expect:unreachable", True)
    assert leader.statuses()["n3"] == "joining"


def test_issue8_3_housekeeping_failures_never_stop_it(caplog: pytest.LogCaptureFixture) -> None:
    """A status that raises is logged once (throttled) and the next rounds run."""
    coord = Coordinator.memory("n1")
    calls = []

    def broken() -> dict[str, Any]:
        calls.append(1)
        raise UnavailableError("the raft thread did not answer in time")

    coord.backend.status = broken  # type: ignore[method-assign]
    hk = keeper(coord, period=0.01)
    with caplog.at_level("INFO", logger="raftcoord.housekeeping"):
        hk.start()
        wait_until(lambda: len(calls) >= 10, 10, "rounds to go on")
        hk.stop(1)
    assert len([r for r in caplog.records if "housekeeping failed" in r.getMessage()]) == 1
    coord.close()


def test_issue8_3_annotate_states_roles_and_heard_ago() -> None:
    """Roles come from the raft status (leader, follower, non-voter); ages only where they are known."""
    states = [NodeState(host=h, status="up", clock=1, timestamp=T0, addr=a)  # type: ignore[arg-type]
              for h, a in (("n1", "a:1"), ("n2", "a:2"), ("n3", "a:3"), ("n4", "a:4"), ("x", ""))]
    leader_status = {"backend": "raft", "host": "n1", "self": "a:1", "role": "leader", "leader": "a:1",
                     "partners": {"a:2": True, "a:3": False}, "peers": {"a:2": 0.1, "a:4": 0.3}}
    got = {s.host: (s.role, s.heard_ago) for s in annotate_states(states, leader_status)}
    assert got == {"n1": ("leader", 0.0), "n2": ("follower", 0.1), "n3": ("follower", None),
                   "n4": ("non-voter", 0.3), "x": (None, None)}
    follower_status = {**leader_status, "host": "n2", "self": "a:2", "role": "follower",
                       "partners": {"a:1": True, "a:3": True}, "peers": {"a:1": 0.05, "a:3": 9.0}}
    got = {s.host: (s.role, s.heard_ago) for s in annotate_states(states, follower_status)}
    assert got == {"n1": ("leader", 0.05), "n2": ("follower", 0.0), "n3": ("follower", None),
                   "n4": ("non-voter", None), "x": (None, None)}
    # annotations are local: neither encoded nor compared
    annotated = annotate_states(states, leader_status)
    assert annotated == states and [s.encode() for s in annotated] == [s.encode() for s in states]
    assert annotate_states(states, {"backend": "memory"})[0].role is None


# --------------------------------------------------------------- cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path, extra=f"node_timeout = {NODE_TIMEOUT}")
    try:
        c.start()
        c.wait_for_leader()
        wait_until(lambda: all_up(c), 30, "every node to be up")
        yield c
    finally:
        c.stop_all()


def records(cluster: LocalCluster, *among: str) -> dict[str, dict[str, Any]]:
    """Node records by host, read linearizably through the given nodes."""
    return {n["host"]: n for n in cluster.client(*among, timeout=5).nodes()}


def all_up(cluster: LocalCluster) -> bool:
    return {h: r["status"] for h, r in records(cluster).items()} == {n: "up" for n in cluster.names}


def follower_of(cluster: LocalCluster) -> str:
    leader = cluster.wait_for_leader()
    return next(n for n in cluster.names if n != leader)


def wait_status(cluster: LocalCluster, name: str, status: str, among: list[str], timeout: float) -> float:
    """Seconds until ``name``'s record says ``status`` (read through ``among``); fails after ``timeout``."""
    started = time.monotonic()
    wait_until(lambda: records(cluster, *among).get(name, {}).get("status") == status, timeout,
               f"{name} to be {status}", interval=0.1)
    return time.monotonic() - started


@pytest.mark.cluster
def test_issue8_3_paused_node_marked_unreachable_then_up_again(cluster: LocalCluster) -> None:
    """SIGSTOP a follower: marked unreachable within node_timeout + 2 s; SIGCONT: up again within 2 s."""
    paused = follower_of(cluster)
    others = [n for n in cluster.names if n != paused]
    cluster.kill(paused, signal.SIGSTOP)
    try:
        took = wait_status(cluster, paused, "unreachable", others, 30)
        print(f"marked unreachable {took:.2f} s after SIGSTOP")
        assert took <= NODE_TIMEOUT + 2, f"marked unreachable only after {took:.2f} s"
    finally:
        cluster.kill(paused, signal.SIGCONT)
    took = wait_status(cluster, paused, "up", others, 30)
    print(f"marked up {took:.2f} s after SIGCONT")
    assert took <= NODE_TIMEOUT + 2, f"marked up again only after {took:.2f} s"
    leader = cluster.wait_for_leader()
    view = cluster.client(leader).call("GET", "/raftcoord/v1/nodes")
    assert view["role"] == "leader"
    by_host = {n["host"]: n for n in view["nodes"]}
    assert by_host[leader]["raft_role"] == "leader" and by_host[leader]["heard_ago"] == 0
    assert all(by_host[n]["raft_role"] == "follower" and 0 <= by_host[n]["heard_ago"] < 1.5
               for n in cluster.names if n != leader), view
    # `raftcoord nodes` asked through a follower shows the leader's view: every node heard
    follower = follower_of(cluster)
    out = CliRunner().invoke(main, ["--endpoints", cluster.client_addr[follower], "nodes", "--json"])
    assert out.exit_code == 0, out.output
    shown = {n["host"]: n for n in json.loads(out.output)}
    assert all(isinstance(shown[n]["heard_ago"], (int, float)) for n in cluster.names), shown
    assert shown[leader]["raft_role"] == "leader"
    out = CliRunner().invoke(main, ["--endpoints", cluster.client_addr[follower], "nodes"])
    line = next(x for x in out.output.splitlines() if x.startswith(f"{follower}\t"))
    assert "\tup\trole=follower\theard=" in line and "heard=-" not in line, out.output


@pytest.mark.cluster
def test_issue8_3_killed_node_marked_unreachable(cluster: LocalCluster) -> None:
    """A follower killed with SIGKILL is marked unreachable within node_timeout + 2 s."""
    victim = follower_of(cluster)
    cluster.kill(victim)
    took = wait_status(cluster, victim, "unreachable", [n for n in cluster.names if n != victim], 30)
    assert took <= NODE_TIMEOUT + 2, f"marked unreachable only after {took:.2f} s"


@pytest.mark.cluster
def test_issue8_3_start_joining_then_up_clean_stop_leaving_then_down(cluster: LocalCluster) -> None:
    """A node writes joining then up when it starts, and leaving then down on SIGTERM (record version +2 each)."""
    name = follower_of(cluster)
    others = [n for n in cluster.names if n != name]
    key = NodeKey(name).encode()
    log = cluster.log(name)
    assert log.index(f"node {name}: joining") < log.index(f"node {name}: up"), log
    version = cluster.client(*others).get(key)["version"]
    cluster.kill(name, signal.SIGTERM)
    assert cluster.procs[name].returncode == 0
    assert records(cluster, *others)[name]["status"] == "down"
    assert cluster.client(*others).get(key)["version"] == version + 2  # leaving, then down
    assert f"node {name}: recorded leaving, then down" in cluster.log(name)
    cluster.start(name)
    wait_status(cluster, name, "up", others, 30)
    assert cluster.client(*others).get(key)["version"] == version + 4  # joining, then up
    # a node that said down is never marked unreachable
    cluster.kill(name, signal.SIGTERM)
    deadline = time.monotonic() + NODE_TIMEOUT + 1.5
    while time.monotonic() < deadline:
        assert records(cluster, *others)[name]["status"] == "down"
        time.sleep(0.2)


@pytest.mark.cluster
def test_issue8_3_no_writes_while_every_node_is_healthy(cluster: LocalCluster) -> None:
    """Once every node is up, the revision stays still: liveness costs no log entry per node per second."""
    revision = cluster.client().status()["revision"]
    deadline = time.monotonic() + 2 * NODE_TIMEOUT
    while time.monotonic() < deadline:
        st = cluster.client().status()
        assert st["revision"] == revision, f"revision moved from {revision} to {st['revision']}"
        time.sleep(0.2)
    assert all_up(cluster)


def test_issue8_3_housekeeping_thread_is_named_and_daemon() -> None:
    """The housekeeper runs on its own daemon thread, named after the node."""
    coord = Coordinator.memory("n1")
    hk = keeper(coord, period=0.05)
    hk.start()
    try:
        names = {t.name: t.daemon for t in threading.enumerate()}
        assert names.get("raftcoord-housekeeping-n1") is True
    finally:
        hk.stop(2)
        coord.close()


@pytest.mark.cluster
def test_issue8_3_paused_non_voter_marked_unreachable_then_up_again(tmp_path: Path) -> None:
    """A non-voter names itself to the voters (engine.HELLO), so the leader marks it like a voter."""
    c = LocalCluster(tmp_path, extra=f"node_timeout = {NODE_TIMEOUT}")
    text = c.config_path.read_text()
    c.config_path.write_text(text.replace(f'client = "{c.client_addr["n3"]}"',
                                          f'client = "{c.client_addr["n3"]}"\nvoter = false'))
    try:
        c.start()
        leader = c.wait_for_leader(["n1", "n2"])
        wait_until(lambda: all_up(c), 30, "every node to be up")

        def heard() -> bool:
            return c.raft["n3"] in c.status(c.wait_for_leader(["n1", "n2"])).get("peers", {})

        wait_until(heard, 10, "the leader to hear the non-voter by its address")
        view = c.client(leader).call("GET", "/raftcoord/v1/nodes")
        assert {n["host"]: n["raft_role"] for n in view["nodes"]}["n3"] == "non-voter"
        c.kill("n3", signal.SIGSTOP)
        try:
            took = wait_status(c, "n3", "unreachable", ["n1", "n2"], 30)
            assert took <= NODE_TIMEOUT + 2, f"marked unreachable only after {took:.2f} s"
        finally:
            c.kill("n3", signal.SIGCONT)
        wait_status(c, "n3", "up", ["n1", "n2"], NODE_TIMEOUT + 2)
    finally:
        c.stop_all()


def test_issue8_3_an_unsound_leader_judges_nobody(leader: Leader) -> None:
    """A leader whose Raft thread stalls or that lost its majority marks nobody (it cannot tell)."""
    leader.record("n3", "up", "10.0.0.3:1")
    hk = keeper(leader)
    hk.run_once()
    hk._leader_since -= NODE_TIMEOUT
    status = leader.status
    for bad in ({"healthy": False}, {"has_quorum": False}):
        leader.status = lambda bad=bad: {**status(), **bad}  # type: ignore[method-assign]
        hk.run_once()
        assert leader.statuses()["n3"] == "up"
    leader.status = status  # type: ignore[method-assign]
    hk.run_once()
    assert leader.statuses()["n3"] == "unreachable"
