"""Fault suite for raftcoord: record histories under injected faults and check them.

The package backs the ``raftcoord chaos`` command. Its parts are kept apart so that the
pure ones can be tested without a cluster:

- ``history`` and ``checker``: recording operations and checking them for
  linearizability against a register model (pure, no I/O but the history file);
- ``cluster`` and ``nemesis``: starting a cluster of real processes and injecting and
  healing faults (kill, pause, partition, member changes);
- ``workload`` and ``runner``: the client workloads, the checks that need a cluster, and
  the loop that ties everything together into one JSON summary line;
- ``watches``: a ``/v3/watch`` kept open on every node through the faults, and the
  check of what it delivered (pure, tested on hand-made logs).

Nothing is imported here so that ``import raftcoord.chaos`` stays cheap.
"""
