"""``node.py`` with two more config keys, for fault tests (tests only).

``bind``: the address the replica listens on when its peers reach it at
``self`` through a proxy; ``nofile``: a limit on the process's open files.
Everything else (requests, answers) is ``node.py``'s.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading

import node  # the sibling runner: this file is run as a script from its directory

from raftcoord.replica import Replica, ReplicaSettings


def main() -> None:
    cfg = json.loads(sys.argv[1])
    logging.basicConfig(stream=sys.stderr, level=cfg.get("log_level", "INFO"),
                        format="%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s %(message)s")
    if cfg.get("nofile"):
        resource.setrlimit(resource.RLIMIT_NOFILE, (cfg["nofile"], cfg["nofile"]))
    replica = Replica(cfg["self"], cfg["partners"], cfg["data_dir"], password=cfg.get("password"),
                      settings=ReplicaSettings(**cfg.get("settings", {})), bind_address=cfg.get("bind"))
    node._say({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        threading.Thread(target=node._handle, args=(replica, req), daemon=True).start()
    replica.close()


if __name__ == "__main__":
    main()
