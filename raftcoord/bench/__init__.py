"""``raftcoord bench``: raftcoord beside etcd and plain pysyncobj, measured in one run on this machine.

Starts its own 3-member clusters on 127.0.0.1 (free ports; every process
killed by its pid at the end, also on Ctrl-C): raftcoord through its HTTP
endpoint, raftcoord embedded in the process that runs the load (as a
PuzzleDB node calls it), etcd through its v3 JSON gateway when ``etcd`` is
on the PATH, and a plain pysyncobj ``ReplDict`` with the same journal file
and secret, with ``appendEntriesUseBatch`` off and on. Runs puts, gets,
compare-and-swap and message delivery at 1, 16 and 64 clients, leader
failover, restart and memory, and put latency with 3 voters and 7
non-voters beside 3 voters alone (system ``raftcoord+7nv``, 1 and 16
clients); prints a table with ratios, writes ``bench.json`` and, when
matplotlib is importable, ``bench.png``.
"""

from raftcoord.bench.runner import SYSTEMS, WORKLOADS, BenchOptions, run

__all__ = ["SYSTEMS", "WORKLOADS", "BenchOptions", "run"]
