"""Plain counters the replica keeps for metrics (issue 10), read at scrape time.

The replica layer must not depend on a metrics library, and the Raft thread
must not do more than add to a few numbers per command: so it keeps these
objects, and :mod:`raftcoord.metrics` turns them into Prometheus families
when a scrape asks. Each field has a single writer (the Raft thread, or the
one snapshot thread at a time); a reader may see a scrape that is one
observation out of step across fields, never a torn number.
"""

from __future__ import annotations

import bisect
from typing import Any, Final

__all__ = ["APPLY_BUCKETS", "LatencyCounts", "ReplicaStats"]

#: Upper bounds (seconds) of the apply-latency buckets: a log entry applies in
#: tens of microseconds (one put) to about a second (a txn of thousands of keys).
APPLY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5)


class LatencyCounts:
    """A histogram as plain numbers: a count per bucket (not cumulative) and a sum.

    ``counts`` has one more slot than ``bounds``: the observations above
    every bound (Prometheus's ``+Inf`` bucket adds them to the rest).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = APPLY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        # bisect_left: an observation equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[list[tuple[float, int]], int, float]:
        """``([(upper bound, observations at or below it)...], count, sum)``, the last bound infinite."""
        counts = list(self.counts)  # one copy, so the buckets agree with the count
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, running, self.total


class ReplicaStats:
    """What one replica counted since it started.

    ``proposals`` is the replica's :class:`~raftcoord.proposals.Proposer`
    (``committed``, ``failed`` by error code). The snapshot fields are those
    of the last snapshot this node wrote itself (not one received from the
    leader).
    """

    def __init__(self, proposals: Any = None) -> None:
        self.proposals = proposals
        self.leader_changes = 0
        self.apply = LatencyCounts()
        self.applied_commands = 0
        self.snapshots = 0
        self.snapshot_bytes = 0
        self.snapshot_seconds = 0.0
