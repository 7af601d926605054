"""A linearizability checker for register histories (put, get, delete, cas).

Theory of operation
-------------------
A history is linearizable when every op can be given one instant between its
invoke and its completion such that, taken in the order of those instants, the
ops are a legal sequential run of a register that starts absent. Ops on
different keys never interact and linearizability is local (Herlihy and Wing),
so the history is split per key and each key is checked on its own.

Per key this is the Wing-Gong-Lowe search, memoised as porcupine does it:
call and return events sit in one doubly linked list sorted by time. Walking
from the front, the search *linearizes* a call whose op the model accepts in the
current state (it unlinks the call and its return, pushes the choice, restarts
from the front); meeting a return means the op it closes has not been placed
although it has completed, so the last choice is undone and the next candidate
after it is tried. A configuration (set of linearized ops as an int bitset,
register value) seen once is never explored again, which bounds the work by the
concurrency of the history rather than its length.

Unknown outcomes (``complete=None``): the op has a call but no return, so the
search may place it at any point after its invoke or never; the search
succeeds as soon as every op with a known outcome is placed. An unknown get
tells nothing and is dropped; an unknown cas swaps if the value matches.

Three prunings keep high concurrency and unknown ops affordable, each sound
because it only skips orders that some kept order dominates: a legal read (get,
failed cas, delete of an absent key) is placed at once without a choice point,
since it leaves the state as it is; an unknown op is never placed just before a
blind write (put, delete), which would erase it; an unknown put or cas whose
value nothing reads or expects is left out when no failed cas follows it.

On failure the checker reports a short window of ops that no order explains:
(1) the earliest completion time T at which the history cut at T already fails
(ops still running at T count as unknown; this prefix property makes a binary
search sound); (2) the latest start time S such that the window still fails
whatever value the register held at S (absent or one written by an op invoked
before S), the ops done before S being dropped and the ops running across S
allowed to be left out (they may have taken effect before S). Each relaxation
only admits more orders, so a window that still fails proves the history fails.

A time budget bounds the whole check; when it runs out the result is unknown
(``ok=None``) instead of a hang. No I/O: it only reads the monotonic clock to
enforce the budget.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from typing import Iterable

from raftcoord.chaos.history import Op

__all__ = ["DEFAULT_BUDGET", "Result", "check"]

#: Seconds a :func:`check` may take before it gives up with ``ok=None``.
DEFAULT_BUDGET = 60.0

#: The most window lines :meth:`Result.explain` prints.
_MAX_LINES = 80


class _Other:
    """A start value no op of a window mentions (all such values behave alike)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<other>"


_OTHER = _Other()

# Op codes for the search's inner loop (per kind and outcome).
_PUT, _DELETE, _DELETE_ABSENT, _GET, _CAS_OK, _CAS_FAIL, _CAS_UNKNOWN = range(7)


# Ops with a known outcome that leave the register as it is.
_READ_ONLY = frozenset((_GET, _CAS_FAIL, _DELETE_ABSENT))


class _BudgetExceeded(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Item:
    """One op as the search sees it; ``complete=None`` makes it optional."""

    index: int  # into the key's op list, to report the original op
    invoke: float
    complete: float | None
    code: int
    value: str | None
    expected: str | None
    output: str | None


def _code(op: Op, known: bool) -> int:
    if op.kind == "put":
        return _PUT
    if op.kind == "delete":
        return _DELETE_ABSENT if known and op.ok is False else _DELETE
    if op.kind == "get":
        return _GET
    if not known:
        return _CAS_UNKNOWN
    return _CAS_OK if op.ok else _CAS_FAIL


def _item(index: int, op: Op, cut: float | None = None) -> _Item | None:
    """The op as the search sees it in the history cut at ``cut``; None if it drops out."""
    known = op.complete is not None and (cut is None or op.complete <= cut)
    if not known and op.kind == "get":
        return None
    return _Item(index, op.invoke, op.complete if known else None, _code(op, known),
                 op.value, op.expected, op.output)


def _step(state: object, item: _Item) -> tuple[bool, object]:
    """The register model: may ``item`` run in ``state``, and the state after it."""
    code = item.code
    if code == _PUT:
        return True, item.value
    if code == _DELETE:
        return True, None
    if code == _GET:
        return state == item.output, state
    if code == _CAS_OK:
        return state == item.expected, item.value
    if code == _CAS_FAIL:
        return state != item.expected, state
    if code == _CAS_UNKNOWN:
        return True, (item.value if state == item.expected else state)
    # _DELETE_ABSENT: the delete found nothing to delete.
    return state is None, None


def _droppable(items: list[_Item]) -> set[int]:
    """Optional writes no op can tell apart from "never": safe to leave out of the search.

    An optional put or cas whose value no get returns and no cas expects only
    changes what a failed cas sees (any value differs from what it expected);
    with no failed cas after its invoke, every order that places it stays legal
    without it, so leaving it out changes no verdict and saves the search from
    trying it at every point of the rest of the history.
    """
    observed = {it.output for it in items if it.code == _GET}
    observed.update(it.expected for it in items
                    if it.code in (_CAS_OK, _CAS_FAIL, _CAS_UNKNOWN))
    last_cas_fail = max((float("inf") if it.complete is None else it.complete
                         for it in items if it.code == _CAS_FAIL), default=float("-inf"))
    return {i for i, it in enumerate(items)
            if it.complete is None and it.code in (_PUT, _CAS_OK, _CAS_UNKNOWN)
            and it.value not in observed and last_cas_fail < it.invoke}


def _linearizable(items: list[_Item], initial: object, deadline: float) -> bool:
    """Whether the ops have a legal order from ``initial``; raises _BudgetExceeded."""
    return _search(items, initial, deadline) is None


def _fails_from_any_value(items: list[_Item], deadline: float,
                          possible: set[str | None] | None = None) -> bool:
    """Whether no order works whatever value the register held first.

    ``possible`` (default: any) are the values it may have held: absent or one
    written by an op invoked before the window. Only equality with the values
    the ops mention matters to the model, so every other value is tried once.
    """
    mentioned: set[object] = {None}
    for it in items:
        mentioned.update((it.value, it.expected, it.output))
    if possible is None:
        starts = mentioned | {_OTHER}
    else:
        starts = {v for v in possible if v in mentioned}
        if any(v not in mentioned for v in possible):
            starts.add(_OTHER)
    return not any(_linearizable(items, start, deadline) for start in starts)


def _search(items: list[_Item], initial: object, deadline: float) -> float | None:
    """The memoised Wing-Gong-Lowe search over one key; raises _BudgetExceeded.

    Returns None when linearizable, else the latest completion time the search
    ever got stuck at: every op completing before it was placed on some path, so
    the history cut before it is linearizable.

    Ops with a known outcome live in the linked list of call and return events.
    Optional ops (unknown outcome) have no return, so they sit in their own list
    by invoke time and are tried only after the known candidates: a linearizable
    history is then found without them first, and each is still tried wherever
    it may go (invoked before the first pending return).
    """
    dropped = _droppable(items)
    events: list[tuple[float, int, int]] = []
    optional: list[int] = []
    for i, it in enumerate(items):
        if it.complete is None:
            if i not in dropped:
                optional.append(i)
        else:
            # Calls sort before returns at equal times: a tie counts as overlapping.
            events.append((it.invoke, 0, i))
            events.append((it.complete, 1, i))
    events.sort()
    optional.sort(key=lambda i: items[i].invoke)
    opt_invoke = [items[i].invoke for i in optional]
    n_opt = len(optional)
    m = len(events)
    # Entry 0 is the list head; entries 1..m are the events; -1 ends the list.
    nxt = list(range(1, m + 1)) + [-1]
    prv = [-1] + list(range(m))
    is_call = [False] * (m + 1)
    op_of = [0] * (m + 1)
    match = [0] * (m + 1)
    times = [0.0] * (m + 1)
    call_entry: dict[int, int] = {}
    for e, (t, kind, i) in enumerate(events, 1):
        op_of[e] = i
        times[e] = t
        if kind == 0:
            is_call[e] = True
            call_entry[i] = e
        else:
            match[call_entry[i]] = e
    remaining = m // 2

    def unlink(call: int) -> None:
        """Take a call and its return out of the event list (dancing links)."""
        nxt[prv[call]] = nxt[call]
        prv[nxt[call]] = prv[call]
        ret = match[call]
        nxt[prv[ret]] = nxt[ret]
        if nxt[ret] != -1:
            prv[nxt[ret]] = prv[ret]

    def relink(call: int) -> None:
        """Undo :func:`unlink` (in reverse order, as dancing links require)."""
        ret = match[call]
        nxt[prv[ret]] = ret
        if nxt[ret] != -1:
            prv[nxt[ret]] = ret
        nxt[prv[call]] = call
        prv[nxt[call]] = call

    read_only = [it.code in _READ_ONLY for it in items]
    # An optional op placed just before a blind write is pointless: leaving it unplaced (and
    # free for later) reaches the same state with more options, so that order is skipped.
    blind = [it.code in (_PUT, _DELETE) for it in items]
    state = initial
    linearized = 0
    seen: set[tuple[int, object]] = set()
    # (call entry, state before, 1 if forced else 0) for a known op;
    # (-1 - position, state before, return entry) for an optional one.
    stack: list[tuple[int, object, int]] = []
    clock = time.monotonic
    steps = 0
    e = 0
    j = -1  # -1: walking the event list; else the next optional op to try before return e
    fresh = True  # a new configuration: look for a read to force first
    furthest = float("-inf")
    while remaining:
        steps += 1
        if not steps & 4095 and clock() > deadline:
            raise _BudgetExceeded
        backtrack = False
        if fresh:
            fresh = False
            # A legal read among the candidates is placed without a choice point: it leaves
            # the state as it is, so if any order works, one placing it first works too.
            f = nxt[0]
            while is_call[f]:
                i = op_of[f]
                if read_only[i] and _step(state, items[i])[0]:
                    break
                f = nxt[f]
            if is_call[f]:
                config = (linearized | (1 << i), state)
                if config in seen:
                    backtrack = True  # explored before, and failed
                else:
                    seen.add(config)
                    stack.append((f, state, 1))
                    linearized = config[0]
                    remaining -= 1
                    unlink(f)
                    fresh = True
                    continue
            e = nxt[0]
            j = -1
        if backtrack:
            pass
        elif j < 0:
            if not is_call[e]:
                j = 0  # the first pending return: now the optional ops invoked before it
                continue
            i = op_of[e]
            legal, new_state = _step(state, items[i])
            if legal and not (blind[i] and stack and stack[-1][0] < 0):
                bits = linearized | (1 << i)
                config = (bits, new_state)
                if config not in seen:
                    seen.add(config)
                    stack.append((e, state, 0))
                    state = new_state
                    linearized = bits
                    remaining -= 1
                    unlink(e)
                    fresh = True
                    continue
            e = nxt[e]
            continue
        elif j < n_opt and opt_invoke[j] <= times[e]:
            i = optional[j]
            if not (linearized >> i) & 1:
                legal, new_state = _step(state, items[i])
                if legal and not (blind[i] and stack and stack[-1][0] < 0):
                    bits = linearized | (1 << i)
                    config = (bits, new_state)
                    if config not in seen:
                        seen.add(config)
                        stack.append((-1 - j, state, e))
                        state = new_state
                        linearized = bits
                        fresh = True
                        continue
            j += 1
            continue
        # A known op completed unplaced and nothing else fits: undo the last choice
        # (and every forced read above it, since they were no choice).
        if not backtrack and times[e] > furthest:
            furthest = times[e]
        while True:
            if not stack:
                return furthest
            top, state, aux = stack.pop()
            if top < 0:
                j = -1 - top
                linearized &= ~(1 << optional[j])
                e = aux
                j += 1
                break
            linearized &= ~(1 << op_of[top])
            remaining += 1
            relink(top)
            if not aux:
                e = nxt[top]
                j = -1
                break
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The verdict of :func:`check`.

    ``ok`` is True (linearizable), False (not; ``key`` and ``window`` say where)
    or None (unknown: the time budget ran out while checking ``key``).
    """

    ok: bool | None
    key: str | None = None
    window: list[Op] = field(default_factory=list)
    #: The op(s) in the window whose completion no order of the window explains.
    stuck: list[Op] = field(default_factory=list)
    #: Every key found not linearizable (the window is for ``key``, the first).
    failed_keys: list[str] = field(default_factory=list)
    #: True when the window starts at the key's first op (register absent), False
    #: when earlier ops were trimmed and the window fails from any start value.
    window_from_start: bool = True
    #: When trimmed: the start time S; the ops done before it were dropped, and the
    #: window fails whatever value the ops invoked before S left.
    window_start: float | None = None
    #: True when the budget ran out while shrinking, so the window may not be the shortest.
    window_partial: bool = False
    operations: int = 0
    keys: int = 0
    elapsed: float = 0.0
    budget: float = DEFAULT_BUDGET
    #: The earliest invoke in the history; window times are printed relative to it.
    t0: float = 0.0

    def explain(self) -> str:
        """A readable report of the verdict and, on failure, the failing window."""
        head = f"{self.operations} ops on {self.keys} keys, checked in {self.elapsed:.2f} s"
        if self.ok:
            return f"linearizable: {head}"
        if self.ok is None:
            return (f"unknown: the time budget of {self.budget:g} s ran out while checking key "
                    f"{self.key!r} ({head})")
        lines = [f"NOT linearizable: key {self.key!r} ({head})"]
        if len(self.failed_keys) > 1:
            lines.append(f"keys that fail: {', '.join(map(repr, self.failed_keys))}")
        start = ("the register starts absent (first op on the key)" if self.window_from_start
                 else "earlier ops trimmed: it fails whatever value they left")
        shortest = "a failing window (budget ran out while shrinking it)" if self.window_partial \
            else "shortest failing window found"
        lines.append(f"{shortest}: {len(self.window)} ops; {start}; times in seconds after the first op;"
                     " '!!' marks the op no order explains:")
        stuck = {id(op) for op in self.stuck}
        cut = max((op.complete for op in self.stuck if op.complete is not None), default=None)
        shown = self.window if len(self.window) <= _MAX_LINES else self.window[-_MAX_LINES:]
        if len(shown) < len(self.window):
            lines.append(f"  ... {len(self.window) - len(shown)} earlier ops not shown")
        for op in shown:
            mark = "!!" if id(op) in stuck else "  "
            note = ""
            if cut is not None and op.complete is not None and op.complete > cut:
                note = "  (still running at the failure: may or may not have taken effect)"
            lines.append(f"{mark} {op.describe(self.t0)}{note}")
        return "\n".join(lines)


def _window(ops: list[Op], stuck_at: float,
            deadline: float) -> tuple[list[Op], list[Op], float | None, bool]:
    """Shrink a failing key history: (window, stuck ops, start time or None, partial).

    ``stuck_at`` is what :func:`_search` returned for the whole key: the cuts
    before it are linearizable, and the cut at it usually is the first to fail.
    """
    partial = False
    cuts = sorted({op.complete for op in ops if op.complete is not None})

    def cut_items(cut: float) -> list[_Item]:
        return [it for i, op in enumerate(ops) if op.invoke <= cut
                for it in [_item(i, op, cut)] if it is not None]

    # (1) Earliest failing cut; the full history (last cut) is known to fail.
    lo, hi = bisect_left(cuts, stuck_at) - 1, len(cuts) - 1
    try:
        if hi - lo > 1 and not _linearizable(cut_items(cuts[lo + 1]), None, deadline):
            hi = lo + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _linearizable(cut_items(cuts[mid]), None, deadline):
                lo = mid
            else:
                hi = mid
    except _BudgetExceeded:
        partial = True
    cut = cuts[hi]
    prefix = cut_items(cut)
    stuck = [ops[it.index] for it in prefix if it.complete == cut]
    # (2) Trim from the front: cut at a start time S, drop the known ops done before S and
    # let the ops running across S be left out (they may have taken effect before S, which
    # trying every start value covers). Failing so relaxed, the window alone is a proof.
    # Only starts after some op completed drop anything.
    first_done = min(it.complete for it in prefix if it.complete is not None)
    starts = sorted({it.invoke for it in prefix
                     if it.complete is not None and it.complete < cut and it.invoke > first_done})
    best: list[_Item] | None = None

    def written_before(start: float) -> set[str | None]:
        # The register held, at the start, absent or what an op invoked before it wrote.
        return {None} | {op.value for op in ops if op.invoke < start and op.kind in ("put", "cas")}

    def trimmed(start: float) -> list[_Item]:
        kept = []
        for it in prefix:
            if it.complete is not None and it.complete < start:
                continue
            if it.complete is not None and it.invoke < start:
                it = replace(it, complete=None)  # optional, but with its known outcome if placed
            kept.append(it)
        return kept

    # Later starts leave fewer ops and fewer ways to fail: search for the latest that fails,
    # galloping back from the end since small windows are cheap and large ones may not be.
    lo, hi = -1, len(starts)
    try:
        back = 1
        while back <= len(starts):
            candidate = trimmed(starts[-back])
            if _fails_from_any_value(candidate, deadline, written_before(starts[-back])):
                lo, best = len(starts) - back, candidate
                break
            hi = len(starts) - back
            back *= 2
        while hi - lo > 1 and best is not None:
            mid = (lo + hi) // 2
            candidate = trimmed(starts[mid])
            if not _fails_from_any_value(candidate, deadline, written_before(starts[mid])):
                hi = mid
            else:
                lo, best = mid, candidate
    except _BudgetExceeded:
        partial = True
    chosen = best if best is not None else prefix
    window = sorted((ops[it.index] for it in chosen), key=lambda op: op.invoke)
    return window, stuck, None if best is None else starts[lo], partial


def check(ops: Iterable[Op], *, budget: float = DEFAULT_BUDGET) -> Result:
    """Check a history for linearizability against a register per key.

    ``budget`` (seconds) bounds the search; when it runs out the result has
    ``ok=None``. On failure the window search gets what is left of the budget
    up to a sixth of it, and at least a tenth.
    """
    started = time.monotonic()
    deadline = started + budget
    all_ops = list(ops)
    by_key: dict[str, list[Op]] = {}
    for op in all_ops:
        by_key.setdefault(op.key, []).append(op)
    t0 = min((op.invoke for op in all_ops), default=0.0)
    common = dict(operations=len(all_ops), keys=len(by_key), budget=budget, t0=t0)
    failed: list[str] = []
    stuck_times: dict[str, float] = {}
    for key in sorted(by_key):
        key_ops = sorted(by_key[key], key=lambda op: op.invoke)
        items = [it for i, op in enumerate(key_ops) for it in [_item(i, op)] if it is not None]
        try:
            stuck_at = _search(items, None, deadline)
            if stuck_at is not None:
                failed.append(key)
                stuck_times[key] = stuck_at
        except _BudgetExceeded:
            if failed:
                break
            return Result(ok=None, key=key, elapsed=time.monotonic() - started, **common)
    if not failed:
        return Result(ok=True, elapsed=time.monotonic() - started, **common)
    key = failed[0]
    key_ops = sorted(by_key[key], key=lambda op: op.invoke)
    # Shrinking is a nicety: it gets at most a sixth of the budget, and at least a tenth.
    now = time.monotonic()
    window_deadline = max(min(deadline, now + budget / 6), now + budget / 10)
    window, stuck, start, partial = _window(key_ops, stuck_times[key], window_deadline)
    return Result(ok=False, key=key, window=window, stuck=stuck, failed_keys=failed,
                  window_from_start=start is None, window_start=start, window_partial=partial,
                  elapsed=time.monotonic() - started, **common)
