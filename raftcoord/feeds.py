"""Message observers and key watches: readers that follow the local store.

Theory of operation
-------------------
Every observer and every watch keeps one position (the clock of the last
message it was handed, or the next revision it wants) and a thread of its
own that *pulls* what lies past that position from the local store, in
bounded batches, each read holding the store only briefly. The apply path
does no more than wake them. Pulling rather than pushing is what makes
delivery complete:

* a backlog (``since=``) and live messages are the same read, so a message
  can never overtake an older one (defect 1b of issue 8);
* messages that reach the store by any road, a command applied, a snapshot
  installed from the leader (1a), a snapshot loaded at start (1c), are
  found at the next read, with no separate notice to get lost;
* a slow or blocked callback holds back only its own feed: it holds one
  batch, and its backlog stays in the store, where retention bounds it. A
  feed whose next item was purged gets :class:`CompactedError` once
  (``on_error``) and stops; it never skips silently.

A feed reads its local replica (serializable), so it sees exactly the log
order every replica applies: the same items, in the same order, on every
node.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from raftcoord.errors import CompactedError, RaftcoordError
from raftcoord.keys import prefix_end
from raftcoord.store import KeyDeleted, KeyPut, KeyValue, Store
from raftcoord.values import Message

__all__ = ["Observer", "Wakeup", "Watch", "WatchEvent", "WatchResponse", "key_range"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Messages read per step; what one observer holds at a time.
MESSAGE_BATCH = 256
#: Revisions read per step; what one watch holds at a time.
CHANGE_BATCH = 64
#: A feed re-reads at least this often even if nobody woke it (a safety net,
#: not the delivery path).
IDLE_POLL = 1.0
#: Pause after a failed read (no store yet, a replica that failed) before retrying.
RETRY_PAUSE = 0.5

_ids = itertools.count(1)


class _Source(Protocol):
    """What a feed needs of its coordinator: a serializable local read."""

    host: str

    def _feed_read(self, fn: Callable[[Store], T]) -> T: ...


class Wakeup:
    """A generation counter that feeds wait on and the apply path bumps.

    Bumping is a counter increment and a notify under a short lock, so the
    apply path never waits on a feed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._generation = 0

    @property
    def generation(self) -> int:
        """The current generation; pass it to :meth:`wait`."""
        return self._generation

    def bump(self) -> None:
        """Wake every waiter."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        """Return once the generation moved past ``seen``, or after ``timeout``."""
        with self._cond:
            if self._generation == seen:
                self._cond.wait(timeout)


class _Feed:
    """The thread, the closing and the error handling an observer and a watch share."""

    kind = "feed"

    def __init__(self, source: _Source, wakeup: Wakeup, on_error: Callable[[BaseException], Any] | None) -> None:
        self.id = next(_ids)
        self._source = source
        self._wakeup = wakeup
        self._on_error = on_error
        self._closed = threading.Event()
        #: Why the feed stopped by itself (a :class:`CompactedError`), else None.
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"raftcoord-{self.kind}-{source.host}-{self.id}",
                                        daemon=True)

    @property
    def closed(self) -> bool:
        """True once closed by :meth:`close`, by its coordinator, or by an error."""
        return self._closed.is_set()

    def close(self) -> None:
        """Stop delivering; a callback already running finishes."""
        self._closed.set()
        self._wakeup.bump()

    def _start(self) -> None:
        self._thread.start()

    def _join(self, timeout: float) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            ended = getattr(self._source, "_feed_ended", None)
            if ended is not None:
                ended(self)

    def _loop(self) -> None:
        failures = 0
        while not self._closed.is_set():
            seen = self._wakeup.generation
            try:
                more = self._step()
                failures = 0
            except CompactedError as exc:
                self._fail(exc)
                return
            except RaftcoordError as exc:
                if self._closed.is_set():
                    return
                failures += 1
                if failures == 1 or failures % 120 == 0:
                    log.warning("%s %d on %s cannot read the local store (%s); retrying",
                                self.kind, self.id, self._source.host, exc.message)
                self._closed.wait(RETRY_PAUSE)
                continue
            except Exception:  # noqa: BLE001 - a feed must outlive a bug in one step
                log.exception("%s %d on %s failed a step; retrying", self.kind, self.id, self._source.host)
                self._closed.wait(RETRY_PAUSE)
                continue
            if not more:
                self._wakeup.wait(seen, self._idle_timeout())

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._closed.set()
        if self._on_error is None:
            log.warning("%s %d on %s stopped: %s", self.kind, self.id, self._source.host, exc)
            return
        try:
            self._on_error(exc)
        except Exception:  # noqa: BLE001
            log.exception("on_error callback of %s %d failed", self.kind, self.id)

    def _idle_timeout(self) -> float:
        return IDLE_POLL

    def _step(self) -> bool:
        """Read and deliver one batch; True if there may be more right away."""
        raise NotImplementedError


class Observer(_Feed):
    """A message observer; :meth:`close` unregisters it.

    ``last_clock`` is the clock of the last message handed to the callback
    (or skipped as the node's own); resume a new observer from it with
    ``since=``.
    """

    kind = "observer"

    def __init__(
        self,
        source: _Source,
        wakeup: Wakeup,
        callback: Callable[[Message], None],
        *,
        since: int,
        include_own: bool,
        on_error: Callable[[BaseException], Any] | None,
    ) -> None:
        super().__init__(source, wakeup, on_error)
        self.callback = callback
        self.include_own = include_own
        self.last_clock = since
        #: Messages handed to the callback so far (for metrics; written by this feed's thread only).
        self.delivered = 0

    def __repr__(self) -> str:
        return f"<Observer {self.id} last_clock={self.last_clock} closed={self.closed}>"

    def _step(self) -> bool:
        since = self.last_clock
        batch = self._source._feed_read(lambda s: s.messages(since, limit=MESSAGE_BATCH))
        for message in batch:
            if self._closed.is_set():
                return False
            assert message.clock is not None
            self.last_clock = message.clock
            if message.from_host == self._source.host and not self.include_own:
                continue
            try:
                self.callback(message)
            except Exception:  # noqa: BLE001 - one bad callback must not stop delivery
                log.exception("observer %r failed on message clock %d; continuing", self.callback, message.clock)
            self.delivered += 1
        return len(batch) == MESSAGE_BATCH


# ------------------------------------------------------------------ watches


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One key change as etcd's watch reports it.

    For a DELETE, ``kv`` holds the key and, as ``mod_revision``, the revision
    of the deletion; its other fields are zero.
    """

    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class WatchResponse:
    """What a watch's callback receives: all matching events of one revision.

    Empty ``events`` is a progress notification: every event up to
    ``revision`` has been delivered.
    """

    revision: int
    events: tuple[WatchEvent, ...] = ()

    @property
    def is_progress(self) -> bool:
        """True for a progress notification (no events)."""
        return not self.events


WATCH_FILTERS = ("NOPUT", "NODELETE")


def key_range(key: bytes, range_end: bytes | None = None, *, prefix: bool = False) -> tuple[bytes, bytes | None]:
    """etcd's key-range rule as ``(start, end)``; ``end`` None means one key.

    ``range_end`` b"\\0" means every key from ``key`` on (``end`` b""), and
    ``prefix`` every key that starts with ``key``.
    """
    if prefix:
        end = prefix_end(key)
        return key, end if end else b""
    if not range_end:
        return key, None
    if range_end == b"\0":
        return key, b""
    return key, range_end


class Watch(_Feed):
    """A watch on one key or a key range; :meth:`close` cancels it.

    ``next_revision`` is the revision it will report from next: every event
    below it has been delivered (resume a new watch there with
    ``start_revision=``).
    """

    kind = "watch"

    def __init__(
        self,
        source: _Source,
        wakeup: Wakeup,
        callback: Callable[[WatchResponse], None],
        *,
        key: bytes,
        end: bytes | None,
        start_revision: int,
        prev_kv: bool,
        filters: frozenset[str],
        progress_interval: float | None,
        on_error: Callable[[BaseException], Any] | None,
    ) -> None:
        super().__init__(source, wakeup, on_error)
        self.callback = callback
        self.key, self.end = key, end
        self.next_revision = start_revision
        self.prev_kv = prev_kv
        self.filters = filters
        self.progress_interval = progress_interval
        self._last_sent = time.monotonic()

    def __repr__(self) -> str:
        return f"<Watch {self.id} key={self.key!r} next_revision={self.next_revision} closed={self.closed}>"

    def matches(self, key: bytes) -> bool:
        """True if ``key`` lies in this watch's range."""
        if self.end is None:
            return key == self.key
        return key >= self.key and (self.end == b"" or key < self.end)

    def _idle_timeout(self) -> float:
        if self.progress_interval is None:
            return IDLE_POLL
        due = self._last_sent + self.progress_interval - time.monotonic()
        return max(0.01, min(IDLE_POLL, due))

    def _step(self) -> bool:
        start = self.next_revision
        changes, revision = self._source._feed_read(lambda s: (s.changes(start, limit=CHANGE_BATCH), s.revision))
        for change in changes:
            if self._closed.is_set():
                return False
            events = tuple(e for e in (self._event(x) for x in change.events) if e is not None)
            self.next_revision = change.revision + 1
            if events:
                self._send(WatchResponse(change.revision, events))
        if len(changes) == CHANGE_BATCH:
            return True
        # Nothing at or after next_revision up to the store's revision: every
        # event up to it has been delivered, so a progress notice may say so.
        self.next_revision = max(self.next_revision, revision + 1)
        if (self.progress_interval is not None and not self._closed.is_set()
                and time.monotonic() - self._last_sent >= self.progress_interval):
            self._send(WatchResponse(self.next_revision - 1))
        return False

    def _event(self, event: Any) -> WatchEvent | None:
        if isinstance(event, KeyPut):
            if "NOPUT" in self.filters or not self.matches(event.kv.key):
                return None
            return WatchEvent("PUT", event.kv, event.prev if self.prev_kv else None)
        if isinstance(event, KeyDeleted):
            if "NODELETE" in self.filters or not self.matches(event.key):
                return None
            return WatchEvent("DELETE", KeyValue(event.key, b"", 0, event.revision, 0),
                              event.prev if self.prev_kv else None)
        return None

    def _send(self, response: WatchResponse) -> None:
        self._last_sent = time.monotonic()
        try:
            self.callback(response)
        except Exception:  # noqa: BLE001 - one bad callback must not stop the watch
            log.exception("watch callback %r failed at revision %d; continuing", self.callback, response.revision)
