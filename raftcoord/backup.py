"""Backup files: a consistent copy of a cluster's state, and seeding a new cluster from one.

A backup is the store snapshot of one revision (``Store.image()``, taken
under a linearizable read by ``GET /raftcoord/v1/snapshot``) in a file of
its own, checked end to end. ``raftcoord snapshot save`` writes one,
``snapshot status`` describes one, ``snapshot restore`` turns one into the
data directory of a node of a NEW cluster (:func:`restore_data_dir`); each
node of that cluster is restored from the same file and starts with its
state, as with ``etcdctl snapshot save/status/restore``.

File layout (version 1): a CBOR sequence (RFC 8742) of five items::

    "raftcoord-backup"      text: the magic, 17 fixed bytes
    1                       uint: the format version
    h'<header>'             bytes: canonical CBOR map {cluster, revision,
                            clock, created (tag 1), keys, messages, nodes}
    h'<state>'              bytes: Store.snapshot() of that revision
    h'<32 bytes>'           bytes: SHA-256 of every byte before this item

Why a trailing checksum over the whole body rather than a ``sha256`` of the
state inside the map: every byte is covered (a flipped revision, cluster
name or count is caught too, not just a damaged state), it is computed in
one pass as the file is written or streamed, and nothing but the fixed
framing is parsed before it is checked: the header map reaches the CBOR
decoder only once its bytes are known good. Why the header travels as a
byte string: every item after the version is a byte string whose head
gives its exact length, so the file's expected size is known from a few
heads, and a truncated file or one with bytes appended is named as such,
apart from one whose content changed. The magic and the version come
first, in fixed places, so that a file of a newer version is recognised as
such without knowing its layout.

The checksum ``snapshot save`` and ``status`` print is that SHA-256 (not
``sha256sum`` of the whole file, which also covers the checksum item).
``keys`` counts the user's keys; ``messages`` and ``nodes`` the message and
node-state records (the three add up to every key in the store).

Restoring writes ``raft.snapshot`` (the replica's own dump file,
:mod:`raftcoord.raftfiles`) into an empty or absent data directory, with the
store's member registry emptied so the new cluster seeds its own from its
config file, and the new config's voters as the Raft cluster. Its two log
entries are the same on every node (no-ops at index 1 and 2, term 0), so the
restored nodes agree on the log they start from, and the first election
(term 1) is above it.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from raftcoord.errors import InvalidInputError, ValueFormatError
from raftcoord.keys import MESSAGE_PREFIX, NODE_PREFIX, prefix_end
from raftcoord.raftfiles import DUMP_FORMAT, Dump, encode_dump_parts, fsync_path, write_parts
from raftcoord.values import cbor_bytes_head, decode_cbor, encode_cbor

__all__ = [
    "BACKUP_VERSION",
    "MAGIC",
    "SNAPSHOT_PATH",
    "Backup",
    "BackupHeader",
    "backup_status",
    "capture",
    "decode_backup",
    "encode_backup",
    "encode_backup_parts",
    "read_backup",
    "restore_data_dir",
]

#: The first item of every backup file: CBOR text "raftcoord-backup".
MAGIC: Final = encode_cbor("raftcoord-backup")
#: The format version this code writes and the newest it reads.
BACKUP_VERSION: Final = 1
#: The client route that answers a backup of the cluster's state.
SNAPSHOT_PATH: Final = "/raftcoord/v1/snapshot"
#: The largest header accepted: a few small fields; more is a damaged length.
MAX_HEADER_BYTES: Final = 64 * 1024
#: The replica's snapshot file in a data directory (``Replica._start_engine``).
DUMP_NAME: Final = "raft.snapshot"
_DIGEST_ITEM: Final = b"\x58\x20"  # the head of a 32-byte CBOR byte string
_DIGEST_BYTES: Final = 32
# pysyncobj's no-op command; the restored log's two entries, identical on every node.
_NO_OP: Final = b"\x01"
_RESTORED_PREV: Final = (_NO_OP, 1, 0)
_RESTORED_LAST: Final = (_NO_OP, 2, 0)
_HEADER_FIELDS: Final = ("cluster", "revision", "clock", "created", "keys", "messages", "nodes")
_UINT64_MAX: Final = 2**64 - 1


@dataclass(frozen=True, slots=True)
class BackupHeader:
    """What a backup holds, in a few numbers: written at save time, covered by the checksum."""

    cluster: str
    revision: int
    clock: int
    created: datetime
    keys: int
    messages: int
    nodes: int

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, str):
            raise ValueFormatError("backup cluster must be text", field="cluster")
        for name in ("revision", "clock", "keys", "messages", "nodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
                raise ValueFormatError(f"backup {name} must be a uint64, got {value!r}", field=name)
        if not isinstance(self.created, datetime) or self.created.tzinfo is None:
            raise ValueFormatError("backup created must be a time with a time zone", field="created")

    def to_map(self) -> dict[str, Any]:
        """The header's CBOR map."""
        return {name: getattr(self, name) for name in _HEADER_FIELDS}


@dataclass(frozen=True, slots=True)
class Backup:
    """A decoded, checked backup file."""

    header: BackupHeader
    state: bytes  # Store.snapshot() bytes
    sha256: str  # the file's checksum, hex
    size: int  # bytes of the whole file


def capture(store: Any, *, cluster: str, created: datetime) -> tuple[BackupHeader, Any]:
    """The header and a frozen image of ``store`` at its current revision.

    Run it under the replica's state lock (a ``read`` callback): both take
    references only, a few ms per 100,000 keys; the image's ``encode()``
    may then run anywhere, later, and still gives this revision's bytes.
    """
    messages = store.count(MESSAGE_PREFIX, prefix_end(MESSAGE_PREFIX))
    nodes = store.count(NODE_PREFIX, prefix_end(NODE_PREFIX))
    header = BackupHeader(cluster=cluster, revision=store.revision, clock=store.clock, created=created,
                          keys=len(store) - messages - nodes, messages=messages, nodes=nodes)
    return header, store.image()


# ------------------------------------------------------------------ encoding

def encode_backup_parts(header: BackupHeader, state: bytes) -> list[bytes]:
    """The backup file's bytes in pieces, ``state`` among them uncopied.

    A large store's state is 100 MB and more: joined, it would be held
    twice. Written one after the other, the pieces are the file.
    """
    head = encode_cbor(header.to_map())
    parts = [MAGIC + encode_cbor(BACKUP_VERSION) + cbor_bytes_head(len(head)) + head, cbor_bytes_head(len(state)), state]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    parts.append(_DIGEST_ITEM + digest.digest())
    return parts


def encode_backup(header: BackupHeader, state: bytes) -> bytes:
    """The backup file of ``state`` (``Store.snapshot()`` bytes) described by ``header``."""
    return b"".join(encode_backup_parts(header, state))


# ------------------------------------------------------------------ decoding

class _Cursor:
    """Reads the file's framing (CBOR heads of known shapes), naming a cut-short file as truncated."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.at = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.at + n > len(self.view):
            raise ValueFormatError(
                f"backup file is truncated: it ends inside the {what} (the file has {len(self.view)} bytes)",
                field="file")
        out = self.view[self.at:self.at + n]
        self.at += n
        return out

    def head(self, major: int, what: str) -> int:
        """A CBOR head of major type ``major``: its argument."""
        first = self.take(1, what)[0]
        if first >> 5 != major:
            kind = {0: "an unsigned integer", 2: "a byte string"}[major]
            raise ValueFormatError(f"backup file is damaged: the {what} is not {kind}", field="file")
        info = first & 0x1F
        if info < 24:
            return info
        if info > 27:
            raise ValueFormatError(f"backup file is damaged: the {what} has a malformed length", field="file")
        return int.from_bytes(self.take(1 << (info - 24), what), "big")


def _frame(view: memoryview) -> tuple[memoryview, memoryview, bytes, int]:
    """Check the framing and checksum: the header bytes, the state bytes, the digest, the body's end."""
    size = len(view)
    if size == 0:
        raise ValueFormatError("backup file is empty", field="file")
    start = bytes(view[:len(MAGIC)])
    if start != MAGIC:
        if size < len(MAGIC) and MAGIC.startswith(start):
            raise ValueFormatError(f"backup file is truncated: only {size} bytes", field="file")
        hint = ""
        if DUMP_FORMAT.encode() in bytes(view[-256:]):
            hint = " (it is a replica's raft.snapshot file; take a backup with `raftcoord snapshot save`)"
        raise ValueFormatError(f"not a raftcoord backup file: it does not begin with the magic {MAGIC[1:].decode()!r}"
                               + hint, field="format")
    cur = _Cursor(view)
    cur.at = len(MAGIC)
    version = cur.head(0, "format version")
    if version > BACKUP_VERSION:
        raise ValueFormatError(
            f"backup file format version {version} is newer than this raftcoord reads ({BACKUP_VERSION}): "
            "upgrade raftcoord to use it (or the file is damaged)", field="version")
    if version != BACKUP_VERSION:
        raise ValueFormatError(f"unsupported backup file format version {version}", field="version")
    header_len = cur.head(2, "header")
    if header_len > MAX_HEADER_BYTES:
        raise ValueFormatError(f"backup file is damaged: its header claims {header_len} bytes "
                               f"(at most {MAX_HEADER_BYTES})", field="file")
    header = cur.take(header_len, "header")
    state_len = cur.head(2, "state")
    # Check the length before taking: a damaged head may claim exabytes.
    if cur.at + state_len > size:
        raise ValueFormatError(
            f"backup file is truncated (or damaged): its state needs {cur.at + state_len - size} more bytes "
            f"than the file's {size}", field="file")
    state = cur.take(state_len, "state")
    body_end = cur.at
    digest_head = bytes(cur.take(len(_DIGEST_ITEM), "checksum"))
    if digest_head != _DIGEST_ITEM:
        raise ValueFormatError("backup file is damaged: no SHA-256 checksum where it belongs", field="file")
    digest = bytes(cur.take(_DIGEST_BYTES, "checksum"))
    if cur.at != size:
        raise ValueFormatError(
            f"backup file has {size - cur.at} bytes of trailing garbage after its checksum", field="file")
    actual = hashlib.sha256(view[:body_end]).digest()
    if actual != digest:
        raise ValueFormatError(
            f"backup file checksum mismatch: the file is damaged (its content hashes to sha256 "
            f"{actual.hex()[:16]}..., the file records {digest.hex()[:16]}...)", field="sha256")
    return header, state, digest, body_end


def _decode_header(data: memoryview) -> BackupHeader:
    obj = decode_cbor(bytes(data), what="backup header")
    if not isinstance(obj, dict):
        raise ValueFormatError("backup header must be a CBOR map", field="header")
    missing = [name for name in _HEADER_FIELDS if name not in obj]
    if missing:
        raise ValueFormatError(f"backup header lacks {', '.join(missing)}", field=missing[0])
    created = obj["created"]
    if isinstance(created, datetime) and created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return BackupHeader(cluster=obj["cluster"], revision=obj["revision"], clock=obj["clock"], created=created,
                        keys=obj["keys"], messages=obj["messages"], nodes=obj["nodes"])


def decode_backup(data: bytes | bytearray | memoryview) -> Backup:
    """A backup file's bytes, checked; raises ValueFormatError naming what is wrong.

    Refused: not a backup (wrong magic), a newer format version, a file cut
    short, bytes after the checksum, a checksum that does not match, a
    malformed header.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueFormatError(f"backup file must be bytes, not {type(data).__name__}", field="file")
    view = memoryview(data).cast("B")
    header, state, digest, _ = _frame(view)
    return Backup(_decode_header(header), bytes(state), digest.hex(), len(view))


@contextlib.contextmanager
def _mapped(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """A backup file mapped read-only (not read into memory), or InvalidInputError if it cannot be read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
    except IsADirectoryError:
        raise InvalidInputError(f"{path}: is a directory, not a backup file", field="file") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}",
                                field="file") from None
    if mapped is None:
        yield memoryview(b"")
        return
    view = memoryview(mapped)
    try:
        yield view
    finally:
        # Slices still held by a traceback keep the map open until they go.
        with contextlib.suppress(BufferError):
            view.release()
            mapped.close()


def read_backup(path: str | os.PathLike[str]) -> Backup:
    """The backup in the file at ``path``, checked (see :func:`decode_backup`)."""
    with _mapped(path) as view:
        return _with_path(path, lambda: decode_backup(view))  # type: ignore[no-any-return]


def _with_path(path: str | os.PathLike[str], fn: Any) -> Any:
    try:
        return fn()
    except ValueFormatError as exc:
        raise ValueFormatError(f"{path}: {exc.message}", field=exc.field) from None


def backup_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the backup file at ``path`` holds, once its checksum is verified.

    ``{"file", "format_version", "cluster", "created" (RFC 3339), "revision",
    "clock", "keys", "messages", "nodes", "state_bytes", "size", "sha256"}``.
    Raises ValueFormatError for a damaged file, InvalidInputError for one
    that cannot be read.
    """
    with _mapped(path) as view:
        def check() -> dict[str, Any]:
            header_bytes, state, digest, _ = _frame(view)
            header = _decode_header(header_bytes)
            return {
                "file": str(path),
                "format_version": BACKUP_VERSION,
                "cluster": header.cluster,
                "created": header.created.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
                "revision": header.revision,
                "clock": header.clock,
                "keys": header.keys,
                "messages": header.messages,
                "nodes": header.nodes,
                "state_bytes": len(state),
                "size": len(view),
                "sha256": digest.hex(),
            }

        return _with_path(path, check)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ restoring

def _restored_state(backup: Backup, state_machine: Any) -> Any:
    """The backup's store, checked against its header, with the member registry emptied."""
    store = state_machine.restore(backup.state)
    h = backup.header
    messages = store.count(MESSAGE_PREFIX, prefix_end(MESSAGE_PREFIX))
    nodes = store.count(NODE_PREFIX, prefix_end(NODE_PREFIX))
    found = (store.revision, store.clock, len(store) - messages - nodes, messages, nodes)
    if found != (h.revision, h.clock, h.keys, h.messages, h.nodes):
        raise ValueFormatError(
            "backup file is inconsistent: its header says revision, clock, keys, messages, nodes = "
            f"{(h.revision, h.clock, h.keys, h.messages, h.nodes)}, its state holds {found}", field="state")
    clear = getattr(store, "clear_members", None)
    if clear is not None:
        # The old cluster's members are not the new one's: the new cluster's
        # first leader seeds the registry from its own config file.
        clear()
    return store


def _holds_data(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries)
    except FileNotFoundError:
        return []


def restore_data_dir(backup: Backup, config: Any, name: str, *, data_dir: str | os.PathLike[str] | None = None,
                     state_machine: Any = None) -> Path:
    """Write node ``name``'s data directory so that it starts with the backup's state.

    ``config`` is the NEW cluster's :class:`raftcoord.config.ClusterConfig`
    (duck-typed); every node of it is restored from the same backup, then
    started as usual. ``data_dir`` defaults to the node's own in the config.
    The directory must be absent or empty (InvalidInputError otherwise): a
    restore never mixes with a node's existing log. The files are written
    in a temporary directory beside it, synced, and renamed into place, so
    a crash leaves no half-restored directory. Returns the directory.
    """
    if state_machine is None:
        from raftcoord.store import Store as state_machine
    node = config.node(name)
    target = Path(data_dir if data_dir is not None else node.data_dir).absolute()
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"data directory {target} is not a directory", field="data_dir")
    found = _holds_data(target)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise InvalidInputError(
            f"data directory {target} already holds data ({shown}); restore needs an empty or absent "
            "directory: move it away first", field="data_dir")
    store = _restored_state(backup, state_machine)
    cluster = tuple(sorted(n.raft for n in config.voters))
    parts = encode_dump_parts(Dump(_RESTORED_LAST, _RESTORED_PREV, cluster, store.snapshot()))
    del store
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=parent))
    except OSError as exc:
        raise InvalidInputError(f"cannot create a directory in {parent}: {exc.strerror or exc}",
                                field="data_dir") from None
    try:
        _write_synced(tmp / DUMP_NAME, parts)
        fsync_path(tmp)
        try:
            # Over an absent directory, or an empty one (rename(2) replaces
            # it): a directory that gained files meanwhile fails here.
            os.rename(tmp, target)
        except OSError as exc:
            raise InvalidInputError(f"cannot put the restored data at {target}: {exc.strerror or exc}",
                                    field="data_dir") from None
        fsync_path(parent)
    except OSError as exc:
        raise InvalidInputError(f"cannot write the restored data in {parent}: {exc.strerror or exc}",
                                field="data_dir") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_synced(path: Path, parts: Iterable[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_parts(fd, parts)
        os.fsync(fd)
    finally:
        os.close(fd)

