"""Faults and hostile peers against real node processes on 127.0.0.1 (issue 6).

Each node is a ``replica_support/bound_node.py`` process. A network partition
is a :class:`~replica_support.faults.PartitionProxy` in front of the node
whose address sorts lowest: pysyncobj connects from the higher address to
the lower, so every connection of that node passes its proxy, and the proxy
can drop all of that node's traffic, as a real partition does.
"""

from __future__ import annotations

import pickle
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from replica_support import free_port, put, wait_for
from replica_support.faults import FaultNode, PartitionProxy

pytestmark = pytest.mark.cluster

SECRET = "fault test secret"
QUICK = {"heartbeat_period": 0.05, "election_timeout_min": 0.4, "election_timeout_max": 0.8,
         "connection_retry": 0.1, "connection_timeout": 1.0}


class Cluster:
    """Three node processes, the first (lowest address) optionally behind a PartitionProxy."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nodes: list[FaultNode] = []
        self.proxy: PartitionProxy | None = None

    def start(self, *, proxied: bool = False, first: dict[str, Any] | None = None,
              others: dict[str, Any] | None = None, nofile: int | None = None) -> list[FaultNode]:
        ports = sorted((free_port() for _ in range(3)), key=lambda p: f"127.0.0.1:{p}")
        addrs = [f"127.0.0.1:{p}" for p in ports]
        for i, addr in enumerate(addrs):
            config: dict[str, Any] = {
                "self": addr, "partners": [a for a in addrs if a != addr], "data_dir": str(self.tmp / f"n{i}"),
                "password": SECRET, "log_level": "INFO",
                "settings": {**QUICK, **((first if i == 0 else others) or {})},
            }
            if i == 0:
                if proxied:
                    real = free_port()
                    self.proxy = PartitionProxy(ports[0], real)
                    config["bind"] = f"127.0.0.1:{real}"
                if nofile:
                    config["nofile"] = nofile
            self.nodes.append(FaultNode(config, self.tmp / f"n{i}.log"))
        for n in self.nodes:
            n.start()
        return self.nodes

    def leader(self, timeout: float = 15.0) -> FaultNode:
        def find() -> FaultNode | None:
            for n in self.nodes:
                try:
                    if n.status()["role"] == "leader":
                        return n
                except (RuntimeError, KeyError):
                    pass
            return None

        return wait_for(find, timeout, "a leader", interval=0.1)

    def close(self) -> None:
        for n in self.nodes:
            n.kill()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def commits(node: FaultNode, key: bytes, timeout: float = 5.0) -> bool:
    """A write through ``node`` commits, and a linearizable read through it sees it."""
    ans = node.propose(put(key, b"v"), timeout)
    return bool(ans["ok"] and ans["result"]["ok"]) and node.get(key, timeout) == b"v"


# ------------------------------------------------------------------ d4


class Writers:
    """Threads writing 2 kB values through every node until stopped; failures are expected."""

    def __init__(self, nodes: list[FaultNode], per_node: int = 4) -> None:
        self.stop = threading.Event()
        self.acked = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n, f"{i}/{t}"), daemon=True)
                        for i, n in enumerate(nodes) for t in range(per_node)]
        for t in self.threads:
            t.start()

    def _run(self, node: FaultNode, name: str) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                ans = node.propose(put(f"w/{name}/{i}".encode(), b"x" * 2000), 2.0)
            except Exception:  # noqa: BLE001 - a node gone or slow: keep loading the others
                continue
            if ans["ok"]:
                with self._lock:
                    self.acked += 1

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def serves_by(node: FaultNode, deadline: float) -> bool:
    """Whether a linearizable read through ``node`` succeeds before ``deadline`` (monotonic)."""
    while True:
        if node.barrier(max(0.5, min(2.0, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False


def test_issue6_d4_partitioned_leader_rejoins(cluster: Cluster) -> None:
    """d4: a leader cut off for 5 s under load rejoins: every node serves a linearizable read 10 s after the heal."""
    nodes = cluster.start(
        proxied=True,
        # The old leader is the quickest to stand for election, and notices the
        # partition late: it raises its term while cut off, so that after the
        # heal it makes the majority elect again (a new leader starts sending at
        # its own log's end, far past the old leader's).
        first={"election_timeout_min": 0.2, "election_timeout_max": 0.3, "connection_timeout": 3.0,
               "retry_interval": 30},
        others={"election_timeout_min": 0.6, "election_timeout_max": 1.0, "retry_interval": 30})
    old, rest = nodes[0], nodes[1:]
    assert cluster.proxy is not None
    wait_for(lambda: old.status()["role"] == "leader", 15, "the proxied node to lead", interval=0.1)
    writers = Writers(nodes)
    try:
        wait_for(lambda: writers.acked >= 100, 20, "writes to commit", interval=0.1)
        wait_for(lambda: old.status()["role"] == "leader", 10, "the proxied node to lead", interval=0.1)
        cluster.proxy.partition()
        wait_for(lambda: any(n.status()["role"] == "leader" for n in rest), 10, "a new leader", interval=0.1)
        acked = writers.acked
        time.sleep(4)  # the partition's length: the new leader's log runs far ahead
        cut_off = old.status()
        assert writers.acked > acked + 100, "the majority did not go on writing"
        assert cut_off["last_log_index"] > cut_off["commit_index"], "no uncommitted entries on the old leader"
        cluster.proxy.heal()
        healed = time.monotonic()
        time.sleep(1)  # writes go on across the heal
    finally:
        writers.join()
    late = [n.address for n in nodes if not serves_by(n, healed + 10)]
    assert not late, (f"no linearizable read through {late} within 10 s of the heal; the old leader is at "
                      f"commit index {old.status()['commit_index']} (was {cut_off['commit_index']} when cut off)")


# ------------------------------------------------------------------ d5


def test_issue6_d5_a_stranger_announcing_a_huge_frame_is_cut_off(cluster: Cluster) -> None:
    """d5: a length of 2^31-1 and then zeros: the connection is closed within a few bytes; memory stays flat."""
    node = cluster.start()[0]
    cluster.leader()
    rss = node.rss()
    sent, closed = 0, False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.connect(("127.0.0.1", node.raft_port))
        s.settimeout(0.5)
        zeros = bytes(65536)
        deadline = time.monotonic() + 5
        try:
            s.sendall(b"\xff\xff\xff\x7f")
            while time.monotonic() < deadline and sent < 64 * 2**20:
                try:
                    sent += s.send(zeros)
                except TimeoutError:  # the node reads slowly: still open
                    continue
        except OSError:
            closed = True
    assert closed, f"the node took {sent / 2**20:.0f} MiB of an unauthenticated frame without closing"
    assert sent < 2**20
    assert node.rss() - rss < 16 * 2**20
    assert commits(node, b"after")


# ------------------------------------------------------------------ d6


def _open(port: int, n: int, half_sent: int = 0, timeout: float = 5.0) -> list[socket.socket]:
    """``n`` connections to ``port``, all at once; the first ``half_sent`` start a frame and stop."""
    pending = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        pending.append(s)
    poller = select.poll()
    for s in pending:
        poller.register(s, select.POLLOUT)
    connected: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while len(connected) < n and time.monotonic() < deadline:
        for fd, _event in poller.poll(100):
            s = next(x for x in pending if x.fileno() == fd)
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                if len(connected) < half_sent:
                    s.send(b"\x00\x01\x00\x00" + b"half")  # announces 256 bytes, sends 4
                connected.append(s)
    for s in pending:
        if s not in connected:
            s.close()
    return connected


def _still_open(socks: list[socket.socket]) -> list[socket.socket]:
    """The sockets the node has not closed (recv would block rather than see EOF or a reset)."""
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)
    readable = {fd for fd, _ in poller.poll(0)}
    open_ = []
    for s in socks:
        if s.fileno() not in readable:
            open_.append(s)
            continue
        try:
            if s.recv(4096):
                open_.append(s)  # it talks (it never does to a stranger): count it as open
        except BlockingIOError:
            open_.append(s)
        except OSError:
            pass
    return open_


def test_issue6_d6_idle_unidentified_connections_are_bounded_and_timed_out(cluster: Cluster) -> None:
    """d6: 150 idle or half-sent connections: at most 64 held, all closed within 5 s, writes go on."""
    node = cluster.start(nofile=128)[0]
    cluster.leader()
    started = time.monotonic()
    socks = _open(node.raft_port, 150, half_sent=20)
    try:
        assert len(socks) > 100, "the node did not even accept the connections"
        wait_for(lambda: len(_still_open(socks)) <= 64 + 8, 3,
                 "the node to hold at most 64 unidentified connections (plus a few not yet accepted)")
        assert _still_open(socks), "every connection was closed at once: the bound is not what closed them"
        assert commits(node, b"during")
        wait_for(lambda: not _still_open(socks), max(0.1, started + 5 + 5 - time.monotonic()),
                 "the node to close unidentified connections after 5 s", interval=0.2)
        assert commits(node, b"after")
        assert node.open_files() < 64
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------ d15


def flawed_value_size() -> int:
    """A value size for which pysyncobj's leader marks a chunk of the entry 'finish' too early.

    The entry is the pickled call of ``apply(command)`` behind a type byte,
    pickled again with its index and term; the leader compares chunk
    offsets with the first length, not the second.
    """
    window = []
    for n in range(2**17 - 300, 2**17):
        cmd = b"\x00" + pickle.dumps((0, (put(b"big", b"x" * n),)), 2)
        entry = pickle.dumps((cmd, 1000, 5), 2)
        if len(cmd) <= 2**17 < len(entry):
            window.append(n)
    assert len(window) > 16, window
    return window[len(window) // 2]  # the index's and term's own sizes shift the window by a few bytes


def test_issue6_d15_a_value_just_under_128_kib_replicates_without_unpickling_errors(cluster: Cluster) -> None:
    """d15 (b): a put of a value the leader splits with a premature 'finish' is applied everywhere, cleanly."""
    nodes = cluster.start()
    leader = cluster.leader()
    assert commits(leader, b"warm")
    value = b"x" * flawed_value_size()
    ans = leader.propose(put(b"big", value), 10)
    assert ans["ok"] and ans["result"]["ok"], ans
    for n in nodes:
        assert n.get(b"big", 10) == value
    for n in nodes:
        text = n.log_text()
        assert "Unpickling" not in text and "pickle data was truncated" not in text and "EOFError" not in text, \
            f"{n.address} failed to unpickle an entry:\n{text[-3000:]}"
