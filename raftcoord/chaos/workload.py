"""The client workloads of the fault suite and the checks that read a live cluster.

Theory of operation. Every workload is a set of sequential workers, each a
thread with its own :class:`~raftcoord.client.Client`, that run until a stop
event is set or their share of the operation budget is spent:

* :class:`Registers` does put/get/delete/compare-and-swap on a few keys and
  records each operation in a :class:`~raftcoord.chaos.history.History` for
  the linearizability checker. The outcome of every operation is classified
  by :func:`outcome`: an answer is a completion; a refusal that certainly did
  not apply (503 without ``unknown_outcome``) is a *fail*, dropped from the
  history; anything else (``UnknownOutcomeError``, a timeout, a lost
  connection, a bug) is *unknown*: the write may still take effect at any
  later time. A worker whose operation is unknown continues as a new process
  (Jepsen's rule), since its old one never completes.
* :class:`Messages` posts messages with a unique payload id and remembers
  which posts were acknowledged (with their clock) and which are unknown.
* :class:`Durable` writes keys that are never written again, for the
  durability check.

The checks on what the cluster holds afterwards are pure functions over the
data read back (:func:`check_messages`, :func:`check_agreement`,
:func:`check_durable`), so tests feed them hand-made data; the functions that
read a cluster (:func:`read_messages`, :func:`poll_agreement`,
:func:`read_durable`, :func:`check_recovery`) only fetch and call them.
"""

from __future__ import annotations

import base64
import itertools
import logging
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from raftcoord.chaos.history import History
from raftcoord.client import Client, b64
from raftcoord.errors import RaftcoordError, TimeoutError, UnavailableError, UnknownOutcomeError
from raftcoord.keys import prefix_end

__all__ = [
    "Agreement",
    "Budget",
    "CheckResult",
    "Durable",
    "Messages",
    "Registers",
    "cas",
    "check_agreement",
    "check_durable",
    "check_messages",
    "check_recovery",
    "message_entries",
    "outcome",
    "poll_agreement",
    "read_durable",
    "read_messages",
    "workload_threads",
]

log = logging.getLogger(__name__)

#: Key prefixes of the workloads (user keys: none starts with a coordinator header).
REGISTER_PREFIX: Final = "chaos/r/"
DURABLE_PREFIX: Final = "chaos/d/"
RECOVERY_PREFIX: Final = "chaos/recovery/"
#: Most problems a check reports; the first ones say enough.
MAX_PROBLEMS: Final = 20
#: Seconds a node has after the last heal to serve a write and a linearizable read.
RECOVERY_DEADLINE: Final = 10.0
#: The message type the message workload posts ("U", user).
MESSAGE_TYPE: Final = "U"
#: Most messages a listing follows (1000 per page): far above any bounded run.
MAX_MESSAGE_PAGES: Final = 1000

# Unexpected worker errors are logged once per kind, not once per operation.
_logged_errors: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(what: str, exc: BaseException) -> None:
    key = f"{what}:{type(exc).__name__}"
    with _logged_lock:
        if key in _logged_errors:
            return
        _logged_errors.add(key)
    log.warning("%s: %s: %s (further ones of this kind are not logged)", what, type(exc).__name__, exc)


def outcome(exc: BaseException) -> str:
    """``"fail"`` when ``exc`` proves the request was not applied, else ``"unknown"``.

    The client raises :class:`UnavailableError` only when no node may have
    applied the request (it never sent the body, or every node refused it
    with a 503); its subclasses :class:`TimeoutError` and
    :class:`UnknownOutcomeError`, a lost connection or anything unexpected
    may hide an applied write.
    """
    if isinstance(exc, (UnknownOutcomeError, TimeoutError)):
        return "unknown"
    if isinstance(exc, UnavailableError) and "unknown_outcome" not in str(exc):
        return "fail"
    if isinstance(exc, RaftcoordError) and 400 <= exc.http_status < 500 and exc.http_status != 409:
        # Refused before it was proposed (the client turns a refusal after a
        # possibly applied attempt into UnknownOutcomeError itself).
        return "fail"
    return "unknown"


@dataclass
class Budget:
    """A shared operation count: workers stop once it is spent."""

    limit: int
    _used: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        """Reserve one operation; False once the budget is spent."""
        with self._lock:
            if self._used >= self.limit:
                return False
            self._used += 1
            return True

    @property
    def used(self) -> int:
        """Operations taken so far."""
        return self._used


def _pause(stop: threading.Event, rng: random.Random, think: float) -> None:
    # Spreads operations over time so the checker's search stays small.
    if think > 0:
        stop.wait(rng.uniform(0, 2 * think))


# ---------------------------------------------------------------- registers


def _txn_answer(out: Any) -> bool:
    if not isinstance(out, dict) or not isinstance(out.get("header"), dict):
        raise ValueError("not a TxnResponse")
    succeeded = out.get("succeeded", False)
    if not isinstance(succeeded, bool):
        raise ValueError("succeeded is not true or false")
    return succeeded


def cas(client: Client, key: str, expected: str | None, new: str) -> bool:
    """Compare-and-swap through ``/v3/kv/txn``: True when the value was ``expected`` and is now ``new``.

    ``expected=None`` means "the key is absent" (create revision 0).
    """
    k = b64(key.encode("utf-8"))
    if expected is None:
        compare = {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
    else:
        compare = {"key": k, "target": "VALUE", "result": "EQUAL", "value": b64(expected.encode("utf-8"))}
    body = {
        "compare": [compare],
        "success": [{"request_put": {"key": k, "value": b64(new.encode("utf-8"))}}],
        "failure": [],
    }
    return bool(client.call("POST", "/v3/kv/txn", body, write=True, check=_txn_answer))


class Registers:
    """Concurrent put/get/delete/CAS on ``keys`` registers, recorded in ``history``.

    Values are unique (``<process>.<seq>``), which keeps the checker's search
    small and makes a report readable. ``weights`` gives the mix of
    operation kinds.
    """

    def __init__(
        self,
        history: History,
        *,
        keys: int = 4,
        budget: Budget,
        think: float = 0.01,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.history = history
        self.keys = [f"{REGISTER_PREFIX}{i}" for i in range(keys)]
        self.budget = budget
        self.think = think
        self.weights = dict(weights or {"get": 0.4, "put": 0.25, "cas": 0.3, "delete": 0.05})
        self._processes = itertools.count()
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def _process(self) -> int:
        with self._lock:
            return next(self._processes)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def worker(self, client: Client, stop: threading.Event, rng: random.Random) -> None:
        """Run operations until ``stop`` or the budget is spent (a thread's target)."""
        process = self._process()
        seen: dict[str, str | None] = {}  # the last value this worker saw per key: what CAS expects
        kinds, weights = list(self.weights), list(self.weights.values())
        seq = 0
        while not stop.is_set() and self.budget.take():
            key = rng.choice(self.keys)
            kind = rng.choices(kinds, weights)[0]
            seq += 1
            value = f"{process}.{seq}" if kind in ("put", "cas") else None
            expected = seen.get(key) if kind == "cas" else None
            handle = self.history.invoke(process, kind, key, value, expected)
            try:
                if kind == "get":
                    kvs = client.range(key.encode("utf-8"))["kvs"]
                    output = kvs[0]["value"].decode("utf-8") if kvs else None
                    self.history.complete(handle, ok=True, output=output)
                    seen[key] = output
                elif kind == "put":
                    client.put(key.encode("utf-8"), value.encode("utf-8"))  # type: ignore[union-attr]
                    self.history.complete(handle, ok=True)
                    seen[key] = value
                elif kind == "delete":
                    client.delete(key.encode("utf-8"))
                    self.history.complete(handle, ok=True)
                    seen[key] = None
                else:
                    swapped = cas(client, key, expected, value)  # type: ignore[arg-type]
                    self.history.complete(handle, ok=swapped)
                    if swapped:
                        seen[key] = value
                self._count("ok")
            except Exception as exc:  # noqa: BLE001 - every failure is an outcome to record
                result = "fail" if kind == "get" else outcome(exc)
                if not isinstance(exc, RaftcoordError):
                    _log_once("register workload", exc)
                if result == "fail":
                    self.history.fail(handle)
                    self._count("fail")
                else:
                    self.history.unknown(handle)
                    self._count("unknown")
                    # The unknown op stays open forever: carry on as a new process.
                    process = self._process()
                    seen.clear()
            _pause(stop, rng, self.think)


# ----------------------------------------------------------------- messages


class _Tally:
    """A workload of one-shot writes: each is acknowledged, refused, or of unknown outcome.

    Subclasses name the workload (``what``) and say how one write goes
    (:meth:`_send`: returns what to remember for an acknowledged write).
    """

    what = "workload"

    def __init__(self, *, budget: Budget, think: float) -> None:
        self.budget = budget
        self.think = think
        self.acked: dict[str, Any] = {}
        self.unknown: set[str] = set()
        self.failed = 0
        self._lock = threading.Lock()

    @property
    def attempted(self) -> int:
        """Writes sent (acknowledged, unknown or refused)."""
        with self._lock:
            return len(self.acked) + len(self.unknown) + self.failed

    def _ident(self, name: str, seq: int) -> str:
        """The unique id of a worker's ``seq``-th write."""
        raise NotImplementedError

    def _send(self, client: Client, ident: str) -> Any:
        """Make the write ``ident``; return what to remember of it once acknowledged."""
        raise NotImplementedError

    def worker(self, client: Client, name: str, stop: threading.Event, rng: random.Random) -> None:
        """Write until ``stop`` or the budget is spent (a thread's target)."""
        for seq in itertools.count(1):
            if stop.is_set() or not self.budget.take():
                return
            ident = self._ident(name, seq)
            try:
                remembered = self._send(client, ident)
                with self._lock:
                    self.acked[ident] = remembered
            except Exception as exc:  # noqa: BLE001 - every failure is an outcome to record
                if not isinstance(exc, RaftcoordError):
                    _log_once(self.what, exc)
                with self._lock:
                    if outcome(exc) == "fail":
                        self.failed += 1
                    else:
                        self.unknown.add(ident)
            _pause(stop, rng, self.think)


class Messages(_Tally):
    """Posts messages whose payload carries a unique id, and remembers their fate.

    ``acked`` maps a payload id to the clock the post was acknowledged with.
    """

    what = "message workload"

    def __init__(self, run: str, *, budget: Budget, think: float = 0.02) -> None:
        super().__init__(budget=budget, think=think)
        self.run = run

    def _ident(self, name: str, seq: int) -> str:
        return f"{name}-{seq}"

    def _send(self, client: Client, ident: str) -> int:
        message = client.post(MESSAGE_TYPE, "C", {"chaos": self.run, "id": ident})
        return int(message["clock"])


def message_entries(messages: Sequence[Mapping[str, Any]], run: str) -> list[tuple[int, str | None]]:
    """A node's message list as (clock, payload id); the id is None for a message not of ``run``."""
    out: list[tuple[int, str | None]] = []
    for m in messages:
        payload = m.get("payload")
        ident = payload.get("id") if isinstance(payload, dict) and payload.get("chaos") == run else None
        out.append((int(m.get("clock", -1)), ident if isinstance(ident, str) else None))
    return out


@dataclass
class CheckResult:
    """One check's verdict and, when it failed, what was wrong (at most :data:`MAX_PROBLEMS` lines)."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, problems: list[str], **detail: Any) -> CheckResult:
        """ok when there are no problems; long lists are cut, saying how many were left out."""
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
        return cls(not problems, shown, dict(detail))


def check_messages(
    lists: Mapping[str, Sequence[tuple[int, str | None]]],
    acked: Mapping[str, int],
    unknown: Collection[str] = (),
    floors: Mapping[str, int] | None = None,
) -> CheckResult:
    """Every node delivered the same sequence, clocks strictly increasing, every acknowledged
    post present once with the clock it was acknowledged with, nothing that was never posted.

    ``lists`` maps a node to its list from :func:`message_entries`; ``floors``
    to its purge floor (the highest clock purged, 0 for none). Purges go
    through the log, so the floors must be equal too; messages at or below the
    floor are gone (a retention purge) and a node listing one fails.
    """
    problems: list[str] = []
    if not lists:
        return CheckResult.of(["no node's message list could be read"])
    floors = dict(floors or {})
    floor = max(floors.values(), default=0)
    if len(set(floors.values())) > 1:
        problems.append(f"the nodes' purge floors differ: {dict(sorted(floors.items()))}")
    for node, entries in lists.items():
        mine = floors.get(node, 0)
        if entries and entries[0][0] <= mine:
            problems.append(f"{node}: lists clock {entries[0][0]} (message {entries[0][1]}) at or below "
                            f"its purge floor {mine}")
        for i in range(1, len(entries)):
            if entries[i][0] <= entries[i - 1][0]:
                problems.append(f"{node}: clock {entries[i][0]} (message {entries[i][1]}) at position {i} "
                                f"does not follow clock {entries[i - 1][0]} (message {entries[i - 1][1]})")
        ids = Counter(ident for _, ident in entries if ident is not None)
        for ident, n in sorted(ids.items()):
            if n > 1:
                problems.append(f"{node}: message {ident} delivered {n} times")
            if ident not in acked and ident not in unknown:
                problems.append(f"{node}: message {ident} was never posted")
        clocks = {ident: clock for clock, ident in entries if ident is not None}
        for ident, clock in sorted(acked.items(), key=lambda item: item[1]):
            if clock <= floor:
                continue  # purged by retention
            if ident not in clocks:
                problems.append(f"{node}: acknowledged message {ident} (clock {clock}) is missing")
            elif clocks[ident] != clock:
                problems.append(f"{node}: message {ident} has clock {clocks[ident]}, but its post was "
                                f"acknowledged with clock {clock}")
    nodes = sorted(lists)
    first = nodes[0]
    above = {node: [e for e in entries if e[0] > floor] for node, entries in lists.items()}
    for node in nodes[1:]:
        a, b = above[first], above[node]
        if a == b:
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        there = lambda seq: seq[at] if at < len(seq) else "the end"  # noqa: E731
        where = f"above the purge floor {floor}, at position {at}" if floor else f"at position {at}"
        problems.append(f"{node} differs from {first} {where}: {there(b)} vs {there(a)} "
                        f"({len(b)} vs {len(a)} messages)")
    return CheckResult.of(problems, messages=max(len(v) for v in lists.values()), acknowledged=len(acked),
                          unknown=len(unknown), floor=floor)


def read_messages(client: Client, url: str, *, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int]:
    """Every message in one node's list (linearizable, through that node only), following
    pages, and the node's purge floor (the highest seen while paging)."""
    out: list[dict[str, Any]] = []
    floor = 0
    since: int | None = None
    for _ in range(MAX_MESSAGE_PAGES):
        query = {"limit": "1000"} if since is None else {"limit": "1000", "since": str(since)}
        page = client.call("GET", "/raftcoord/v1/messages?" + urllib.parse.urlencode(query), endpoint=url,
                           timeout=timeout)
        if not isinstance(page, dict) or not isinstance(page.get("messages"), list):
            raise UnavailableError(f"{url}: the message listing is not a page of messages")
        messages = page["messages"]
        out.extend(messages)
        if isinstance(page.get("floor"), int):
            floor = max(floor, page["floor"])
        if not page.get("more") or not messages:
            return out, floor
        last = messages[-1].get("clock")
        if not isinstance(last, int) or (since is not None and last <= since):
            # The page did not move forward: report what was read, the check names the fault.
            return out, floor
        since = last
    raise UnavailableError(f"{url}: the message listing did not end after {MAX_MESSAGE_PAGES} pages")


# ---------------------------------------------------------------- agreement


@dataclass
class Agreement:
    """The agreement check's verdict over rounds of digests."""

    ok: bool
    problems: list[str]
    applied: int | None  # the applied count all nodes agreed at
    decided: bool = True  # False: no verdict yet (no common applied count so far)


def check_agreement(rounds: Sequence[Mapping[str, Mapping[str, Any]]], nodes: Collection[str]) -> Agreement:
    """Replicas that applied the same number of commands hold byte-identical state.

    ``rounds`` are polls of ``GET /raftcoord/v1/digest``, each mapping a node
    to its answer (a node that did not answer is left out). A disagreement,
    two digests with the same ``applied`` but a different sha256 or
    revision, fails at once; agreement needs one ``applied`` count that every
    node in ``nodes`` reported with the same digest.
    """
    by_applied: dict[int, dict[str, tuple[str, int]]] = {}
    problems: list[str] = []
    for poll in rounds:
        for node, d in poll.items():
            applied = int(d["applied"])
            seen = by_applied.setdefault(applied, {})
            mine = (str(d["sha256"]), int(d["revision"]))
            for other, theirs in seen.items():
                if other != node and theirs != mine:
                    problem = (f"applied {applied}: {other} has sha256 {theirs[0][:16]} at revision {theirs[1]}, "
                               f"{node} has sha256 {mine[0][:16]} at revision {mine[1]}")
                    if problem not in problems:
                        problems.append(problem)
            seen.setdefault(node, mine)
    if problems:
        return Agreement(False, problems[:MAX_PROBLEMS], None)
    common = [applied for applied, seen in by_applied.items() if set(nodes) <= set(seen)]
    if common:
        return Agreement(True, [], max(common))
    last = {node: d.get("applied") for node, d in rounds[-1].items()} if rounds else {}
    return Agreement(False, [f"the nodes never reported the same applied count (last: {last})"], None,
                     decided=False)


def poll_agreement(clients: Mapping[str, tuple[Client, str]], *, timeout: float = 20.0,
                   interval: float = 0.2) -> Agreement:
    """Poll every node's digest until they agree, disagree, or ``timeout`` passes.

    ``clients`` maps a node to a client and that node's URL.
    """
    rounds: list[dict[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    verdict = Agreement(False, ["no digest was read"], None)
    while True:
        poll: dict[str, dict[str, Any]] = {}
        for node, (client, url) in clients.items():
            try:
                answer = client.call("GET", "/raftcoord/v1/digest", endpoint=url, timeout=2.0, retry=False)
                if isinstance(answer, dict) and {"applied", "sha256", "revision"} <= set(answer):
                    poll[node] = answer
            except RaftcoordError:
                pass
        rounds.append(poll)
        verdict = check_agreement(rounds, clients)
        if verdict.decided or time.monotonic() >= deadline:
            return verdict
        time.sleep(interval)


# --------------------------------------------------------------- durability


class Durable(_Tally):
    """Writes keys that are never written again; ``acked`` maps each acknowledged key to its value."""

    what = "durability workload"

    def __init__(self, *, budget: Budget, think: float = 0.05) -> None:
        super().__init__(budget=budget, think=think)

    def _ident(self, name: str, seq: int) -> str:
        return f"{DURABLE_PREFIX}{name}-{seq}"

    def _send(self, client: Client, key: str) -> str:
        name, seq = key[len(DURABLE_PREFIX):].rsplit("-", 1)
        value = f"{name}.{seq}"
        client.put(key.encode("utf-8"), value.encode("utf-8"))
        return value


def check_durable(found: Mapping[str, Mapping[str, str]], acked: Mapping[str, str],
                  unknown: Collection[str] = ()) -> CheckResult:
    """Every acknowledged write is present with its value on every node, and no key appeared
    that was never written. ``found`` maps a node to the keys and values it holds."""
    problems: list[str] = []
    if not found:
        return CheckResult.of(["no node could be read"])
    for node, kvs in sorted(found.items()):
        for key, value in acked.items():
            if key not in kvs:
                problems.append(f"{node}: acknowledged write {key} is missing")
            elif kvs[key] != value:
                problems.append(f"{node}: {key} holds {kvs[key]!r}, but {value!r} was acknowledged")
        for key in kvs:
            if key not in acked and key not in unknown:
                problems.append(f"{node}: {key} was never written")
    return CheckResult.of(problems, acknowledged=len(acked), unknown=len(unknown))


def read_durable(client: Client, url: str, *, timeout: float = 10.0) -> dict[str, str]:
    """The durability workload's keys on one node (a linearizable scan through it)."""
    prefix = DURABLE_PREFIX.encode("utf-8")
    body = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
    out = client.call("POST", "/v3/kv/range", body, endpoint=url, timeout=timeout)
    return {
        base64.b64decode(kv["key"]).decode("utf-8"): base64.b64decode(kv.get("value", "")).decode("utf-8")
        for kv in out.get("kvs", [])
    }


# ----------------------------------------------------------------- recovery


def check_recovery(clients: Mapping[str, tuple[Client, str]], since: float,
                   deadline: float = RECOVERY_DEADLINE) -> CheckResult:
    """Every node serves a write and a linearizable read through its own endpoint
    within ``deadline`` seconds of ``since`` (a ``time.monotonic()`` value)."""
    token = f"{random.getrandbits(64):016x}"

    def one(node: str, client: Client, url: str) -> str | None:
        key = f"{RECOVERY_PREFIX}{node}".encode("utf-8")
        last = "nothing was tried"
        while True:
            left = since + deadline - time.monotonic()
            if left <= 0:
                return f"{node}: no write and linearizable read within {deadline:g} s of the heal (last: {last})"
            try:
                value = f"{token}.{node}".encode("utf-8")
                client.call("POST", "/v3/kv/put", {"key": b64(key), "value": b64(value)}, endpoint=url,
                            write=True, timeout=max(0.1, left))
                left = since + deadline - time.monotonic()
                out = client.call("POST", "/v3/kv/range", {"key": b64(key)}, endpoint=url,
                                  timeout=max(0.1, left))
                kvs = out.get("kvs", []) if isinstance(out, dict) else []
                if kvs and kvs[0].get("value") == b64(value):
                    return None
                last = f"the read gave {kvs!r}"
            except RaftcoordError as exc:
                last = str(exc)
            time.sleep(0.1)

    with ThreadPoolExecutor(max_workers=max(1, len(clients))) as pool:
        futures = {node: pool.submit(one, node, c, url) for node, (c, url) in clients.items()}
        problems = [p for p in (f.result() for f in futures.values()) if p]
    took = time.monotonic() - since
    return CheckResult.of(problems, seconds=round(took, 2))


def workload_threads(targets: Sequence[tuple[str, Callable[[], None]]]) -> list[threading.Thread]:
    """Start one daemon thread per (name, target)."""
    threads = []
    for name, target in targets:
        t = threading.Thread(target=target, name=f"chaos-{name}", daemon=True)
        t.start()
        threads.append(t)
    return threads
