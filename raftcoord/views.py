"""Consistent chunked reads: answers as of one revision, the state lock taken per chunk.

Theory of operation
-------------------
A read that builds its whole answer under the replica's state lock holds the
Raft thread for as long as it takes (a full range of 100,000 keys: half a
second, past an election timeout). A :class:`ReadView` answers ``get``,
``range`` and ``revision`` as of the revision ``R`` it was opened at, while
taking the lock only for one chunk of about a thousand keys at a time; the Raft
thread applies commands between chunks.

It stays at ``R`` through *pre-images*. While a view is open, the apply path
calls :meth:`ViewRegistry.record` (under the state lock) with each command's
events; for every key an event touches, each open view remembers the key's
value before the change (``prev``, or None if the key did not exist) the first
time that key changes after ``R``. At any instant, then, the state at ``R`` is:

    state_R(k) = pre[k] if k in pre else current(k)

A chunk is computed under the lock from the store's current keys in an
interval of the range plus the pre-images in that same interval, so each chunk
is exact, and the intervals of successive chunks partition the range. Keys
created after ``R`` are hidden (their pre-image is None), keys deleted or
changed after ``R`` are shown as they were. ``count`` is the store's count now
adjusted by the pre-images in the range.

Bounds: at most ``max_views`` views are open at once (more wait, then get
:class:`~raftcoord.errors.UnavailableError`), and each view keeps at most
``max_preimages`` pre-images and ``max_preimage_bytes`` of keys and values; a
view that passes either bound stops recording and its next read fails with a
retryable UnavailableError (too many writes during one long read). A view is
also ended when the store is replaced (a snapshot from the leader).

Fairness: the state lock is a :class:`PriorityLock`, which the apply path
takes with ``first()``; however many readers there are, it waits for at most
about two chunks.

This module owns no thread and does no I/O; the replica passes its state lock
and a way to reach its current store.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Final

from sortedcontainers import SortedDict

from raftcoord.errors import UnavailableError
from raftcoord.events import KeyDeleted, KeyPut, KeyValue, RangeResult

if TYPE_CHECKING:
    from raftcoord.store import Store

__all__ = ["PriorityLock", "ReadView", "ViewRegistry"]

#: Keys per chunk: a few milliseconds of the state lock.
CHUNK_KEYS: Final = 1000
MAX_VIEWS: Final = 64
MAX_PREIMAGES: Final = 100_000
MAX_PREIMAGE_BYTES: Final = 64 * 1024 * 1024
_KV_OVERHEAD: Final = 64  # rough bytes of a KeyValue beyond its key and value


class PriorityLock:
    """A reentrant lock that lets a waiting priority holder (the Raft thread) in first.

    Python's locks are not fair: with many readers taking the lock a chunk at
    a time, one of them nearly always holds it, and the apply path could wait
    for many chunks in a row (measured: 0.5 s with 64 readers). Here at most
    one ordinary acquirer at a time waits on the lock itself (the others
    queue before it), and none starts waiting while a priority acquirer
    (:meth:`first`) does, so the priority holder waits for at most the chunk
    being read and one more. A thread that already holds the lock re-enters
    it at once, whatever waits.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0
        self._first_waiting = 0
        self._cond = threading.Condition(threading.Lock())
        self._queue = threading.Lock()  # held by the one ordinary acquirer waiting on _lock

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock, after any priority acquirer already waiting for it."""
        me = threading.get_ident()
        if self._owner == me:
            return self._take(me)
        deadline = None if timeout < 0 else time.monotonic() + timeout

        def left() -> float:
            return -1 if deadline is None else max(0.0, deadline - time.monotonic())

        if not self._queue.acquire(blocking, left()):
            return False
        try:
            if self._first_waiting:
                if not blocking:
                    return False
                with self._cond:
                    if not self._cond.wait_for(lambda: not self._first_waiting, None if deadline is None else left()):
                        return False
            return self._take(me, blocking, left())
        finally:
            self._queue.release()

    def _take(self, me: int, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        self._owner = me
        self._depth += 1
        return True

    def release(self) -> None:
        """Release one level of the lock."""
        self._depth -= 1
        if not self._depth:
            self._owner = None
        self._lock.release()

    def __enter__(self) -> PriorityLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        """Hold the lock, going before ordinary acquirers that have not got it yet."""
        with self._cond:
            self._first_waiting += 1
        try:
            self._take(threading.get_ident())
        finally:
            with self._cond:
                self._first_waiting -= 1
                if not self._first_waiting:
                    self._cond.notify_all()
        try:
            yield
        finally:
            self.release()


class ViewRegistry:
    """The open views of one store, fed by the apply path.

    ``lock`` is the lock the apply path holds while it changes the store and
    calls :meth:`record`; ``store`` returns the current store (it may be
    replaced, see :meth:`invalidate`); ``check`` runs under the lock before
    each chunk and may raise (e.g. the replica was closed or failed).
    """

    def __init__(
        self,
        lock: PriorityLock | threading.RLock,
        store: Callable[[], Store],
        *,
        check: Callable[[], None] | None = None,
        max_views: int = MAX_VIEWS,
        max_preimages: int = MAX_PREIMAGES,
        max_preimage_bytes: int = MAX_PREIMAGE_BYTES,
        chunk_keys: int = CHUNK_KEYS,
    ) -> None:
        if max_views < 1 or max_preimages < 1 or max_preimage_bytes < 1 or chunk_keys < 1:
            raise ValueError("view bounds must be positive")
        self.lock = lock
        self.store = store
        self.check = check
        self.max_views = max_views
        self.max_preimages = max_preimages
        self.max_preimage_bytes = max_preimage_bytes
        self.chunk_keys = chunk_keys
        self._slots = threading.BoundedSemaphore(max_views)
        self._views: list[ReadView] = []  # changed only under `lock`

    @property
    def active(self) -> int:
        """How many views are open."""
        return len(self._views)

    def open(self, timeout: float) -> ReadView:
        """Open a view at the store's current revision; close it when done.

        Waits up to ``timeout`` seconds for a free slot, then raises
        UnavailableError.
        """
        if not self._slots.acquire(timeout=max(0.0, timeout)):
            raise UnavailableError(f"too many reads in progress ({self.max_views}); try again")
        try:
            with self.lock:
                if self.check is not None:
                    self.check()
                view = ReadView(self, self.store().revision)
                self._views = [*self._views, view]
            return view
        except BaseException:
            self._slots.release()
            raise

    def record(self, events: Iterable[object]) -> None:
        """Keep the pre-images of the keys ``events`` changed (caller holds the lock)."""
        views = self._views
        if not views:
            return
        for ev in events:
            if type(ev) is KeyPut:
                key, prev = ev.kv.key, ev.prev
            elif type(ev) is KeyDeleted:
                key, prev = ev.key, ev.prev
            else:
                continue
            for view in views:
                view._note(key, prev)

    def invalidate(self, reason: str) -> None:
        """End every open view: the store changed without events (caller holds the lock)."""
        for view in self._views:
            view._fail(UnavailableError(f"the read was interrupted: {reason}; try again"))

    def _close(self, view: ReadView) -> None:
        with self.lock:
            if view not in self._views:
                return
            self._views = [v for v in self._views if v is not view]
        self._slots.release()


def _bounds(key: bytes, range_end: bytes) -> tuple[bytes | None, bytes | None] | None:
    """``[min, max)`` of etcd's range ``(key, range_end)`` (None: unbounded), or None if empty.

    Single-key ranges (empty ``range_end``) are handled by the callers.
    """
    if range_end == b"\x00":
        return (None if key == b"\x00" else key), None
    if range_end <= key:
        return None
    return key, range_end


class ReadView:
    """A reader (``revision``, ``get``, ``range``, ``count``, ``scan``) fixed at one revision.

    Made by :meth:`ViewRegistry.open`; use it as a context manager, or call
    :meth:`close`. Each call takes the state lock only briefly (``range`` and
    ``scan`` once per chunk). Not for sharing between threads.
    """

    def __init__(self, registry: ViewRegistry, revision: int) -> None:
        self._reg = registry
        self._revision = revision
        self._pre: SortedDict[bytes, KeyValue | None] | None = SortedDict()
        self._pre_bytes = 0
        self._error: UnavailableError | None = None
        self._closed = False

    # ------------------------------------------------------- apply side (locked)

    def _note(self, key: bytes, prev: KeyValue | None) -> None:
        pre = self._pre
        if pre is None or key in pre:
            return
        self._pre_bytes += len(key) + _KV_OVERHEAD + (0 if prev is None else len(prev.value))
        if len(pre) >= self._reg.max_preimages or self._pre_bytes > self._reg.max_preimage_bytes:
            self._fail(UnavailableError(
                f"too many writes during one read (over {self._reg.max_preimages} keys or "
                f"{self._reg.max_preimage_bytes} bytes changed since revision {self._revision}); "
                "try again, or read a smaller range"))
            return
        pre[key] = prev

    def _fail(self, error: UnavailableError) -> None:
        if self._error is None:
            self._error = error
        self._pre = None  # its memory is no use any more

    def _live(self) -> SortedDict[bytes, KeyValue | None]:
        """The pre-images, once the view is known usable (caller holds the lock)."""
        if self._closed:
            raise RuntimeError("read through a closed view")
        if self._error is not None:
            raise self._error
        if self._reg.check is not None:
            self._reg.check()
        assert self._pre is not None
        return self._pre

    # ------------------------------------------------------------ reader protocol

    @property
    def revision(self) -> int:
        """The revision every answer of this view is as of."""
        return self._revision

    def get(self, key: bytes) -> KeyValue | None:
        """The key at the view's revision, or None."""
        with self._reg.lock:
            pre = self._live()
            if key in pre:
                return pre[key]
            return self._reg.store().get(key)

    def count(self, key: bytes, range_end: bytes = b"") -> int:
        """How many keys of the range existed at the view's revision."""
        if not range_end:
            return 0 if self.get(key) is None else 1
        bounds = _bounds(key, range_end)
        if bounds is None:
            return 0
        with self._reg.lock:
            pre = self._live()
            store = self._reg.store()
            n = store.count(key, range_end)
            for k in pre.irange(bounds[0], bounds[1], inclusive=(True, False)):
                n += (pre[k] is not None) - (store.get(k) is not None)
            return n

    def scan(
        self, key: bytes, range_end: bytes = b"", *, descending: bool = False, after: bytes | None = None
    ) -> Iterator[KeyValue]:
        """The range's key-values at the view's revision, fetched a chunk at a time.

        ``after`` resumes strictly after that key (in iteration order). The
        lock is taken once per chunk, never while the caller handles a key.
        """
        if not range_end:
            if after is None:
                kv = self.get(key)
                if kv is not None:
                    yield kv
            return
        bounds = _bounds(key, range_end)
        if bounds is None:
            return
        rmin, rmax = bounds
        cursor = after
        n = self._reg.chunk_keys
        while True:
            with self._reg.lock:
                pre = self._live()
                current = self._reg.store().chunk(key, range_end, after=cursor, limit=n, descending=descending)
                exhausted = len(current) < n
                edge = None if exhausted else current[-1].key  # the chunk's last key, inclusive
                if descending:
                    lo, lo_in = (rmin, True) if edge is None else (edge, True)
                    hi, hi_in = (rmax, False) if cursor is None else (cursor, False)
                else:
                    lo, lo_in = (rmin, True) if cursor is None else (cursor, False)
                    hi, hi_in = (rmax, False) if edge is None else (edge, True)
                changed = [(k, pre[k]) for k in pre.irange(lo, hi, inclusive=(lo_in, hi_in), reverse=descending)]
            chunk = _merge(current, changed, descending)
            yield from chunk
            if exhausted:
                return
            cursor = edge

    def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        offset: int = 0,
        descending: bool = False,
    ) -> RangeResult:
        """Store.range's answer, as of the view's revision."""
        count = self.count(key, range_end)
        kvs: list[KeyValue] = []
        if offset < count:
            skipped = 0
            for kv in self.scan(key, range_end, descending=descending):
                if skipped < offset:
                    skipped += 1
                    continue
                kvs.append(kv)
                if limit and len(kvs) >= limit:
                    break
        more = bool(limit) and count - offset > limit
        return RangeResult(tuple(kvs), count, more)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop recording pre-images for this view; idempotent."""
        if not self._closed:
            self._reg._close(self)
            self._closed = True
            self._pre = None

    def __enter__(self) -> ReadView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge(current: list[KeyValue], changed: list[tuple[bytes, KeyValue | None]], descending: bool) -> list[KeyValue]:
    """One chunk at the view's revision: current keys, overridden by pre-images."""
    if not changed:
        return current
    out: list[KeyValue] = []
    i = j = 0
    while i < len(current) or j < len(changed):
        if j == len(changed):
            out.extend(current[i:])
            break
        ck = changed[j][0]
        if i < len(current):
            k = current[i].key
            if k == ck:
                i += 1  # the pre-image wins
            elif (k > ck) if descending else (k < ck):
                out.append(current[i])
                i += 1
                continue
        prev = changed[j][1]
        if prev is not None:
            out.append(prev)
        j += 1
    return out
