"""One replica in its own process, driven by JSON lines on stdin/stdout (tests only).

Usage: ``python node.py CONFIG_JSON`` with CONFIG_JSON holding ``self``,
``partners``, ``data_dir`` and optionally ``password``, ``settings`` (keyword
arguments of ReplicaSettings) and ``log_level``. The node prints
``{"ready": true, "pid": ...}`` once its replica listens, then answers each
request line ``{"id": n, "op": ..., ...}`` with ``{"id": n, "ok": ...}``, each
on its own thread so that many requests can be in flight:

* ``propose``: ``cmd`` (base64 command bytes), ``timeout`` -> ``result``
  (base64 CBOR of the store's result)
* ``get``: ``key`` (base64), ``consistency``, ``timeout`` -> ``value`` (base64 or null)
* ``state``: -> ``snapshot`` (base64 of the local store's snapshot, as it is)
* ``status``: -> ``status``
* ``bench``: ``concurrency``, ``seconds``, ``value_size`` -> writes/s and latencies
* ``exit``: close the replica and exit 0
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from raftcoord.errors import RaftcoordError
from raftcoord.replica import Replica, ReplicaSettings
from raftcoord.values import encode_cbor

_out = threading.Lock()


def _say(obj: dict[str, Any]) -> None:
    line = json.dumps(obj)
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bench(replica: Replica, concurrency: int, seconds: float, value_size: int) -> dict[str, Any]:
    lats: list[float] = []
    stop = time.monotonic() + seconds

    def writer(t: int) -> None:
        i = 0
        while time.monotonic() < stop:
            cmd = encode_cbor({"op": "put", "key": b"bench/%d/%d" % (t, i % 100), "value": bytes(value_size)})
            t0 = time.perf_counter()
            replica.propose(cmd, 10.0)
            lats.append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(concurrency)]
    started = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - started
    lats.sort()
    return {"writes": len(lats), "per_second": len(lats) / elapsed,
            "p50_ms": lats[len(lats) // 2] * 1000, "p99_ms": lats[int(len(lats) * 0.99)] * 1000}


def _handle(replica: Replica, req: dict[str, Any]) -> None:
    op = req["op"]
    try:
        if op == "propose":
            result = replica.propose(base64.b64decode(req["cmd"]), req.get("timeout", 5.0))
            out: dict[str, Any] = {"result": _b64(encode_cbor(result))}
        elif op == "get":
            key = base64.b64decode(req["key"])
            kv = replica.read(lambda s: s.get(key), consistency=req.get("consistency", "linearizable"),
                              timeout=req.get("timeout", 5.0))
            out = {"value": None if kv is None else _b64(kv.value)}
        elif op == "state":
            out = {"snapshot": _b64(replica.read(lambda s: s.snapshot(), consistency="serializable"))}
        elif op == "status":
            out = {"status": replica.status()}
        elif op == "bench":
            out = _bench(replica, req["concurrency"], req["seconds"], req.get("value_size", 100))
        else:
            raise ValueError(f"unknown op {op!r}")
        _say({"id": req["id"], "ok": True, **out})
    except RaftcoordError as exc:
        _say({"id": req["id"], "ok": False, "error": type(exc).__name__, "message": exc.message})


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=cfg.get("log_level", "INFO"),
                        format="%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s")
    replica = Replica(cfg["self"], cfg["partners"], cfg["data_dir"], password=cfg.get("password"),
                      settings=ReplicaSettings(**cfg.get("settings", {})))
    _say({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        threading.Thread(target=_handle, args=(replica, req), daemon=True).start()
    replica.close()


if __name__ == "__main__":
    main()
