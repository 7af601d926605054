"""The fault suite's watch workload: a ``/v3/watch`` on every node, checked against the final state.

Theory of operation. One :class:`Watcher` per node keeps a ``POST /v3/watch``
stream open on that node for the whole run, on the key prefix every workload
writes under (:data:`WATCH_PREFIX`), from revision 1 (the cluster is fresh, so
the stream carries every change under the prefix). When the stream breaks
(the node was killed, restarted, refused) the watcher dials the same node
again and resumes with ``start_revision`` = the revision after the last one it
received, as an etcd client does. It records every event line, every resume,
and every ``compact_revision`` answer.

The watcher speaks HTTP/1.1 over a plain socket, not through
:class:`~raftcoord.client.Client`: the check must see the raw stream, with no
client library resuming, filtering or de-duplicating under it.

At the end the runner reads the final state of the prefix once (a
linearizable range: every key's value, create and mod revision and version,
and the revision ``R`` it was read at), writes a fence key so that every
watcher can tell it has been brought past ``R``, waits for them, and calls
:func:`check_watches`, a pure function (tests feed it hand-made logs). Per
node it checks, over the events up to ``R``:

* order and uniqueness: event revisions never go down; a revision is never
  delivered twice nor split over two responses (atomic per revision);
* no gap: replaying the events from an empty store gives exactly the final
  state (keys, values, revisions, versions), and along the way every key's
  version and create revision follow from its previous event (an event lost
  in between shows at once, even if a later write hid it from the final
  state);
* agreement: every node delivered the same events at the same revisions;
* a resume answered with ``compact_revision`` is reported as such, and fails
  the check: the events in between were never delivered.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from raftcoord.chaos.workload import MAX_PROBLEMS, CheckResult
from raftcoord.client import Client, b64
from raftcoord.keys import prefix_end

__all__ = [
    "FENCE_KEY",
    "WATCH_PREFIX",
    "KeyState",
    "WatchEvent",
    "WatchLog",
    "Watcher",
    "check_watches",
    "decode_event",
    "dump",
    "finish",
    "read_final_state",
    "start_watchers",
    "summary",
]

log = logging.getLogger(__name__)

#: Every workload key starts with this (registers, durable writes, recovery probes, the fence).
WATCH_PREFIX: Final = "chaos/"
#: Written after the final state is read, so each watcher can tell it has passed that revision.
FENCE_KEY: Final = "chaos/w/fence"
#: Seconds a socket read waits before the watcher looks at its stop event again.
READ_TICK: Final = 0.5
#: Seconds to wait for a node to accept a connection.
DIAL_TIMEOUT: Final = 1.0
#: Largest response head or single line the watcher accepts (a guard, far above any real one).
MAX_LINE: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class WatchEvent:
    """One event of a watch response, decoded (keys and values as text)."""

    type: str  # "PUT" or "DELETE"
    key: str
    value: str
    mod_revision: int
    create_revision: int = 0
    version: int = 0

    def __str__(self) -> str:
        if self.type == "DELETE":
            return f"DELETE {self.key} @{self.mod_revision}"
        return f"PUT {self.key}={self.value!r} @{self.mod_revision} (v{self.version}, created @{self.create_revision})"


@dataclass(frozen=True)
class KeyState:
    """One key of the final state."""

    value: str
    mod_revision: int
    create_revision: int
    version: int


@dataclass
class WatchLog:
    """What one node's watch stream delivered over the run."""

    #: The events of each response line that carried events, in arrival order.
    lines: list[tuple[WatchEvent, ...]] = field(default_factory=list)
    #: The highest revision the stream has been brought to (events, or a progress answer).
    through: int = 0
    #: (start_revision asked, compact_revision answered) for each compacted answer.
    compacted: list[tuple[int, int]] = field(default_factory=list)
    #: Times the stream was opened again after it broke.
    resumes: int = 0
    #: Why streams broke or were refused (the first few).
    errors: list[str] = field(default_factory=list)


def _int(value: Any) -> int:
    # The gateway writes int64s as strings and leaves zeros out.
    return int(value) if value not in (None, "") else 0


def _text(value: Any) -> str:
    return base64.b64decode(value or "").decode("utf-8", "replace")


def decode_event(e: Mapping[str, Any]) -> WatchEvent:
    """A gateway event (``{"type"?, "kv": {...}}``) as a :class:`WatchEvent`."""
    kv = e.get("kv") or {}
    return WatchEvent(type=str(e.get("type") or "PUT"), key=_text(kv.get("key")), value=_text(kv.get("value")),
                      mod_revision=_int(kv.get("mod_revision")), create_revision=_int(kv.get("create_revision")),
                      version=_int(kv.get("version")))


# ------------------------------------------------------------------ checker


def _check_one(node: str, wlog: WatchLog, final: Mapping[str, KeyState], revision: int,
               problems: list[str]) -> list[WatchEvent]:
    """The per-node checks; returns the node's events up to ``revision`` (for the agreement check)."""
    for asked, compact in wlog.compacted:
        problems.append(f"{node}: resuming from revision {asked} was answered compact_revision {compact}: "
                        f"the events in between were never delivered (compacted, not a pass)")
    if wlog.through < revision:
        problems.append(f"{node}: the watch was brought only to revision {wlog.through}, not to the final "
                        f"revision {revision}")
    events: list[WatchEvent] = []
    last_rev = 0
    seen: dict[int, tuple[int, tuple[WatchEvent, ...]]] = {}
    for n, line in enumerate(wlog.lines):
        revs = [e.mod_revision for e in line]
        if revs != sorted(revs):
            problems.append(f"{node}: response {n} lists revisions {revs} out of order")
        for rev in sorted(set(revs)):
            mine = tuple(e for e in line if e.mod_revision == rev)
            if rev in seen:
                what = "delivered twice" if seen[rev][1] == mine else "split over two responses (not atomic)"
                problems.append(f"{node}: revision {rev} {what} (responses {seen[rev][0]} and {n})")
                continue
            seen[rev] = (n, mine)
            if rev < last_rev:
                problems.append(f"{node}: revision {rev} ({mine[0]}) arrived after revision {last_rev} "
                                f"(out of order)")
                continue
            last_rev = rev
            if rev <= revision:
                events.extend(mine)
    state: dict[str, KeyState] = {}
    for e in events:
        before = state.get(e.key)
        if e.type == "DELETE":
            if before is None:
                problems.append(f"{node}: {e} deletes a key the events so far never created (an event is missing)")
            state.pop(e.key, None)
            continue
        if before is None:
            if e.version != 1 or e.create_revision != e.mod_revision:
                problems.append(f"{node}: {e} is version {e.version} created @{e.create_revision}, but the events "
                                f"so far never created it (an event is missing)")
        elif e.version != before.version + 1 or e.create_revision != before.create_revision:
            problems.append(f"{node}: {e} does not follow the key's previous event (v{before.version}, created "
                            f"@{before.create_revision}, @{before.mod_revision}): an event is missing")
        state[e.key] = KeyState(e.value, e.mod_revision, e.create_revision, e.version)
    if not wlog.compacted:
        for key in sorted(set(final) | set(state)):
            want, got = final.get(key), state.get(key)
            if want == got:
                continue
            if want is None:
                problems.append(f"{node}: replaying the events leaves {key} = {got}, but the final state (revision "
                                f"{revision}) has no such key")
            elif got is None:
                problems.append(f"{node}: the final state has {key} = {want}, but replaying the events leaves no "
                                f"such key (an event is missing)")
            else:
                problems.append(f"{node}: the final state has {key} = {want}, replaying the events gives {got}")
    return events


def check_watches(logs: Mapping[str, WatchLog], final: Mapping[str, KeyState], revision: int) -> CheckResult:
    """Each node's watch delivered every change under the prefix up to ``revision``: in order, once,
    atomically, replaying to ``final`` (the prefix's state read at ``revision``); all nodes alike."""
    if not logs:
        return CheckResult.of(["no watch ran"])
    problems: list[str] = []
    events = {node: _check_one(node, wlog, final, revision, problems) for node, wlog in sorted(logs.items())}
    nodes = sorted(events)
    first = nodes[0]
    for node in nodes[1:]:
        a, b = events[first], events[node]
        if a == b:
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        there = lambda seq: str(seq[at]) if at < len(seq) else "the end"  # noqa: E731
        problems.append(f"{node}'s events differ from {first}'s at event {at}: {there(b)} vs {there(a)} "
                        f"({len(b)} vs {len(a)} events)")
    return CheckResult.of(problems, events=max(len(v) for v in events.values()), revision=revision,
                          resumes=sum(w.resumes for w in logs.values()))


def read_final_state(client: Client, url: str, *, timeout: float = 10.0) -> tuple[dict[str, KeyState], int]:
    """Every key under :data:`WATCH_PREFIX` on one node (a linearizable range) and the revision it was read at."""
    prefix = WATCH_PREFIX.encode("utf-8")
    body = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
    out = client.call("POST", "/v3/kv/range", body, endpoint=url, timeout=timeout)
    state = {}
    for kv in out.get("kvs", []):
        state[_text(kv.get("key"))] = KeyState(_text(kv.get("value")), _int(kv.get("mod_revision")),
                                               _int(kv.get("create_revision")), _int(kv.get("version")))
    return state, _int(out.get("header", {}).get("revision"))


# ------------------------------------------------------------------ watcher


class _StreamBroke(Exception):
    """The stream ended or could not be opened (the watcher dials again)."""


class _HttpStream:
    """One ``POST`` whose answer is a stream of lines, over a plain socket (HTTP/1.1, chunked or not)."""

    def __init__(self, url: str, path: str, body: bytes, stop: threading.Event) -> None:
        parts = urllib.parse.urlsplit(url)
        self.stop = stop
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=DIAL_TIMEOUT)
        self.sock.settimeout(READ_TICK)
        head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
        self.sock.sendall(head + body)
        self.buf = bytearray()
        raw = self._until(b"\r\n\r\n")
        status_line, *headers = raw.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in headers)}
        self.chunked = "chunked" in fields.get("transfer-encoding", "").lower()
        if self.status != 200:
            tail = bytes(self.buf[:300]).decode("utf-8", "replace")
            raise _StreamBroke(f"HTTP {self.status}: {tail}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self) -> None:
        while True:
            if self.stop.is_set():
                raise _StreamBroke("stopped")
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise _StreamBroke(f"{type(exc).__name__}: {exc}") from None
            if not data:
                raise _StreamBroke("the node closed the stream")
            self.buf += data
            return

    def _until(self, sep: bytes) -> bytes:
        while (at := self.buf.find(sep)) < 0:
            if len(self.buf) > MAX_LINE:
                raise _StreamBroke("a line longer than the guard")
            self._fill()
        out = bytes(self.buf[:at])
        del self.buf[:at + len(sep)]
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _body(self) -> Iterator[bytes]:
        if not self.chunked:
            while True:
                if self.buf:
                    out = bytes(self.buf)
                    self.buf.clear()
                    yield out
                self._fill()
        while True:
            size = int(self._until(b"\r\n").split(b";")[0].strip() or b"0", 16)
            if size == 0:
                raise _StreamBroke("the node ended the stream")
            if size > MAX_LINE:
                raise _StreamBroke("a chunk larger than the guard")
            yield self._exactly(size)
            self._exactly(2)

    def lines(self) -> Iterator[bytes]:
        """Each complete line of the answer, as it arrives."""
        pending = bytearray()
        for chunk in self._body():
            pending += chunk
            while (at := pending.find(b"\n")) >= 0:
                line = bytes(pending[:at]).strip()
                del pending[:at + 1]
                if line:
                    yield line


class Watcher:
    """Keeps a watch on :data:`WATCH_PREFIX` open on one node, resuming after every break."""

    def __init__(self, node: str, url: str, *, start_revision: int = 1) -> None:
        self.node = node
        self.url = url
        self.log = WatchLog()
        self.next_revision = start_revision
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._opened = 0

    def start(self) -> Watcher:
        """Start the watcher's thread (a daemon)."""
        self._thread = threading.Thread(target=self._run, name=f"chaos-watch-{self.node}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _error(self, what: str) -> None:
        with self._lock:
            if len(self.log.errors) < MAX_PROBLEMS:
                self.log.errors.append(what)

    def _run(self) -> None:
        pause = 0.05
        rng = random.Random(self.node)
        while not self.stop.is_set():
            try:
                self._one_stream()
                pause = 0.05
            except _StreamBroke as exc:
                if not self.stop.is_set():
                    log.debug("watch on %s broke: %s", self.node, exc)
                    self._error(str(exc))
            except OSError as exc:  # could not connect: the node is down or paused
                self._error(f"{type(exc).__name__}: {exc}")
                pause = min(1.0, pause * 2)
            except Exception as exc:  # noqa: BLE001 - a bug here must not end the watch silently
                log.warning("watch on %s: %s: %s", self.node, type(exc).__name__, exc)
                self._error(f"{type(exc).__name__}: {exc}")
            self.stop.wait(pause * rng.uniform(0.5, 1.5))

    def _one_stream(self) -> None:
        start = self.next_revision
        prefix = WATCH_PREFIX.encode("utf-8")
        create = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                     "start_revision": str(start)}}
        stream = _HttpStream(self.url, "/v3/watch", json.dumps(create).encode("utf-8"), self.stop)
        try:
            with self._lock:
                self._opened += 1
                if self._opened > 1:
                    self.log.resumes += 1
            for raw in stream.lines():
                self._handle(json.loads(raw), start)
        finally:
            stream.close()

    def _handle(self, line: Mapping[str, Any], start: int) -> None:
        result = line.get("result")
        if not isinstance(result, dict):
            raise _StreamBroke(f"not a watch response: {str(line)[:200]}")
        compact = _int(result.get("compact_revision"))
        if compact:
            with self._lock:
                self.log.compacted.append((start, compact))
            # Carry on from what is kept, so later events are still seen (the check fails anyway).
            self.next_revision = max(self.next_revision, compact)
            raise _StreamBroke(f"compacted: compact_revision {compact} for start_revision {start}")
        if result.get("canceled"):
            raise _StreamBroke(f"canceled: {result.get('cancel_reason', '')}")
        events = tuple(decode_event(e) for e in result.get("events") or ())
        header = _int((result.get("header") or {}).get("revision"))
        with self._lock:
            if events:
                self.log.lines.append(events)
                top = max(e.mod_revision for e in events)
                self.next_revision = max(self.next_revision, top + 1)
                self.log.through = max(self.log.through, top)
            elif not result.get("created"):
                # A progress notification: every event up to the header's revision has been sent.
                self.log.through = max(self.log.through, header)
                self.next_revision = max(self.next_revision, header + 1)

    def wait_through(self, revision: int, timeout: float) -> bool:
        """Wait until the stream has been brought to ``revision``; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.log.through >= revision:
                    return True
            time.sleep(0.05)
        return False


def start_watchers(urls: Mapping[str, str]) -> dict[str, Watcher]:
    """One started :class:`Watcher` per node (``urls`` maps a node to its client URL)."""
    return {node: Watcher(node, url).start() for node, url in urls.items()}


def finish(watchers: Mapping[str, Watcher], client: Client, url: str, *,
           timeout: float = 15.0) -> CheckResult:
    """Read the final state through ``url``, write the fence, wait for every watcher, stop them, check."""
    final, revision = read_final_state(client, url)
    client.put(FENCE_KEY.encode("utf-8"), str(revision).encode("utf-8"))
    deadline = time.monotonic() + timeout
    late = [n for n, w in sorted(watchers.items())
            if not w.wait_through(revision, max(0.0, deadline - time.monotonic()))]
    for w in watchers.values():
        w.close()
    logs = {node: w.log for node, w in watchers.items()}
    result = check_watches(logs, final, revision)
    if late:
        log.info("watchers not brought to revision %d within %g s: %s", revision, timeout, late)
    return result


def dump(logs: Mapping[str, WatchLog], path: Path) -> None:
    """Write ``logs`` as JSON lines: per node a header line, then one line per response with events."""
    with open(path, "w", encoding="utf-8") as f:
        for node, wlog in sorted(logs.items()):
            f.write(json.dumps({"node": node, "through": wlog.through, "resumes": wlog.resumes,
                                "compacted": wlog.compacted, "errors": wlog.errors}) + "\n")
            for line in wlog.lines:
                f.write(json.dumps({"node": node, "events": [asdict(e) for e in line]}) + "\n")


def summary(watchers: Sequence[Watcher]) -> str:
    """One line on what the watchers saw (for the run's timeline)."""
    return "; ".join(f"{w.node}: {sum(len(line) for line in w.log.lines)} events, {w.log.resumes} resumes"
                     + (f", {len(w.log.compacted)} compacted" if w.log.compacted else "") for w in watchers)
