"""Recording what clients did, for the linearizability checker.

Theory of operation
-------------------
A history is a list of :class:`Op` values, one per client operation on one key
of a register: when it was invoked, when it completed (or that its outcome is
unknown) and what it returned. One client is one sequential *process*: it
invokes its next operation only after the previous one completed or was given
up on, so a process id is enough to read a history by client.

:class:`History` is the thread-safe recorder the workload's clients share:
``invoke`` stamps the start and returns a handle; then exactly one of
``complete`` (a definite answer), ``unknown`` (timed out, connection lost,
:class:`~raftcoord.errors.UnknownOutcomeError`: it may still take effect) or
``fail`` (definitely refused, so it is dropped: it never happened). An op still
open when :meth:`History.ops` is called is reported as unknown, since the
request may have reached the cluster.

Outcomes per kind (what the checker's register model assumes):

- ``put``: ``ok=True`` (a put that was refused is ``fail``-ed instead).
- ``get``: ``ok=True``, ``output`` the value read (``None`` = key absent).
- ``delete``: ``ok=True`` deleted (whether or not the key existed);
  ``ok=False`` is allowed for a client that learnt the key was absent.
- ``cas``: ``ok=True`` swapped ``expected`` for ``value``; ``ok=False`` did not
  swap because the value differed (``expected=None`` means "key absent").

Histories are written and read as JSON lines (one op per line) so that a
failing run can be kept and re-checked later with the same checker.

The module reads the clock only through the injectable ``clock`` and does no
I/O except :meth:`History.dump` and :meth:`History.load`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["KINDS", "History", "Op"]

#: The operation kinds the register model knows.
KINDS = ("put", "get", "delete", "cas")

_FIELDS = ("process", "kind", "key", "value", "expected", "invoke", "complete", "ok", "output")


@dataclass(frozen=True, slots=True, kw_only=True)
class Op:
    """One client operation on one key; validated when built.

    ``complete=None`` means the outcome is unknown: the op may take effect at
    any time after ``invoke``, or never; then ``ok`` and ``output`` are None.
    """

    process: int
    kind: str
    key: str
    value: str | None = None
    expected: str | None = None
    invoke: float
    complete: float | None = None
    ok: bool | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.key, str):
            raise ValueError(f"key must be a str, not {type(self.key).__name__}")
        if self.kind in ("put", "cas"):
            if not isinstance(self.value, str):
                raise ValueError(f"{self.kind} needs a str value")
        elif self.value is not None:
            raise ValueError(f"{self.kind} takes no value")
        if self.kind != "cas" and self.expected is not None:
            raise ValueError(f"{self.kind} takes no expected value")
        if self.kind != "get" and self.output is not None:
            raise ValueError(f"{self.kind} has no output")
        if self.complete is None:
            if self.ok is not None or self.output is not None:
                raise ValueError("an op with unknown outcome has ok=None and output=None")
            return
        if self.complete < self.invoke:
            raise ValueError(f"op completes ({self.complete}) before it is invoked ({self.invoke})")
        if not isinstance(self.ok, bool):
            raise ValueError("a completed op needs ok=True or ok=False")
        if self.kind in ("put", "get") and not self.ok:
            raise ValueError(f"a completed {self.kind} has ok=True (drop a refused one with fail())")

    @property
    def unknown(self) -> bool:
        """True when the outcome is unknown (it may or may not have taken effect)."""
        return self.complete is None

    def call_text(self) -> str:
        """The call as text, e.g. ``cas('k', 'a' -> 'b')``."""
        if self.kind == "put":
            return f"put({self.key!r}, {self.value!r})"
        if self.kind == "cas":
            return f"cas({self.key!r}, {_val(self.expected)} -> {self.value!r})"
        return f"{self.kind}({self.key!r})"

    def result_text(self) -> str:
        """The outcome as text: the value read, swapped or not, or unknown."""
        if self.complete is None:
            return "unknown (may take effect at any time, or never)"
        if self.kind == "get":
            return _val(self.output)
        if self.kind == "cas":
            return "swapped" if self.ok else "not swapped"
        if self.kind == "delete" and not self.ok:
            return "absent"
        return "ok"

    def describe(self, t0: float = 0.0) -> str:
        """One readable line: process, times relative to ``t0``, call and result."""
        end = "?" if self.complete is None else f"{self.complete - t0:+.6f}"
        return f"p{self.process:<3} [{self.invoke - t0:+.6f} .. {end}]  {self.call_text()} -> {self.result_text()}"

    def to_json(self) -> dict[str, Any]:
        """The op as a JSON-able dict (the line format of :meth:`History.dump`)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Op":
        """Build (and validate) an op from :meth:`to_json` output."""
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown op fields {sorted(unknown)}")
        return cls(**data)


def _val(value: str | None) -> str:
    return "<absent>" if value is None else repr(value)


@dataclass(slots=True)
class _Open:
    process: int
    kind: str
    key: str
    value: str | None
    expected: str | None
    invoke: float


class History:
    """A thread-safe recorder of client operations (see the module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0
        self._open: dict[int, _Open] = {}
        # Handle order is invocation order, so ops() needs no sort for recorded histories.
        self._done: dict[int, Op] = {}

    def invoke(self, process: int, kind: str, key: str, value: str | None = None,
               expected: str | None = None) -> int:
        """Record the start of an operation; returns the handle to finish it with."""
        # Validate now, so a bad call fails at the client and not when checking.
        Op(process=process, kind=kind, key=key, value=value, expected=expected, invoke=0.0)
        with self._lock:
            handle = self._next
            self._next += 1
            self._open[handle] = _Open(process, kind, key, value, expected, self._clock())
        return handle

    def complete(self, handle: int, *, ok: bool = True, output: str | None = None) -> None:
        """Record a definite outcome (see the module docstring for ``ok`` per kind)."""
        now = self._clock()
        with self._lock:
            o = self._take(handle)
            try:
                self._done[handle] = Op(process=o.process, kind=o.kind, key=o.key, value=o.value,
                                        expected=o.expected, invoke=o.invoke, complete=now,
                                        ok=ok, output=output)
            except ValueError:
                self._open[handle] = o
                raise

    def unknown(self, handle: int) -> None:
        """Record that the outcome is unknown: it may take effect at any time, or never."""
        with self._lock:
            self._done[handle] = self._unknown_op(self._take(handle))

    def fail(self, handle: int) -> None:
        """Record that the op was definitely not applied: it is dropped from the history."""
        with self._lock:
            self._take(handle)

    def ops(self) -> list[Op]:
        """Every recorded op in invocation order; ops still open are reported as unknown."""
        with self._lock:
            merged = dict(self._done)
            merged.update((h, self._unknown_op(o)) for h, o in self._open.items())
        return [merged[h] for h in sorted(merged)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._done) + len(self._open)

    def dump(self, path: str | Path) -> None:
        """Write :meth:`ops` to ``path`` as JSON lines, one op per line."""
        lines = [json.dumps(op.to_json(), sort_keys=True) + "\n" for op in self.ops()]
        Path(path).write_text("".join(lines), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "History":
        """Read a history written by :meth:`dump`."""
        ops = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                ops.append(Op.from_json(json.loads(line)))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{n}: bad history line: {e}") from e
        return cls.from_ops(ops)

    @classmethod
    def from_ops(cls, ops: Iterable[Op]) -> "History":
        """A history holding the given finished ops (in the given order)."""
        history = cls()
        for op in ops:
            history._done[history._next] = op
            history._next += 1
        return history

    def _take(self, handle: int) -> _Open:
        try:
            return self._open.pop(handle)
        except KeyError:
            raise ValueError(f"op handle {handle} is not open (never invoked or already finished)") from None

    @staticmethod
    def _unknown_op(o: _Open) -> Op:
        return Op(process=o.process, kind=o.kind, key=o.key, value=o.value, expected=o.expected,
                  invoke=o.invoke)
