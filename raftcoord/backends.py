"""What a coordinator sends its commands through: the Backend protocol, and one in memory.

A :class:`Backend` is the replication layer below a coordinator: it commits
proposed command bytes, applies them to its store, answers reads at a chosen
consistency, opens one-revision :class:`Reader` views, and tells listeners
about every applied command in log order. Two implement it: the Raft replica
(``replica.py``) and :class:`MemoryBackend` here, one store behind a lock in
this process, for tests and for trying the API out.

This module knows nothing of the coordinator above it; the coordinator takes
a backend as its first argument.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal, Protocol, TypeVar

from raftcoord.errors import UnavailableError
from raftcoord.store import Applied, Store
from raftcoord.txn import Reader

__all__ = ["CONSISTENCIES", "Backend", "Consistency", "MemoryBackend", "Reader"]

T = TypeVar("T")
Consistency = Literal["linearizable", "serializable"]
CONSISTENCIES = ("linearizable", "serializable")


class Backend(Protocol):
    """What a coordinator needs from the replication layer below it.

    A backend may set ``proposes_once = True`` to promise that ``propose``
    hands the bytes to the state machine at most once per call (no internal
    retry); the coordinator then knows that a request refused for an expired
    session never applied, and sends it again under a new session. A backend
    that retries internally may instead set ``reports_attempts = True`` and
    accept ``propose(..., report=dict)``, setting ``report["single"]`` to
    whether only one attempt can have reached the state machine, which
    tells the coordinator the same for that one call.
    """

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Commit ``command``, apply it locally, return the store's result."""

    def read(self, fn: Callable[[Store], T], *, consistency: Consistency, timeout: float) -> T:
        """Run ``fn`` on the local store, after a read barrier if linearizable.

        ``fn`` runs while no command is being applied, so what it sees is one
        revision, and a listener added inside it misses nothing.
        """

    def read_view(self, *, consistency: Consistency, timeout: float) -> AbstractContextManager[Reader]:
        """A reader of one revision (after a read barrier if linearizable).

        The reader answers as of one revision for as long as the context is
        open, and holds the replica's state lock only briefly at a time, so
        a large read never keeps the Raft thread from applying or sending
        heartbeats.
        """

    def add_listener(self, listener: Callable[[Applied], None]) -> None:
        """Call ``listener`` for each applied command, in log order, quickly."""

    def status(self) -> dict[str, Any]:
        """The replica's view of the cluster, for status commands."""

    def close(self) -> None:
        """Stop; further calls raise :class:`UnavailableError`."""


class MemoryBackend:
    """A single-process backend: one store behind a lock, no replication.

    Used by :meth:`Coordinator.memory`, in tests, and to try the API out.
    """

    #: ``propose`` applies the bytes exactly once: there is no retry to hide.
    proposes_once = True

    def __init__(self, store: Store | None = None) -> None:
        self.store = store if store is not None else Store()
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Applied], None]] = []
        self._closed = False

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Apply ``command`` at once; there is nobody to agree with."""
        with self._lock:
            self._check_open()
            applied = self.store.apply(command)
            for listener in self._listeners:
                listener(applied)
            return applied.result

    def read(self, fn: Callable[[Store], T], *, consistency: Consistency, timeout: float) -> T:
        """Run ``fn`` on the store; both consistencies are the same here."""
        with self._lock:
            self._check_open()
            return fn(self.store)

    @contextmanager
    def read_view(self, *, consistency: Consistency, timeout: float) -> Iterator[Reader]:
        """The store itself, under the lock for the whole view.

        There is no Raft thread to starve here: holding the lock only keeps
        other callers of this backend waiting.
        """
        with self._lock:
            self._check_open()
            yield self.store

    def add_listener(self, listener: Callable[[Applied], None]) -> None:
        """Register ``listener``; it runs under the store lock, in apply order."""
        with self._lock:
            self._listeners.append(listener)

    def status(self) -> dict[str, Any]:
        """A one-member cluster that is always its own leader."""
        with self._lock:
            return {
                "backend": "memory",
                "role": "leader",
                "term": 1,
                "leader": "memory",
                "commit_index": self.store.applied,
                "last_applied": self.store.applied,
                "revision": self.store.revision,
                "clock": self.store.clock,
            }

    def close(self) -> None:
        """Refuse further calls."""
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the coordinator is closed")
