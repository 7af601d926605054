"""One fault-suite run: cluster, workloads, nemesis, checks, one JSON summary.

Theory of operation. :func:`run` starts a :class:`~raftcoord.chaos.cluster.ChaosCluster`,
starts the workloads of :mod:`raftcoord.chaos.workload` on threads (per node: a
register client pinned to the node and one that fails over, a message poster
pinned to the node, a durability writer that fails over) and, unless
``watches`` is off, a ``/v3/watch`` on every node (:mod:`raftcoord.chaos.watches`,
opened first, resumed after each fault), and, for
``duration`` seconds, a nemesis loop that waits a few seconds, injects a
fault of a kind drawn from ``faults`` with ``random.Random(seed)``, keeps it
2-6 s and heals it: one fault at a time, never two at once. A fault the
cluster refused at that moment (a member change without a leader or a
majority) is counted as ``<kind>-skipped``. A node a member fault removed
and could not add back is added back before the next fault and in the
final heal. Then it heals everything and checks, in this order:

1. recovery: every node serves a write and a linearizable read through its
   own endpoint within 10 s of the last heal (the workers stop meanwhile),
   and the member registry lists every node of the cluster file, as a voter
   with its own addresses (member faults remove and add nodes);
2. messages: every node's list is the same sequence, strictly increasing
   clocks, every acknowledged post once, nothing never posted;
3. watches: each node's watch delivered every change under the workloads'
   prefix in revision order, once, atomically, replaying to the final state,
   the same on every node; a compacted answer on resume fails it;
4. durability (after healing): every acknowledged write on every node;
5. agreement: the nodes' snapshot digests are equal at an equal applied count;
6. durability (after a kill -9 of every node and a restart): the writes and
   the acknowledged messages are all still there;
7. linearizability of the register history (the checker, with a time budget).

The cluster keeps few messages (a small ``message_retention_count``), so the
leader's retention purges run during the run and the message checks see them.

Everything is bounded: the operation budget, each client call's timeout,
every wait. The summary is one JSON line; when a check fails the history
(JSON lines) and a readable report are written under ``out``. The random
seed decides the faults and the workers' choices; thread timing still makes
two runs of one seed differ in detail.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from raftcoord.chaos import checker, watches, workload
from raftcoord.chaos.history import History
from raftcoord.client import Client
from raftcoord.errors import InvalidInputError, RaftcoordError, UnavailableError

__all__ = ["ChaosOptions", "run", "sigterm_as_interrupt"]

log = logging.getLogger(__name__)

#: Seconds each workload call may take, retries included; beyond it the outcome is unknown.
OP_TIMEOUT: Final = 5.0
DIAL_TIMEOUT: Final = 1.0
#: Seconds the cluster has to become healthy at start and after the full restart.
HEALTHY_TIMEOUT: Final = 60.0
#: Seconds the nodes' message lists have to become identical after the heal.
CONVERGE_TIMEOUT: Final = 15.0
#: The default register operation budget's ceiling.
MAX_OPS: Final = 30_000
HISTORY_FILE: Final = "history.jsonl"
#: What each node's watch delivered, written when the watches check fails.
WATCHES_FILE: Final = "watches.jsonl"
REPORT_FILE: Final = "report.txt"
CHECKS: Final = ("linearizable", "messages", "recovery", "durability", "agreement", "watches")
#: Seconds each node's watch has, after the final state is read, to deliver up to it.
WATCH_CATCH_UP: Final = 15.0
#: Seconds the membership has, after the final heal, to be whole in the registry and every node's configuration.
MEMBERS_TIMEOUT: Final = 10.0


@dataclass
class ChaosOptions:
    """What one run does. ``out`` receives the history and report of a failing run."""

    nodes: int = 3
    duration: float = 60.0
    faults: Sequence[str] = ("kill", "pause", "partition")
    seed: int = 0
    out: Path | None = None
    #: None: network namespaces when the machine allows, else the fault proxy (ChaosCluster decides).
    netns: bool | None = None
    #: Register operations at most (default: 100 per second of duration, at most 30,000, which
    #: keeps the checker within seconds); the workers pace themselves to spread them over the run.
    max_ops: int | None = None
    register_keys: int = 4
    fault_length: tuple[float, float] = (2.0, 6.0)
    fault_gap: tuple[float, float] = (1.0, 3.0)
    checker_budget: float = 60.0
    #: Keep a /v3/watch open on every node and check what it delivered (the "watches" check).
    watches: bool = True


@dataclass
class _Event:
    at: float
    what: str


@dataclass
class _Run:
    options: ChaosOptions
    t0: float = field(default_factory=time.monotonic)
    events: list[_Event] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    checks: dict[str, bool] = field(default_factory=dict)
    details: dict[str, list[str]] = field(default_factory=dict)
    watch_logs: dict[str, watches.WatchLog] = field(default_factory=dict)

    def note(self, what: str) -> None:
        self.events.append(_Event(time.monotonic() - self.t0, what))
        log.info("[%7.2f] %s", time.monotonic() - self.t0, what)

    def verdict(self, name: str, ok: bool, problems: Sequence[str] = ()) -> None:
        self.checks[name] = self.checks.get(name, True) and ok
        if problems:
            self.details.setdefault(name, []).extend(problems)
        self.note(f"check {name}: {'ok' if ok else 'FAILED'}" + (f" ({problems[0]})" if problems else ""))


def _fault_classes(kinds: Sequence[str]) -> list[type]:
    from raftcoord.chaos.nemesis import faults_for

    if not kinds:
        raise InvalidInputError("--faults: name at least one fault kind, e.g. kill,pause,partition", field="faults")
    try:
        return list(faults_for(list(kinds)))
    except (ValueError, KeyError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise InvalidInputError(f"--faults: {message}", field="faults") from None


def _rejoin_removed(cluster: Any, run: _Run) -> None:
    """Add back every node a member fault removed and did not add back (its heal failed)."""
    for name in sorted(getattr(cluster, "removed", ())):
        try:
            cluster.rejoin(name)
            run.note(f"added {name} back (a member fault's heal had not)")
        except Exception as exc:  # noqa: BLE001 - the checks say what is left wrong
            run.note(f"add {name} back: {type(exc).__name__}: {exc}")


def _heal_all(cluster: Any, run: _Run) -> None:
    """Undo anything a fault may have left behind: every node a member, running, unpaused, reachable."""
    heal_network = getattr(cluster, "heal_network", None)
    if callable(heal_network):
        try:
            heal_network()
        except Exception as exc:  # noqa: BLE001 - healing must go on to every node
            run.note(f"heal network: {type(exc).__name__}: {exc}")
    _rejoin_removed(cluster, run)
    for name in cluster.names:
        try:
            if name in getattr(cluster, "paused", ()):
                cluster.resume(name)
            if not cluster.alive(name):
                cluster.restart(name)
        except Exception as exc:  # noqa: BLE001 - healing must reach every node
            run.note(f"heal {name}: {type(exc).__name__}: {exc}")


def _nemesis(cluster: Any, classes: list[type], rng: random.Random, until: float, stop: threading.Event,
             run: _Run) -> None:
    """Inject and heal faults until ``until`` (a monotonic time)."""
    lo, hi = run.options.fault_length
    while not stop.is_set():
        stop.wait(max(0.0, min(rng.uniform(*run.options.fault_gap), until - time.monotonic())))
        if time.monotonic() + lo > until or stop.is_set():
            return
        _rejoin_removed(cluster, run)
        fault = rng.choice(classes)()
        length = min(rng.uniform(lo, hi), until - time.monotonic())
        try:
            what = fault.inject(cluster, rng)
        except Exception as exc:  # noqa: BLE001 - a fault that cannot be injected now is skipped
            run.note(f"inject {fault.kind} failed: {type(exc).__name__}: {exc}")
            what = None
        if what is not None and getattr(fault, "skipped", False):
            run.faults[f"{fault.kind}-skipped"] += 1
            run.note(f"fault {fault.kind}: {what}")
        elif what is not None:
            run.faults[fault.kind] += 1
            run.note(f"fault {fault.kind}: {what} (for {length:.1f} s)")
            stop.wait(max(0.0, length))
        try:
            fault.heal(cluster)
            if what is not None:
                run.note(f"healed {fault.kind}")
        except Exception as exc:  # noqa: BLE001 - the final heal tries again
            run.note(f"heal {fault.kind} failed: {type(exc).__name__}: {exc}")


def _start_cluster(options: ChaosOptions, root: Path, factory: Callable[..., Any] | None,
                   classes: list[type]) -> Any:
    """The cluster, started and healthy; a missing capability is a one-line error before any node starts."""
    if factory is None:
        from raftcoord.chaos.cluster import ChaosCluster as factory
    try:
        cluster = factory(root, options.nodes, netns=options.netns, seed=options.seed)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        raise UnavailableError(f"chaos: cannot set up the cluster: {exc}") from None
    try:
        for cls in classes:
            unsupported = getattr(cls(), "unsupported", None)
            why = unsupported(cluster) if callable(unsupported) else None
            if why:
                why = why if why.startswith(f"{cls.kind}:") else f"{cls.kind}: {why}"
                raise InvalidInputError(f"--faults: {why}", field="faults")
    except BaseException:
        cluster.__exit__(None, None, None)
        raise
    try:
        # Entering starts every node and waits until they are healthy (cleaning up if not).
        cluster.__enter__()
    except (OSError, RuntimeError, subprocess.SubprocessError, AssertionError) as exc:
        raise UnavailableError(f"chaos: the cluster did not start: {exc}") from None
    return cluster


@dataclass
class _Lists:
    """Every node's message list as (clock, payload id), its purge floor, and the nodes not read."""

    lists: dict[str, list[Any]] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def check(self, messages: workload.Messages) -> workload.CheckResult:
        if not self.lists:
            return workload.CheckResult.of(self.errors + ["no node's message list could be read"])
        result = workload.check_messages(self.lists, messages.acked, messages.unknown, self.floors)
        return workload.CheckResult.of(self.errors + result.problems)

    def above(self, floor: int) -> dict[str, list[Any]]:
        return {node: [e for e in entries if e[0] > floor] for node, entries in self.lists.items()}


def _read_lists(clients: dict[str, tuple[Client, str]], run_id: str) -> _Lists:
    found = _Lists()
    for node, (client, url) in clients.items():
        try:
            messages, found.floors[node] = workload.read_messages(client, url)
            found.lists[node] = workload.message_entries(messages, run_id)
        except RaftcoordError as exc:
            found.errors.append(f"{node}: cannot read its messages: {exc}")
    return found


def _converged_lists(clients: dict[str, tuple[Client, str]], run_id: str, timeout: float) -> _Lists:
    """The nodes' lists once identical (a late post of unknown outcome may still be applying)."""
    deadline = time.monotonic() + timeout
    while True:
        found = _read_lists(clients, run_id)
        floor = max(found.floors.values(), default=0)
        same = len({tuple(v) for v in found.above(floor).values()}) == 1 and len(set(found.floors.values())) == 1
        if not found.errors and same:
            return found
        if time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def _check_durable(clients: dict[str, tuple[Client, str]], durable: workload.Durable) -> workload.CheckResult:
    found, errors = {}, []
    for node, (client, url) in clients.items():
        try:
            found[node] = workload.read_durable(client, url)
        except RaftcoordError as exc:
            errors.append(f"{node}: cannot read its keys: {exc}")
    result = workload.check_durable(found, durable.acked, durable.unknown)
    return workload.CheckResult.of(errors + result.problems)


def _membership_problems(cluster: Any, timeout: float = MEMBERS_TIMEOUT) -> list[str]:
    """What is wrong with the membership after the heal, once ``timeout`` passed without it being whole.

    Whole: the registry lists every node of the cluster file as a voter with
    its own addresses, and nothing else; and every node's own Raft
    configuration (``voters`` of its status) holds exactly those voters, so
    that the registry and the configuration have not drifted apart.
    """
    deadline = time.monotonic() + timeout
    while True:
        problems = _membership_now(cluster)
        if not problems or time.monotonic() >= deadline:
            return problems
        time.sleep(0.5)


def _membership_now(cluster: Any) -> list[str]:
    try:
        members = {m.get("name"): m for m in cluster.members(timeout=10.0)}
    except RaftcoordError as exc:
        return [f"the member list cannot be read: {exc.message}"]
    problems = []
    for name in cluster.names:
        want = {"name": name, "raft": cluster.raft[name], "client": cluster.client_addr[name], "voter": True}
        got = members.pop(name, None)
        if got is None:
            problems.append(f"{name} is not a member after the heal")
        elif {k: got.get(k) for k in want} != want:
            problems.append(f"{name} is the member {got}, not {want}")
    problems.extend(f"{name} is a member but no node of the cluster" for name in sorted(map(str, members)))
    voters = sorted(cluster.raft[n] for n in cluster.names)
    for name in cluster.names:
        try:
            theirs = cluster.status(name).get("voters")
        except RaftcoordError as exc:
            problems.append(f"{name}: its status cannot be read: {exc.message}")
            continue
        if theirs is not None and sorted(theirs) != voters:
            problems.append(f"{name}: its Raft configuration has the voters {sorted(theirs)}, not {voters}")
    return problems


def _full_restart(cluster: Any, run: _Run) -> None:
    for name in cluster.names:
        cluster.kill(name)
    run.note("killed every node (SIGKILL)")
    for name in cluster.names:
        cluster.restart(name)
    cluster.wait_healthy(HEALTHY_TIMEOUT)
    run.note("every node restarted and healthy")


def _guard(state: _Run, name: str, fn: Callable[[], None]) -> None:
    """Run one check; an exception fails it (with its text) instead of ending the run."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed check
        log.debug("check %s raised", name, exc_info=True)
        state.verdict(name, False, [f"the check itself failed: {type(exc).__name__}: {exc}"])


def _after_heal(cluster: Any, checkers: dict[str, tuple[Client, str]], healed: float,
                threads: list[threading.Thread], state: _Run, run_id: str, messages: workload.Messages,
                durable: workload.Durable, watchers: dict[str, watches.Watcher]) -> None:
    """Every check that needs the cluster, in the order of the module docstring."""

    def recovery() -> None:
        result = workload.check_recovery(checkers, healed)
        members = _membership_problems(cluster) if callable(getattr(cluster, "members", None)) else []
        state.verdict("recovery", result.ok and not members, result.problems + members)
        for t in threads:
            t.join(timeout=OP_TIMEOUT * 3)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            state.note(f"workers still running after the stop: {stuck}")
        try:
            cluster.wait_healthy(HEALTHY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the checks below say what is wrong
            state.verdict("recovery", False, [f"not healthy {HEALTHY_TIMEOUT:g} s after the heal: {exc}"])

    before = _Lists()

    def message_order() -> None:
        found = _converged_lists(checkers, run_id, CONVERGE_TIMEOUT)
        before.lists, before.floors, before.errors = found.lists, found.floors, found.errors
        result = found.check(messages)
        floor = max(found.floors.values(), default=0)
        state.note(f"message lists read: purge floor {floor}, "
                   f"{max((len(v) for v in found.lists.values()), default=0)} messages kept")
        state.verdict("messages", result.ok, result.problems)

    def watch_delivery() -> None:
        if not watchers:
            return
        node = next(iter(checkers))
        client, url = checkers[node]
        try:
            result = watches.finish(watchers, client, url, timeout=WATCH_CATCH_UP)
        finally:
            state.note(f"watches: {watches.summary(list(watchers.values()))}")
            state.watch_logs = {node: w.log for node, w in watchers.items()}
        state.verdict("watches", result.ok, result.problems)

    def durability_after_heal() -> None:
        result = _check_durable(checkers, durable)
        state.verdict("durability", result.ok, [f"after healing: {p}" for p in result.problems])

    def agreement() -> None:
        verdict = workload.poll_agreement(checkers)
        state.verdict("agreement", verdict.ok, verdict.problems)

    def durability_after_restart() -> None:
        try:
            _full_restart(cluster, state)
        except Exception as exc:  # noqa: BLE001 - a cluster that does not come back fails durability
            state.verdict("durability", False, [f"after the full restart: not healthy: {exc}"])
            return
        after = _check_durable(checkers, durable)
        found = _converged_lists(checkers, run_id, CONVERGE_TIMEOUT)
        problems = after.problems + found.check(messages).problems
        floor = max([*found.floors.values(), *before.floors.values()], default=0)
        old = next(iter(before.above(floor).values()), None)
        for node, entries in found.above(floor).items():
            # A post of unknown outcome may commit only now, so the list may grow; it may not change.
            if old is not None and entries[:len(old)] != old:
                problems.append(f"{node}: the message list after the restart does not extend the one before")
        state.verdict("durability", not problems, [f"after the full restart: {p}" for p in problems])

    for name, check in (("recovery", recovery), ("messages", message_order), ("watches", watch_delivery),
                        ("durability", durability_after_heal),
                        ("agreement", agreement), ("durability", durability_after_restart)):
        _guard(state, name, check)


def run(options: ChaosOptions, *, cluster_factory: Callable[..., Any] | None = None,
        fault_classes: Sequence[type] | None = None) -> dict[str, Any]:
    """One run; returns the summary (see the module docstring). Raises only when the
    cluster cannot be set up at all (one-line errors of the project's hierarchy).

    ``cluster_factory`` (default :class:`~raftcoord.chaos.cluster.ChaosCluster`) and
    ``fault_classes`` (default: from ``options.faults``) let tests bring their own.
    """
    if options.nodes < 1:
        raise InvalidInputError("--nodes: at least 1", field="nodes")
    if not options.duration > 0:
        raise InvalidInputError("--duration: must be more than 0 seconds", field="duration")
    classes = list(fault_classes) if fault_classes is not None else _fault_classes(options.faults)
    rng = random.Random(options.seed)
    run_id = uuid.UUID(int=rng.getrandbits(128)).hex[:12]
    state = _Run(options)
    history = History()
    max_ops = options.max_ops if options.max_ops is not None else min(MAX_OPS, int(100 * options.duration) + 100)
    side_ops = max(50, max_ops // 5)
    # Think times that spread each budget over the run (2 register workers per node, 1 of each other).
    span = options.duration + 10.0
    registers = workload.Registers(history, keys=options.register_keys, budget=workload.Budget(max_ops),
                                   think=2 * options.nodes * span / max_ops)
    messages = workload.Messages(run_id, budget=workload.Budget(side_ops), think=options.nodes * span / side_ops)
    durable = workload.Durable(budget=workload.Budget(side_ops), think=options.nodes * span / side_ops)
    stop = threading.Event()
    root = Path(tempfile.mkdtemp(prefix="raftcoord-chaos-"))
    try:
        return _run(options, cluster_factory, classes, rng, run_id, state, history, max_ops, registers, messages,
                    durable, stop, root)
    finally:
        stop.set()  # workers of a run cut short by an exception stop too
        shutil.rmtree(root, ignore_errors=True)


def _run(options: ChaosOptions, cluster_factory: Callable[..., Any] | None, classes: list[type],
         rng: random.Random, run_id: str, state: _Run, history: History, max_ops: int,
         registers: workload.Registers, messages: workload.Messages, durable: workload.Durable,
         stop: threading.Event, root: Path) -> dict[str, Any]:
    cluster = None
    watchers: dict[str, watches.Watcher] = {}
    try:
        cluster = _start_cluster(options, root, cluster_factory, classes)
        state.note(f"cluster of {options.nodes} up in {root} (network: {getattr(cluster, 'mode', '?')})")
        urls = {name: cluster.client_urls[name] for name in cluster.names}
        order = list(cluster.names)
        if options.watches:
            # Opened before any workload writes, from revision 1: the streams carry every change.
            watchers = watches.start_watchers(urls)
            state.note(f"a watch on {watches.WATCH_PREFIX!r} open on every node")

        def roaming(name: str) -> Client:
            i = order.index(name)
            return Client([urls[n] for n in order[i:] + order[:i]], timeout=OP_TIMEOUT, dial_timeout=DIAL_TIMEOUT)

        def pinned(name: str, timeout: float = OP_TIMEOUT) -> Client:
            return Client([urls[name]], timeout=timeout, dial_timeout=DIAL_TIMEOUT)

        targets: list[tuple[str, Callable[[], None]]] = []
        for i, name in enumerate(order):
            for kind, client in (("pinned", pinned(name)), ("roaming", roaming(name))):
                worker_rng = random.Random(f"{options.seed}/reg/{name}/{kind}")
                targets.append((f"reg-{name}-{kind}",
                                lambda c=client, r=worker_rng: registers.worker(c, stop, r)))
            targets.append((f"msg-{name}", lambda c=pinned(name), n=name, r=random.Random(f"{options.seed}/msg/{i}"):
                            messages.worker(c, n, stop, r)))
            targets.append((f"dur-{name}", lambda c=roaming(name), n=name, r=random.Random(f"{options.seed}/dur/{i}"):
                            durable.worker(c, n, stop, r)))
        threads = workload.workload_threads(targets)
        state.note(f"{len(threads)} workers started; faults for {options.duration:g} s")

        nemesis_stop = threading.Event()
        _nemesis(cluster, classes, rng, time.monotonic() + options.duration, nemesis_stop, state)
        _heal_all(cluster, state)
        healed = time.monotonic()
        state.note("healed everything")
        stop.set()

        checkers = {name: (pinned(name, 10.0), urls[name]) for name in order}
        _after_heal(cluster, checkers, healed, threads, state, run_id, messages, durable, watchers)
    finally:
        for watcher in watchers.values():
            watcher.close()
        if cluster is not None:
            try:
                cluster.__exit__(None, None, None)
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the result
                log.warning("stopping the chaos cluster: %s", exc)

    ops = history.ops()
    state.note(f"register ops: {dict(registers.counts)} ({max_ops} allowed); messages: {len(messages.acked)} "
               f"acknowledged, {len(messages.unknown)} unknown, {messages.failed} refused; durable writes: "
               f"{len(durable.acked)} acknowledged, {len(durable.unknown)} unknown, {durable.failed} refused")
    lin = checker.check(ops, budget=options.checker_budget)
    state.verdict("linearizable", lin.ok is True,
                  [] if lin.ok else [lin.explain().splitlines()[0]])
    checks = {name: bool(state.checks.get(name, False)) for name in CHECKS if name != "watches" or options.watches}
    ok = all(checks.values())
    summary: dict[str, Any] = {
        "seed": options.seed,
        "nodes": options.nodes,
        "duration": options.duration,
        "operations": len(ops) + messages.attempted + durable.attempted,
        "faults": dict(sorted(state.faults.items())),
        "checks": checks,
        "ok": ok,
        "history": None,
    }
    if not ok:
        out = options.out if options.out is not None else Path(tempfile.mkdtemp(prefix="raftcoord-chaos-failed-"))
        summary["history"] = str(out / HISTORY_FILE)
        _write_failure(out, root, history, lin, state, registers, messages, durable, summary)
    return summary


def _write_failure(out: Path, root: Path, history: History, lin: checker.Result, state: _Run,
                   registers: workload.Registers, messages: workload.Messages, durable: workload.Durable,
                   summary: dict[str, Any]) -> None:
    """Write the history, a readable report and the nodes' logs under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    history.dump(out / HISTORY_FILE)
    lines = [
        "raftcoord chaos: a check failed",
        json.dumps(summary, sort_keys=True),
        "",
        f"register ops: {dict(registers.counts)}; messages: {len(messages.acked)} acknowledged, "
        f"{len(messages.unknown)} unknown, {messages.failed} refused; durable writes: {len(durable.acked)} "
        f"acknowledged, {len(durable.unknown)} unknown, {durable.failed} refused",
        "",
        "checks:",
    ]
    for name in CHECKS:
        if name not in summary["checks"]:
            continue
        lines.append(f"  {name}: {'ok' if state.checks.get(name) else 'FAILED'}")
        lines.extend(f"    - {p}" for p in state.details.get(name, []))
    ops = history.ops()
    first = f"; the history's first op was at {min(op.invoke for op in ops) - state.t0:.2f} s" if ops else ""
    lines += ["", "linearizability:", lin.explain(), "", f"timeline (seconds after the start{first}):"]
    lines.extend(f"  {e.at:8.2f}  {e.what}" for e in state.events)
    if state.watch_logs and not state.checks.get("watches", True):
        watches.dump(state.watch_logs, out / WATCHES_FILE)
        lines += ["", f"what each node's watch delivered: {out / WATCHES_FILE}"]
    logs = out / "logs"
    for f in sorted(root.rglob("*.log")):
        logs.mkdir(exist_ok=True)
        shutil.copy(f, logs / f.name)
    if logs.exists():
        lines += ["", f"node logs: {logs}"]
    (out / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def sigterm_as_interrupt(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with SIGTERM turned into KeyboardInterrupt, so a stopped run still cleans up."""
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        return fn()
    try:
        return fn()
    finally:
        signal.signal(signal.SIGTERM, previous)
