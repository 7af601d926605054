"""A benchmark member process that runs its load in-process: ``python -m raftcoord.bench.worker KIND CONFIG``.

KIND ``embedded``: a node that embeds a :class:`~raftcoord.coordinator.Coordinator`
(``Coordinator.from_config``), as a PuzzleDB node does; its observer stamps
every benchmark message with ``time.monotonic()`` (one clock for every
process of the machine) and reports it, so post-to-delivery is measured on
every node. KIND ``plain``: a plain pysyncobj ``ReplDict`` with a journal
file (the persistence raftcoord uses) and the same secret, the floor the
library starts from. CONFIG is a JSON object (see :func:`main`).

Requests arrive on stdin, one JSON object a line (``{"id": 1, "op": "role"}``,
``{"id": 2, "op": "load", "workload": "puts", "clients": 16, "seconds": 5,
"warmup": 0.5}``); each answer is one JSON line with the same ``id``.
Observer stamps are lines ``{"seen": [[i, t], ...]}``. A load runs
``clients`` threads in a closed loop (each waits for its call before the
next), as concurrent callers in one node do.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftcoord.bench.load import KEYSPACE, VALUE, bench_key, summarize

__all__ = ["closed_loop", "main"]

#: The key the compare-and-swap workload contends on.
CAS_KEY = b"cas-key1"

_out_lock = threading.Lock()


def _emit(obj: Any) -> None:
    data = (json.dumps(obj) + "\n").encode()
    with _out_lock:
        os.write(1, data)


def closed_loop(fn: Callable[[int, int], Any], clients: int, seconds: float, warmup: float,
                count: int | None = None) -> dict[str, Any]:
    """Run ``fn(client, n)`` on ``clients`` threads for ``warmup + seconds``; latencies of the last ``seconds``.

    With ``count``, each thread instead makes exactly ``count`` calls (a load of known keys), measured whole.
    """
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds
    lats: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    first_error: list[str] = []

    def run(c: int) -> None:
        n = 0
        while True:
            t0 = time.monotonic()
            if (n >= count) if count is not None else t0 >= stop:
                return
            try:
                fn(c, n)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the load goes on
                errors[c] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            else:
                if t0 >= measure_from:
                    lats[c].append(time.monotonic() - t0)
            n += 1

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if count is not None:
        seconds = max(1e-9, time.monotonic() - start)
    return summarize([x for per in lats for x in per], seconds, sum(errors), first_error[0] if first_error else "")


# ------------------------------------------------------------------ embedded


class _Embedded:
    def __init__(self, config: dict[str, Any]) -> None:
        from raftcoord.coordinator import Coordinator

        self.run = config["run"]
        self.coord = Coordinator.from_config(config["config"], node=config["name"], timeout=10)
        self.ready = False
        self._seen: list[list[float]] = []
        self._seen_lock = threading.Lock()
        self._counter = 0
        self._loaded = False
        #: The messages workload's posts ``[i, sent, acknowledged]``; the cas workload's wins per client.
        self.sent: list[list[float]] = []
        self.swapped: list[int] = []
        threading.Thread(target=self._observe, daemon=True).start()

    def _observe(self) -> None:
        def seen(m: Any) -> None:
            t = time.monotonic()
            p = m.payload
            if isinstance(p, dict) and p.get("bench") == self.run:
                _emit({"seen": [[p["i"], t]]})

        deadline = time.monotonic() + 60
        while True:
            try:
                self.coord.add_observer(seen, include_own=True)
                break
            except Exception:  # noqa: BLE001 - no leader yet: try again until the deadline
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.ready = True

    def role(self) -> dict[str, Any]:
        return {"role": self.coord.status().get("role"), "ready": self.ready}

    def prepare(self, workload: str) -> None:
        if workload in ("get-linearizable", "get-serializable") and not self._loaded:
            closed_loop(lambda cl, n: self.coord.put(bench_key(cl + 16 * n), VALUE), 16, 0, 0,
                        count=-(-KEYSPACE // 16))
            self._loaded = True
        elif workload == "cas" and self.coord.get_kv(CAS_KEY) is None:
            self.coord.put(CAS_KEY, VALUE)

    def op(self, workload: str, clients: int) -> Callable[[int, int], Any]:
        c = self.coord
        if workload == "puts":
            return lambda cl, n: c.put(bench_key(cl * 7919 + n), VALUE)
        if workload in ("get-linearizable", "get-serializable"):
            consistency = workload.split("-")[1]

            def get(cl: int, n: int) -> None:
                if c.get_kv(bench_key(cl * 7919 + n), consistency=consistency) is None:
                    raise KeyError("a loaded key is missing")

            return get
        if workload == "cas":
            last = [c.get_kv(CAS_KEY).mod_revision] * clients  # type: ignore[union-attr]
            self.swapped = [0] * clients

            def cas(cl: int, n: int) -> None:
                r = c.execute({"op": "txn",
                               "compare": [{"key": CAS_KEY, "target": "mod", "result": "equal", "value": last[cl]}],
                               "success": [{"op": "put", "key": CAS_KEY, "value": VALUE}],
                               "failure": [{"op": "range", "key": CAS_KEY}]})
                if r["succeeded"]:
                    last[cl] = r["revision"]
                    self.swapped[cl] += 1
                else:
                    last[cl] = r["responses"][0]["kvs"][0]["mod_revision"]

            return cas
        if workload == "messages":
            self.sent = []
            lock = threading.Lock()

            def post(cl: int, n: int) -> None:
                with lock:
                    self._counter += 1
                    i = self._counter
                t0 = time.monotonic()
                c.post_message("U", "C", {"bench": self.run, "i": i})
                with lock:
                    self.sent.append([i, t0, time.monotonic()])

            return post
        raise ValueError(f"unknown workload {workload!r}")


# --------------------------------------------------------------------- plain


class _Plain:
    def __init__(self, config: dict[str, Any]) -> None:
        from pysyncobj import SyncObj, SyncObjConf
        from pysyncobj.batteries import ReplDict

        d = Path(config["dir"])
        d.mkdir(parents=True, exist_ok=True)
        self.dict = ReplDict()
        conf = SyncObjConf(password=config.get("password"), journalFile=str(d / "journal"),
                           fullDumpFile=str(d / "dump"), appendEntriesUseBatch=bool(config["batch"]))
        self.obj = SyncObj(config["self"], config["partners"], conf, consumers=[self.dict])

    def role(self) -> dict[str, Any]:
        leader = self.obj._isLeader()  # noqa: SLF001 - pysyncobj has no public role call
        return {"role": "leader" if leader else "follower", "ready": self.obj._getLeader() is not None}  # noqa: SLF001

    def prepare(self, workload: str) -> None:
        pass

    def op(self, workload: str, clients: int) -> Callable[[int, int], Any]:
        if workload != "puts":
            raise ValueError(f"the plain ReplDict runs only the puts workload, not {workload!r}")
        d = self.dict

        def put(cl: int, n: int) -> None:
            d.set(bench_key(cl * 7919 + n), VALUE, sync=True, timeout=10)

        return put


# ---------------------------------------------------------------------- main


def _handle(node: Any, req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "role":
        return node.role()
    if op == "load":
        workload, clients = req["workload"], int(req["clients"])
        node.prepare(workload)
        fn = node.op(workload, clients)
        measure_from = time.monotonic() + float(req.get("warmup", 0))
        out = closed_loop(fn, clients, float(req["seconds"]), float(req.get("warmup", 0)))
        if workload == "messages":
            out["sent"] = [s for s in node.sent if s[1] >= measure_from]
        elif workload == "cas":
            out["swapped"] = sum(node.swapped)
        return out
    raise ValueError(f"unknown request {op!r}")


def main(argv: list[str] | None = None) -> None:
    """``KIND CONFIG``: embedded ``{"config", "name", "run"}``; plain ``{"self", "partners", "dir", "password",
    "batch"}``."""
    kind, raw = (argv if argv is not None else sys.argv[1:])[:2]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = json.loads(raw)
    node = _Embedded(config) if kind == "embedded" else _Plain(config)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            answer = _handle(node, req)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports it
            answer = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        _emit({"id": req.get("id"), **answer})
    os._exit(0)  # the pysyncobj and observer threads would otherwise keep the process alive


if __name__ == "__main__":
    main()
