"""The clusters a benchmark starts on 127.0.0.1, and how it finds, kills and restarts their members.

Every process is started by :class:`Processes` in a session of its own and
killed by its pid (SIGKILL) when the run ends, however it ends. Clusters get
fresh ports and their own directories under the run's temporary directory.

* :func:`start_raftcoord`: ``raftcoord node`` processes from a cluster file
  with a secret, as users run them (the HTTP system; with ``voters``, the
  nodes past the first ``voters`` run as non-voters).
* :func:`start_etcd`: an etcd cluster, spoken to through its v3 JSON gateway.
* :func:`start_workers`: processes of ``raftcoord.bench.worker`` that embed a
  Coordinator (``embedded``) or a plain pysyncobj ``ReplDict`` (``plain``),
  driven by JSON lines over their pipes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from raftcoord.chaos.cluster import free_ports
from raftcoord.keys import prefix_end

__all__ = ["Cluster", "Member", "Processes", "Worker", "b64", "etcd_version", "find_leader", "free_ports",
           "prefix_end", "rss_bytes", "start_etcd", "start_raftcoord", "start_workers", "wait_learners",
           "worker_leader", "write_cluster_file"]


def b64(data: bytes) -> str:
    """Base64 text, as etcd's JSON gateway wants bytes."""
    return base64.b64encode(data).decode("ascii")


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux ``/proc``), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Processes:
    """Every process the benchmark started, killed by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        #: Processes started through asyncio (the workers), by pid.
        self.pids: list[int] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a session of its own, its output appended to ``log``."""
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGKILL every process still running and reap it."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@dataclass
class Member:
    """One member process of a cluster: how to start it again, and its client URL."""

    name: str
    url: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Cluster:
    """A started cluster of HTTP members (raftcoord nodes or etcd members)."""

    system: str
    members: dict[str, Member]
    version: str = ""
    leader: str = ""

    @property
    def urls(self) -> dict[str, str]:
        """Client URLs by member name."""
        return {name: m.url for name, m in self.members.items()}

    def start(self, procs: Processes, name: str) -> None:
        """(Re)start member ``name`` with its original command line."""
        m = self.members[name]
        m.proc = procs.start(m.argv, m.log, m.env)


def write_cluster_file(root: Path, names: list[str], *, secret: bool = True,
                       extra: dict[str, Any] | None = None, voters: int | None = None) -> tuple[Path, list[int]]:
    """A cluster file with fresh ports (and a fresh secret); returns it and the ports (raft, client per node).

    With ``voters``, only the first ``voters`` nodes vote; the rest are non-voters (``voter = false``).
    """
    ports = free_ports(2 * len(names))
    lines = ["[cluster]", 'name = "bench"', f'data_dir = "{root / "data"}"']
    if secret:
        lines.append(f'secret = "{secrets.token_urlsafe(24)}"')
    lines += [f"{k} = {json.dumps(v)}" for k, v in (extra or {}).items()]
    lines.append("")
    for i, name in enumerate(names):
        lines += ["[[node]]", f'name = "{name}"', f'raft = "127.0.0.1:{ports[2 * i]}"',
                  f'client = "127.0.0.1:{ports[2 * i + 1]}"']
        lines += ["voter = false", ""] if voters is not None and i >= voters else [""]
    root.mkdir(parents=True, exist_ok=True)
    config = root / "cluster.toml"
    config.write_text("\n".join(lines))
    config.chmod(0o600)  # it holds the secret
    return config, ports


def _env() -> dict[str, str]:
    # A secret in the environment would override the cluster file's.
    return {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}


def start_raftcoord(root: Path, procs: Processes, n: int = 3, *, system: str = "raftcoord",
                    extra: dict[str, Any] | None = None, voters: int | None = None) -> Cluster:
    """Write a cluster file (fresh ports, a secret) and start ``n`` ``raftcoord node`` processes.

    With ``voters``, nodes past the first ``voters`` are non-voting replicas.
    """
    from raftcoord import __version__

    names = [f"n{i + 1}" for i in range(n)]
    config, ports = write_cluster_file(root, names, extra=extra, voters=voters)
    members = {name: Member(name, f"http://127.0.0.1:{ports[2 * i + 1]}",
                            [sys.executable, "-m", "raftcoord", "node", "--config", str(config), "--name", name,
                             "--log-level", "WARNING"],
                            root / f"{name}.log", _env())
               for i, name in enumerate(names)}
    cluster = Cluster(system, members, version=str(__version__))
    for name in names:
        cluster.start(procs, name)
    return cluster


def etcd_version(binary: str) -> str:
    """The version an ``etcd`` binary reports."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("etcd Version")), "?")


def start_etcd(binary: str, root: Path, procs: Processes, n: int = 3) -> Cluster:
    """Start an ``n``-member etcd on 127.0.0.1 (fresh ports, its own data directories)."""
    names = [f"e{i + 1}" for i in range(n)]
    ports = free_ports(2 * n)
    peers = {name: f"http://127.0.0.1:{ports[2 * i]}" for i, name in enumerate(names)}
    clients = {name: f"http://127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(names)}
    initial = ",".join(f"{name}={url}" for name, url in peers.items())
    token = f"bench-{secrets.token_hex(6)}"
    root.mkdir(parents=True, exist_ok=True)
    members = {}
    for name in names:
        # A restart reuses the data directory, where etcd ignores the --initial-* flags.
        argv = [binary, "--name", name, "--data-dir", str(root / name),
                "--listen-client-urls", clients[name], "--advertise-client-urls", clients[name],
                "--listen-peer-urls", peers[name], "--initial-advertise-peer-urls", peers[name],
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token, "--log-level", "warn"]
        members[name] = Member(name, clients[name], argv, root / f"{name}.log")
    cluster = Cluster("etcd", members, version=etcd_version(binary))
    for name in names:
        cluster.start(procs, name)
    return cluster


async def find_leader(session: aiohttp.ClientSession, cluster: Cluster, timeout: float = 60.0) -> str:
    """Wait until every member answers and they name one leader; returns (and records) its name."""
    deadline = time.monotonic() + timeout
    last: Any = None
    short = aiohttp.ClientTimeout(total=2)
    while time.monotonic() < deadline:
        for m in cluster.members.values():
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"{cluster.system} member {m.name} exited with code {m.proc.returncode}; "
                                   f"see {m.log}")
        try:
            if cluster.system == "etcd":
                ids, leader_ids = {}, set()
                for name, url in cluster.urls.items():
                    async with session.post(f"{url}/v3/maintenance/status", json={}, timeout=short) as r:
                        st = await r.json()
                    ids[st["header"]["member_id"]] = name
                    leader_ids.add(st.get("leader"))
                leaders = [ids[i] for i in leader_ids if i in ids] if len(leader_ids) == 1 else []
                last = {"leader_ids": sorted(map(str, leader_ids))}
            else:
                roles = {}
                for name, url in cluster.urls.items():
                    async with session.get(f"{url}/raftcoord/v1/status", timeout=short) as r:
                        roles[name] = (await r.json()).get("role")
                leaders = [name for name, role in roles.items() if role == "leader"]
                last = roles
            if len(leaders) == 1:
                cluster.leader = leaders[0]
                return leaders[0]
        except (aiohttp.ClientError, OSError, KeyError, ValueError, asyncio.TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{cluster.system}: no single leader within {timeout:g} s (last: {last})")


async def wait_learners(session: aiohttp.ClientSession, cluster: Cluster, count: int, timeout: float = 60.0) -> None:
    """Wait until the leader of ``cluster`` has ``count`` non-voters connected, and every member has applied up to
    the commit index the leader told it: a cluster with non-voters still catching up would measure their catch-up."""
    deadline = time.monotonic() + timeout
    short = aiohttp.ClientTimeout(total=2)
    last: Any = None
    while time.monotonic() < deadline:
        try:
            leader = await find_leader(session, cluster, max(1.0, deadline - time.monotonic()))
            states = {}
            for name, url in cluster.urls.items():
                async with session.get(f"{url}/raftcoord/v1/status", timeout=short) as r:
                    states[name] = await r.json()
            connected = states[leader].get("learners_connected")
            behind = [name for name, st in states.items()
                      if (st.get("last_applied") or 0) < (st.get("leader_commit_index") or 0)]
            last = {"learners_connected": connected, "behind": behind}
            if connected == count and not behind:
                return
        except (aiohttp.ClientError, OSError, KeyError, ValueError, asyncio.TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{cluster.system}: {count} non-voters not connected and caught up within {timeout:g} s "
                       f"(last: {last})")


# ------------------------------------------------------------------ workers


@dataclass
class Worker:
    """A ``raftcoord.bench.worker`` process: requests and answers as JSON lines, plus delivery stamps."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    #: Benchmark message number -> ``time.monotonic()`` when this process's observer had it.
    seen: dict[int, float] = field(default_factory=dict)
    duplicates: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    async def call(self, op: str, timeout: float = 600.0, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its answer; raises RuntimeError for an error answer."""
        if self.reader is not None and self.reader.done():
            self.reader.result()
        i = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"id": i, "op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            answer = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(i, None)
        if "error" in answer:
            raise RuntimeError(f"worker {self.name}: {op}: {answer['error']}")
        return answer

    async def read(self) -> None:
        """Dispatch the process's output lines until it exits."""
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            msg = json.loads(raw)
            if "seen" in msg:
                for i, t in msg["seen"]:
                    if i in self.seen:
                        self.duplicates += 1
                    else:
                        self.seen[i] = t
                continue
            fut = self._waiting.get(msg.get("id"))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        code = await self.proc.wait()
        err = RuntimeError(f"worker {self.name} exited (code {code}); see {self.log}")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(err)
        raise err


async def start_workers(kind: str, configs: dict[str, dict[str, Any]], root: Path,
                        procs: Processes) -> dict[str, Worker]:
    """Start one worker process per ``configs`` entry (``kind``: "embedded" or "plain")."""
    workers = {}
    for name, config in configs.items():
        log = root / f"{name}.log"
        with open(log, "ab") as f:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "raftcoord.bench.worker", kind, json.dumps(config),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=f, env=_env(),
                start_new_session=True, limit=2**26)
        procs.pids.append(proc.pid)
        w = Worker(name, proc, log)
        w.reader = asyncio.create_task(w.read())
        workers[name] = w
    return workers


async def worker_leader(workers: dict[str, Worker], timeout: float = 60.0) -> str:
    """Wait until exactly one worker says it leads and every one knows a leader; returns its name."""
    deadline = time.monotonic() + timeout
    roles: dict[str, Any] = {}
    while time.monotonic() < deadline:
        roles = {name: await w.call("role", timeout=30) for name, w in workers.items()}
        leaders = [name for name, r in roles.items() if r["role"] == "leader"]
        if len(leaders) == 1 and all(r.get("ready") for r in roles.values()):
            return leaders[0]
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no single leader among the workers within {timeout:g} s: {roles}")
