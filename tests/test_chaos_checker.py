"""The history recorder and the linearizability checker (raftcoord.chaos, issue 7).

Hand-made histories, linearizable and not, with the verdict each must get; a
brute-force checker that the real one must agree with on small random
histories; and histories generated from a real sequential execution.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftcoord.chaos.checker import Result, check
from raftcoord.chaos.history import History, Op

# -- building histories by hand -------------------------------------------------------------


def put(p: int, key: str, value: str, a: float, b: float | None) -> Op:
    """A put by process p over [a, b]; b=None is an unknown outcome."""
    return Op(process=p, kind="put", key=key, value=value, invoke=a, complete=b,
              ok=None if b is None else True)


def get(p: int, key: str, output: str | None, a: float, b: float | None) -> Op:
    """A get that read ``output`` (None: absent)."""
    return Op(process=p, kind="get", key=key, invoke=a, complete=b,
              ok=None if b is None else True, output=None if b is None else output)


def delete(p: int, key: str, a: float, b: float | None, ok: bool = True) -> Op:
    """A delete; ok=False means it found the key absent."""
    return Op(process=p, kind="delete", key=key, invoke=a, complete=b, ok=None if b is None else ok)


def cas(p: int, key: str, expected: str | None, value: str, a: float, b: float | None,
        ok: bool | None = True) -> Op:
    """A compare-and-swap expected -> value; ok False = not swapped."""
    return Op(process=p, kind="cas", key=key, expected=expected, value=value, invoke=a,
              complete=b, ok=None if b is None else ok)


def assert_ok(ops: list[Op]) -> Result:
    """Check and insist the history is linearizable."""
    result = check(ops, budget=30)
    assert result.ok is True, result.explain()
    return result


def assert_bad(ops: list[Op], key: str = "k") -> Result:
    """Check and insist the history is not linearizable, on ``key``, with a failing window."""
    result = check(ops, budget=30)
    assert result.ok is False, result.explain()
    assert result.key == key
    assert result.window and result.stuck
    # The window is a proof on its own: checked alone it fails too.
    assert check(result.window, budget=30).ok is False, result.explain()
    return result


# -- hand-made histories --------------------------------------------------------------------


def test_empty_and_sequential_histories_are_linearizable() -> None:
    """No ops, and a sequential run of every kind, are linearizable."""
    assert_ok([])
    assert_ok([
        get(1, "k", None, 0, 1),
        put(1, "k", "a", 2, 3),
        get(2, "k", "a", 4, 5),
        cas(1, "k", "a", "b", 6, 7),
        cas(2, "k", "a", "c", 8, 9, ok=False),
        get(2, "k", "b", 10, 11),
        delete(1, "k", 12, 13),
        get(1, "k", None, 14, 15),
        cas(2, "k", None, "d", 16, 17),
        get(1, "k", "d", 18, 19),
    ])


@pytest.mark.parametrize("read", ["a", "b"])
def test_overlapping_writes_either_order(read: str) -> None:
    """Two overlapping puts may take effect in either order: a later read of either is fine."""
    assert_ok([put(1, "k", "a", 0, 10), put(2, "k", "b", 1, 9), get(3, "k", read, 11, 12)])


@pytest.mark.parametrize("read", ["a", "b"])
def test_read_overlapping_a_write_sees_old_or_new(read: str) -> None:
    """A read overlapping a write may see the old or the new value."""
    assert_ok([put(1, "k", "a", 0, 1), put(1, "k", "b", 2, 10), get(2, "k", read, 3, 4)])


def test_reads_cannot_go_back_in_time() -> None:
    """Once a read saw the new value, a later read may not see the old one."""
    assert_bad([put(1, "k", "a", 0, 1), put(1, "k", "b", 2, 10),
                get(2, "k", "b", 3, 4), get(3, "k", "a", 5, 6)])


def test_stale_read_after_completed_write() -> None:
    """A read that starts after a write completed must not return the value before it."""
    result = assert_bad([put(1, "k", "a", 0, 1), put(2, "k", "b", 2, 3), get(3, "k", "a", 4, 5)])
    assert result.stuck == [get(3, "k", "a", 4, 5)]
    assert put(2, "k", "b", 2, 3) in result.window


def test_read_of_a_value_never_written() -> None:
    """Reading a value nobody wrote (or a value before anything was written) fails."""
    assert_bad([put(1, "k", "a", 0, 1), get(2, "k", "zzz", 2, 3)])
    assert_bad([get(2, "k", "a", 0, 1), put(1, "k", "a", 2, 3)])


def test_lost_cas() -> None:
    """A swap that was acknowledged but whose value a later read does not see is lost."""
    assert_bad([put(1, "k", "a", 0, 1), cas(2, "k", "a", "b", 2, 3), get(3, "k", "a", 4, 5)])


def test_cas_refused_although_the_value_matched() -> None:
    """A cas reported as not swapped while the value was the expected one is wrong."""
    assert_bad([put(1, "k", "a", 0, 1), cas(2, "k", "a", "b", 2, 3, ok=False)])
    assert_ok([put(1, "k", "a", 0, 1), cas(2, "k", "x", "b", 2, 3, ok=False)])


def test_two_successful_cas_from_the_same_value() -> None:
    """Two swaps from the same expected value cannot both succeed, concurrent or not."""
    assert_bad([put(1, "k", "a", 0, 1), cas(2, "k", "a", "b", 2, 10), cas(3, "k", "a", "c", 3, 9)])
    assert_bad([put(1, "k", "a", 0, 1), cas(2, "k", "a", "b", 2, 3), cas(3, "k", "a", "c", 4, 5)])
    # Unless something wrote the expected value back in between.
    assert_ok([put(1, "k", "a", 0, 1), cas(2, "k", "a", "b", 2, 10), put(4, "k", "a", 3, 8),
               cas(3, "k", "a", "c", 4, 9)])


def test_unknown_write_must_explain_a_read() -> None:
    """A read of a value only an unknown put wrote is explained by that put."""
    history = [put(1, "k", "a", 0, 1), put(2, "k", "b", 2, None), get(3, "k", "b", 5, 6)]
    assert_ok(history)
    assert_bad([op for op in history if op.complete is not None])


def test_unknown_write_may_never_take_effect() -> None:
    """An unknown put may never happen: later reads of the old value are fine."""
    assert_ok([put(1, "k", "a", 0, 1), put(2, "k", "b", 2, None), get(3, "k", "a", 5, 6),
               get(3, "k", "a", 7, 8)])


def test_unknown_write_may_take_effect_late() -> None:
    """An unknown put may take effect long after its invoke, after reads of the old value."""
    assert_ok([put(1, "k", "a", 0, 1), put(2, "k", "b", 2, None), get(3, "k", "a", 5, 6),
               get(3, "k", "b", 100, 101)])


def test_unknown_write_cannot_explain_a_read_before_its_invoke() -> None:
    """An unknown put invoked after a read completed cannot explain what it read."""
    assert_bad([put(1, "k", "a", 0, 1), get(3, "k", "b", 2, 3), put(2, "k", "b", 4, None)])


def test_unknown_write_takes_effect_once() -> None:
    """An unknown put cannot take effect, be overwritten and take effect again."""
    assert_bad([put(1, "k", "a", 0, 1), put(2, "k", "b", 2, None), get(3, "k", "b", 3, 4),
                put(1, "k", "c", 5, 6), get(3, "k", "b", 7, 8)])


def test_unknown_cas_swaps_only_on_a_match() -> None:
    """An unknown cas explains a read of its value only if the expected value was there."""
    assert_ok([put(1, "k", "a", 0, 1), cas(2, "k", "a", "b", 2, None), get(3, "k", "b", 5, 6)])
    assert_bad([put(1, "k", "x", 0, 1), cas(2, "k", "a", "b", 2, None), get(3, "k", "b", 5, 6)])


def test_unknown_get_is_dropped() -> None:
    """A get with an unknown outcome tells nothing."""
    assert_ok([put(1, "k", "a", 0, 1), get(2, "k", None, 2, None), get(3, "k", "a", 5, 6)])


def test_delete_semantics() -> None:
    """Delete makes the key absent; a delete that found nothing needs the key absent."""
    assert_ok([put(1, "k", "a", 0, 1), delete(2, "k", 2, 3), get(3, "k", None, 4, 5),
               cas(1, "k", None, "b", 6, 7), delete(2, "k", 8, 9), delete(3, "k", 10, 11, ok=False)])
    assert_bad([put(1, "k", "a", 0, 1), delete(2, "k", 2, 3), get(3, "k", "a", 4, 5)])
    assert_bad([put(1, "k", "a", 0, 1), delete(2, "k", 2, 3, ok=False)])
    assert_bad([put(1, "k", "a", 0, 1), delete(2, "k", 2, 3), cas(3, "k", "a", "b", 4, 5)])
    # An unknown delete may explain a read of absent.
    assert_ok([put(1, "k", "a", 0, 1), delete(2, "k", 2, None), get(3, "k", None, 4, 5)])


def test_split_across_keys_names_the_bad_key() -> None:
    """Keys are checked apart; the report names the one bad key and shows only its ops."""
    ops = [put(1, "good", "a", 0, 1), put(2, "bad", "x", 0.5, 1.5), get(3, "good", "a", 2, 3),
           put(1, "bad", "y", 2, 3), get(2, "good", "a", 3.5, 4), get(3, "bad", "x", 4, 5)]
    result = assert_bad(ops, key="bad")
    assert result.failed_keys == ["bad"]
    assert all(op.key == "bad" for op in result.window)
    text = result.explain()
    assert "NOT linearizable" in text and "'bad'" in text
    # Times are relative to the first op of the history; the stuck op is marked.
    assert "!! p3   [+4.000000 .. +5.000000]  get('bad') -> 'x'" in text
    assert "p1   [+2.000000 .. +3.000000]  put('bad', 'y') -> ok" in text
    # Ops on one key do not constrain another.
    assert_ok([put(1, "a", "1", 0, 1), get(2, "b", None, 2, 3), get(3, "a", "1", 4, 5)])


def test_window_is_short_in_a_long_history() -> None:
    """A stale read deep in a long history is reported with a few ops around it."""
    ops = []
    for n in range(2000):
        ops.append(put(n % 3, "k", f"v{n}", 2 * n, 2 * n + 1.5))
    ops.append(get(9, "k", "v1000", 5000, 5001))
    result = assert_bad(ops)
    assert len(result.window) <= 3, result.explain()
    assert not result.window_from_start


def test_budget_gives_unknown() -> None:
    """A check that runs out of time answers unknown instead of hanging."""
    ops = [put(1, "k", f"v{n}", 2 * n, 2 * n + 1) for n in range(10000)]
    result = check(ops, budget=0)
    assert result.ok is None and result.key == "k"
    assert "unknown" in result.explain()


# -- the recorder ---------------------------------------------------------------------------


def test_history_records_completes_unknowns_and_drops_failures(tmp_path: Path) -> None:
    """complete/unknown/fail, open ops as unknown, and a JSON-lines round trip."""
    ticks = itertools.count()
    history = History(clock=lambda: float(next(ticks)))
    h1 = history.invoke(1, "put", "k", "a")
    h2 = history.invoke(2, "get", "k")
    h3 = history.invoke(3, "cas", "k", "a", expected=None)
    h4 = history.invoke(4, "delete", "k")
    h5 = history.invoke(5, "put", "k", "z")
    history.complete(h1)
    history.complete(h2, output="a")
    history.unknown(h3)
    history.fail(h4)
    ops = history.ops()
    assert [op.process for op in ops] == [1, 2, 3, 5]
    assert ops[0] == put(1, "k", "a", 0.0, 5.0)
    assert ops[1] == get(2, "k", "a", 1.0, 6.0)
    assert ops[2].unknown and ops[2].ok is None
    assert ops[3].unknown  # still open: it may have reached the cluster
    with pytest.raises(ValueError):
        history.complete(h4)  # already dropped
    with pytest.raises(ValueError):
        history.complete(h5, ok=False)  # a put is never "not ok": fail() it instead
    history.complete(h5)
    path = tmp_path / "history.jsonl"
    history.dump(path)
    loaded = History.load(path)
    assert loaded.ops() == history.ops()
    assert len(path.read_text().splitlines()) == 4


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["put", "get", "delete", "cas"]),
                          st.sampled_from(["k", "é/ü", ""]), st.sampled_from([None, "a", "\n\"x"]),
                          st.floats(0, 1e6), st.floats(0, 1e3), st.booleans(), st.booleans()),
                max_size=20))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_dump_load_round_trip(tmp_path: Path, raw: list) -> None:
    """Any valid history survives dump and load unchanged."""
    ops = []
    for p, kind, key, v, start, dur, known, ok in raw:
        value = (v or "v") if kind in ("put", "cas") else None
        complete = start + dur if known else None
        okv = None if not known else (True if kind in ("put", "get") else ok)
        output = v if known and kind == "get" else None
        expected = v if kind == "cas" else None
        ops.append(Op(process=p, kind=kind, key=key, value=value, expected=expected, invoke=start,
                      complete=complete, ok=okv, output=output))
    path = tmp_path / "h.jsonl"
    History.from_ops(ops).dump(path)
    assert History.load(path).ops() == ops


def test_op_validation() -> None:
    """Ops that make no sense are refused when built, and bad files name the line."""
    with pytest.raises(ValueError):
        Op(process=1, kind="incr", key="k", invoke=0)
    with pytest.raises(ValueError):
        Op(process=1, kind="put", key="k", invoke=0, complete=1, ok=True)  # no value
    with pytest.raises(ValueError):
        Op(process=1, kind="get", key="k", invoke=2, complete=1, ok=True)  # ends before start
    with pytest.raises(ValueError):
        Op(process=1, kind="get", key="k", invoke=0, output="a")  # unknown with an output
    history = History()
    with pytest.raises(ValueError):
        history.invoke(1, "get", "k", value="x")


def test_history_is_thread_safe() -> None:
    """Many threads recording at once lose nothing."""
    history = History()

    def client(p: int) -> None:
        for n in range(200):
            h = history.invoke(p, "put", "k", f"{p}-{n}")
            history.complete(h)

    threads = [threading.Thread(target=client, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = history.ops()
    assert len(ops) == 1600
    assert check(ops).ok is True


# -- generated histories --------------------------------------------------------------------


def simulate(rng: random.Random, n_ops: int, *, keys: tuple[str, ...] = ("a", "b", "c"),
             processes: int = 8, unknown: int = 0) -> list[Op]:
    """A history of a real register: each op takes effect at a random instant inside its
    interval (one process at a time); ``unknown`` ops lose their outcome and half of them
    never take effect."""
    plan = []
    clock = {p: rng.random() for p in range(processes)}
    for _ in range(n_ops):
        p = rng.randrange(processes)
        invoke = clock[p] + rng.random() * 0.01
        effect = invoke + rng.random() * 0.02
        clock[p] = complete = effect + rng.random() * 0.02
        plan.append((p, rng.choice(("put", "get", "get", "cas", "delete")), rng.choice(keys),
                     invoke, effect, complete))
    lost = set(rng.sample(range(n_ops), unknown))
    state: dict[str, str] = {}
    written: dict[str, list[str | None]] = {k: [None] for k in keys}
    ops = []
    for n, idx in enumerate(sorted(range(n_ops), key=lambda i: plan[i][4])):
        p, kind, key, invoke, _, complete = plan[idx]
        value = f"v{n}" if kind in ("put", "cas") else None
        expected = rng.choice(written[key][-3:] + [state.get(key)]) if kind == "cas" else None
        ok, output = True, None
        if idx not in lost or rng.random() < 0.5:
            current = state.get(key)
            if kind == "put" or (kind == "cas" and current == expected):
                state[key] = value
                written[key].append(value)
            elif kind == "delete":
                state.pop(key, None)
            ok = kind != "cas" or current == expected
            output = current if kind == "get" else None
        if idx in lost:
            ops.append(Op(process=p, kind=kind, key=key, value=value, expected=expected, invoke=invoke))
        else:
            ops.append(Op(process=p, kind=kind, key=key, value=value, expected=expected, invoke=invoke,
                          complete=complete, ok=ok, output=output))
    return sorted(ops, key=lambda op: op.invoke)


@given(st.integers(0, 2**32), st.integers(1, 120), st.integers(1, 6), st.integers(0, 4))
@settings(max_examples=150, deadline=None)
def test_generated_histories_are_linearizable(seed: int, n: int, processes: int, unknown: int) -> None:
    """Histories of a real register with overlapping intervals are always linearizable."""
    rng = random.Random(seed)
    ops = simulate(rng, n, keys=("a", "b")[: rng.randint(1, 2)], processes=processes,
                   unknown=min(unknown, n))
    assert_ok(ops)


@given(st.integers(0, 2**32), st.integers(2, 60), st.data())
@settings(max_examples=150, deadline=None)
def test_mutated_read_in_sequential_history_fails(seed: int, n: int, data: st.DataObject) -> None:
    """Changing what one read returned in a sequential history makes it non-linearizable."""
    ops = simulate(random.Random(seed), n, keys=("a",), processes=1)
    reads = [i for i, op in enumerate(ops) if op.kind == "get"]
    if not reads:
        return
    i = data.draw(st.sampled_from(reads))
    wrong = data.draw(st.sampled_from([None, "v0", "never-written"] +
                                      [op.value for op in ops if op.value is not None]))
    if wrong == ops[i].output:
        return
    ops[i] = dataclasses.replace(ops[i], output=wrong)
    result = assert_bad(ops, key="a")
    assert ops[i] in result.stuck


# -- agreement with a brute-force checker on small random histories ------------------------


def brute_force(ops: list[Op], initial: str | None = None) -> bool:
    """Try every order of every subset that holds all known ops (unknown gets dropped)."""
    ops = [op for op in ops if not (op.unknown and op.kind == "get")]
    known = [op for op in ops if not op.unknown]
    optional = [op for op in ops if op.unknown]
    for r in range(len(optional) + 1):
        for extra in itertools.combinations(optional, r):
            chosen = known + list(extra)
            for order in itertools.permutations(chosen):
                if _legal(order, initial):
                    return True
    return False


def _legal(order: tuple[Op, ...], initial: str | None) -> bool:
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            if b.complete is not None and b.complete < a.invoke:
                return False  # b finished before a started, yet comes after it
    state = initial
    for op in order:
        if op.kind == "put":
            state = op.value
        elif op.kind == "delete":
            if op.ok is False and state is not None:
                return False
            state = None
        elif op.kind == "get":
            if op.output != state:
                return False
        elif op.ok is None:
            state = op.value if state == op.expected else state
        elif op.ok != (state == op.expected):
            return False
        elif op.ok:
            state = op.value
    return True


@st.composite
def small_history(draw: st.DrawFn) -> list[Op]:
    """Up to 6 ops on one key with tiny values and integer times, so collisions abound."""
    ops = []
    for p in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["put", "get", "delete", "cas"]))
        start = draw(st.integers(0, 8))
        end = None if draw(st.integers(0, 5)) == 0 else start + draw(st.integers(0, 4))
        value = draw(st.sampled_from(["a", "b"])) if kind in ("put", "cas") else None
        expected = draw(st.sampled_from([None, "a", "b"])) if kind == "cas" else None
        ok = output = None
        if end is not None:
            ok = True if kind in ("put", "get") else draw(st.booleans())
            output = draw(st.sampled_from([None, "a", "b"])) if kind == "get" else None
        ops.append(Op(process=p, kind=kind, key="k", value=value, expected=expected,
                      invoke=float(start), complete=None if end is None else float(end),
                      ok=ok, output=output))
    return ops


@given(small_history())
@settings(max_examples=1500, deadline=None)
def test_agrees_with_brute_force(ops: list[Op]) -> None:
    """On small histories the search gives the same verdict as trying every order."""
    result = check(ops, budget=30)
    assert result.ok is brute_force(ops), result.explain()
    if result.ok is False:
        # The window alone fails; trimmed at the front, it fails from any start value.
        starts = {None} | ({op.value for op in ops if op.invoke < result.window_start}
                           if not result.window_from_start else set())
        assert not any(brute_force(result.window, s) for s in starts), result.explain()


# -- speed ----------------------------------------------------------------------------------


def test_ten_thousand_ops_in_seconds() -> None:
    """10,000 ops on 3 keys with 8 clients and a few unknown ops check in seconds, and a
    single wrong read among them is found with a short window."""
    ops = simulate(random.Random(7), 10_000, processes=8, unknown=5)
    started = time.monotonic()
    assert_ok(ops)
    reads = [i for i, op in enumerate(ops) if op.kind == "get" and not op.unknown]
    i = reads[len(reads) // 2]
    ops[i] = dataclasses.replace(ops[i], output="bogus")
    result = assert_bad(ops, key=ops[i].key)
    assert ops[i] in result.stuck and len(result.window) < 50
    assert time.monotonic() - started < 20


def test_window_start_any_value_is_not_narrowed_by_a_read() -> None:
    """A window trimmed at the front may start from any value: a cas that needs some earlier
    value may go before a read of its result, which the absent start refuses."""
    from raftcoord.chaos.checker import _fails_from_any_value, _item, _linearizable

    deadline = time.monotonic() + 10
    ops = [cas(1, "k", "x", "a", 0, 10), get(2, "k", "a", 1, 2)]
    items = [_item(i, op) for i, op in enumerate(ops)]
    assert not _linearizable(items, None, deadline)
    assert not _fails_from_any_value(items, deadline)
    stale = [put(1, "k", "a", 0, 1), put(2, "k", "b", 2, 3), get(3, "k", "a", 4, 5)]
    assert _fails_from_any_value([_item(i, op) for i, op in enumerate(stale)], deadline)
