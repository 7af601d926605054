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
from collections.abc import Callable, Iterable
from typing import Any, Final

from raftcoord.errors import CompactedError, ValueFormatError
from raftcoord.events import Change, KeyDeleted, KeyEvent, KeyPut
from raftcoord.keys import MAX_CLOCK
from raftcoord.kvmap import META_SIZE, pack_record, record_kv, record_meta

__all__ = ["HISTORY_BYTES", "HISTORY_REVISIONS", "History", "KeyChange"]

#: Default bounds (the Store's class attributes; the README states them).
HISTORY_REVISIONS: Final = 10_000
HISTORY_BYTES: Final = 16 * 1024 * 1024

_PUT: Final = 0
_DELETE: Final = 1

#: One key change as the history keeps it: (key, the new record or None when
#: the key was deleted, the record before or None when it was created), with
#: records as the store's map holds them (``raftcoord.kvmap``). Records are
#: immutable and shared with the map, so a kept change costs a tuple, not
#: event objects and a copy of the value (issue 9); :meth:`History.changes`
#: builds the events when a watch reads them.
KeyChange = tuple[bytes, "bytes | None", "bytes | None"]


def _size(change: KeyChange) -> int:
    key, rec, prev = change
    return len(key) + (0 if rec is None else len(rec) - META_SIZE) + (0 if prev is None else len(prev) - META_SIZE)


def _event(change: KeyChange, revision: int) -> KeyEvent:
    key, rec, prev = change
    if rec is None:
        assert prev is not None
        return KeyDeleted(key, revision, record_kv(key, prev))
    return KeyPut(record_kv(key, rec), None if prev is None else record_kv(key, prev))


class History:
    """The bounded, ordered list of changes. See the module docstring."""

    def __init__(self, *, max_revisions: int = HISTORY_REVISIONS, max_bytes: int = HISTORY_BYTES, compact_revision: int = 1) -> None:
        self._max_revisions = max(1, max_revisions)
        self._max_bytes = max_bytes
        # Slots before _head are dropped revisions (their changes None):
        # trimming from the left is O(1) and _revisions stays bisectable.
        self._revisions: list[int] = []
        self._changes: list[tuple[KeyChange, ...] | None] = []
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

    def record(self, revision: int, changes: Iterable[KeyChange]) -> None:
        """Keep the key changes of ``revision`` (a revision after every kept one)."""
        kept = tuple(changes)
        if not kept:
            return
        self._append(revision, kept)
        self._trim()

    def _append(self, revision: int, changes: tuple[KeyChange, ...]) -> None:
        size = sum(map(_size, changes))
        self._revisions.append(revision)
        self._changes.append(changes)
        self._sizes.append(size)
        self._bytes += size

    def _trim(self) -> None:
        while len(self) > 1 and (len(self) > self._max_revisions or self._bytes > self._max_bytes):
            self._changes[self._head] = None
            self._bytes -= self._sizes[self._head]
            self._compact_revision = self._revisions[self._head] + 1
            self._head += 1
        if self._head > 64 and 2 * self._head > len(self._changes):
            del self._revisions[: self._head]
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
        i = bisect_left(self._revisions, start_revision, lo=self._head)
        j = len(self._changes) if limit <= 0 else min(len(self._changes), i + limit)
        revisions, changes = self._revisions, self._changes
        return [Change(revisions[k], tuple(_event(c, revisions[k]) for c in changes[k])) for k in range(i, j)]  # type: ignore[union-attr]

    # ------------------------------------------------------------ snapshots

    def to_snapshot(self) -> list[Any]:
        """The kept changes as CBOR-able data: ``[revision, [[key, record, previous], ...]]``.

        Records as the store holds them (``raftcoord.kvmap``; None when the key
        was deleted, or had no previous record): no per-change work beyond a
        reference (snapshot format 4; formats 3 and earlier are still loaded).
        """
        revisions, changes = self._revisions, self._changes
        return [[revisions[k], changes[k]] for k in range(self._head, len(changes))]

    @classmethod
    def load(
        cls,
        items: Any,
        *,
        compact_revision: Any,
        revision: int,
        max_revisions: int = HISTORY_REVISIONS,
        max_bytes: int = HISTORY_BYTES,
        records: bool = True,
        current: Callable[[bytes], bytes | None] | None = None,
    ) -> History:
        """A history from :meth:`to_snapshot` data; raises ValueFormatError naming what is wrong.

        ``revision`` is the store's revision: no change may be newer, and
        ``compact_revision`` may be at most one past it. ``records=False``
        reads the event lists of snapshot format 3. ``current`` gives a key's
        record in the restored map: an equal record is shared, not kept twice.
        """
        compact = _uint(compact_revision, "compact_revision")
        if not 1 <= compact <= revision + 1:
            raise ValueFormatError(f"snapshot compact_revision {compact} is not in 1-{revision + 1}", field="compact_revision")
        if not isinstance(items, list):
            raise ValueFormatError("snapshot history must be a list", field="history")
        history = cls(max_revisions=max_revisions, max_bytes=max_bytes, compact_revision=compact)
        decode = _decode_records if records else _decode_change
        # The last record seen per key: a later change's previous record is
        # the same bytes, and is kept once, as it was before the snapshot.
        latest: dict[bytes, bytes] = {}
        last = compact - 1
        for item in items:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list) or not item[1]:
                raise ValueFormatError("each history entry must be [revision, [event, ...]]", field="history")
            rev = _uint(item[0], "history revision")
            if not last < rev <= revision:
                raise ValueFormatError(
                    f"history revision {rev} is out of order or outside {compact}-{revision}", field="history"
                )
            changes = []
            for e in item[1]:
                key, rec, prev = decode(e, rev)
                if prev is not None and latest.get(key) == prev:
                    prev = latest[key]
                if rec is not None:
                    # Only a key's newest record can equal the map's.
                    now = None if current is None else current(key)
                    if now is not None and now == rec:
                        rec = now
                    latest[key] = rec
                changes.append((key, rec, prev))
            history._append(rev, tuple(changes))
            last = rev
        history._trim()
        return history


def _decode_records(e: Any, revision: int) -> KeyChange:
    if not isinstance(e, list) or len(e) != 3:
        raise ValueFormatError("a history change must be [key, record, previous record]", field="history")
    key, rec, prev = e
    if type(key) is not bytes:
        raise ValueFormatError("snapshot history key must be bytes", field="history")
    if rec is None and prev is None:
        raise ValueFormatError("a history change needs a record or a previous record", field="history")
    if rec is not None:
        create, mod, version = _record(rec)
        if not (1 <= create <= revision and mod == revision and version >= 1):
            raise ValueFormatError(f"a history put of revision {revision} is inconsistent", field="history")
    if prev is not None:
        create, mod, version = _record(prev)
        if not (create <= mod < revision and version >= 1):
            raise ValueFormatError(f"a history previous record of revision {revision} is inconsistent", field="history")
    return (key, rec, prev)


def _record(rec: Any) -> tuple[int, int, int]:
    if type(rec) is not bytes or len(rec) < META_SIZE:
        raise ValueFormatError(f"a history record must be bytes of at least {META_SIZE}", field="history")
    return record_meta(rec)


def _uint(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLOCK:
        raise ValueFormatError(f"snapshot {name} must be a uint64, got {v!r}", field="history")
    return v


def _bytes(v: Any, name: str) -> bytes:
    if not isinstance(v, bytes):
        raise ValueFormatError(f"snapshot history {name} must be bytes", field="history")
    return v


def _prev(v: Any, revision: int) -> bytes:
    if not isinstance(v, list) or len(v) != 4:
        raise ValueFormatError("a history previous record must be [value, create, mod, version]", field="history")
    value, create, mod, version = _bytes(v[0], "value"), _uint(v[1], "create"), _uint(v[2], "mod"), _uint(v[3], "version")
    if not (create <= mod < revision and version >= 1):
        raise ValueFormatError(f"a history previous record of revision {revision} is inconsistent", field="history")
    return pack_record(value, create, mod, version)


def _decode_change(e: Any, revision: int) -> KeyChange:
    if not isinstance(e, list) or not e or type(e[0]) is not int or e[0] not in (_PUT, _DELETE):
        raise ValueFormatError("a history event must be a list starting with 0 (put) or 1 (delete)", field="history")
    if e[0] == _PUT:
        if len(e) != 6:
            raise ValueFormatError("a history put must be [0, key, value, create, version, prev]", field="history")
        key, value = _bytes(e[1], "key"), _bytes(e[2], "value")
        create, version = _uint(e[3], "create"), _uint(e[4], "version")
        if not (1 <= create <= revision and version >= 1):
            raise ValueFormatError(f"a history put of revision {revision} is inconsistent", field="history")
        prev = None if e[5] is None else _prev(e[5], revision)
        return (key, pack_record(value, create, revision, version), prev)
    if len(e) != 3:
        raise ValueFormatError("a history delete must be [1, key, prev]", field="history")
    return (_bytes(e[1], "key"), None, _prev(e[2], revision))
