"""Issue 8: delivery with no gaps across kills, restarts and snapshot installs.

Each node here is a process that embeds its coordinator as a PuzzleDB node
does (``replica_support/observer_node.py``): it observes every message
(``include_own``), writing one line per delivery, and posts its own. The
tests compare what every node's observer saw with what was acknowledged.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_support import LocalCluster, wait_until

OBSERVER_NODE = str(Path(__file__).parent / "replica_support" / "observer_node.py")
FAST = "\n".join([
    "heartbeat_period = 0.05",
    "election_timeout_min = 0.4",
    "election_timeout_max = 0.8",
    "compaction_entries = 40",
])


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _seen(out: Path, name: str) -> list[tuple[int, str]]:
    """(clock, payload) per delivery, in delivery order."""
    rows = []
    for line in _lines(out / f"{name}.seen"):
        clock, _, payload = line.split(" ", 2)
        rows.append((int(clock), payload))
    return rows


@pytest.fixture
def embedded(tmp_path: Path) -> Any:
    out = tmp_path / "out"
    out.mkdir()
    cluster = LocalCluster(tmp_path, 3, extra=FAST)

    def start(*names: str, posts: int) -> None:
        for name in names:
            (out / f"{name}.ready").unlink(missing_ok=True)
        cluster.start(*names, argv=lambda name: [sys.executable, OBSERVER_NODE, str(cluster.config_path), name,
                                                 str(out), str(posts)])
        for name in names:
            wait_until(lambda name=name: (out / f"{name}.ready").exists(), 60, f"{name}'s observer")

    yield cluster, out, start
    cluster.stop_all()


def _check_agreement(cluster: LocalCluster, out: Path) -> list[tuple[int, str]]:
    acked = {p for name in cluster.names for p in _lines(out / f"{name}.acked")}

    def all_in() -> bool:
        return all(acked <= {p for _, p in _seen(out, n)} for n in cluster.names) and len(
            {len(_seen(out, n)) for n in cluster.names}) == 1

    wait_until(all_in, 60, "every acknowledged post on every node's observer")
    time.sleep(0.5)
    sequences = {name: _seen(out, name) for name in cluster.names}
    first = sequences[cluster.names[0]]
    for name, seq in sequences.items():
        assert seq == first, f"{name}'s observer saw another sequence than {cluster.names[0]}'s"
    clocks = [c for c, _ in first]
    assert clocks == sorted(set(clocks)), "clocks are not strictly increasing"
    payloads = [p for _, p in first]
    assert len(payloads) == len(set(payloads)), "a message was delivered twice"
    assert acked <= set(payloads), f"acknowledged posts missing: {sorted(acked - set(payloads))[:5]}"
    return first


def test_issue8_every_node_sees_every_post_once_through_a_follower_kill_and_restart(embedded: Any) -> None:
    """Posts from all three nodes while a follower is killed -9 and restarted; it resumes with since=."""
    cluster, out, start = embedded
    start(*cluster.names, posts=150)
    leader = cluster.names[0]
    victim = next(n for n in cluster.names if n != leader)
    wait_until(lambda: len(_seen(out, victim)) >= 60, 60, f"{victim} to see some posts")
    cluster.kill(victim)
    before = len(_seen(out, victim))
    time.sleep(1.0)  # the others go on posting while it is down
    start(victim, posts=150)
    for name in cluster.names:
        wait_until(lambda name=name: (out / f"{name}.posted").exists(), 120, f"{name} to finish posting")
    seq = _check_agreement(cluster, out)
    assert len(seq) >= 300 and before < len(seq)


def test_issue8_a_paused_node_caught_up_by_snapshot_misses_nothing(embedded: Any) -> None:
    """A node paused while the leader compacts past it installs a snapshot; its observer has every message."""
    cluster, out, start = embedded
    start(*cluster.names, posts=0)
    victim = cluster.names[2]
    cluster.kill(victim, signal.SIGSTOP)
    try:
        others = [n for n in cluster.names if n != victim]
        for name in others:
            (out / f"{name}.posted").unlink(missing_ok=True)
            cluster.kill(name, signal.SIGTERM)
        start(*others, posts=120)  # 240 posts: six times compaction_entries
        for name in others:
            wait_until(lambda name=name: (out / f"{name}.posted").exists(), 120, f"{name} to finish posting")
    finally:
        cluster.kill(victim, signal.SIGCONT)
    wait_until(lambda: "loaded the snapshot" in cluster.log(victim), 30, f"{victim} to install a snapshot")
    seq = _check_agreement(cluster, out)
    assert len(seq) == 240
