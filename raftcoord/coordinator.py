"""The embedded coordinator: the API a PuzzleDB node uses.

A :class:`Coordinator` turns calls into state-machine commands, sends them
through a :class:`Backend` (in memory for one process, or the Raft replica),
and turns results back into values or exceptions. It owns what is local to a
node and must not be replicated: the node's Lamport clock, the wall clock
used for timestamps, request ids, and the observers of the message box.

Observers run on one delivery thread per coordinator, never on the caller's
thread nor the Raft thread: the backend hands each applied command's events
to a queue in log order, and the delivery thread calls every observer for
every message in clock order, exactly once (an observer remembers the last
clock it saw, so a backlog and live messages cannot overlap).
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, TypeVar

from raftcoord.clock import LamportClock
from raftcoord.errors import (
    CommandError,
    ConflictError,
    KeyNotFoundError,
    RaftcoordError,
    ReservedKeyError,
    UnavailableError,
    error_from_code,
)
from raftcoord.keys import NodeKey, is_reserved, prefix_end
from raftcoord.store import MAX_COMMAND_BYTES, Applied, KeyValue, MessagePosted, RangeResult, Store
from raftcoord.values import Message, NodeState, NodeStatus, encode_cbor

__all__ = ["Backend", "Coordinator", "MemoryBackend", "Observer", "Transaction"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Consistency = Literal["linearizable", "serializable"]
CONSISTENCIES = ("linearizable", "serializable")


class Backend(Protocol):
    """What a coordinator needs from the replication layer below it."""

    def propose(self, command: bytes, *, timeout: float) -> dict[str, Any]:
        """Commit ``command``, apply it locally, return the store's result."""

    def read(self, fn: Callable[[Store], T], *, consistency: Consistency, timeout: float) -> T:
        """Run ``fn`` on the local store, after a read barrier if linearizable.

        ``fn`` runs while no command is being applied, so what it sees is one
        revision, and a listener added inside it misses nothing.
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


@dataclass(eq=False)
class Observer:
    """A registered message observer; :meth:`close` unregisters it."""

    callback: Callable[[Message], None]
    include_own: bool
    #: The clock of the last message this observer was handed (or skipped).
    last_clock: int
    _coordinator: Coordinator = field(repr=False)
    closed: bool = False

    def close(self) -> None:
        """Stop delivering messages to this observer."""
        self.closed = True
        self._coordinator._remove_observer(self)


_STOP = object()


class Coordinator:
    """A PuzzleDB node's handle on the coordinator service.

    Build one with :meth:`memory` (in-process, for tests and trying out) or
    :meth:`from_config` (a replica of a Raft cluster). Thread-safe.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        host: str,
        cluster: str = "",
        addr: str = "",
        consistency: Consistency = "linearizable",
        timeout: float = 10.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        NodeKey(host)  # a bad hostname fails here, naming the field
        if consistency not in CONSISTENCIES:
            raise CommandError(f"consistency must be one of {CONSISTENCIES}", field="consistency")
        self.host = host
        self.cluster = cluster
        self.addr = addr
        self.consistency: Consistency = consistency
        self.timeout = timeout
        self._backend = backend
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._clock = LamportClock()
        self._lock = threading.Lock()
        # Request ids: a random client id per coordinator instance, so two
        # processes embedding the same host never share a session.
        self._client_id = f"{host}/{secrets.token_hex(6)}"
        self._seq = itertools.count(1)
        self._in_flight: set[int] = set()
        self._observers: list[Observer] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._delivery = threading.Thread(target=self._deliver_loop, name=f"raftcoord-observers-{host}", daemon=True)
        self._delivery.start()
        backend.add_listener(self._on_applied)

    # ----------------------------------------------------------- constructors

    @classmethod
    def memory(cls, host: str = "localhost", *, cluster: str = "memory", **kwargs: Any) -> Coordinator:
        """A coordinator over an in-memory store in this process."""
        return cls(MemoryBackend(), host=host, cluster=cluster, **kwargs)

    @classmethod
    def from_config(cls, path: str, *, node: str, **kwargs: Any) -> Coordinator:
        """A coordinator embedding replica ``node`` of the cluster in ``path``."""
        from raftcoord.server import open_coordinator  # the service layer builds replicas

        return open_coordinator(path, node=node, **kwargs)

    # ----------------------------------------------------------------- basics

    @property
    def clock(self) -> int:
        """This node's local Lamport clock."""
        with self._lock:
            return self._clock.value

    @property
    def backend(self) -> Backend:
        """The backend below this coordinator."""
        return self._backend

    def status(self) -> dict[str, Any]:
        """The backend's view of the cluster plus this node's identity."""
        out = dict(self._backend.status())
        out.update(host=self.host, cluster=self.cluster, local_clock=self.clock)
        return out

    def close(self) -> None:
        """Stop observers and the backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        if threading.current_thread() is not self._delivery:
            self._delivery.join(timeout=5)
        self._backend.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------- commands, reads

    def execute(self, command: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Propose one raw state-machine command and return its result map.

        The command gets a request id, so a retry after an ambiguous failure
        applies at most once. An error result is raised as its exception.
        """
        with self._lock:
            seq = next(self._seq)
            self._in_flight.add(seq)
            low = min(self._in_flight)
        try:
            data = encode_cbor({**command, "req": [self._client_id, seq, low]})
            if len(data) > MAX_COMMAND_BYTES:
                raise CommandError(
                    f"request of {len(data)} bytes exceeds the limit of {MAX_COMMAND_BYTES}", field="value"
                )
            result = self._backend.propose(data, timeout=self.timeout if timeout is None else timeout)
        finally:
            with self._lock:
                self._in_flight.discard(seq)
        if not result.get("ok"):
            err = result.get("error") or {}
            raise error_from_code(err.get("code", "internal"), err.get("message", "command refused"), err.get("field"))
        return result

    def read(self, fn: Callable[[Store], T], *, consistency: Consistency | None = None) -> T:
        """Run ``fn`` on the local store at the given consistency (advanced)."""
        level = consistency or self.consistency
        if level not in CONSISTENCIES:
            raise CommandError(f"consistency must be one of {CONSISTENCIES}", field="consistency")
        return self._backend.read(fn, consistency=level, timeout=self.timeout)

    # ------------------------------------------------------------ key-values

    def get(self, key: bytes, *, consistency: Consistency | None = None) -> bytes:
        """The value of ``key``; raises :class:`KeyNotFoundError` if absent."""
        kv = self.get_kv(key, consistency=consistency)
        if kv is None:
            raise KeyNotFoundError(f"key {key!r} not found", field="key")
        return kv.value

    def get_kv(self, key: bytes, *, consistency: Consistency | None = None) -> KeyValue | None:
        """The key with its revisions, or None."""
        _check_key(key)
        return self.read(lambda s: s.get(key), consistency=consistency)

    def put(self, key: bytes, value: bytes) -> int:
        """Set ``key`` to ``value``; returns the revision of the write."""
        return int(self.execute({"op": "put", "key": _check_key(key), "value": _check_value(value)})["revision"])

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; True if it existed."""
        return bool(self.execute({"op": "delete", "key": _check_key(key)})["deleted"])

    def scan(
        self,
        prefix: bytes = b"",
        *,
        offset: int = 0,
        limit: int = 0,
        order: Literal["asc", "desc"] = "asc",
        consistency: Consistency | None = None,
    ) -> list[KeyValue]:
        """Keys starting with ``prefix`` in key order (``desc`` reverses it)."""
        key, end = _prefix_range(prefix)
        _check_order(order)
        res = self.range(key, end, offset=offset, limit=limit, descending=order == "desc", consistency=consistency)
        return list(res.kvs)

    def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        offset: int = 0,
        descending: bool = False,
        consistency: Consistency | None = None,
    ) -> RangeResult:
        """An etcd-style range read (``range_end`` as in etcd)."""
        return self.read(
            lambda s: s.range(key, range_end, limit=limit, offset=offset, descending=descending),
            consistency=consistency,
        )

    def revision(self, *, consistency: Consistency | None = None) -> int:
        """The store's current revision."""
        return self.read(lambda s: s.revision, consistency=consistency)

    @contextmanager
    def transact(self) -> Iterator[Transaction]:
        """A transaction: reads are recorded, writes buffered, commit on exit.

        The commit is one state-machine command that applies only if nothing
        the transaction read has changed meanwhile; otherwise it raises
        :class:`ConflictError` and nothing is written. An exception inside
        the block cancels the transaction.
        """
        txn = Transaction(self)
        yield txn
        txn.commit()

    # ------------------------------------------------------------ node states

    def set_node_state(self, status: NodeStatus | str, **fields: Any) -> NodeState:
        """Record this node's state (``addr``, ``cluster`` and extra fields)."""
        addr = fields.pop("addr", self.addr)
        cluster = fields.pop("cluster", self.cluster)
        state = NodeState(
            host=self.host,
            status=status,  # type: ignore[arg-type]
            clock=self.clock,
            timestamp=self._now(),
            addr=addr,
            cluster=cluster,
            extra=fields,
        )
        self.execute({"op": "node", "state": state.to_map()})
        return state

    def get_cluster_state(self, *, consistency: Consistency | None = None) -> list[NodeState]:
        """Every node's state record, ordered by hostname."""
        return self.read(lambda s: s.node_states(), consistency=consistency)

    def get_node_state(self, host: str, *, consistency: Consistency | None = None) -> NodeState | None:
        """One node's state record, or None."""
        return self.read(lambda s: s.node_state(host), consistency=consistency)

    # --------------------------------------------------------------- messages

    def post_message(self, type: int | str, event: int | str | None = None, payload: Any = None) -> Message:
        """Post a message to every node; returns it with its clock assigned.

        ``type`` and ``event`` take an int (0-255) or a one-letter code such
        as ``"U"`` (user) and ``"C"`` (created).
        """
        with self._lock:
            sender_clock = self._clock.tick()
        cmd: dict[str, Any] = {
            "op": "post",
            "from": self.host,
            "clock": sender_clock,
            "type": _code(type, "type"),
            "timestamp": self._now(),
        }
        if event is not None:
            cmd["event"] = _code(event, "event")
        if payload is not None:
            cmd["payload"] = payload
        message = Message.from_map(self.execute(cmd)["message"])
        with self._lock:
            if message.clock is not None and message.clock > self._clock.value:
                self._clock = LamportClock(message.clock)
        return message

    def messages(self, since: int | None = None, *, consistency: Consistency | None = None) -> list[Message]:
        """Messages with a clock above ``since`` (all kept ones for None)."""
        return self.read(lambda s: s.messages(since), consistency=consistency)

    def purge_messages(self, *, before: datetime | None = None, max_count: int | None = None) -> int:
        """Drop the oldest messages (by timestamp or beyond a count); returns how many."""
        cmd: dict[str, Any] = {"op": "purge"}
        if before is not None:
            cmd["before"] = before
        if max_count is not None:
            cmd["max_count"] = max_count
        return int(self.execute(cmd)["purged"])

    def add_observer(
        self, callback: Callable[[Message], None], *, since: int | None = None, include_own: bool = False
    ) -> Observer:
        """Call ``callback(message)`` for every message from now on.

        With ``since``, messages with a clock above it are delivered first
        (raises :class:`CompactedError` if some were purged). Messages this
        node posted are skipped unless ``include_own``. Callbacks run on the
        coordinator's delivery thread, in clock order, each message once.
        """
        if self._closed:
            raise UnavailableError("the coordinator is closed")

        def register(store: Store) -> Observer:
            # Runs with no command being applied: the backlog is queued before
            # any live message applied after it, so nothing is skipped.
            backlog = store.messages(since) if since is not None else []
            obs = Observer(callback, include_own, since if since is not None else store.clock, self)
            with self._lock:
                self._observers.append(obs)
            if backlog:
                self._queue.put(("backlog", obs, backlog))
            return obs

        return self.read(register, consistency="serializable")

    def _remove_observer(self, observer: Observer) -> None:
        with self._lock:
            if observer in self._observers:
                self._observers.remove(observer)

    def _on_applied(self, applied: Applied) -> None:
        # Runs on the apply path: only hand messages over, never call out.
        messages = [e.message for e in applied.events if isinstance(e, MessagePosted)]
        if messages:
            self._queue.put(("live", None, messages))

    def _deliver_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            kind, only, messages = item
            for message in messages:
                if kind == "live" and message.from_host != self.host:
                    with self._lock:
                        self._clock.merge(message.clock)
                with self._lock:
                    targets = [only] if only is not None else list(self._observers)
                for obs in targets:
                    self._deliver(obs, message)

    def _deliver(self, obs: Observer, message: Message) -> None:
        assert message.clock is not None
        if obs.closed or message.clock <= obs.last_clock:
            return
        obs.last_clock = message.clock
        if message.from_host == self.host and not obs.include_own:
            return
        try:
            obs.callback(message)
        except Exception:
            log.exception("observer %r failed on message clock %d; continuing", obs.callback, message.clock)


class Transaction:
    """Reads recorded, writes buffered; see :meth:`Coordinator.transact`."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coord = coordinator
        self._reads: dict[bytes, int] = {}
        self._ranges: list[tuple[bytes, bytes, list[list[Any]]]] = []
        self._writes: dict[bytes, bytes | None] = {}
        self._truncated = False
        self._done = False

    def _store_read(self, fn: Callable[[Store], T]) -> T:
        # Local reads: the commit re-checks every one of them, so a stale
        # replica can only cause a ConflictError, never a wrong commit.
        return self._coord.read(fn, consistency="serializable")

    def get(self, key: bytes) -> bytes:
        """The value of ``key`` as this transaction sees it."""
        self._check_open()
        _check_key(key)
        if key in self._writes:
            value = self._writes[key]
        elif self._truncated and not is_reserved(key):
            value = None
        else:
            kv = self._store_read(lambda s: s.get(key))
            self._reads.setdefault(key, 0 if kv is None else kv.mod_revision)
            value = None if kv is None else kv.value
        if value is None:
            raise KeyNotFoundError(f"key {key!r} not found", field="key")
        return value

    def scan(
        self, prefix: bytes = b"", *, offset: int = 0, limit: int = 0, order: Literal["asc", "desc"] = "asc"
    ) -> list[tuple[bytes, bytes]]:
        """``(key, value)`` pairs under ``prefix``, this transaction's writes included."""
        self._check_open()
        _check_order(order)
        key, end = _prefix_range(prefix)
        kvs = self._store_read(lambda s: s.range(key, end).kvs)
        self._ranges.append((key, end, [[kv.key, kv.mod_revision] for kv in kvs]))
        merged = {kv.key: kv.value for kv in kvs if not (self._truncated and not is_reserved(kv.key))}
        for k, v in self._writes.items():
            if k.startswith(prefix):
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
        items = sorted(merged.items(), reverse=order == "desc")[offset:]
        return items[:limit] if limit else items

    def set(self, key: bytes, value: bytes) -> None:
        """Buffer a write of ``key``."""
        self._check_open()
        _check_writable_key(key)
        self._writes[key] = _check_value(value)

    def remove(self, key: bytes) -> None:
        """Buffer a delete of ``key``; raises KeyNotFoundError if it is absent."""
        self.get(key)
        _check_writable_key(key)
        self._writes[key] = None

    def truncate(self) -> None:
        """Buffer the removal of every user key (coordinator records stay)."""
        self._check_open()
        self._truncated = True
        self._writes.clear()

    def cancel(self) -> None:
        """Drop the buffered writes; nothing is sent."""
        self._done = True

    def commit(self) -> int | None:
        """Send the transaction as one command; returns its revision.

        Returns None when nothing was read or written. Raises
        :class:`ConflictError` if anything read changed meanwhile.
        """
        self._check_open()
        self._done = True
        if not (self._reads or self._ranges or self._writes or self._truncated):
            return None
        compare = [{"key": k, "target": "mod", "result": "equal", "value": rev} for k, rev in self._reads.items()]
        compare += [{"key": k, "range_end": e, "target": "keys", "value": seen} for k, e, seen in self._ranges]
        ops: list[dict[str, Any]] = []
        if self._truncated:
            # Delete every user key except those this transaction writes: one
            # revision may not both delete and write a key (etcd's rule), so
            # the truncation covers only the gaps between written keys.
            start = b"\x00"
            for k in sorted(self._writes):
                if start < k:
                    ops.append({"op": "delete", "key": start, "range_end": k})
                start = k + b"\x00"
            ops.append({"op": "delete", "key": start, "range_end": b"\x00"})
        for k, v in self._writes.items():
            ops.append({"op": "put", "key": k, "value": v} if v is not None else {"op": "delete", "key": k})
        result = self._coord.execute({"op": "txn", "compare": compare, "success": ops, "failure": []})
        if not result["succeeded"]:
            raise ConflictError("the transaction read keys that changed before it committed; retry it")
        return int(result["revision"])

    def _check_open(self) -> None:
        if self._done:
            raise RaftcoordError("the transaction is already finished")


def _check_key(key: Any) -> bytes:
    if not isinstance(key, bytes):
        raise CommandError(f"key must be bytes, not {type(key).__name__}", field="key")
    if not key:
        raise CommandError("key must not be empty", field="key")
    return key


def _check_writable_key(key: Any) -> bytes:
    _check_key(key)
    if is_reserved(key):
        raise ReservedKeyError(f"key {key!r} is under a coordinator header", field="key")
    return key


def _check_value(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise CommandError(f"value must be bytes, not {type(value).__name__}", field="value")
    return value


def _check_order(order: str) -> None:
    if order not in ("asc", "desc"):
        raise CommandError(f"order must be 'asc' or 'desc', not {order!r}", field="order")


def _prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    if not isinstance(prefix, bytes):
        raise CommandError(f"prefix must be bytes, not {type(prefix).__name__}", field="prefix")
    return (prefix, prefix_end(prefix)) if prefix else (b"\x00", b"\x00")


def _code(value: int | str, name: str) -> int:
    if isinstance(value, str):
        if len(value) != 1 or ord(value) > 0xFF:
            raise CommandError(f"{name} must be one character or an int 0-255, got {value!r}", field=name)
        return ord(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise CommandError(f"{name} must be an int 0-255 or one character, got {value!r}", field=name)
    return value
