"""The watch history: the last revisions' key changes, kept in the replicated state.

A watch that starts from a past revision, or resumes after a leader change,
replays :class:`~raftcoord.events.Change` values from here, so every replica
must agree on what is kept and what is compacted: the history is part of the
store's state and of its snapshots, and trimming depends only on the changes
applied, never on a clock or on when a snapshot was taken.

Bounds: at most ``max_revisions`` changes and ``max_bytes`` bytes (the sum of
key, value and previous value lengths of their events); the oldest changes go
first, and the newest change is always kept, however large. ``compact_revision``
is the oldest revision a watch may start from.

Cost: recording a change is O(its events) amortized (trimming advances a head
index; the dead prefix of the list is cut off once it is half of it), and
:meth:`History.changes` is O(log n + k) by bisection. Like the store, this
module does no I/O, reads no clock and draws no random number.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from operator import attrgetter
from typing import Any, Final

from raftcoord.errors import CompactedError, ValueFormatError
from raftcoord.events import Change, Event, KeyDeleted, KeyEvent, KeyPut, KeyValue
from raftcoord.keys import MAX_CLOCK

__all__ = ["HISTORY_BYTES", "HISTORY_REVISIONS", "History"]

#: Default bounds (the Store's class attributes; the README states them).
HISTORY_REVISIONS: Final = 10_000
HISTORY_BYTES: Final = 16 * 1024 * 1024

_PUT: Final = 0
_DELETE: Final = 1
_revision_of = attrgetter("revision")


def _size(event: KeyEvent) -> int:
    if isinstance(event, KeyPut):
        return len(event.kv.key) + len(event.kv.value) + (0 if event.prev is None else len(event.prev.value))
    return len(event.key) + len(event.prev.value)


class History:
    """The bounded, ordered list of changes. See the module docstring."""

    def __init__(self, *, max_revisions: int = HISTORY_REVISIONS, max_bytes: int = HISTORY_BYTES, compact_revision: int = 1) -> None:
        self._max_revisions = max(1, max_revisions)
        self._max_bytes = max_bytes
        # Slots before _head are dropped changes (None): trimming from the
        # left is O(1) and the list stays indexable for bisection.
        self._changes: list[Change | None] = []
        self._sizes: list[int] = []
        self._head = 0
        self._bytes = 0
        self._compact_revision = compact_revision

    @property
    def compact_revision(self) -> int:
        """The oldest revision a watch may start from."""
        return self._compact_revision

    @property
    def size_bytes(self) -> int:
        """Key, value and previous value bytes of the changes kept."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._changes) - self._head

    def record(self, revision: int, events: Iterable[Event]) -> None:
        """Keep the key events of ``revision`` (a revision after every kept one)."""
        kept = tuple(e for e in events if isinstance(e, (KeyPut, KeyDeleted)))
        if not kept:
            return
        self._append(Change(revision, kept))
        self._trim()

    def _append(self, change: Change) -> None:
        size = sum(_size(e) for e in change.events)
        self._changes.append(change)
        self._sizes.append(size)
        self._bytes += size

    def _trim(self) -> None:
        while len(self) > 1 and (len(self) > self._max_revisions or self._bytes > self._max_bytes):
            dropped = self._changes[self._head]
            assert dropped is not None
            self._changes[self._head] = None
            self._bytes -= self._sizes[self._head]
            self._head += 1
            self._compact_revision = dropped.revision + 1
        if self._head > 64 and 2 * self._head > len(self._changes):
            del self._changes[: self._head]
            del self._sizes[: self._head]
            self._head = 0

    def changes(self, start_revision: int, *, limit: int = 0) -> list[Change]:
        """Kept changes with revision >= ``start_revision``, at most ``limit`` (0: all).

        Raises :class:`CompactedError` (with ``compact_revision``) when
        ``start_revision`` is below :attr:`compact_revision`.
        """
        if start_revision < self._compact_revision:
            raise CompactedError(
                f"revision {start_revision} is compacted; the oldest revision a watch may start from "
                f"is {self._compact_revision}",
                field="start_revision",
                compact_revision=self._compact_revision,
            )
        i = bisect_left(self._changes, start_revision, lo=self._head, key=_revision_of)
        j = len(self._changes) if limit <= 0 else min(len(self._changes), i + limit)
        return self._changes[i:j]  # type: ignore[return-value]

    # ------------------------------------------------------------ snapshots

    def to_snapshot(self) -> list[Any]:
        """The kept changes as plain CBOR-able lists (see :meth:`load`)."""
        out = []
        for change in self._changes[self._head :]:
            assert change is not None
            out.append([change.revision, [_encode_event(e) for e in change.events]])
        return out

    @classmethod
    def load(
        cls, items: Any, *, compact_revision: Any, revision: int, max_revisions: int = HISTORY_REVISIONS, max_bytes: int = HISTORY_BYTES
    ) -> History:
        """A history from :meth:`to_snapshot` data; raises ValueFormatError naming what is wrong.

        ``revision`` is the store's revision: no change may be newer, and
        ``compact_revision`` may be at most one past it.
        """
        compact = _uint(compact_revision, "compact_revision")
        if not 1 <= compact <= revision + 1:
            raise ValueFormatError(f"snapshot compact_revision {compact} is not in 1-{revision + 1}", field="compact_revision")
        if not isinstance(items, list):
            raise ValueFormatError("snapshot history must be a list", field="history")
        history = cls(max_revisions=max_revisions, max_bytes=max_bytes, compact_revision=compact)
        last = compact - 1
        for item in items:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list) or not item[1]:
                raise ValueFormatError("each history entry must be [revision, [event, ...]]", field="history")
            rev = _uint(item[0], "history revision")
            if not last < rev <= revision:
                raise ValueFormatError(
                    f"history revision {rev} is out of order or outside {compact}-{revision}", field="history"
                )
            history._append(Change(rev, tuple(_decode_event(e, rev) for e in item[1])))
            last = rev
        history._trim()
        return history


def _kv_list(kv: KeyValue) -> list[Any]:
    return [kv.value, kv.create_revision, kv.mod_revision, kv.version]


def _encode_event(event: KeyEvent) -> list[Any]:
    # The key and the change's revision (the put's mod revision, the
    # deletion's revision) are not repeated.
    if isinstance(event, KeyPut):
        kv = event.kv
        prev = None if event.prev is None else _kv_list(event.prev)
        return [_PUT, kv.key, kv.value, kv.create_revision, kv.version, prev]
    return [_DELETE, event.key, _kv_list(event.prev)]


def _uint(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK:
        raise ValueFormatError(f"snapshot {name} must be a uint64, got {v!r}", field="history")
    return v


def _bytes(v: Any, name: str) -> bytes:
    if not isinstance(v, bytes):
        raise ValueFormatError(f"snapshot history {name} must be bytes", field="history")
    return v


def _prev(key: bytes, v: Any, revision: int) -> KeyValue:
    if not isinstance(v, list) or len(v) != 4:
        raise ValueFormatError("a history previous record must be [value, create, mod, version]", field="history")
    value, create, mod, version = _bytes(v[0], "value"), _uint(v[1], "create"), _uint(v[2], "mod"), _uint(v[3], "version")
    if not (create <= mod < revision and version >= 1):
        raise ValueFormatError(f"a history previous record of revision {revision} is inconsistent", field="history")
    return KeyValue(key, value, create, mod, version)


def _decode_event(e: Any, revision: int) -> KeyEvent:
    if not isinstance(e, list) or not e or type(e[0]) is not int or e[0] not in (_PUT, _DELETE):
        raise ValueFormatError("a history event must be a list starting with 0 (put) or 1 (delete)", field="history")
    if e[0] == _PUT:
        if len(e) != 6:
            raise ValueFormatError("a history put must be [0, key, value, create, version, prev]", field="history")
        key, value = _bytes(e[1], "key"), _bytes(e[2], "value")
        create, version = _uint(e[3], "create"), _uint(e[4], "version")
        if not (1 <= create <= revision and version >= 1):
            raise ValueFormatError(f"a history put of revision {revision} is inconsistent", field="history")
        prev = None if e[5] is None else _prev(key, e[5], revision)
        return KeyPut(KeyValue(key, value, create, revision, version), prev)
    if len(e) != 3:
        raise ValueFormatError("a history delete must be [1, key, prev]", field="history")
    key = _bytes(e[1], "key")
    return KeyDeleted(key, revision, _prev(key, e[2], revision))
