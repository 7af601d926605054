"""The workloads, as the HTTP systems and the worker systems each run them.

HTTP (raftcoord's endpoint, etcd's gateway; the same requests for both),
always through the leader:

* ``puts``: ``/v3/kv/put``, 8-byte keys of a 1,000-key space, 256-byte values;
* ``get-linearizable`` / ``get-serializable``: ``/v3/kv/range`` of one
  loaded key (``serializable: true`` for the second);
* ``cas``: a ``/v3/kv/txn`` on ONE key every client contends on: "if its
  mod_revision is still the one I saw, put; else read it" (the failure
  branch tells the client the new revision for its next try); a row counts
  every answered txn, and ``swapped`` those that won (warm-up included);
* ``messages``: raftcoord posts to ``/raftcoord/v1/messages``, timed until
  the ``messages?follow=1`` stream of every node has the message; for etcd,
  puts timed until a ``/v3/watch`` on every member has the event (the path
  ``benchmarks/delivery_bench.py`` measures at a steady rate);
* ``failover``: SIGKILL of the leader, then writes through the survivors
  (a new attempt every 20 ms) until one succeeds; the member is restarted
  and the cluster settles before the next kill;
* ``restart`` and ``memory`` (raftcoord only): see :func:`keys_phase`;
* puts on 3 voters + 7 non-voters (the ``raftcoord+7nv`` system), each row
  paired with the same puts on 3 voters alone just before it: see
  :func:`nonvoter_row`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from raftcoord.bench.load import KEYSPACE, VALUE, bench_key, http_loop, percentile, stats
from raftcoord.bench.systems import Cluster, Processes, Worker, b64, find_leader, prefix_end, rss_bytes

__all__ = ["HTTP_WORKLOADS", "failover", "failover_summary", "http_messages", "http_row", "keys_phase",
           "nonvoter_row", "worker_messages", "worker_row"]

#: The workloads of the throughput table, as the HTTP systems run them.
HTTP_WORKLOADS = ("puts", "get-linearizable", "get-serializable", "cas")
#: The key the compare-and-swap workload contends on (the workers use the same).
CAS_KEY = b"cas-key1"
#: Seconds a row waits after its last send for deliveries still on their way.
STRAGGLER_WAIT = 5.0

_JSON = {"Content-Type": "application/json"}


async def _post(session: aiohttp.ClientSession, url: str, body: bytes,
                timeout: aiohttp.ClientTimeout | None = None) -> bytes:
    async with session.post(url, data=body, headers=_JSON, timeout=timeout) as r:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        return data


def _put_body(key: bytes, value: bytes = VALUE) -> bytes:
    return json.dumps({"key": b64(key), "value": b64(value)}).encode()


async def _load_keys(session: aiohttp.ClientSession, cluster: Cluster) -> None:
    """Write every key of the key space once (the gets read them)."""
    url = cluster.urls[cluster.leader] + "/v3/kv/put"
    keys = iter(range(KEYSPACE))

    async def writer() -> None:
        for k in keys:
            await _post(session, url, _put_body(bench_key(k)))

    await asyncio.gather(*(writer() for _ in range(16)))


async def http_row(session: aiohttp.ClientSession, cluster: Cluster, workload: str, clients: int,
                   seconds: float, warmup: float, prepared: set[str]) -> dict[str, Any]:
    """One row of the throughput table for an HTTP system."""
    base = cluster.urls[cluster.leader]
    if workload in ("get-linearizable", "get-serializable") and "keys" not in prepared:
        await _load_keys(session, cluster)
        prepared.add("keys")
    if workload == "puts":
        url, bodies = base + "/v3/kv/put", [_put_body(bench_key(k)) for k in range(KEYSPACE)]

        async def op(c: int, n: int) -> None:
            await _post(session, url, bodies[(c * 7919 + n) % KEYSPACE])

        return await http_loop(op, clients, seconds, warmup)
    if workload in ("get-linearizable", "get-serializable"):
        serializable = workload.endswith("serializable")
        url = base + "/v3/kv/range"
        bodies = [json.dumps({"key": b64(bench_key(k)), **({"serializable": True} if serializable else {})}).encode()
                  for k in range(KEYSPACE)]
        answer = json.loads(await _post(session, url, bodies[0]))
        if int(answer.get("count", 0)) != 1:
            raise RuntimeError(f"{cluster.system}: a loaded key is missing: {answer}")

        async def get(c: int, n: int) -> None:
            await _post(session, url, bodies[(c * 7919 + n) % KEYSPACE])

        return await http_loop(get, clients, seconds, warmup)
    if workload == "cas":
        return await _cas_row(session, base, clients, seconds, warmup)
    raise ValueError(f"unknown workload {workload!r}")


async def _cas_row(session: aiohttp.ClientSession, base: str, clients: int, seconds: float,
                   warmup: float) -> dict[str, Any]:
    key = b64(CAS_KEY)
    await _post(session, base + "/v3/kv/put", _put_body(CAS_KEY))
    first = json.loads(await _post(session, base + "/v3/kv/range", json.dumps({"key": key}).encode()))
    last = [int(first["kvs"][0]["mod_revision"])] * clients
    won = [0]
    url = base + "/v3/kv/txn"
    success = [{"request_put": {"key": key, "value": b64(VALUE)}}]
    failure = [{"request_range": {"key": key}}]

    async def cas(c: int, n: int) -> None:
        body = json.dumps({"compare": [{"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": last[c]}],
                           "success": success, "failure": failure}).encode()
        answer = json.loads(await _post(session, url, body))
        if answer.get("succeeded"):  # etcd's gateway leaves out a false boolean
            last[c] = int(answer["header"]["revision"])
            won[0] += 1
        else:
            last[c] = int(answer["responses"][0]["response_range"]["kvs"][0]["mod_revision"])

    row = await http_loop(cas, clients, seconds, warmup)
    row["swapped"] = won[0]
    return row


async def worker_row(worker: Worker, workload: str, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One row of the throughput table for a worker system (embedded or plain), run inside its leader."""
    answer = await worker.call("load", workload=workload, clients=clients, seconds=seconds, warmup=warmup,
                               timeout=seconds + warmup + 300)
    answer.pop("id", None)
    return answer


# ------------------------------------------------------------------ messages


def _delivery(sent: dict[int, float], seen: list[dict[int, float]]) -> dict[str, Any]:
    every, missing = [], 0
    for i, t0 in sent.items():
        times = [s.get(i) for s in seen]
        if any(t is None for t in times):
            missing += 1
        else:
            every.append((max(times) - t0) * 1000)  # type: ignore[type-var]
    return {"delivery_ms": stats(every), "delivered": len(every), "missing": missing}


async def _until_seen(sent: dict[int, float], seen: list[dict[int, float]], deadline: float,
                      check: Callable[[], None] = lambda: None) -> None:
    while time.monotonic() < deadline:
        check()
        if all(all(i in s for i in sent) for s in seen):
            return
        await asyncio.sleep(0.01)


async def http_messages(session: aiohttp.ClientSession, streams: aiohttp.ClientSession, cluster: Cluster,
                        run: str, clients: int, seconds: float, warmup: float, counter: Any) -> dict[str, Any]:
    """Posts (raftcoord) or puts (etcd) with the time until every member's stream has them."""
    raftcoord = cluster.system != "etcd"
    prefix = f"bench/{run}/".encode()
    seen: dict[str, dict[int, float]] = {name: {} for name in cluster.members}
    responses: list[aiohttp.ClientResponse] = []

    def parse(line: bytes) -> list[int]:
        m = json.loads(line)
        if raftcoord:
            if "error" in m:
                raise RuntimeError(f"follow stream error: {m['error']}")
            p = m.get("payload")
            return [int(p["i"])] if isinstance(p, dict) and p.get("bench") == run else []
        result = m.get("result")
        if result is None or result.get("canceled"):
            raise RuntimeError(f"watch stream error: {m}")
        return [int(base64.b64decode(e["kv"]["key"])[len(prefix):]) for e in result.get("events", [])]

    async def reader(name: str, r: aiohttp.ClientResponse) -> None:
        got = seen[name]
        async for line in r.content:
            now = time.monotonic()
            if line.strip():
                for i in parse(line):
                    got.setdefault(i, now)

    for name, url in cluster.urls.items():
        if raftcoord:
            r = await streams.get(f"{url}/raftcoord/v1/messages", params={"follow": "1"})
            r.raise_for_status()
        else:
            create = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}}
            r = await streams.post(f"{url}/v3/watch", json=create)
            r.raise_for_status()
            first = json.loads(await r.content.readline())
            if not first.get("result", {}).get("created"):
                raise RuntimeError(f"{url}: the watch was not created: {first}")
        responses.append(r)
    readers = [asyncio.create_task(reader(name, r)) for name, r in zip(cluster.members, responses)]

    def check() -> None:
        for t in readers:
            if t.done():
                raise RuntimeError(f"{cluster.system}: a stream ended: {t.exception() or 'closed'}")

    base = cluster.urls[cluster.leader]
    sent: dict[int, float] = {}
    start = time.monotonic()
    try:
        async def op(c: int, n: int) -> None:
            i = next(counter)
            t0 = time.monotonic()
            if t0 >= start + warmup:
                sent[i] = t0
            if raftcoord:
                body = json.dumps({"type": "U", "event": "C", "payload": {"bench": run, "i": i}}).encode()
                await _post(session, base + "/raftcoord/v1/messages", body)
            else:
                await _post(session, base + "/v3/kv/put", _put_body(prefix + str(i).encode(), b"x" * 100))

        row = await http_loop(op, clients, seconds, warmup)
        await _until_seen(sent, list(seen.values()), time.monotonic() + STRAGGLER_WAIT, check)
    finally:
        for t in readers:
            t.cancel()
        for t in readers:
            with contextlib.suppress(BaseException):
                await t
        for r in responses:
            r.close()
    row.update(_delivery(sent, list(seen.values())))
    return row


async def worker_messages(workers: dict[str, Worker], leader: str, clients: int, seconds: float,
                          warmup: float) -> dict[str, Any]:
    """Embedded posts with the time until every node's observer has them."""
    row = await worker_row(workers[leader], "messages", clients, seconds, warmup)
    sent = {int(i): t0 for i, t0, _ in row.pop("sent")}
    seen = [w.seen for w in workers.values()]

    def check() -> None:
        for w in workers.values():
            if w.reader is not None and w.reader.done():
                w.reader.result()

    await _until_seen(sent, seen, time.monotonic() + STRAGGLER_WAIT, check)
    row.update(_delivery(sent, seen))
    row["duplicates"] = sum(w.duplicates for w in workers.values())
    return row


# ---------------------------------------------------------------- non-voters


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


async def nonvoter_row(session: aiohttp.ClientSession, alone: Cluster, with_non_voters: Cluster, clients: int,
                       seconds: float, warmup: float) -> dict[str, Any]:
    """Puts through the leader of ``with_non_voters``, paired with the same puts on ``alone`` (3 voters) just before.

    The row is the first cluster's; ``baseline`` holds the second's and ``vs_3_voters`` the ratios (p50, p99,
    throughput) of the first to the second. Both clusters run during both halves, so they share the machine's
    noise alike; what differs is only the non-voters receiving and applying the log.
    """
    await find_leader(session, alone, 30)
    baseline = await http_row(session, alone, "puts", clients, seconds, warmup, set())
    await find_leader(session, with_non_voters, 30)
    row = await http_row(session, with_non_voters, "puts", clients, seconds, warmup, set())
    row["baseline"] = baseline
    row["vs_3_voters"] = {"p50": _ratio(row.get("p50_ms"), baseline.get("p50_ms")),
                          "p99": _ratio(row.get("p99_ms"), baseline.get("p99_ms")),
                          "per_second": _ratio(row.get("per_second"), baseline.get("per_second"))}
    return row


# ------------------------------------------------------------------ failover


async def _write_until_ok(session: aiohttp.ClientSession, urls: list[str], limit: float) -> float:
    """Start a put every 20 ms through ``urls`` in turn until one succeeds; the time of that success."""
    done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    timeout = aiohttp.ClientTimeout(total=3)
    body = _put_body(b"failover")

    async def attempt(url: str) -> None:
        with contextlib.suppress(Exception):
            await _post(session, url + "/v3/kv/put", body, timeout)
            if not done.done():
                done.set_result(time.monotonic())

    tasks = []
    deadline = time.monotonic() + limit
    try:
        for k in itertools.count():
            if done.done() or time.monotonic() > deadline:
                break
            tasks.append(asyncio.create_task(attempt(urls[k % len(urls)])))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 0.02)
        if not done.done():
            raise RuntimeError(f"no write succeeded within {limit:g} s")
        return done.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def failover(session: aiohttp.ClientSession, cluster: Cluster, procs: Processes) -> float:
    """SIGKILL the leader; seconds until a write through a survivor succeeds. Restarts it and lets it settle."""
    leader = await find_leader(session, cluster)
    await _write_until_ok(session, [cluster.urls[leader]], 30)
    victim = cluster.members[leader]
    t_kill = time.monotonic()
    victim.kill()
    survivors = [url for name, url in cluster.urls.items() if name != leader]
    took = await _write_until_ok(session, survivors, 60) - t_kill
    cluster.start(procs, leader)
    await find_leader(session, cluster)
    await _write_until_ok(session, [victim.url], 60)  # back in the cluster before the next kill
    return took


def failover_summary(times: list[float]) -> dict[str, Any]:
    """Seconds: p50, p99 and max of the measured failovers."""
    if not times:
        return {"kills": 0}
    return {"kills": len(times), "p50_s": round(percentile(times, 0.5), 3), "p99_s": round(percentile(times, 0.99), 3),
            "max_s": round(max(times), 3), "all_s": [round(t, 3) for t in times]}


# ------------------------------------------------------------- restart, memory


async def keys_phase(session: aiohttp.ClientSession, cluster: Cluster, procs: Processes, targets: list[int],
                     memory_at: int, progress: Callable[[str], None], *, restart: bool = True) -> dict[str, Any]:
    """Load ``targets`` keys (100-byte values) in turn; at each, restart a follower and time its first
    linearizable read (from the process's start); at ``memory_at`` keys, the resident size of each node."""
    leader = await find_leader(session, cluster)
    base_rss = {name: rss_bytes(m.proc.pid) for name, m in cluster.members.items() if m.proc is not None}
    out: dict[str, Any] = {"baseline_rss_bytes": base_rss, "restart": [], "memory": None}
    loaded = 0
    value = b64(b"m" * 100)
    for target in targets:
        progress(f"loading {target:,} keys of 100 bytes")
        t0 = time.monotonic()
        batches = iter(range(loaded, target, 1000))

        async def loader() -> None:
            for first in batches:
                ops = [{"request_put": {"key": b64(b"r%07d" % i), "value": value}}
                       for i in range(first, min(first + 1000, target))]
                await _post(session, cluster.urls[leader] + "/v3/kv/txn", json.dumps({"success": ops}).encode(),
                            aiohttp.ClientTimeout(total=120))

        await asyncio.gather(*(loader() for _ in range(4)))
        loaded = target
        out.setdefault("load_seconds", {})[str(target)] = round(time.monotonic() - t0, 2)
        if target == memory_at:
            await asyncio.sleep(1.0)
            rss = {name: rss_bytes(m.proc.pid) for name, m in cluster.members.items() if m.proc is not None}
            out["memory"] = {"keys": target, "rss_bytes": rss, "max_rss_bytes": max(rss.values())}
        if restart:
            progress(f"restarting a follower holding {target:,} keys")
            out["restart"].append({"keys": target, **await _restart(session, cluster, procs, target)})
            leader = await find_leader(session, cluster)
    return out


async def _restart(session: aiohttp.ClientSession, cluster: Cluster, procs: Processes, keys: int) -> dict[str, Any]:
    leader = await find_leader(session, cluster)
    name = next(n for n in sorted(cluster.members) if n != leader)
    member = cluster.members[name]
    member.kill()
    t0 = time.monotonic()
    cluster.start(procs, name)
    body = json.dumps({"key": b64(b"r%07d" % (keys - 1))}).encode()
    timeout = aiohttp.ClientTimeout(total=1)
    deadline = t0 + 120
    while time.monotonic() < deadline:
        if member.proc is not None and member.proc.poll() is not None:
            raise RuntimeError(f"restarted node {name} exited; see {member.log}")
        with contextlib.suppress(Exception):
            answer = json.loads(await _post(session, member.url + "/v3/kv/range", body, timeout))
            if int(answer.get("count", 0)) == 1:
                return {"node": name, "seconds": round(time.monotonic() - t0, 3)}
        await asyncio.sleep(0.02)
    raise RuntimeError(f"restarted node {name} served no linearizable read within 120 s")

