"""An embedded PuzzleDB-like node for the delivery tests: observe, post, record.

Usage: ``python observer_node.py CONFIG NAME OUTDIR POSTS``

Opens the coordinator of node NAME from the cluster file (as a PuzzleDB node
embeds it), registers one observer with ``include_own=True`` that appends
``clock sender payload`` to ``OUTDIR/NAME.seen`` (one flushed line per
message), and posts POSTS messages with payload ``NAME-i``, appending each
acknowledged one to ``OUTDIR/NAME.acked``. After a restart it resumes the
observer from the last clock in its ``.seen`` file (``since=``) and the
posts after the last one it attempted (one in flight at a kill may have
applied, so its payload is never posted twice). ``OUTDIR/NAME.ready`` appears once
the observer is registered. Runs until SIGTERM or SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from raftcoord.coordinator import Coordinator
from raftcoord.errors import RaftcoordError, UnknownOutcomeError


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    return text.split("\n")[:-1]  # a kill -9 may leave a partial last line


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config, name, outdir, posts = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    seen_path, acked_path = outdir / f"{name}.seen", outdir / f"{name}.acked"
    seen = _complete_lines(seen_path)
    since = int(seen[-1].split()[0]) if seen else 0
    if seen_path.exists():  # drop a partial line left by a kill
        seen_path.write_text("".join(line + "\n" for line in seen))
    # A post in flight at a kill may have applied: never post that payload
    # again. Attempts are appended before each post (a rewrite cut short by
    # kill -9 would leave an empty file and restart the numbering).
    attempted_path = outdir / f"{name}.attempted"
    first = max((int(line) for line in _complete_lines(attempted_path)), default=-1) + 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    coord = Coordinator.from_config(config, node=name, timeout=10)
    fd = os.open(seen_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(m: object) -> None:
        os.write(fd, f"{m.clock} {m.from_host} {m.payload}\n".encode())  # type: ignore[attr-defined]

    while True:
        try:
            coord.add_observer(record, since=since, include_own=True)
            break
        except RaftcoordError:
            time.sleep(0.1)
    (outdir / f"{name}.ready").write_text(str(os.getpid()))

    with open(acked_path, "a") as acks, open(attempted_path, "a") as attempts:
        for i in range(first, posts):
            payload = f"{name}-{i}"
            attempts.write(f"{i}\n")
            attempts.flush()
            while not stop.is_set():
                try:
                    coord.post_message("U", "C", payload)
                    acks.write(payload + "\n")
                    acks.flush()
                    break
                except UnknownOutcomeError:
                    break  # may or may not be there: not acknowledged, never re-posted
                except RaftcoordError:
                    time.sleep(0.05)
            if stop.is_set():
                break
    (outdir / f"{name}.posted").write_text("done")
    stop.wait()
    coord.close()


if __name__ == "__main__":
    main()
