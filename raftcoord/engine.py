"""The guarded Raft engine: pysyncobj's SyncObj with one replicated method.

:class:`Engine` carries ``apply(command_bytes)`` and nothing else (hazard 8);
:class:`GuardedTransport` filters what peers send before pysyncobj sees it, so
that the places where pysyncobj 0.3.17 would otherwise lie are closed
(``notes/pysyncobj-hazards.md``; the numbers are that page's). The replica
(``replica.py``) drives the engine on its own thread; this module does no
business logic.

Liveness (issue 8): the transport notes when a message last arrived from
each peer (:meth:`Engine.peer_ages`), so the leader knows whom it stopped
hearing without any heartbeat entry in the log. A non-voter, which
pysyncobj knows only as an anonymous connection, names itself to each
voter once connected (:data:`HELLO`) when its ``rc_identity`` is set.

What the guards close, besides hazards 3 and 5 (issue 6's defect numbers):

* d4: a follower whose log ends in entries of an older term answers a failed
  append with a point it knows the leader shares (past its commit index), not
  with "my last index + 1", which undid the leader's one-step back-off on
  every pipelined batch and left a rejoining old leader stuck for good.
* d5, d6: an incoming connection that has not said which node it is may
  announce frames of at most :attr:`GuardedTransport.frame_cap` bytes, must
  identify itself within :attr:`GuardedTransport.handshake_timeout`, and at
  most :attr:`GuardedTransport.max_unidentified` of them are held (the oldest
  goes first). Running out of file handles no longer unbinds the raft port
  for good, and the port's accept queue is longer than pysyncobj's 5, so a
  flood of strangers does not push a peer's reconnect into SYN back-off.
* d8: a snapshot that fails to load stops the engine (``on_fatal``); it never
  acknowledges it, and from then on neither hears nor answers a peer.
* d14: a snapshot received from the leader is fsync'ed before it replaces the
  old one, and its directory after.
* d15: entries of 64 KiB and more arrive in chunks (``transmission``); they
  are reassembled here, so the hazard-5 guard covers them too, and a chunk
  the leader marks last too early (it compares offsets with the command's
  length, not the pickled entry's) waits for the rest instead of failing to
  unpickle.

Speed (issue 9): pysyncobj pickles every peer message with protocol 2,
which writes bytes as latin-1 text re-encoded as UTF-8 (half as large again
for binary values) and is 8 times slower than protocol 5 on a small
message, then deflates it (``zlib.compress`` at level 3), whose set-up alone
costs tens of microseconds, more than encrypting the message. Messages go
pickled with protocol 5 inside a "stored" (uncompressed) zlib stream
(:func:`stored_zlib`): smaller than before for binary values, and the
receiver's ``pickle.loads(zlib.decompress(...))`` reads them as before, so
peers that still send the old way and peers that do not understand each
other.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.serializer import Serializer
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport

from raftcoord.errors import ValueFormatError
from raftcoord.raftfiles import decode_dump, fsync_path

__all__ = ["HELLO", "Engine", "GuardedTransport", "Throttle", "cap_snapshot_commit", "join_transmission",
           "skip_held_entries", "stored_zlib"]

log = logging.getLogger(__name__)

#: The message a non-voter sends each voter once connected: ``{"type": HELLO,
#: "addr": its configured raft address}``. pysyncobj knows a non-voter only
#: as an anonymous connection numbered in arrival order; without a name the
#: leader could not tell which node it stopped hearing. pysyncobj ignores
#: message types it does not know, so an older peer is not disturbed.
HELLO: Final = "rc_hello"

#: pysyncobj's command type of a membership change entry (``_COMMAND_TYPE.MEMBERSHIP``).
MEMBERSHIP_ENTRY: Final = 2

# --------------------------------------------------------------------------
# The guards on incoming append_entries (hazards 3 and 5, d15).


def join_transmission(engine: Engine, message: dict[str, Any]) -> dict[str, Any]:
    """d15: turn the last chunk of a large entry into a plain append of that entry.

    pysyncobj sends an entry of 64 KiB or more as chunks (``transmission``
    start, process..., finish) and unpickles them on ``finish`` inside its
    append branch, where no guard could see the entry. Joined here, the
    entry passes :func:`skip_held_entries` like any other. The leader marks a
    chunk ``finish`` once the offset passes the command's length, which is
    shorter than the pickled entry: such a premature ``finish`` does not
    unpickle and is handed on as ``process``, so the real last chunk
    completes it.
    """
    kind = message.get("transmission")
    if kind not in ("process", "finish"):
        return message
    received = engine._SyncObj__recvTransmission  # type: ignore[attr-defined]
    if not isinstance(received, bytes):
        # A chunk without its start (a reconnect in between): pysyncobj would
        # raise on it. Answer as to a heartbeat; the leader sends it again.
        rest = {k: v for k, v in message.items() if k not in ("transmission", "data")}
        return {**rest, "entries": []}
    if kind == "process":
        return message
    try:
        entry = pysyncobj_pickle.loads(received + message["data"])
    except Exception:  # noqa: BLE001 - truncated: more chunks follow
        return {**message, "transmission": "process"}
    engine._SyncObj__recvTransmission = ""  # type: ignore[attr-defined]  # as pysyncobj leaves it
    rest = {k: v for k, v in message.items() if k not in ("transmission", "data")}
    return {**rest, "entries": [tuple(entry)]}


def cap_snapshot_commit(engine: Engine, message: dict[str, Any]) -> dict[str, Any]:
    """Hazard 3: a snapshot chunk must not commit this replica's own entries."""
    if "prevLogIdx" not in message and message["commit_index"] > engine.raftCommitIndex:
        return {**message, "commit_index": engine.raftCommitIndex}
    return message


def skip_held_entries(engine: Engine, message: dict[str, Any]) -> dict[str, Any]:
    """Hazard 5: do not let pysyncobj delete entries this replica already holds."""
    prev_idx, prev_term = message.get("prevLogIdx"), message.get("prevLogTerm")
    if prev_idx is None or message.get("transmission") is not None:
        return message  # chunks before the last carry no entry (join_transmission)
    if engine.rc_term_at(prev_idx) != prev_term:
        return message  # pysyncobj refuses it
    entries = message.get("entries") or []
    held = 0
    for _command, idx, term in entries:
        if engine.rc_term_at(idx) != term:
            break
        held += 1  # same index and term: the same entry (Log Matching)
    if held:
        _command, prev_idx, prev_term = entries[held - 1]
    rest = entries[held:]
    if not rest:
        last_idx, last_term = engine.rc_last_entry()
        if last_idx > prev_idx and last_term == message["term"]:
            # Entries of the leader's own term came from this leader: they
            # are in its log, and so is everything before them.
            prev_idx, prev_term = last_idx, last_term
    if prev_idx == message["prevLogIdx"]:
        return message
    return {**message, "entries": rest, "prevLogIdx": prev_idx, "prevLogTerm": prev_term}


class Throttle:
    """Lets a repeated log line through at most once per ``interval``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.suppressed = 0
        self._next = 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self.interval
        return True

    def take(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


# --------------------------------------------------------------------------
# Peer messages without deflate (issue 9).

_STORED_BLOCK: Final = struct.Struct("<BHH")
_ADLER: Final = struct.Struct(">I")
_FRAME_LEN: Final = struct.Struct("i")  # pysyncobj's length prefix, native int
#: Fixed, not HIGHEST_PROTOCOL: a newer Python's default must not reach an older peer.
_PICKLE_PROTOCOL: Final = 5


def stored_zlib(data: bytes) -> bytes:
    """``data`` as a zlib stream of uncompressed ("stored") deflate blocks (RFC 1950/1951).

    Any ``zlib.decompress`` reads it; building it costs a copy and a
    checksum, not a deflate stream's set-up.
    """
    parts = [b"\x78\x01"]  # deflate, 32 KiB window, no dictionary, fastest (check bits: 0x7801 % 31 == 0)
    view = memoryview(data)
    pos, end = 0, len(data)
    while True:
        chunk = view[pos:pos + 0xFFFF]
        pos += len(chunk)
        last = pos >= end
        parts.append(_STORED_BLOCK.pack(1 if last else 0, len(chunk), len(chunk) ^ 0xFFFF))
        parts.append(chunk)
        if last:
            break
    parts.append(_ADLER.pack(zlib.adler32(data)))
    return b"".join(parts)


class _LeanConnection(TcpConnection):
    """pysyncobj's connection, sending each message pickled with protocol 5 as a stored zlib stream."""

    def send(self, message: Any) -> None:
        # pysyncobj's TcpConnection.send, but for the pickle protocol and the deflate.
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        data = stored_zlib(pickle.dumps(message, _PICKLE_PROTOCOL))
        if self.encryptor:
            data = self.encryptor.encrypt_at_time(data, int(time.monotonic()))
        self._TcpConnection__writeBuffer += _FRAME_LEN.pack(len(data)) + data  # type: ignore[attr-defined]
        self._TcpConnection__trySendBuffer()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Connections that have not identified themselves (d5, d6).


class _UnidentifiedConnection(_LeanConnection):
    """An incoming connection whose peer has not yet said which node it is.

    pysyncobj reads until the length a frame announces has arrived, growing
    its buffer by concatenation, and trusts that length before anything is
    authenticated (upstream issue 174): a stranger could make it buffer up
    to 2 GiB. Here a frame may announce at most ``rc_frame_cap`` bytes, and
    once a whole frame is in, reading pauses until it has been checked.
    """

    rc_frame_cap: int | None = None
    rc_refused: str | None = None

    def _TcpConnection__processRead(self) -> bool:  # noqa: N802 - pysyncobj's (mangled) name
        more: bool = TcpConnection._TcpConnection__processRead(self)  # type: ignore[attr-defined]
        cap = self.rc_frame_cap
        if not more or cap is None:
            return more
        buffer: bytes = self._TcpConnection__readBuffer  # type: ignore[attr-defined]
        if len(buffer) < 4:
            return True
        (size,) = struct.unpack("i", buffer[:4])
        if not 0 <= size <= cap:
            self.rc_refused = f"announced a frame of {size} bytes before identifying itself"
            self.disconnect()
            return False
        return len(buffer) < 4 + size


class _SturdyServer(TcpServer):
    """pysyncobj's listener, which unbinds for good when one ``accept`` fails.

    Out of file handles (EMFILE), pysyncobj would close the raft port and
    never open it again. Here only the transport's ``destroy`` closes it; a
    failed accept is logged, and accepting pauses for a moment (the pending
    connection would otherwise wake every poll) before it is tried again.
    """

    rc_closing = False
    rc_throttle: Throttle | None = None
    rc_paused_until: float | None = None

    def bind(self) -> None:
        super().bind()
        # pysyncobj listens with a backlog of 5: while strangers fill it, a
        # peer's connection attempt is dropped and retried after 1 s, 3 s, 7 s.
        self._TcpServer__socket.listen(128)  # type: ignore[attr-defined]

    def unbind(self) -> None:
        if self.rc_closing:
            super().unbind()
            return
        if self.rc_throttle is None:
            self.rc_throttle = Throttle(10.0)
        if self.rc_throttle():
            log.error("cannot accept a raft connection (out of file handles?); the raft port stays open "
                      "(%d more not logged)", self.rc_throttle.take())
        fileno = self._TcpServer__fileno  # type: ignore[attr-defined]
        if fileno is not None and self.rc_paused_until is None:
            self._TcpServer__poller.unsubscribe(fileno)  # type: ignore[attr-defined]
            self.rc_paused_until = time.monotonic() + 0.2

    def rc_resume(self) -> None:
        """Accept again once a pause after a failed accept is over (called every tick)."""
        if self.rc_paused_until is None or time.monotonic() < self.rc_paused_until or self.rc_closing:
            return
        self.rc_paused_until = None
        self._TcpServer__poller.subscribe(  # type: ignore[attr-defined]
            self._TcpServer__fileno, self._TcpServer__onNewConnection,  # type: ignore[attr-defined]
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)


class GuardedTransport(TCPTransport):
    """pysyncobj's TCP transport with the append_entries guards and peer logs."""

    #: Largest frame an unidentified connection may announce. Its first
    #: frames are a random key (about 150 bytes), a node address or
    #: ``'readonly'``, or a short admin command.
    frame_cap = 16 * 1024
    #: Seconds an incoming connection has to say which node it is.
    handshake_timeout = 5.0
    #: Unidentified connections held at once; the oldest is dropped first.
    max_unidentified = 64
    #: Peers whose last message time is kept; the longest silent goes first.
    max_heard = 1024

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:  # noqa: N803
        self._rc_up: set[Any] = set()
        self._rc_flaps: dict[Any, Throttle] = {}
        self._rc_refused = Throttle(60.0)
        self._rc_pending: dict[Any, float] = {}  # unidentified connection -> accept time
        self._rc_readonly_addr: dict[Any, str] = {}  # a non-voter's connection -> the address it announced
        self._rc_greeted: set[Any] = set()  # voters this non-voter has announced itself to
        self._rc_bad_hello = Throttle(60.0)
        super().__init__(syncObj, selfNode, otherNodes)

    def _createServer(self) -> None:  # noqa: N802
        super()._createServer()
        self._server.__class__ = _SturdyServer

    def addNode(self, node: Any) -> None:  # noqa: N802
        super().addNode(node)
        conn = self._connections.get(node)
        if type(conn) is TcpConnection:
            conn.__class__ = _LeanConnection  # outgoing: created by pysyncobj as a plain TcpConnection

    def _onTick(self) -> None:  # noqa: N802
        super()._onTick()
        if isinstance(self._server, _SturdyServer):
            self._server.rc_resume()
        self._rc_greet()
        if self._rc_pending:
            born_before = time.monotonic() - self.handshake_timeout
            for conn, born in list(self._rc_pending.items()):
                if born > born_before:
                    break
                self._rc_drop(conn, f"did not identify itself within {self.handshake_timeout:g} s")

    def _rc_drop(self, conn: Any, why: str) -> None:
        if conn.rc_refused is None:
            conn.rc_refused = why
        self._rc_pending.pop(conn, None)
        conn.disconnect()

    def _onNewIncomingConnection(self, conn: Any) -> None:  # noqa: N802
        super()._onNewIncomingConnection(conn)
        conn.__class__ = _UnidentifiedConnection
        conn.rc_frame_cap = self.frame_cap
        self._rc_pending[conn] = time.monotonic()
        while len(self._rc_pending) > self.max_unidentified:
            self._rc_drop(next(iter(self._rc_pending)),
                          f"more than {self.max_unidentified} connections had not identified themselves")

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:  # noqa: N802
        super()._onIncomingMessageReceived(conn, message)
        if conn not in self._unknownConnections and conn in self._rc_pending:
            del self._rc_pending[conn]
            conn.rc_frame_cap = None  # a peer of the cluster: its frames are its own business

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        engine = self._syncObj
        if engine.rc_failed:
            return
        if type(message) is dict and message.get("type") == HELLO:
            self._rc_hello(node, message)
            return  # ours alone: pysyncobj never sees it
        addr = getattr(node, "address", None) or self._rc_readonly_addr.get(node)
        if addr is not None:
            engine.rc_heard[addr] = time.monotonic()
        if type(message) is dict and message.get("type") == "append_entries":
            if message.get("term", -1) >= engine.raftCurrentTerm:
                message = join_transmission(engine, message)
                message = skip_held_entries(engine, cap_snapshot_commit(engine, message))
        super()._onMessageReceived(node, message)

    def send(self, node: Any, message: Any) -> bool:
        if getattr(self, "_syncObj", None) is not None and self._syncObj.rc_failed:
            return False  # a failed engine answers no peer (d8)
        return bool(super().send(node, message))

    def destroy(self) -> None:
        if isinstance(self._server, _SturdyServer):
            self._server.rc_closing = True
        super().destroy()

    def _onNodeConnected(self, node: Any) -> None:  # noqa: N802
        if node not in self._rc_up:
            self._rc_up.add(node)
            flaps = self._rc_flaps.get(node)
            (log.debug if flaps is not None and flaps.suppressed else log.info)("raft peer %s connected", node)
        super()._onNodeConnected(node)
        self._rc_greet()

    def _rc_greet(self) -> None:
        """A non-voter tells each voter it reaches which node it is (see :data:`HELLO`)."""
        engine = getattr(self, "_syncObj", None)
        identity = getattr(engine, "rc_identity", None)
        if identity is None or not self._selfIsReadonlyNode:
            return
        # Only after the handshake (_rc_up): a frame sent before the key
        # exchange would be taken for the exchange itself.
        for node in self._rc_up - self._rc_greeted:
            if self.send(node, {"type": HELLO, "addr": identity}):
                self._rc_greeted.add(node)

    def _rc_hello(self, node: Any, message: dict[str, Any]) -> None:
        addr = message.get("addr")
        # A voter's address is a voter's: a non-voter claiming it would make
        # a silent voter look alive.
        if node not in self._readonlyNodes or not isinstance(addr, str) or not 0 < len(addr) <= 300 \
                or addr in self._nodeAddrToNode:
            if self._rc_bad_hello():
                log.warning("ignored a malformed or misplaced non-voter greeting from %s (%d more not logged)",
                            node, self._rc_bad_hello.take())
            return
        self._rc_readonly_addr[node] = addr
        heard = self._syncObj.rc_heard
        heard[addr] = time.monotonic()
        while len(heard) > self.max_heard:  # peers that come and go under new names
            del heard[min(heard, key=heard.__getitem__)]

    def _onReadonlyNodeDisconnected(self, node: Any) -> None:  # noqa: N802
        self._rc_readonly_addr.pop(node, None)
        super()._onReadonlyNodeDisconnected(node)

    def _onNodeDisconnected(self, node: Any) -> None:  # noqa: N802
        self._rc_greeted.discard(node)
        if node in self._rc_up:
            self._rc_up.discard(node)
            flaps = self._rc_flaps.setdefault(node, Throttle(30.0))
            if flaps():  # a peer that keeps reconnecting is reported twice a minute
                log.warning("raft peer %s disconnected (%d more disconnects not logged)", node, flaps.take())
            else:
                log.debug("raft peer %s disconnected", node)
        super()._onNodeDisconnected(node)

    def _onReadonlyNodeConnected(self, node: Any) -> None:  # noqa: N802
        log.info("non-voting replica connected")
        super()._onReadonlyNodeConnected(node)

    def _onDisconnected(self, conn: Any) -> None:  # noqa: N802
        self._rc_pending.pop(conn, None)
        if conn in self._unknownConnections and self._rc_refused():
            # pysyncobj drops a peer that fails authentication without a word
            # (upstream issue 175); this is the only trace of it.
            why = getattr(conn, "rc_refused", None) or "wrong cluster secret, or not a raft peer?"
            log.warning("closed an incoming raft connection that did not identify itself (%s); "
                        "%d more not logged", why, self._rc_refused.take())
        super()._onDisconnected(conn)


# --------------------------------------------------------------------------
# Snapshot files (d8, d14).


class _SyncedSerializer(Serializer):
    """pysyncobj's snapshot file handling, made durable and loud.

    A snapshot received from the leader is written to a temporary file and
    renamed over the old one; the data is fsync'ed before the rename and the
    directory after it, so that a power cut leaves the old snapshot or the
    new one, never a renamed file with lost data. A failure of the snapshot
    reader is remembered for :class:`Engine` (pysyncobj only logs it).
    """

    rc_load_error: BaseException | None = None
    _rc_damaged = Throttle(30.0)

    def _rc_whole(self, path: str) -> bool:
        # pysyncobj streams snapshot chunks unacknowledged, and a reconnect
        # loses those in flight: the file can arrive with a gap. Such a file
        # must neither replace the snapshot on disk nor be acknowledged (nor
        # stop the replica, d8: a blip is not fatal); not installing it makes
        # the leader send the snapshot again.
        try:
            decode_dump(Path(path).read_bytes())
        except (OSError, ValueFormatError) as exc:
            if self._rc_damaged():
                log.warning("a snapshot from the leader arrived damaged (%s); not installing it, the leader "
                            "sends it again (%d more not logged)", exc, self._rc_damaged.take())
            return False
        return True

    def deserialize(self) -> Any:
        try:
            return super().deserialize()
        except BaseException as exc:
            self.rc_load_error = exc
            raise

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802
        incoming = self._Serializer__incomingTransmissionFile  # type: ignore[attr-defined]
        if data is not None and data[2] and incoming is not None:
            try:
                if data[0]:
                    incoming.write(data[0])
                    data = (b"", data[1], data[2])
                incoming.flush()
                os.fsync(incoming.fileno())
            except OSError:
                log.exception("cannot sync the snapshot received from the leader; not installing it")
                incoming.close()
                self._Serializer__incomingTransmissionFile = None  # type: ignore[attr-defined]
                return False
            if not self._rc_whole(incoming.name):
                incoming.close()
                self._Serializer__incomingTransmissionFile = None  # type: ignore[attr-defined]
                return False
        done: bool = super().setTransmissionData(data)
        name = self._Serializer__fileName  # type: ignore[attr-defined]
        if done and name is not None:
            try:
                fsync_path(Path(name).resolve().parent)  # the rename
            except OSError:
                log.exception("cannot sync the directory of the snapshot received from the leader")
        return done


# --------------------------------------------------------------------------
# The engine: a SyncObj with one replicated method.


class Engine(SyncObj):
    """pysyncobj's SyncObj carrying ``apply(command_bytes)``, and nothing else.

    ``sink`` applies a committed command (on the Raft thread). ``on_fatal``
    is called once, on the Raft thread, with a reason when this replica must
    stop applying (a snapshot that fails to load); from then on the engine
    neither hears nor answers any peer. Without it, the reason is only
    logged. Drive the engine with ``autoTick=False`` (the replica does).
    """

    def __init__(self, self_address: str | None, partners: list[str], conf: SyncObjConf,
                 sink: Callable[[bytes], dict[str, Any]], *,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self._rc_sink = sink
        self._rc_on_fatal = on_fatal
        self._rc_failed: str | None = None
        #: Raft address -> monotonic time a message from that peer last arrived.
        self.rc_heard: dict[str, float] = {}
        #: A non-voter's own raft address as the configuration names it, sent
        #: to the voters (:data:`HELLO`) so the leader can tell when it last
        #: heard from it. None: stay anonymous (pysyncobj's behaviour).
        self.rc_identity: str | None = None
        self._rc_learners_due = 0.0  # when non-voters may get their next append (leader)
        super().__init__(self_address, partners, conf=conf, transportClass=GuardedTransport)
        self._SyncObj__serializer.__class__ = _SyncedSerializer  # type: ignore[attr-defined]

    @replicated
    def apply(self, command: bytes) -> dict[str, Any]:
        """The one replicated method (hazard 8): apply a command to the store."""
        return self._rc_sink(command)

    @property
    def rc_failed(self) -> str | None:
        """Why this engine stopped (see ``on_fatal``), or None while it runs."""
        return getattr(self, "_rc_failed", None)

    def rc_fail(self, reason: str) -> None:
        """Stop for good: answer no peer, and tell ``on_fatal``."""
        if self.rc_failed is not None:
            return
        self._rc_failed = reason
        log.critical("the raft engine stopped: %s", reason)
        if self._rc_on_fatal is not None:
            try:
                self._rc_on_fatal(reason)
            except Exception:  # noqa: BLE001 - the engine stays stopped whatever the callback does
                log.exception("on_fatal callback failed")

    def peer_ages(self) -> dict[str, float]:
        """Seconds since a message last arrived from each peer, by raft address (Raft thread).

        Built from Raft's own traffic, so it costs no log entry: the leader
        hears every follower and every non-voter that announced itself
        (:data:`HELLO`) at each heartbeat, a follower hears only the leader.
        A peer not heard since this engine started is absent.
        """
        now = time.monotonic()
        return {addr: round(now - at, 3) for addr, at in self.rc_heard.items()}

    # pysyncobj keeps its log private; these are the only reads of it.
    def rc_term_at(self, idx: int) -> int | None:
        """The term of the entry at ``idx`` in this replica's log, or None."""
        journal = self._SyncObj__raftLog  # type: ignore[attr-defined]
        pos = idx - journal[0][1]
        return journal[pos][2] if 0 <= pos < len(journal) else None

    def rc_last_entry(self) -> tuple[int, int]:
        """``(index, term)`` of the last entry in this replica's log."""
        entry = self._SyncObj__raftLog[-1]  # type: ignore[attr-defined]
        return entry[1], entry[2]

    def rc_shared_index(self) -> int:
        """The last index this replica knows every future leader holds as it does.

        Committed entries are in every later leader's log (Raft's Leader
        Completeness), and so are applied ones, which were committed.
        """
        return max(self.raftCommitIndex, self.raftLastApplied)

    # Overrides of pysyncobj's private methods (name-mangled; looked up on the
    # instance, so these replace them for every caller inside SyncObj).

    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False,  # noqa: N802
                                  nextNodeIdx: int | None = None, success: bool = False) -> None:  # noqa: N803
        if reset and not success:
            # d4: a refused append. pysyncobj answers "my last index + 1" when
            # the leader's previous entry is past this log, and "one back" on
            # a term mismatch; batches sent without waiting answer in turn,
            # the later ones undo the back-off, and a follower whose log ends
            # in another term's entries is never reached. Unless this log ends
            # in the leader's own term (all of it is then the leader's), go
            # back to a point both logs are known to share.
            last_idx, last_term = self.rc_last_entry()
            if nextNodeIdx is None:
                nextNodeIdx = last_idx + 1
            if last_term != self.raftCurrentTerm:
                nextNodeIdx = min(nextNodeIdx, self.rc_shared_index() + 1)
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset=reset,  # type: ignore[attr-defined]
                                          nextNodeIdx=nextNodeIdx, success=success)

    #: Seconds between two appends a leader sends a non-voter while entries
    #: keep coming (issue 10); voters get each entry at once. Set by the replica.
    rc_learner_interval: float = 0.0

    def _SyncObj__sendAppendEntries(self) -> None:  # noqa: N802
        # A commit waits for voters only, but pysyncobj sends each entry to
        # every voter and non-voter in one loop, pickled and encrypted once
        # per connection: with seven non-voters a put took 1.8-2.2 x as long
        # at one client (issue 10, the raftcoord+7nv bench row). Voters get
        # every append first; non-voters get what piled up at most every
        # rc_learner_interval seconds, in one message. The leader's next tick
        # after that sends them the rest, so they trail by at most about that.
        readonly = self._SyncObj__readonlyNodes  # type: ignore[attr-defined]
        if not readonly or self.rc_learner_interval <= 0:
            SyncObj._SyncObj__sendAppendEntries(self)  # type: ignore[attr-defined]
            return
        during: set[Any] = set()
        self._SyncObj__readonlyNodes = during
        try:
            SyncObj._SyncObj__sendAppendEntries(self)  # type: ignore[attr-defined]
        finally:
            # A non-voter that came or went meanwhile is in (or left) the
            # connected set: keep the two in step, as pysyncobj does.
            connected = self._SyncObj__connectedNodes  # type: ignore[attr-defined]
            self._SyncObj__readonlyNodes = {n for n in readonly | during if n in connected}
        now = time.monotonic()
        if now < self._rc_learners_due:
            # Make sure a tick comes back for them once they are due.
            self._SyncObj__newAppendEntriesTime = min(  # type: ignore[attr-defined]
                self._SyncObj__newAppendEntriesTime, self._rc_learners_due)  # type: ignore[attr-defined]
            return
        self._rc_learners_due = now + self.rc_learner_interval
        voters = self._SyncObj__otherNodes  # type: ignore[attr-defined]
        next_time = self._SyncObj__newAppendEntriesTime  # type: ignore[attr-defined]
        self._SyncObj__otherNodes = set()
        try:
            SyncObj._SyncObj__sendAppendEntries(self)  # type: ignore[attr-defined]
        finally:
            self._SyncObj__otherNodes = voters
            self._SyncObj__newAppendEntriesTime = next_time  # the voters' heartbeat clock, not reset

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802
        # Tell the followers a new commit index before applying it here, not
        # after: pysyncobj applies on the leader first (the store, listeners,
        # waiting proposers) and only then sends the append that carries the
        # commit, so every follower's observers and watches trailed the
        # leader's by its whole apply. Committed entries may be applied in
        # any order across replicas; the send after applying is then redundant.
        if (not self._SyncObj__conf.appendEntriesUseBatch  # type: ignore[attr-defined]
                and self._isLeader()
                and self.raftCommitIndex > self.raftLastApplied):
            self._SyncObj__sendAppendEntries()  # type: ignore[attr-defined]
            SyncObj._SyncObj__applyLogEntries(self)  # type: ignore[attr-defined]
            return False
        return bool(SyncObj._SyncObj__applyLogEntries(self))  # type: ignore[attr-defined]

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        SyncObj._SyncObj__onMessageReceived(self, node, message)  # type: ignore[attr-defined]
        # A follower answers a snapshot only after its last chunk, so the
        # leader read nothing from it for the whole transfer and, past its
        # connection timeout, dropped the connection and began the snapshot
        # again, for ever, once a snapshot took longer than that to send.
        # Acknowledge each chunk of the current term (the leader's answer to
        # a neither-reset-nor-success next_node_idx is only "heard from it").
        chunk = message.get("serialized") if isinstance(message, dict) else None
        if (isinstance(chunk, (tuple, list)) and len(chunk) == 3 and message.get("type") == "append_entries"
                and not chunk[2]
                and message.get("term") == self.raftCurrentTerm and not self._isLeader()):
            self._SyncObj__sendNextNodeIdx(node, reset=False, success=False)  # type: ignore[attr-defined]

    # ------------------------------------------------------------ membership

    def rc_change_membership(self, kind: str, address: str, registry_command: bytes,
                             callback: Callable[[Any, int], None]) -> None:
        """Raft thread: propose pysyncobj's change of the voters (``"add"`` or ``"rem"`` ``address``).

        The entry also carries ``registry_command``, the store command that
        records the change in the member registry: pysyncobj reads only the
        first three items of its request, and this engine applies the fourth
        when the entry commits (:meth:`_SyncObj__doApplyCommand`). One entry,
        so the Raft configuration and the registry never disagree about a
        committed change. pysyncobj changes its configuration when the entry
        is appended (the Raft paper's rule), refuses a change while another
        is uncommitted or before its leader's first entry committed
        (REQUEST_DENIED), and a follower forwards the request to the leader.
        """
        if kind not in ("add", "rem"):
            raise ValueError(f"membership change must be add or rem, not {kind!r}")
        request = [kind, address, TCPNode(address), bytes(registry_command)]
        self._applyCommand(pickle.dumps(request, protocol=_PICKLE_PROTOCOL), callback, MEMBERSHIP_ENTRY)

    def rc_voters(self) -> list[str]:
        """The voters' raft addresses in this engine's current configuration (Raft thread)."""
        others = [n.address for n in self.otherNodes]
        me = self.selfNode
        return sorted(others + ([me.address] if me is not None else []))

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:  # noqa: N802
        result = SyncObj._SyncObj__doApplyCommand(self, command)  # type: ignore[attr-defined]
        if command[:1] == bytes([MEMBERSHIP_ENTRY]):
            try:
                request = pickle.loads(command[1:])  # noqa: S301 - a committed entry from an authenticated peer
            except Exception:  # noqa: BLE001 - never raise on apply (hazard 7)
                log.error("a committed membership entry could not be read; its registry change is skipped")
                return None
            if isinstance(request, list) and len(request) >= 4 and isinstance(request[3], bytes):
                return self._rc_sink(request[3])
        return result

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:  # noqa: N802, N803
        # d8: pysyncobj logs a snapshot that fails to load and then tells the
        # leader it has it (its old log end, with success). Stop instead.
        if self.rc_failed is not None:
            return
        serializer = self._SyncObj__serializer  # type: ignore[attr-defined]
        serializer.rc_load_error = None
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)  # type: ignore[attr-defined]
        error = serializer.rc_load_error
        if error is not None:
            self.rc_fail(f"the snapshot could not be loaded ({type(error).__name__}: {error}); "
                         f"this replica must not go on")
