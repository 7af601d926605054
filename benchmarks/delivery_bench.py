"""Delivery latency: post-to-delivery and put-to-watch on every node, beside a 3-member etcd.

    python benchmarks/delivery_bench.py [--quick] [--ops 1000] [--rate 100] [--via leader|follower]
                                        [--rounds 4] [--json PATH] [--no-etcd] [--no-embedded] [--no-secret]

Starts a 3-node raftcoord cluster on 127.0.0.1 (node processes, fresh ports,
a cluster secret, as users run it) and, when ``etcd`` is on the PATH, a
3-member etcd on 127.0.0.1. One asyncio/aiohttp load generator then measures,
at a steady rate (open loop: an operation is sent on schedule whether or not
the one before was answered):

* raftcoord post -> follow: ``POST /raftcoord/v1/messages`` through one node,
  until the ``GET /raftcoord/v1/messages?follow=1`` stream of EVERY node has
  the message;
* raftcoord put -> watch: ``POST /v3/kv/put`` through one node, until a
  ``POST /v3/watch`` stream on every node has the event;
* etcd put -> watch: the same through etcd's JSON gateway;
* embedded post -> observer (on unless ``--no-embedded``): a second 3-node
  raftcoord cluster whose nodes are processes that embed their coordinator,
  as a PuzzleDB node does (this script with ``--embedded-node``): one node
  posts with ``Coordinator.post_message``, and an observer
  (``add_observer(include_own=True)``) in EVERY node stamps each message with
  ``time.monotonic()`` as its callback gets it. CLOCK_MONOTONIC is one clock
  for every process of the machine, so these stamps compare with the load
  generator's own; the only extra hop is the pipe that tells a node to post
  (and the one it answers on, read off the clock).

Every stream is read concurrently in this one process, and every time is
``time.monotonic()`` of this process (or, for the embedded row, of the same
clock in the node), so a latency is "sent" to "the last of the three streams
had it". The operations are split into ``--rounds`` rounds and the phases
alternate round by round, so that noise from other work on the machine falls
on all of them alike. Each stream is also checked for operations delivered
twice or never. Prints a table, the ratios to etcd, and writes every figure
as JSON (``--json``, default ``delivery_bench.json``).

The HTTP rows include the client endpoint and its stream on every node; the
embedded row is what a PuzzleDB node's observer sees.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

# Shared with ``raftcoord bench``, which grew out of this script.
from raftcoord.bench.systems import Processes, b64, free_ports, prefix_end

#: Operations before each phase's measured ones, to warm connections and caches (not counted).
WARMUP = 20
#: Seconds after the last send that a phase waits for stragglers before counting them missing.
STRAGGLER_WAIT = 10.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by the nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


# ------------------------------------------------------------------ clusters


@dataclass
class Cluster:
    """A started cluster: its client URLs by member name, and the one writes go through."""

    system: str
    urls: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    leader: str = ""
    version: str = ""
    via: str = ""


#: Whether the clusters get a secret (as users run them); ``--no-secret`` shows what encryption costs.
SECRET = True


def write_cluster_file(root: Path, names: list[str]) -> tuple[Path, list[int]]:
    """A cluster file with fresh ports and a fresh secret; returns it and the ports (raft, client per node)."""
    ports = free_ports(2 * len(names))
    lines = ["[cluster]", 'name = "bench"', f'data_dir = "{root / "data"}"', ""]
    if SECRET:
        lines.insert(2, f'secret = "{secrets.token_urlsafe(24)}"')
    for i, name in enumerate(names):
        lines += ["[[node]]", f'name = "{name}"', f'raft = "127.0.0.1:{ports[2 * i]}"',
                  f'client = "127.0.0.1:{ports[2 * i + 1]}"', ""]
    config = root / "cluster.toml"
    config.write_text("\n".join(lines))
    config.chmod(0o600)  # it holds the secret
    return config, ports


def start_raftcoord(root: Path, procs: Processes, n: int = 3) -> Cluster:
    """Write a cluster file (fresh ports, a secret) and start ``n`` node processes."""
    names = [f"n{i + 1}" for i in range(n)]
    config, ports = write_cluster_file(root, names)
    env = {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}
    started = [procs.start([sys.executable, "-m", "raftcoord", "node", "--config", str(config), "--name", name],
                           root / f"{name}.log", env) for name in names]
    from raftcoord import __version__ as version  # noqa: PLC0415 - only for the report

    return Cluster("raftcoord", {name: f"http://127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(names)},
                   started, version=str(version))


def etcd_version(binary: str) -> str:
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
    started = []
    for name in names:
        argv = [binary, "--name", name, "--data-dir", str(root / name),
                "--listen-client-urls", clients[name], "--advertise-client-urls", clients[name],
                "--listen-peer-urls", peers[name], "--initial-advertise-peer-urls", peers[name],
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", token, "--log-level", "warn"]
        started.append(procs.start(argv, root / f"{name}.log"))
    return Cluster("etcd", clients, started, version=etcd_version(binary))


async def find_leader(session: aiohttp.ClientSession, cluster: Cluster, timeout: float = 60.0) -> str:
    """Wait until every member answers and one is leader; returns the leader's name."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a {cluster.system} process exited with code {proc.returncode}")
        try:
            if cluster.system == "raftcoord":
                roles = {}
                for name, url in cluster.urls.items():
                    async with session.get(f"{url}/raftcoord/v1/status") as r:
                        roles[name] = (await r.json()).get("role")
                leaders = [name for name, role in roles.items() if role == "leader"]
            else:
                ids, leader_ids = {}, set()
                for name, url in cluster.urls.items():
                    async with session.post(f"{url}/v3/maintenance/status", json={}) as r:
                        st = await r.json()
                    ids[st["header"]["member_id"]] = name
                    leader_ids.add(st.get("leader"))
                leaders = [ids[i] for i in leader_ids if i in ids]
                roles = {"leader_ids": sorted(map(str, leader_ids))}
            if len(leaders) == 1:
                return leaders[0]
            last = roles
        except (aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{cluster.system}: no single leader within {timeout:g} s (last: {last})")


# -------------------------------------------------------------------- phases


@dataclass
class Phase:
    """One measured path: how to open a stream on a member, send operation ``i``, and read ``i`` back."""

    name: str
    cluster: Cluster
    #: Opens a stream on one member; returns the response once the stream is ready for events
    #: (None: the phase's members report deliveries themselves, as the embedded nodes do).
    open: Callable[[aiohttp.ClientSession, str], Awaitable[aiohttp.ClientResponse]] | None
    #: The operation numbers one stream line carries.
    parse: Callable[[bytes], list[int]]
    #: Sends operation ``i`` through the ``via`` member.
    send: Callable[[aiohttp.ClientSession, str, int], Awaitable[None]]
    #: True when acknowledgements arrive by themselves (set in ``acked`` by the member's reader).
    async_ack: bool = False
    #: Background readers that outlive one round (the embedded nodes' pipes).
    background: list[asyncio.Task[None]] = field(default_factory=list)
    #: Stops what the phase started itself (the embedded nodes), inside the event loop.
    shutdown: Callable[[], Awaitable[None]] | None = None
    sent: dict[int, float] = field(default_factory=dict)
    acked: dict[int, float] = field(default_factory=dict)
    received: dict[str, dict[int, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    disorder: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)


def raftcoord_post_phase(cluster: Cluster, run: str) -> Phase:
    async def open_(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
        # Without since= the stream starts from the node's clock now; the headers mean it is in place.
        r = await session.get(f"{url}/raftcoord/v1/messages", params={"follow": "1"})
        r.raise_for_status()
        return r

    def parse(line: bytes) -> list[int]:
        m = json.loads(line)
        payload = m.get("payload") if isinstance(m, dict) else None
        if isinstance(payload, dict) and payload.get("bench") == run:
            return [int(payload["i"])]
        if isinstance(m, dict) and "error" in m:
            raise RuntimeError(f"follow stream error: {m['error']}")
        return []

    async def send(session: aiohttp.ClientSession, url: str, i: int) -> None:
        body = {"type": "U", "event": "C", "payload": {"bench": run, "i": i}}
        async with session.post(f"{url}/raftcoord/v1/messages", json=body) as r:
            r.raise_for_status()
            await r.read()

    return Phase("raftcoord post -> every node's follow stream", cluster, open_, parse, send)


def watch_phase(cluster: Cluster, run: str) -> Phase:
    """Put-to-watch, the same code for raftcoord and etcd (both speak etcd's JSON gateway)."""
    prefix = f"bench/{run}/".encode()

    async def open_(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
        create = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}}
        r = await session.post(f"{url}/v3/watch", json=create)
        r.raise_for_status()
        first = json.loads(await r.content.readline())
        if not first.get("result", {}).get("created"):
            raise RuntimeError(f"{url}: the watch was not created: {first}")
        return r

    def parse(line: bytes) -> list[int]:
        m = json.loads(line)
        result = m.get("result")
        if result is None:
            raise RuntimeError(f"watch stream error: {m}")
        if result.get("canceled"):
            raise RuntimeError(f"watch canceled: {result}")
        return [int(base64.b64decode(e["kv"]["key"])[len(prefix):]) for e in result.get("events", [])]

    async def send(session: aiohttp.ClientSession, url: str, i: int) -> None:
        body = {"key": b64(prefix + str(i).encode()), "value": b64(b"x" * 100)}
        async with session.post(f"{url}/v3/kv/put", json=body) as r:
            r.raise_for_status()
            await r.read()

    return Phase(f"{cluster.system} put -> every {'node' if cluster.system == 'raftcoord' else 'member'}'s "
                 f"/v3/watch", cluster, open_, parse, send)


async def _reader(phase: Phase, member: str, response: aiohttp.ClientResponse) -> None:
    got = phase.received.setdefault(member, {})
    last = -1
    async for line in response.content:
        now = time.monotonic()
        if not line.strip():
            continue
        for i in phase.parse(line):
            if i in got:
                phase.duplicates[member] = phase.duplicates.get(member, 0) + 1
                continue
            got[i] = now
            if i < last:
                # Operations are sent in order but may commit out of order (open loop), so this is
                # only a sign of reordering in flight, not a fault; the streams' own order is etcd's
                # revision order or the message clock order.
                phase.disorder[member] = phase.disorder.get(member, 0) + 1
            last = max(last, i)


async def run_round(phase: Phase, first: int, count: int, rate: float, *, warmup: int) -> None:
    """Open every member's stream, warm up, then send ``count`` operations numbered from ``first``."""
    cluster = phase.cluster
    via = cluster.urls[cluster.via]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    streams = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
    senders = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                    connector=aiohttp.TCPConnector(limit=0))
    readers: list[asyncio.Task[None]] = []
    responses: dict[str, aiohttp.ClientResponse] = {}
    try:
        if phase.open is not None:
            for m, url in cluster.urls.items():
                responses[m] = await phase.open(streams, url)
            readers = [asyncio.create_task(_reader(phase, m, r)) for m, r in responses.items()]
        for m in cluster.urls:
            phase.received.setdefault(m, {})

        async def one(i: int) -> None:
            phase.sent[i] = time.monotonic()
            try:
                await phase.send(senders, via, i)
                if not phase.async_ack:
                    phase.acked[i] = time.monotonic()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                phase.failures.append(f"op {i}: {type(exc).__name__}: {exc}")

        async def until_all(ops: range, deadline: float) -> None:
            while time.monotonic() < deadline:
                if all(all(i in got for i in ops) for got in phase.received.values()) \
                        and len(phase.received) == len(cluster.urls):
                    return
                for t in readers + phase.background:
                    if t.done() and t.exception() is not None:
                        raise RuntimeError(f"{phase.name}: a stream failed: {t.exception()}")
                await asyncio.sleep(0.01)

        # Warm-up operations get negative numbers: sent one by one, never counted.
        for i in range(-warmup, 0):
            await one(i)
            await until_all(range(i, i + 1), time.monotonic() + 5)
        for i in range(-warmup, 0):
            phase.sent.pop(i, None)
            phase.acked.pop(i, None)
            for got in phase.received.values():
                got.pop(i, None)

        tasks = []
        t0 = time.monotonic() + 0.05
        for k in range(count):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(first + k)))
        await asyncio.gather(*tasks)
        await until_all(range(first, first + count), time.monotonic() + STRAGGLER_WAIT)
    finally:
        for t in readers:
            t.cancel()
        for t in readers:
            with contextlib.suppress(BaseException):
                await t
        for r in responses.values():
            r.close()
        await streams.close()
        await senders.close()


def summarize(phase: Phase, ops: int) -> dict[str, Any]:
    """p50/p99/max in milliseconds of "sent" to "every member's stream has it", and per member."""
    members = sorted(phase.cluster.urls)
    every: list[float] = []
    per_member: dict[str, list[float]] = {m: [] for m in members}
    missing = 0
    for i, sent in phase.sent.items():
        times = [phase.received.get(m, {}).get(i) for m in members]
        if any(t is None for t in times):
            missing += 1
            continue
        every.append((max(times) - sent) * 1000)  # type: ignore[type-var]
        for m, t in zip(members, times):
            per_member[m].append((t - sent) * 1000)  # type: ignore[operator]
    acks = [(phase.acked[i] - s) * 1000 for i, s in phase.sent.items() if i in phase.acked]

    def stats(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"p50": None, "p99": None, "max": None, "mean": None}
        return {"p50": round(percentile(values, 0.50), 3), "p99": round(percentile(values, 0.99), 3),
                "max": round(max(values), 3), "mean": round(statistics.fmean(values), 3)}

    return {
        "name": phase.name,
        "system": phase.cluster.system,
        "version": phase.cluster.version,
        "via": f"{phase.cluster.via} ({'leader' if phase.cluster.via == phase.cluster.leader else 'follower'})",
        "operations": ops,
        "measured": len(every),
        "missing": missing,
        "failed_sends": len(phase.failures),
        "failures": phase.failures[:5],
        "duplicates": phase.duplicates,
        "out_of_send_order": phase.disorder,
        "every_member_ms": stats(every),
        "ack_ms": stats(acks),
        "per_member_ms": {m: stats(v) for m, v in per_member.items()},
    }


# ------------------------------------------------------------------ embedded


def embedded_node(config: str, name: str, run: str) -> None:
    """``--embedded-node CONFIG NAME RUN``: a node that embeds its coordinator, driven over stdin/stdout.

    Writes ``ready`` once its observer is registered, ``seen I T`` when the
    observer gets benchmark message I (T: ``time.monotonic()`` in the
    callback), ``ack I T`` / ``fail I WHY`` for each post it was told to make
    (``post I`` on stdin, each on a thread of a pool, so posts overlap as the
    load generator sends them), and ``role ROLE`` for ``role``.
    """
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from raftcoord.coordinator import Coordinator

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    lock = threading.Lock()

    def out(line: str) -> None:
        with lock:
            os.write(1, (line + "\n").encode())

    def seen(m: Any) -> None:
        t = time.monotonic()
        p = m.payload
        if isinstance(p, dict) and p.get("bench") == run:
            out(f"seen {p['i']} {t!r}")

    coord = Coordinator.from_config(config, node=name, timeout=10)
    deadline = time.monotonic() + 60
    while True:
        try:
            coord.add_observer(seen, include_own=True)
            break
        except Exception:  # noqa: BLE001 - not ready yet (no leader): try again until the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    out("ready")

    def post(i: int) -> None:
        try:
            coord.post_message("U", "C", {"bench": run, "i": i})
            out(f"ack {i} {time.monotonic()!r}")
        except Exception as exc:  # noqa: BLE001 - reported to the load generator
            out(f"fail {i} {type(exc).__name__}: {str(exc)[:200]}")

    with ThreadPoolExecutor(max_workers=64) as pool:
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "post":
                pool.submit(post, int(arg))
            elif cmd == "role":
                out(f"role {coord.status().get('role')}")
    coord.close()


async def start_embedded(root: Path, procs: Processes, run: str, n: int = 3) -> tuple[Phase, float]:
    """A cluster of ``n`` embedding nodes and its phase; returns once one is leader (and the seconds taken)."""
    t0 = time.monotonic()
    names = [f"m{i + 1}" for i in range(n)]
    config, _ = write_cluster_file(root, names)
    env = {k: v for k, v in os.environ.items() if k != "RAFTCOORD_SECRET"}
    nodes: dict[str, asyncio.subprocess.Process] = {}
    for name in names:
        with open(root / f"{name}.log", "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--embedded-node", str(config), name, run,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
                start_new_session=True)
        procs.pids.append(proc.pid)
        nodes[name] = proc
    from raftcoord import __version__ as version  # noqa: PLC0415 - only for the report

    cluster = Cluster("raftcoord embedded", {name: name for name in names}, [], version=str(version))
    ready: set[str] = set()
    roles: dict[str, str] = {}

    async def send(_session: aiohttp.ClientSession, via: str, i: int) -> None:
        stdin = nodes[via].stdin
        assert stdin is not None
        stdin.write(f"post {i}\n".encode())
        await stdin.drain()

    phase = Phase("embedded post -> every node's observer", cluster, None, lambda line: [], send, async_ack=True)

    async def reader(name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        got = phase.received.setdefault(name, {})
        async for raw in proc.stdout:
            what, _, rest = raw.decode().strip().partition(" ")
            if what == "seen":
                i, t = rest.split()
                if int(i) in got:
                    phase.duplicates[name] = phase.duplicates.get(name, 0) + 1
                else:
                    got[int(i)] = float(t)
            elif what == "ack":
                i, t = rest.split()
                phase.acked[int(i)] = float(t)
            elif what == "fail":
                phase.failures.append(f"op {rest}")
            elif what == "ready":
                ready.add(name)
            elif what == "role":
                roles[name] = rest
        raise RuntimeError(f"embedded node {name} exited (code {await proc.wait()}); see {root / name}.log")

    phase.background = [asyncio.create_task(reader(name, proc)) for name, proc in nodes.items()]

    async def shutdown() -> None:
        for t in phase.background:
            t.cancel()
        for name, proc in nodes.items():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
            procs.pids.remove(proc.pid)
        for t in phase.background:
            with contextlib.suppress(BaseException):
                await t

    phase.shutdown = shutdown
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for t in phase.background:
            if t.done():
                t.result()
        if len(ready) == n:
            roles.clear()
            for proc in nodes.values():
                assert proc.stdin is not None
                proc.stdin.write(b"role\n")
            await asyncio.sleep(0.3)
            leaders = [name for name, role in roles.items() if role == "leader"]
            if len(leaders) == 1 and len(roles) == n:
                cluster.leader = leaders[0]
                return phase, time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the embedded cluster did not become ready with one leader (ready {sorted(ready)}, "
                       f"roles {roles})")


# ---------------------------------------------------------------------- main


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:8.2f}"


def print_table(results: list[dict[str, Any]], args: argparse.Namespace, etcd_note: str) -> dict[str, Any]:
    print(f"\ndelivery latency on 127.0.0.1, 3 members each, {args.ops} operations per row at {args.rate:g}/s "
          f"(open loop, {args.rounds} interleaved rounds), writes through the {args.via}, raftcoord "
          f"{'with' if SECRET else 'WITHOUT'} a secret; milliseconds from "
          f"send to the LAST of the 3 streams")
    head = f"{'what':<46} {'p50':>8} {'p99':>8} {'max':>8} {'ack p50':>8} {'missing':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        e, a = r["every_member_ms"], r["ack_ms"]
        print(f"{r['name']:<46} {_fmt(e['p50'])} {_fmt(e['p99'])} {_fmt(e['max'])} {_fmt(a['p50'])} "
              f"{r['missing']:>8}")
    if etcd_note:
        print(etcd_note)
    ratios: dict[str, Any] = {}
    etcd = next((r for r in results if r["system"] == "etcd"), None)
    if etcd is not None and etcd["every_member_ms"]["p99"]:
        for r in results:
            if not r["system"].startswith("raftcoord") or r["every_member_ms"]["p99"] is None:
                continue
            key = ("embedded_post_to_observer" if r["system"].endswith("embedded") else
                   "post_to_follow_stream" if "post" in r["name"] else "put_to_watch")
            ratios[key] = {q: round(r["every_member_ms"][q] / etcd["every_member_ms"][q], 2) for q in ("p50", "p99")}
        print("ratios to etcd's put -> watch (1.0 = as fast as etcd; the target is post-to-delivery p99 <= 1.0): "
              + "; ".join(f"{k} p50 {v['p50']:.2f}x, p99 {v['p99']:.2f}x" for k, v in ratios.items()))
    for r in results:
        per = ", ".join(f"{m} p50 {s['p50']} p99 {s['p99']}" for m, s in r["per_member_ms"].items())
        extra = []
        if r["duplicates"]:
            extra.append(f"DUPLICATES {r['duplicates']}")
        if r["failed_sends"]:
            extra.append(f"{r['failed_sends']} sends failed, e.g. {r['failures'][0]}")
        print(f"  {r['name']} (via {r['via']}): per stream {per}" + (f"; {'; '.join(extra)}" if extra else ""))
    return ratios


async def bench(args: argparse.Namespace, root: Path, procs: Processes) -> dict[str, Any]:
    run = secrets.token_hex(4)
    embedded: Phase | None = None
    if args.embedded:
        (root / "embedded").mkdir()
        embedded, _ = await start_embedded(root / "embedded", procs, run)
        c = embedded.cluster
        c.via = c.leader if args.via == "leader" else next(m for m in sorted(c.urls) if m != c.leader)
    clusters = [start_raftcoord(root / "raftcoord", procs)]
    etcd_bin = None if args.no_etcd else shutil.which("etcd")
    etcd_note = ""
    if etcd_bin is None:
        etcd_note = ("etcd: skipped (" + ("--no-etcd" if args.no_etcd else "no `etcd` on the PATH; "
                     "apt-get install etcd-server") + "): no etcd row, no ratios")
    else:
        (root / "etcd").mkdir()
        clusters.append(start_etcd(etcd_bin, root / "etcd", procs))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for c in clusters:
            c.leader = await find_leader(session, c)
            c.via = c.leader if args.via == "leader" else next(m for m in sorted(c.urls) if m != c.leader)
    phases = [raftcoord_post_phase(clusters[0], run), watch_phase(clusters[0], run)]
    if embedded is not None:
        phases.insert(0, embedded)
    if len(clusters) > 1:
        phases.append(watch_phase(clusters[1], run))
    per_round = [args.ops // args.rounds + (1 if r < args.ops % args.rounds else 0) for r in range(args.rounds)]
    first = 0
    try:
        for r, count in enumerate(per_round):
            for phase in phases:
                print(f"round {r + 1}/{args.rounds}: {phase.name}: {count} operations", file=sys.stderr, flush=True)
                await run_round(phase, first, count, args.rate, warmup=WARMUP if r == 0 else 3)
            first += count
    finally:
        if embedded is not None and embedded.shutdown is not None:
            await embedded.shutdown()
    results = [summarize(p, args.ops) for p in phases]
    ratios = print_table(results, args, etcd_note)
    return {"ops": args.ops, "rate": args.rate, "rounds": args.rounds, "via": args.via, "secret": SECRET,
            "results": results,
            "ratios_to_etcd": ratios, "etcd": etcd_note or "measured",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "unix_time": time.time()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run: 200 operations per row")
    ap.add_argument("--ops", type=int, default=1000, help="measured operations per row (default 1000)")
    ap.add_argument("--rate", type=float, default=100.0, help="operations per second (default 100)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the operations are split into")
    ap.add_argument("--via", choices=("leader", "follower"), default="leader",
                    help="send writes through the leader (default) or a follower")
    ap.add_argument("--json", type=Path, default=Path("delivery_bench.json"), help="where to write the figures")
    ap.add_argument("--no-etcd", action="store_true", help="skip etcd even when it is on the PATH")
    ap.add_argument("--no-embedded", dest="embedded", action="store_false",
                    help="skip the cluster of nodes that embed their coordinator")
    ap.add_argument("--no-secret", action="store_true",
                    help="raftcoord clusters without a secret (no peer encryption): what encryption costs")
    ap.add_argument("--keep", action="store_true", help="keep the clusters' directories (logs) afterwards")
    if sys.argv[1:2] == ["--embedded-node"]:
        embedded_node(*sys.argv[2:5])
        return
    args = ap.parse_args()
    if args.quick:
        args.ops, args.rounds = min(args.ops, 200), min(args.rounds, 2)
    global SECRET
    SECRET = not args.no_secret
    if args.ops < 1 or args.rate <= 0 or not 1 <= args.rounds <= args.ops:
        ap.error("--ops and --rate must be positive, --rounds between 1 and --ops")
    root = Path(tempfile.mkdtemp(prefix="delivery-bench-"))
    (root / "raftcoord").mkdir()
    procs = Processes()
    try:
        report = asyncio.run(bench(args, root, procs))
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        procs.stop()
        if args.keep:
            print(f"logs kept under {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
