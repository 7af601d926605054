"""The load generator and the figures it keeps.

One asyncio load generator drives every HTTP system (raftcoord's endpoint
and etcd's v3 JSON gateway) with the same requests: ``clients`` coroutines
in a closed loop (each sends its next request when the last one is
answered), over one aiohttp session with keep-alive connections. The
embedded and plain systems run the same closed loop on threads in their
own process (``worker.py``); both report through :func:`summarize`.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["KEYSPACE", "VALUE", "bench_key", "http_loop", "percentile", "stats", "summarize"]

#: Distinct keys the put and get workloads use (8-byte keys ``k0000000``...).
KEYSPACE = 1000
#: The value of every put: 256 bytes.
VALUE = b"v" * 256


def bench_key(n: int) -> bytes:
    """The 8-byte key number ``n`` (modulo :data:`KEYSPACE`)."""
    return b"k%07d" % (n % KEYSPACE)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by the nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def stats(ms: list[float]) -> dict[str, float | None]:
    """p50, p99, max and mean of latencies in milliseconds (None when there are none)."""
    if not ms:
        return {"p50": None, "p99": None, "max": None, "mean": None}
    return {"p50": round(percentile(ms, 0.50), 3), "p99": round(percentile(ms, 0.99), 3),
            "max": round(max(ms), 3), "mean": round(statistics.fmean(ms), 3)}


def summarize(latencies: list[float], seconds: float, errors: int, first_error: str = "") -> dict[str, Any]:
    """A row's figures from its latencies (seconds) over a window of ``seconds``."""
    s = stats([x * 1000 for x in latencies])
    return {"ops": len(latencies), "per_second": round(len(latencies) / seconds, 1) if seconds > 0 else None,
            "p50_ms": s["p50"], "p99_ms": s["p99"], "max_ms": s["max"], "mean_ms": s["mean"],
            "errors": errors, "first_error": first_error}


async def http_loop(op: Callable[[int, int], Awaitable[Any]], clients: int, seconds: float,
                    warmup: float) -> dict[str, Any]:
    """Run ``await op(client, n)`` on ``clients`` coroutines for ``warmup + seconds``; figures of the last part.

    ``op`` raises for a failed request; a failure is counted, not timed.
    """
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds
    lats: list[float] = []
    errors = 0
    first_error = ""

    async def run(c: int) -> None:
        nonlocal errors, first_error
        n = 0
        while True:
            t0 = time.monotonic()
            if t0 >= stop:
                return
            try:
                await op(c, n)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {str(exc)[:200]}"
                await asyncio.sleep(0.01)  # a refused request must not spin the loop
            else:
                if t0 >= measure_from:
                    lats.append(time.monotonic() - t0)
            n += 1

    await asyncio.gather(*(run(c) for c in range(clients)))
    return summarize(lats, seconds, errors, first_error)
