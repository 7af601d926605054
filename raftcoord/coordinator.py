"""The embedded coordinator: the API a PuzzleDB node uses.

A :class:`Coordinator` turns calls into state-machine commands, sends them
through a :class:`Backend` (in memory for one process, or the Raft replica),
and turns results back into values or exceptions. It owns what is local to a
node and must not be replicated: the node's Lamport clock, the wall clock
used for timestamps, request ids, and the observers of the message box.

Observers and watches (``feeds.py``) each run on a thread of their own,
never on the caller's thread nor the Raft thread: each pulls what lies past
its position from the local store, woken by the apply path, so every
message and every key change reaches it once, in log order, whether it was
applied here or arrived in a snapshot from the leader. The apply path also
merges every other node's message clock into this node's Lamport clock.

Writes carry a request id ``[client, seq, lowest_outstanding]`` under a
client session that the state machine registered and named (``{"op":
"session"}``, sent lazily before the first write, since a cluster may have no
leader yet when the coordinator is built). The replica re-proposes the same
bytes after an ambiguous attempt, and the session turns a second application
into the first one's result. A session the store has forgotten
(``session_expired``) or a result it no longer keeps (``duplicate_request``)
means an earlier attempt may have applied, so the caller gets
:class:`UnknownOutcomeError`, never a second application; only a request the
backend provably handed over once is sent again, under a new session.

Reads of a size a client chooses (ranges, scans, read-only transactions) go
through ``backend.read_view``, a reader of one revision that holds the
replica's state lock only in short steps, and are refused beyond
``max_response_bytes``; read-only transactions never enter the log.

The parts that need nothing of the coordinator live below it, so imports
run one way: the Backend protocol and :class:`MemoryBackend` in
``backends.py``, the stepped range read in ``ranges.py``, argument checks in
``arguments.py``, and :class:`Transaction` in ``transaction.py`` (built on
this class's public calls only). All of them are importable from here too.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from raftcoord import store as _store
from raftcoord.arguments import check_key, check_order, check_value, message_code, prefix_range
from raftcoord.backends import CONSISTENCIES, Backend, Consistency, MemoryBackend, Reader
from raftcoord.clock import LamportClock
from raftcoord.errors import (
    CommandError,
    KeyNotFoundError,
    LimitExceededError,
    RaftcoordError,
    TimeoutError,
    UnavailableError,
    UnknownOutcomeError,
    error_from_code,
)
from raftcoord.feeds import WATCH_FILTERS, Observer, Wakeup, Watch, WatchEvent, WatchResponse, key_range
from raftcoord.housekeeping import Housekeeper, annotate_states
from raftcoord.keys import NodeKey
from raftcoord.ranges import read_range
from raftcoord.store import MAX_COMMAND_BYTES, Applied, KeyDeleted, KeyPut, KeyValue, MessagePosted, RangeResult, Store
from raftcoord.transaction import Transaction
from raftcoord.values import Message, NodeState, NodeStatus, encode_cbor

__all__ = [
    "Backend",
    "Coordinator",
    "MemoryBackend",
    "Observer",
    "Reader",
    "Transaction",
    "Watch",
    "WatchEvent",
    "WatchResponse",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
F = TypeVar("F", Observer, Watch)

#: etcd's default limit of operations per transaction (``--max-txn-ops``).
DEFAULT_MAX_TXN_OPS = 128
#: Default bound on the bytes of one read's answer (``max_response_bytes``).
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: Keys read per step of a range, so a view can release the state lock between steps.
RANGE_PAGE = 1024
#: Messages read per step of :meth:`Coordinator.messages`.
MESSAGE_PAGE = 1024
#: How many times a request provably never applied is re-sent under a fresh session.
SESSION_RETRIES = 2

_AMBIGUOUS_CODES = frozenset({"session_expired", "duplicate_request"})


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
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        NodeKey(host)  # a bad hostname fails here, naming the field
        if consistency not in CONSISTENCIES:
            raise CommandError(f"consistency must be one of {CONSISTENCIES}", field="consistency")
        for name, value in (("max_txn_ops", max_txn_ops), ("max_response_bytes", max_response_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CommandError(f"{name} must be a positive integer, got {value!r}", field=name)
        self.host = host
        self.cluster = cluster
        self.addr = addr
        self.consistency: Consistency = consistency
        self.timeout = timeout
        self.max_txn_ops = max_txn_ops
        self.max_response_bytes = max_response_bytes
        self._backend = backend
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._clock = LamportClock()
        self._lock = threading.Lock()
        # The client session is registered by the state machine on first use
        # (a cluster may have no leader yet), and replaced if it expires.
        self._session: str | None = None
        self._session_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._in_flight: set[int] = set()
        #: The node's timer work, when built by :meth:`from_cluster_config`.
        self.housekeeper: Housekeeper | None = None
        #: The member registry and its changes (:mod:`raftcoord.membership`); None in memory.
        self.membership: Any = None
        self._feeds: set[Observer | Watch] = set()
        self._delivered_by_ended = 0  # messages delivered by observers already forgotten (metrics)
        self._messages_posted = Wakeup()
        self._posted = 0  # messages this node posted (for metrics: feed_stats)
        self._keys_changed = Wakeup()
        self._closed = False
        backend.add_listener(self._on_applied)
        add_restore_listener = getattr(backend, "add_restore_listener", None)
        if add_restore_listener is not None:
            add_restore_listener(self._on_restored)
        # A restarted node starts its clock past every message its store holds.
        self._advance_clock(backend.read(lambda s: s.clock, consistency="serializable", timeout=timeout))

    # ----------------------------------------------------------- constructors

    @classmethod
    def memory(cls, host: str = "localhost", *, cluster: str = "memory", **kwargs: Any) -> Coordinator:
        """A coordinator over an in-memory store in this process."""
        return cls(MemoryBackend(), host=host, cluster=cluster, **kwargs)

    @classmethod
    def from_config(cls, path: str, *, node: str, **kwargs: Any) -> Coordinator:
        """A coordinator embedding replica ``node`` of the cluster in ``path``.

        Starts the node's replica (Raft peer traffic on its ``raft`` address)
        but no HTTP endpoint. Close it with :meth:`close`.
        """
        # config.py is a leaf (it imports only errors and keys); importing it
        # here, rather than the service layer's server.py, keeps the arrow
        # between coordinator and server pointing one way.
        from raftcoord.config import load_config

        return cls.from_cluster_config(load_config(path), node=node, **kwargs)

    @classmethod
    def from_cluster_config(cls, config: Any, *, node: str, housekeeping: bool = True,
                            voters: list[str] | None = None, voter: bool | None = None,
                            **kwargs: Any) -> Coordinator:
        """A coordinator embedding replica ``node`` of a loaded cluster configuration.

        ``config`` is a :class:`raftcoord.config.ClusterConfig` (duck-typed).
        Its ``request_timeout``, ``max_txn_ops`` and ``max_response_bytes``
        are the defaults of the matching keyword arguments. With
        ``housekeeping`` (the default) the node records its own state
        (``joining``, ``up``; ``leaving``, ``down`` on :meth:`close`) and,
        while it leads, marks unreachable nodes and purges old messages
        (:class:`~raftcoord.housekeeping.Housekeeper`, as ``.housekeeper``).
        ``voters`` (raft addresses) and ``voter`` replace what the file says
        about the other voters and this node's vote: a node joining a running
        cluster takes them from the cluster's member registry (issue 10).
        The coordinator's ``.membership`` lists and changes the members.
        """
        from raftcoord.config import check_can_start
        from raftcoord.replica import open_replica_backend

        node_cfg = config.node(node)
        check_can_start(config, node)
        kwargs.setdefault("timeout", config.request_timeout)
        for name in ("max_txn_ops", "max_response_bytes"):
            if getattr(config, name, None) is not None:
                kwargs.setdefault(name, getattr(config, name))
        backend = open_replica_backend(config, node, voters=voters, voter=voter)
        try:
            coord = cls(backend, host=node_cfg.name, cluster=config.name, addr=node_cfg.raft, **kwargs)
        except BaseException:
            backend.close()
            raise
        from raftcoord.membership import Membership

        coord.membership = Membership(coord, config)
        if housekeeping:
            # An embedded node may be the leader: it must mark liveness and
            # purge like a served one, or nobody would while it leads.
            coord.housekeeper = Housekeeper(coord, config, node_cfg.name)
            coord.housekeeper.start()
        return coord

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
        if self.housekeeper is not None:
            self.housekeeper.stop()  # says leaving, then down, while the replica still runs
        self._closed = True
        with self._lock:
            feeds, self._feeds = list(self._feeds), set()
        for feed in feeds:
            feed.close()
        deadline = time.monotonic() + 5
        for feed in feeds:
            feed._join(max(0.0, deadline - time.monotonic()))
        self._backend.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------- commands, reads

    def execute(
        self, command: Mapping[str, Any], *, timeout: float | None = None, req: list[Any] | None = None
    ) -> dict[str, Any]:
        """Run one raw state-machine command and return its result map.

        A read-only txn is answered by :meth:`read_txn` and never enters the
        log. Anything else is proposed with a request id of this
        coordinator's session, so the replica's retries apply it at most
        once; if the session expired meanwhile and an earlier attempt may
        have applied, :class:`UnknownOutcomeError` is raised. With ``req``
        (a client's own ``[client_id, seq, lowest_outstanding]``, e.g. from
        the HTTP endpoint), that id is used as it is, and an expired session
        or a forgotten result is raised as :class:`SessionExpiredError` or
        :class:`DuplicateRequestError` for the client to judge. An error
        result is raised as its exception.
        """
        if not isinstance(command, Mapping):
            raise CommandError(f"command must be a map, not {type(command).__name__}", field="command")
        if command.get("op") == "txn":
            self._check_txn_ops(command)
            if _store.is_read_only_txn(command):
                return self.read_txn(command)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if command.get("op") == "session":
            return self._register(deadline)  # a session needs no session of its own
        if req is not None:
            return _raise_error(self._propose({**command, "req": req}, deadline))
        attempts = 0
        while True:
            attempts += 1
            session = self._current_session(deadline)
            with self._lock:
                seq = next(self._seq)
                self._in_flight.add(seq)
                low = min(self._in_flight)
            report: dict[str, Any] = {}
            try:
                result = self._propose({**command, "req": [session, seq, low]}, deadline, report)
            finally:
                with self._lock:
                    self._in_flight.discard(seq)
            code = None if result.get("ok") else (result.get("error") or {}).get("code")
            if code not in _AMBIGUOUS_CODES:
                return _raise_error(result)
            self._drop_session(session)
            single = report.get("single", getattr(self._backend, "proposes_once", False))
            if code == "duplicate_request" or not single:
                # The replica may have proposed these bytes more than once,
                # and an earlier attempt may have applied before the session
                # (or its result) was forgotten: sending it again could apply
                # it twice.
                # The store's own words may know more (issue 9: "applied at
                # revision R; its range kvs are not kept"): pass them on.
                said = (result.get("error") or {}).get("message") or code
                raise UnknownOutcomeError(
                    f"the command may or may not have been applied: its client session {session} "
                    f"was forgotten before the outcome was known ({said})",
                    field="req",
                )
            if attempts > SESSION_RETRIES:
                raise UnavailableError(
                    f"client sessions expire faster than they can be used ({attempts} tried); "
                    "the command was not applied"
                )
            log.info("client session %s expired before its one attempt applied; registering a new one", session)

    def _propose(
        self, command: Mapping[str, Any], deadline: float, report: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data = encode_cbor(dict(command))
        if len(data) > MAX_COMMAND_BYTES:
            raise CommandError(
                f"request of {len(data)} bytes exceeds the limit of {MAX_COMMAND_BYTES}", field="value"
            )
        timeout = max(0.0, deadline - time.monotonic())
        if report is not None and getattr(self._backend, "reports_attempts", False):
            return self._backend.propose(data, timeout=timeout, report=report)
        return self._backend.propose(data, timeout=timeout)

    def new_session(self, *, timeout: float | None = None) -> str:
        """Register a new client session with the state machine and return its id.

        For clients that send their own request ids (``execute(req=...)``),
        such as HTTP clients through the endpoint. Sessions are bounded by
        count in the store; an unused one is eventually forgotten.
        """
        return self._register(time.monotonic() + (self.timeout if timeout is None else timeout))["client"]

    def _register(self, deadline: float) -> dict[str, Any]:
        try:
            result = _raise_error(self._propose({"op": "session"}, deadline))
        except UnknownOutcomeError as exc:
            # At worst a session was registered that nobody will use.
            raise TimeoutError(f"could not register a client session: {exc.message}") from None
        client = result.get("client")
        if not isinstance(client, str) or not client:
            raise RaftcoordError(f"the store answered a session registration with {result!r}")
        return result

    def _current_session(self, deadline: float) -> str:
        """This coordinator's client session, registered on first use."""
        with self._session_lock:
            if self._session is None:
                try:
                    self._session = self._register(deadline)["client"]
                except TimeoutError as exc:
                    raise TimeoutError(f"{exc.message}; the command was not applied") from None
            return self._session

    def _drop_session(self, session: str) -> None:
        with self._session_lock:
            if self._session == session:
                self._session = None

    def _check_txn_ops(self, command: Mapping[str, Any]) -> None:
        # As etcd counts: the compares, and the larger of the two branches.
        def size(name: str) -> int:
            ops = command.get(name)
            return len(ops) if isinstance(ops, (list, tuple)) else 0

        n = max(size("compare"), size("success"), size("failure"))
        if n > self.max_txn_ops:
            raise LimitExceededError(
                f"too many operations in txn request: {n} (max_txn_ops is {self.max_txn_ops})",
                field="max_txn_ops",
            )

    def read_txn(self, command: Mapping[str, Any], *, consistency: Consistency | None = None) -> dict[str, Any]:
        """Evaluate a read-only txn (no put or delete) as a read, off the log.

        Returns the result map a proposed txn would return. Raises
        :class:`LimitExceededError` beyond ``max_txn_ops`` or when the
        answer would pass ``max_response_bytes``.
        """
        if not isinstance(command, Mapping):
            raise CommandError(f"command must be a map, not {type(command).__name__}", field="command")
        self._check_txn_ops(command)
        if not _store.is_read_only_txn(command):
            raise CommandError("read_txn takes a txn without put or delete operations", field="op")
        with self.view(consistency=consistency) as reader:
            return _store.read_txn(reader, command, max_result_bytes=self.max_response_bytes)

    def view(self, *, consistency: Consistency | None = None) -> AbstractContextManager[Reader]:
        """A reader of one revision of the store (advanced; see :class:`Reader`).

        Keep the context short: the view's revision is pinned while it is open.
        """
        level = consistency or self.consistency
        if level not in CONSISTENCIES:
            raise CommandError(f"consistency must be one of {CONSISTENCIES}", field="consistency")
        return self._backend.read_view(consistency=level, timeout=self.timeout)

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
        check_key(key)
        return self.read(lambda s: s.get(key), consistency=consistency)

    def get_many(
        self, keys: Sequence[bytes], *, consistency: Consistency | None = None
    ) -> tuple[list[KeyValue | None], int]:
        """Several keys (each with its revisions, or None) and the revision they were read at.

        One read of one revision: at ``linearizable`` one read barrier for
        them all, and the replica's state lock taken once. For a handful of
        keys (the HTTP endpoint gathers concurrent single-key reads into one
        such call, at most a few hundred); a range of a client's size goes
        through :meth:`range`.
        """
        wanted = [check_key(key) for key in keys]
        return self.read(lambda s: ([s.get(key) for key in wanted], s.revision), consistency=consistency)

    def put(self, key: bytes, value: bytes) -> int:
        """Set ``key`` to ``value``; returns the revision of the write."""
        return int(self.execute({"op": "put", "key": check_key(key), "value": check_value(value)})["revision"])

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; True if it existed."""
        return bool(self.execute({"op": "delete", "key": check_key(key)})["deleted"])

    def scan(
        self,
        prefix: bytes = b"",
        *,
        offset: int = 0,
        limit: int = 0,
        order: Literal["asc", "desc"] = "asc",
        consistency: Consistency | None = None,
        max_bytes: int | None = None,
    ) -> list[KeyValue]:
        """Keys starting with ``prefix`` in key order (``desc`` reverses it)."""
        key, end = prefix_range(prefix)
        check_order(order)
        res = self.range(
            key, end, offset=offset, limit=limit, descending=order == "desc", consistency=consistency,
            max_bytes=max_bytes,
        )
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
        max_bytes: int | None = None,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> RangeResult:
        """An etcd-style range read (``range_end`` as in etcd).

        Read through a view of one revision, a page at a time. An answer
        whose key-values would pass ``max_bytes`` (default: the
        coordinator's ``max_response_bytes``) raises
        :class:`LimitExceededError`; ``keys_only`` answers (values left
        empty) and ``count_only`` answers (no key-values) cost accordingly
        less.
        """
        check_key(key)
        if not isinstance(range_end, bytes):
            raise CommandError(f"range_end must be bytes, not {type(range_end).__name__}", field="range_end")
        for name, value in (("limit", limit), ("offset", offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CommandError(f"{name} must be a non-negative integer, got {value!r}", field=name)
        budget = self.max_response_bytes if max_bytes is None else max_bytes
        with self.view(consistency=consistency) as reader:
            return read_range(
                reader, key, range_end, limit=limit, offset=offset, descending=descending,
                budget=budget, keys_only=keys_only, count_only=count_only, page=RANGE_PAGE,
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
        """Every node's state record, ordered by hostname.

        Each record also carries, from this node's replica and never stored,
        its ``role`` (leader, follower, non-voter) and ``heard_ago`` (seconds
        since the leader last heard the node; known on the leader, and on a
        follower for the leader only).
        """
        return annotate_states(self.read(lambda s: s.node_states(), consistency=consistency), self.status())

    def get_node_state(self, host: str, *, consistency: Consistency | None = None) -> NodeState | None:
        """One node's state record, or None."""
        return self.read(lambda s: s.node_state(host), consistency=consistency)

    # --------------------------------------------------------------- messages

    def post_message(
        self,
        type: int | str,
        event: int | str | None = None,
        payload: Any = None,
        *,
        req: list[Any] | None = None,
    ) -> Message:
        """Post a message to every node; returns it with its clock assigned.

        ``type`` and ``event`` take an int (0-255) or a one-letter code such
        as ``"U"`` (user) and ``"C"`` (created). ``req`` is a client's own
        request id, as for :meth:`execute` (the HTTP endpoint passes it on).
        """
        with self._lock:
            sender_clock = self._clock.tick()
        cmd: dict[str, Any] = {
            "op": "post",
            "from": self.host,
            "clock": sender_clock,
            "type": message_code(type, "type"),
            "timestamp": self._now(),
        }
        if event is not None:
            cmd["event"] = message_code(event, "event")
        if payload is not None:
            cmd["payload"] = payload
        message = Message.from_map(self.execute(cmd, req=req)["message"])
        with self._lock:
            self._posted += 1
            if message.clock is not None and message.clock > self._clock.value:
                self._clock = LamportClock(message.clock)
        return message

    def feed_stats(self) -> dict[str, Any]:
        """Counts of this node's messages and feeds, for metrics (:mod:`raftcoord.metrics`).

        ``posted``: messages posted through this coordinator; ``delivered``:
        messages handed to its observers' callbacks; ``observers`` and
        ``watches`` open now; ``observer_clocks``: each open observer's last clock.
        """
        with self._lock:
            posted, feeds, delivered_before = self._posted, list(self._feeds), self._delivered_by_ended
        observers = [f for f in feeds if isinstance(f, Observer)]
        return {
            "posted": posted,
            "delivered": delivered_before + sum(o.delivered for o in observers),
            "observers": sum(1 for o in observers if not o.closed),
            "watches": sum(1 for f in feeds if isinstance(f, Watch) and not f.closed),
            "observer_clocks": [o.last_clock for o in observers if not o.closed],
        }

    def messages(self, since: int | None = None, *, consistency: Consistency | None = None) -> list[Message]:
        """Messages with a clock above ``since`` (all kept ones for None), in clock order.

        Raises :class:`CompactedError` (with ``oldest_clock``) if messages
        after ``since`` were purged. The box is read in steps of
        :data:`MESSAGE_PAGE`, each holding the replica's state briefly; the
        first step is at ``consistency``, the rest continue from the same
        replica, so the list is one stretch of the total order with no gap.
        """
        out = self.read(lambda s: s.messages(since, limit=MESSAGE_PAGE), consistency=consistency)
        page = out
        while len(page) == MESSAGE_PAGE:
            cursor = page[-1].clock
            page = self._feed_read(lambda s: s.messages(cursor, limit=MESSAGE_PAGE))
            out.extend(page)
        return out

    def purge_messages(self, *, before: datetime | None = None, max_count: int | None = None) -> int:
        """Drop the oldest messages (by timestamp or beyond a count); returns how many."""
        cmd: dict[str, Any] = {"op": "purge"}
        if before is not None:
            cmd["before"] = before
        if max_count is not None:
            cmd["max_count"] = max_count
        return int(self.execute(cmd)["purged"])

    def add_observer(
        self,
        callback: Callable[[Message], None],
        *,
        since: int | None = None,
        include_own: bool = False,
        on_error: Callable[[BaseException], Any] | None = None,
    ) -> Observer:
        """Call ``callback(message)`` for every message from now on.

        With ``since``, every kept message with a clock above it comes first
        (raises :class:`CompactedError`, naming the oldest clock kept, if some
        were purged). Messages this node posted are skipped unless
        ``include_own``. Each observer has a thread of its own that reads the
        local store in clock order, so every message arrives once, in order,
        also those that came in a snapshot from the leader; a callback may
        block or post messages itself, holding back only this observer. If
        retention purges messages this observer has not had yet, it stops and
        ``on_error`` gets the :class:`CompactedError` (resume with
        ``since=observer.last_clock`` once the loss is dealt with).
        """
        self._check_open()

        def start_at(store: Store) -> int:
            if since is None:
                return store.clock
            store.messages(since, limit=1)  # raises CompactedError below the floor
            return since

        observer = Observer(self, self._messages_posted, callback, since=self._feed_read(start_at),
                            include_own=include_own, on_error=on_error)
        return self._start_feed(observer)

    def watch(
        self,
        key: bytes | str,
        range_end: bytes | str | None = None,
        *,
        callback: Callable[[WatchResponse], None],
        prefix: bool = False,
        start_revision: int | None = None,
        prev_kv: bool = False,
        filters: Iterable[str] = (),
        progress_interval: float | None = None,
        on_error: Callable[[BaseException], Any] | None = None,
    ) -> Watch:
        """Call ``callback(response)`` for each revision that changes keys in a range.

        ``key`` and ``range_end`` follow etcd: no ``range_end`` watches one
        key, ``range_end`` b"\\0" every key from ``key`` on, ``prefix=True``
        every key starting with ``key``. ``start_revision`` replays the kept
        history from that revision (None or 0: from the next one); one older
        than the kept history gives ``on_error`` a :class:`CompactedError`
        with ``compact_revision`` and closes the watch. Each response holds
        every matching event of one revision, in revision order, each once,
        with ``prev_kv`` if asked; ``filters`` may drop "NOPUT" or "NODELETE"
        events; with ``progress_interval`` an empty response reports the
        revision reached whenever that many seconds pass without events. The
        callback runs on the watch's own thread.
        """
        self._check_open()
        start, end = key_range(_as_bytes(key, "key"), None if range_end is None else _as_bytes(range_end, "range_end"),
                               prefix=prefix)
        wanted = frozenset(filters)
        if not wanted <= set(WATCH_FILTERS):
            raise CommandError(f"watch filters must be among {WATCH_FILTERS}, got {sorted(wanted)}", field="filters")
        if start_revision is not None and (isinstance(start_revision, bool) or not isinstance(start_revision, int)
                                           or start_revision < 0):
            raise CommandError(f"start_revision must be a revision, got {start_revision!r}", field="start_revision")
        if progress_interval is not None and not progress_interval > 0:
            raise CommandError("progress_interval must be positive", field="progress_interval")
        first = start_revision or self._feed_read(lambda s: s.revision) + 1
        watch = Watch(self, self._keys_changed, callback, key=start, end=end, start_revision=first,
                      prev_kv=prev_kv, filters=wanted, progress_interval=progress_interval, on_error=on_error)
        return self._start_feed(watch)

    def _feed_ended(self, feed: Observer | Watch) -> None:
        """A feed's thread ended (closed, or stopped by an error): forget it.

        Every HTTP watch and follow stream is a feed; kept until the
        coordinator closes, each would stay in memory for the node's life.
        """
        with self._lock:
            if feed in self._feeds:
                self._feeds.discard(feed)
                if isinstance(feed, Observer):
                    self._delivered_by_ended += feed.delivered

    def _start_feed(self, feed: F) -> F:
        with self._lock:
            self._check_open()
            self._feeds.add(feed)
        feed._start()
        return feed

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the coordinator is closed")

    def _feed_read(self, fn: Callable[[Store], T]) -> T:
        """A local read for the feeds: the replica's own state, in log order."""
        return self._backend.read(fn, consistency="serializable", timeout=self.timeout)

    def _advance_clock(self, clock: int) -> None:
        with self._lock:
            if clock > self._clock.value:
                self._clock = LamportClock(clock)

    def _on_applied(self, applied: Applied) -> None:
        # Runs on the apply path: merge clocks and wake the feeds, never call out.
        posted = False
        changed = False
        for event in applied.events:
            if isinstance(event, MessagePosted):
                posted = True
                if event.message.from_host != self.host and event.message.clock is not None:
                    with self._lock:
                        self._clock.merge(event.message.clock)
            elif isinstance(event, (KeyPut, KeyDeleted)):
                changed = True
        if posted:
            self._messages_posted.bump()
        if changed:
            self._keys_changed.bump()

    def _on_restored(self, store: Store) -> None:
        # A snapshot from the leader replaced the store: its messages were
        # never applied here one by one, so merge the clock they reached and
        # let every feed read what is new.
        self._advance_clock(store.clock)
        self._messages_posted.bump()
        self._keys_changed.bump()


def _as_bytes(value: bytes | str, name: str) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise CommandError(f"{name} must be bytes or str, not {type(value).__name__}", field=name)


def _raise_error(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` if it is a success; else its error, raised."""
    if not result.get("ok"):
        err = result.get("error") or {}
        raise error_from_code(err.get("code", "internal"), err.get("message", "command refused"), err.get("field"))
    return result
