"""Proposals and read barriers: when a command handed to Raft counts as done.

:class:`Proposer` carries one command's bytes to the Raft engine until it is
committed and applied here, or until its deadline says what the caller may
assume; :class:`Barriers` turns concurrent linearizable reads into shared
barrier rounds. Both are driven by :class:`raftcoord.replica.Replica`, which
hands them the engine's ``apply`` (as ``submit``) and its own ``propose``;
neither touches the engine or the store. The hazard numbers are those of
``notes/pysyncobj-hazards.md``.

The contract of propose and read barriers
-----------------------------------------
1. **Heard back.** ``propose`` returns the store's result once the entry is
   committed *and* applied on this replica (``submit``'s callback fires after
   the apply), so a read here right after sees the write. It never waits
   longer than its own ``timeout``: pysyncobj's callbacks may never fire
   (hazard 10).
2. **No leader.** Without a leader the engine refuses at once
   (``MISSING_LEADER``; nothing waits in its queue), and ``propose`` retries
   with a short back-off until the deadline, then raises
   :class:`~raftcoord.errors.UnavailableError`. Refusals that prove the
   command was not applied (``QUEUE_FULL``, ``MISSING_LEADER``,
   ``NOT_LEADER``, ``DISCARDED``) end, at the deadline, in
   ``UnavailableError`` or :class:`~raftcoord.errors.TimeoutError`.
3. **Retried.** ``LEADER_CHANGED``, ``UNKNOWN_OUTCOME`` and an attempt that
   stays unanswered for ``retry_interval`` are ambiguous (hazard 4): the same
   bytes are proposed again, and the store's at-most-once sessions (the
   ``req`` field) turn a second application into the remembered result. If
   the deadline passes while any attempt may still apply, ``propose`` raises
   :class:`~raftcoord.errors.UnknownOutcomeError`. Commands without ``req``
   must be idempotent (a barrier is) or be proposed with
   ``retry_ambiguous=False``.
4. **Read barriers.** A linearizable read first commits a
   ``{"op": "barrier"}`` entry and waits until this replica applied it. A
   barrier commits only in the term of the leader that appended it, so a
   leader cut off from the majority cannot pass one (hazard 2). Readers that
   arrive while a barrier is in flight share the next one: any burst of
   readers costs at most two rounds.
5. **Closed.** Closing the :class:`Proposer` (the replica closed or failed)
   wakes every pending ``propose`` at once; it raises what ``check_open``
   raises, or UnavailableError.
6. **Batches.** Attempts that reach the Raft thread together share one log
   entry (:class:`Batcher`, :func:`encode_batch`): applied in the order they
   arrived, each with its own result to its own proposer. An outcome of the
   entry (a refusal, LEADER_CHANGED, no answer) is each attempt's, so points
   2 and 3 hold per command: a retry proposes the same command bytes again,
   maybe in another batch, and its session makes that at most once. A
   barrier in a batch commits in the term of the leader that appended the
   entry, like any barrier. A command may not itself begin with 0xFF:
   entries that do are framed (:data:`BATCH_MAGIC`, or a version frame of
   a later format; ``raftcoord/formats.py``), and a replica stops on framing
   it does not know rather than guess.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from pysyncobj.config import FAIL_REASON

from raftcoord.engine import Throttle
from raftcoord.errors import (
    InvalidInputError,
    NewerFormatError,
    RaftcoordError,
    TimeoutError,
    UnavailableError,
    UnknownOutcomeError,
)
from raftcoord.formats import BATCH_MAGIC, describe
from raftcoord.values import encode_cbor

__all__ = ["BARRIER", "BATCH_MAGIC", "NOT_APPLIED", "BarrierRound", "Barriers", "Batcher", "Proposal", "Proposer",
           "decode_batch", "encode_batch"]

log = logging.getLogger(__name__)

#: The command a read barrier commits; the store applies it as a no-op.
BARRIER: Final = encode_cbor({"op": "barrier"})
#: Outcomes that prove a command was not applied; any other failure
#: (LEADER_CHANGED, UNKNOWN_OUTCOME, no answer) leaves it unknown (hazard 4).
NOT_APPLIED: Final = frozenset(
    {FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER,
     FAIL_REASON.DISCARDED, FAIL_REASON.REQUEST_DENIED}
)
_REASON_NAMES: Final = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}
_BACKOFF: Final = (0.01, 0.25)  # first and longest pause between refused attempts

# BATCH_MAGIC, the first bytes of a Raft entry that carries several commands,
# lives in formats.py with the other framings. 0xFF is CBOR's "break", which
# can begin no data item, so no command a store would apply starts with it;
# ``propose`` refuses one that does.
_U32: Final = struct.Struct(">I")

#: ``submit(command, callback)``: hand ``command`` to the Raft engine, which
#: calls ``callback(result, reason)`` at most once, maybe never (hazard 10).
Submit = Callable[[bytes, Callable[[Any, int], None]], None]


class Proposal:
    """The attempts of one ``propose`` call and what came back for them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.current = 0  # the attempt being waited for
        self.pending = 0  # attempts without an answer
        self.ambiguous = False  # some attempt may have applied
        self.refused = 0  # attempts refused in a way that proves they did not apply
        self.error: int | None = None  # refusal of the current attempt
        self.result: dict[str, Any] | None = None
        self.closed = False

    def start_attempt(self) -> Callable[[Any, int], None]:
        """Begin another attempt; return the engine callback that answers it (at most once)."""
        with self.cond:
            self.current += 1
            self.pending += 1
            self.error = None
            attempt = self.current
        fired = False

        def callback(result: Any, reason: int) -> None:
            nonlocal fired
            with self.cond:
                if fired:
                    return
                fired = True
                self.pending -= 1
                if reason == FAIL_REASON.SUCCESS:
                    if self.result is None:
                        self.result = result
                elif reason not in NOT_APPLIED:
                    self.ambiguous = True
                else:
                    self.refused += 1
                if attempt == self.current and reason != FAIL_REASON.SUCCESS:
                    self.error = reason
                self.cond.notify_all()

        return callback

    @property
    def single(self) -> bool:
        """True when at most one attempt can have reached the state machine.

        Every other attempt was refused in a way that proves it did not
        apply; so a result came from the only one that may have.
        """
        with self.cond:
            return self.current - self.refused <= 1

    def wait(self, until: float) -> str | int:
        """"ok", "closed", "timeout", or the current attempt's failure code."""
        with self.cond:
            while True:
                if self.result is not None:
                    return "ok"
                if self.closed:
                    return "closed"
                if self.error is not None:
                    error, self.error = self.error, None
                    return error
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return "timeout"
                self.cond.wait(remaining)

    def close(self) -> None:
        """Wake the waiter for good: the proposal ends as "closed"."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class Proposer:
    """Runs ``propose`` calls: attempts, retries and the error at the deadline (see the module doc).

    ``submit`` hands one attempt to the engine; ``check_open`` raises when
    the owner is closed or failed (it is asked before a proposal starts and
    again when :meth:`close` ended one). ``retry_interval`` is how long an
    attempt may stay unanswered before the same bytes go again;
    ``max_command_bytes`` bounds a command.
    """

    def __init__(self, submit: Submit, *, retry_interval: float, max_command_bytes: int,
                 check_open: Callable[[], None]) -> None:
        self._submit = submit
        self._retry_interval = retry_interval
        self._max_command_bytes = max_command_bytes
        self._check_open = check_open
        self._lock = threading.Lock()  # guards _closed and _pending, which close() walks (defect 15)
        self._closed = False
        self._pending: weakref.WeakSet[Proposal] = weakref.WeakSet()
        self._giveups = Throttle(5.0)
        #: Proposals (read barriers aside) applied, and failed by error code, for metrics (under _lock).
        self.committed = 0
        self.failed: dict[str, int] = {}

    def close(self) -> None:
        """End every pending proposal now, and every later one at once. Idempotent."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)  # under the lock: propose() adds from other threads
        for p in pending:
            p.close()

    def propose(self, command: bytes, timeout: float, *, retry_ambiguous: bool = True,
                report: dict[str, Any] | None = None) -> dict[str, Any]:
        """Commit ``command``, wait until it is applied here, and return the store's result.

        Raises UnavailableError or TimeoutError when the command certainly did
        not apply, UnknownOutcomeError when it may have (see the module doc).
        Refusals that prove the command did not apply are always retried;
        with ``retry_ambiguous=False`` an ambiguous outcome is raised at once
        and an unanswered attempt is waited for until the deadline, never
        proposed twice. With ``report``, ``report["single"]`` tells on return
        whether only one attempt can have reached the state machine (so a
        refusal in the result, such as an expired session, proves the command
        was not applied by any attempt).
        """
        if command is BARRIER:  # a read, not a write: not counted
            return self._propose(command, timeout, retry_ambiguous=retry_ambiguous, report=report)
        try:
            result = self._propose(command, timeout, retry_ambiguous=retry_ambiguous, report=report)
        except RaftcoordError as exc:
            with self._lock:
                self.failed[exc.code] = self.failed.get(exc.code, 0) + 1
            raise
        with self._lock:
            self.committed += 1
        return result

    def _propose(self, command: bytes, timeout: float, *, retry_ambiguous: bool,
                 report: dict[str, Any] | None) -> dict[str, Any]:
        if not isinstance(command, (bytes, bytearray, memoryview)):
            raise InvalidInputError("a command must be bytes", field="command")
        command = bytes(command)
        if len(command) > self._max_command_bytes:
            raise InvalidInputError(f"command of {len(command)} bytes exceeds the limit of "
                                    f"{self._max_command_bytes}", field="command")
        if command[:1] == b"\xff":
            # A forged frame would be a batch, or a "newer format" entry that
            # stops every replica that applies it (formats.py).
            raise InvalidInputError("a command must not begin with 0xFF, which marks a framed log entry "
                                    "(a batch of commands or a newer entry format)", field="command")
        self._check_open()
        deadline = time.monotonic() + timeout
        p = Proposal()
        with self._lock:
            self._pending.add(p)
            if self._closed:
                p.close()
        refusal: int | None = None
        backoff = _BACKOFF[0]
        attempts = 0
        while True:
            attempts += 1
            callback = p.start_attempt()
            try:
                self._submit(command, callback)
            except Exception:  # noqa: BLE001 - e.g. the engine is being destroyed
                log.exception("handing a command to the raft engine failed")
                callback(None, FAIL_REASON.QUEUE_FULL)
            until = min(deadline, time.monotonic() + self._retry_interval) if retry_ambiguous else deadline
            outcome = p.wait(until)
            if outcome == "ok":
                return _answered(p, report)
            if outcome == "closed":
                break
            if outcome == "timeout":
                if not retry_ambiguous or time.monotonic() >= deadline:
                    break
                log.debug("attempt %d unanswered after %.1f s; proposing the same bytes again",
                          attempts, self._retry_interval)
                continue
            log.debug("attempt %d refused: %s", attempts, _REASON_NAMES.get(outcome, outcome))
            if outcome in NOT_APPLIED:
                refusal = outcome
            elif not retry_ambiguous:
                break
            pause = p.wait(min(deadline, time.monotonic() + backoff))  # a late success still counts
            if pause == "ok":
                return _answered(p, report)
            if pause == "closed" or time.monotonic() >= deadline:
                break
            backoff = min(2 * backoff, _BACKOFF[1])
        with p.cond:
            answered = p.result is not None
            maybe = p.ambiguous or p.pending > 0
        if answered:
            return _answered(p, report)
        if self._giveups():
            log.warning("gave up on a proposal after %d attempts (%s); %d more not logged", attempts,
                        "outcome unknown" if maybe else _REASON_NAMES.get(refusal, "closed"),
                        self._giveups.take())
        if maybe:
            raise UnknownOutcomeError(f"the command may or may not have been applied "
                                      f"({attempts} attempts in {timeout:g} s)")
        if p.closed:
            self._check_open()
            raise UnavailableError("the replica is closed")
        if refusal in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER):
            raise UnavailableError(f"no raft leader within {timeout:g} s; the command was not applied")
        raise TimeoutError(f"the command was not applied within {timeout:g} s "
                           f"(last refusal: {_REASON_NAMES.get(refusal, refusal)})")


def _answered(p: Proposal, report: dict[str, Any] | None) -> dict[str, Any]:
    if report is not None:
        report["single"] = p.single
    return p.result  # type: ignore[return-value]


class BarrierRound:
    """One barrier shared by the readers that joined it before it started."""

    def __init__(self) -> None:
        self.deadline = 0.0
        self.waiters = 0
        self.done = threading.Event()
        self.error: RaftcoordError | None = None


class Barriers:
    """Read barriers shared by concurrent readers, committed by a thread of their own.

    ``propose(command, timeout)`` commits a command and returns once it is
    applied here (:meth:`Proposer.propose`). Call :meth:`start` once, and
    :meth:`close` to stop the thread.
    """

    def __init__(self, propose: Callable[[bytes, float], Any], *, name: str) -> None:
        self._propose = propose
        self._cond = threading.Condition()
        self._next: BarrierRound | None = None  # the round new readers join; not yet started
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def waiting(self) -> int:
        """How many readers wait for the next round (not the one in flight)."""
        with self._cond:
            return 0 if self._next is None else self._next.waiters

    def start(self) -> None:
        """Start the thread that commits the barriers."""
        self._thread.start()

    def wait(self, timeout: float) -> None:
        """Return once a barrier that started after this call is applied here.

        Raises TimeoutError if that does not happen in ``timeout`` seconds,
        or what the barrier's proposal raised.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            rnd = self._next
            if rnd is None:
                rnd = self._next = BarrierRound()
                self._cond.notify_all()
            rnd.deadline = max(rnd.deadline, deadline)
            rnd.waiters += 1
        if not rnd.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"read barrier not applied within {timeout:g} s")
        if rnd.error is not None:
            raise rnd.error

    def close(self) -> None:
        """Stop the thread once the round in flight ended; wait for it (unless called on it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next is None and not self._closed:
                    self._cond.wait()
                rnd, self._next = self._next, None
            if rnd is None:
                return
            try:
                self._propose(BARRIER, max(0.0, rnd.deadline - time.monotonic()))
            except UnknownOutcomeError as exc:
                rnd.error = TimeoutError(f"read barrier not applied in time: {exc.message}")
            except RaftcoordError as exc:
                rnd.error = exc
            rnd.done.set()


# --------------------------------------------------------------------------
# Batches: many commands in one Raft entry.


def encode_batch(commands: Sequence[bytes]) -> bytes:
    """One Raft entry carrying ``commands``, applied in order: the marker, a count, then each length-prefixed."""
    parts = [BATCH_MAGIC, _U32.pack(len(commands))]
    for command in commands:
        parts.append(_U32.pack(len(command)))
        parts.append(command)
    return b"".join(parts)


def decode_batch(entry: bytes) -> list[bytes] | None:
    """The commands of a batch entry, or None when ``entry`` is not a well-formed batch.

    Not one: a plain command (every entry before batching, and any command
    alone), or a frame that does not parse, which the caller applies as one
    command: the store refuses it as it refused such bytes before batching.
    A well-formed batch holding a command that begins with 0xFF (a frame:
    this code puts none in a batch, so a later format did) raises
    NewerFormatError, as ``formats.check_entry`` does for a whole entry.
    """
    if not entry.startswith(BATCH_MAGIC) or len(entry) < len(BATCH_MAGIC) + 4:
        return None
    pos = len(BATCH_MAGIC)
    (count,) = _U32.unpack_from(entry, pos)
    pos += 4
    if not count or count > (len(entry) - pos) // 4:
        return None
    out: list[bytes] = []
    framed: int | None = None  # where the first command that begins with 0xFF starts
    for _ in range(count):
        if pos + 4 > len(entry):
            return None
        (size,) = _U32.unpack_from(entry, pos)
        pos += 4
        if pos + size > len(entry):
            return None
        if size and entry[pos] == 0xFF and framed is None:
            framed = pos
        out.append(entry[pos:pos + size])
        pos += size
    if pos != len(entry):
        return None
    if framed is not None:
        raise NewerFormatError(f"a command in a batch: {describe(entry[framed:framed + 8])}", field="entry")
    return out


class Batcher:
    """Commands waiting for the Raft thread, handed to the engine as few entries as the bounds allow.

    Proposers :meth:`add` a command with its attempt's callback from any
    thread; the Raft thread :meth:`take`s what arrived since its last tick,
    grouped in arrival order into entries of at most ``max_commands``
    commands and ``max_bytes`` bytes (a command larger than that goes alone).
    An entry of one command is that command's own bytes, as before batching;
    a larger one is framed (:func:`encode_batch`), its result is the list of
    the commands' results, and its callback hands each proposer its own.
    A refusal or an ambiguous outcome of the entry is every command's.
    """

    def __init__(self, *, max_commands: int, max_bytes: int, max_waiting: int) -> None:
        self._queue: deque[tuple[bytes, Callable[[Any, int], None]]] = deque()
        self._max_commands = max_commands
        self._max_bytes = max_bytes
        self._max_waiting = max_waiting

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, command: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue one attempt; refuse it at once (QUEUE_FULL) past ``max_waiting``."""
        if len(self._queue) >= self._max_waiting:
            callback(None, FAIL_REASON.QUEUE_FULL)
            return
        self._queue.append((command, callback))  # deque.append is atomic: no lock needed

    def take(self) -> list[tuple[bytes, Callable[[Any, int], None]]]:
        """Raft thread: the waiting commands as ``(entry, callback)`` pairs, in order."""
        out: list[tuple[bytes, Callable[[Any, int], None]]] = []
        commands: list[bytes] = []
        callbacks: list[Callable[[Any, int], None]] = []
        size = len(BATCH_MAGIC) + 4
        queue = self._queue
        while queue:
            command, callback = queue.popleft()
            if commands and (len(commands) >= self._max_commands or size + 4 + len(command) > self._max_bytes):
                out.append(_entry(commands, callbacks))
                commands, callbacks, size = [], [], len(BATCH_MAGIC) + 4
            commands.append(command)
            callbacks.append(callback)
            size += 4 + len(command)
        if commands:
            out.append(_entry(commands, callbacks))
        return out

    def refuse_all(self, reason: int) -> None:
        """Answer every waiting command with ``reason`` (one that proves it did not apply)."""
        while self._queue:
            _command, callback = self._queue.popleft()
            callback(None, reason)


def _entry(commands: list[bytes], callbacks: list[Callable[[Any, int], None]],
           ) -> tuple[bytes, Callable[[Any, int], None]]:
    if len(commands) == 1:
        return commands[0], callbacks[0]
    return encode_batch(commands), _fan_out(callbacks)


def _fan_out(callbacks: list[Callable[[Any, int], None]]) -> Callable[[Any, int], None]:
    def callback(result: Any, reason: int) -> None:
        if reason != FAIL_REASON.SUCCESS:
            results: Sequence[Any] = [None] * len(callbacks)
        elif isinstance(result, list) and len(result) == len(callbacks):
            results = result
        else:  # a frame the store refused whole (it never is, unless damaged): each command's answer
            results = [result] * len(callbacks)
        for cb, res in zip(callbacks, results):
            try:
                cb(res, reason)
            except Exception:  # noqa: BLE001 - one proposer's callback must not cost the others theirs
                log.exception("a proposal callback failed")

    return callback
