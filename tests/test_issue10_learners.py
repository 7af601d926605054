"""Issue 10: a non-voter never slows a commit (in-process replicas).

pysyncobj sent every entry to every voter and non-voter in one loop, each
pickled and encrypted per connection, so seven non-voters made a put 1.8 to
2.2 times slower at one client. Voters now get each entry at once; a
non-voter gets what piled up at most every ``learner_append_interval``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from test_replica import FAST, Cluster, leader_of
from replica_support import put, wait_for

from raftcoord.replica import Replica


def _count_appends(leader: Replica) -> dict[str, int]:
    """Count the append_entries messages the leader sends, per kind of peer."""
    counts = {"voter": 0, "non-voter": 0}
    transport = leader._engine._SyncObj__transport
    voters = set(leader._engine.otherNodes)
    real_send = transport.send

    def send(node: Any, message: Any) -> bool:
        if isinstance(message, dict) and message.get("type") == "append_entries":
            counts["voter" if node in voters else "non-voter"] += 1
        return real_send(node, message)

    transport.send = send
    return counts


@pytest.mark.parametrize("interval", [0.02, 0.0])
def test_issue10_voters_get_every_append_at_once_and_a_non_voter_a_batch(tmp_path: Path, interval: float) -> None:
    cluster = Cluster(tmp_path)
    settings = dataclasses.replace(FAST, learner_append_interval=interval)
    try:
        addrs = cluster.addresses(3)
        voters = [cluster.replica(a, addrs, settings=settings) for a in addrs]
        learner = cluster.replica(None, addrs, settings=settings)
        leader = leader_of(voters)
        wait_for(lambda: leader.status()["learners_connected"] == 1, 10, "the non-voter to connect")
        counts = _count_appends(leader)
        started = time.monotonic()
        for i in range(150):
            leader.propose(put(b"k%03d" % i, b"v"), 5)
        elapsed = time.monotonic() - started
        # The non-voter still gets everything, soon.
        wait_for(lambda: learner.read(lambda s: s.get(b"k149"), consistency="serializable") is not None, 5,
                 "the non-voter to apply the last put")
        per_voter = counts["voter"] / 2
        assert per_voter >= 150, counts
        if interval:
            # At most one append per interval while puts kept coming (and a
            # heartbeat's worth of slack), not one per put.
            assert counts["non-voter"] <= elapsed / interval + 10, (counts, elapsed)
        else:
            assert counts["non-voter"] >= 150, counts
    finally:
        for r in cluster.made:
            r.close()
