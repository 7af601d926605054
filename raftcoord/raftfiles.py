"""The replica's files: snapshot dumps, the journal's alignment, flushed journals.

pysyncobj keeps its log in a journal file (mmap) and its state in a full-dump
file written through ``serializer`` hooks. raftcoord writes that dump as the
store's own canonical CBOR (never pickle, hazard 9) beside the two log
entries pysyncobj needs, and this module holds the byte layout of that file,
the repair of a journal left untrimmed by a crash, and the journal wrapper
that flushes every change when ``fsync`` is on (hazard 6).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.pickle import dumps as pysyncobj_dumps

from raftcoord.errors import NewerFormatError, ValueFormatError
from raftcoord.formats import newer_message
from raftcoord.values import cbor_bytes_head, decode_cbor, encode_cbor

__all__ = ["Dump", "Entry", "FlushedJournal", "align_journal", "decode_dump", "encode_dump", "encode_dump_parts",
           "fsync_path", "replace_durably", "rewrite_journal", "write_parts"]

DUMP_FORMAT: Final = "raftcoord-replica-snapshot"
#: The snapshot file layout this code writes, and those it reads (issue 10:
#: a newer one is refused with "newer ... upgrade", never guessed at).
DUMP_VERSION: Final = 1
READABLE_DUMP_VERSIONS: Final = (1,)

Entry = tuple[bytes, int, int]  # pysyncobj log entry: (command, index, term)


@dataclass(frozen=True, slots=True)
class Dump:
    last: Entry  # the last applied entry; the state includes it
    prev: Entry  # the entry before it
    cluster: tuple[str, ...]
    state: bytes  # store.snapshot()


def encode_dump(dump: Dump) -> bytes:
    return encode_cbor({
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "last": list(dump.last),
        "prev": list(dump.prev),
        "cluster": list(dump.cluster),
        "state": dump.state,
    })


def encode_dump_parts(dump: Dump) -> list[bytes]:
    """:func:`encode_dump`'s bytes in pieces, the state among them uncopied.

    The state of a large store is 100 MB and more; joining it into one
    bytes object would hold a second copy in memory and the GIL while
    copying. Written one after the other, the pieces are ``encode_dump(dump)``.
    """
    empty = encode_dump(Dump(dump.last, dump.prev, dump.cluster, b""))
    # Canonical CBOR sorts the keys by length first: "last" and "prev" come
    # before "state", then "format", "cluster" and "version".
    at = 1 + sum(len(encode_cbor(k)) + len(encode_cbor(list(v))) for k, v in (("last", dump.last), ("prev", dump.prev)))
    at += len(encode_cbor("state"))
    if empty[at - 6:at + 1] != encode_cbor("state") + cbor_bytes_head(0):  # a cbor2 that orders otherwise
        return [encode_dump(dump)]
    return [empty[:at], cbor_bytes_head(len(dump.state)), dump.state, empty[at + 1:]]


def decode_dump(data: bytes) -> Dump:
    """The snapshot file in ``data``; ValueFormatError if it is not one, NewerFormatError if of a newer version."""
    obj = decode_cbor(data, what="snapshot file")

    def entry(name: str) -> Entry:
        e = obj.get(name)
        if (not isinstance(e, list) or len(e) != 3 or not isinstance(e[0], bytes)
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in e[1:])):
            raise ValueFormatError(f"snapshot file {name} entry is malformed", field=name)
        return (e[0], e[1], e[2])

    if not isinstance(obj, dict) or obj.get("format") != DUMP_FORMAT:
        raise ValueFormatError("not a raftcoord snapshot file", field="format")
    version = obj.get("version")
    if version not in READABLE_DUMP_VERSIONS:
        if isinstance(version, int) and not isinstance(version, bool) and version > max(READABLE_DUMP_VERSIONS):
            raise NewerFormatError(newer_message("snapshot file version", version, READABLE_DUMP_VERSIONS),
                                   field="version")
        raise ValueFormatError(f"unsupported snapshot file version {version!r}", field="version")
    cluster = obj.get("cluster")
    if not isinstance(cluster, list) or not all(isinstance(a, str) for a in cluster):
        raise ValueFormatError("snapshot file cluster must be a list of addresses", field="cluster")
    if not isinstance(obj.get("state"), bytes):
        raise ValueFormatError("snapshot file state must be bytes", field="state")
    return Dump(entry("last"), entry("prev"), tuple(cluster), obj["state"])


def write_parts(fd: int, parts: Iterable[bytes]) -> None:
    """Write every byte of ``parts`` to ``fd``, in order, with no joined copy."""
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a power cut leaves the old file or the new one.

    Temp file, fsync, rename, fsync of the directory: renamed before its data
    is on disk, the file could come back empty after a crash.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_path(path.parent)


def rewrite_journal(path: Path, entries: list[Entry]) -> None:
    """Replace the journal at ``path`` with one holding just ``entries``, durably.

    pysyncobj trims a journal by rewriting it in place (clear, then add the
    entries kept); a power cut in the middle leaves a torn file. Here the
    new journal is written beside it, synced, and renamed over it.
    """
    fresh_path = path.with_name(path.name + ".new")
    fresh_path.unlink(missing_ok=True)
    fresh = FileJournal(str(fresh_path))
    try:
        for entry in entries:
            fresh.add(*entry)
    finally:
        fresh._destroy()  # msync and close
    fsync_path(fresh_path)
    os.replace(fresh_path, path)
    fsync_path(path.parent)


def align_journal(journal_path: Path, dump: Dump) -> int:
    """Drop journal entries older than the snapshot; return how many went.

    pysyncobj writes the snapshot, then trims the journal on its next tick.
    Killed in between, it restarts with a journal that does not begin with
    the snapshot's two entries, clears the whole journal and so loses the
    entries after the snapshot. Trimming here first keeps them.
    """
    if not journal_path.exists():
        return 0
    journal = FileJournal(str(journal_path))
    try:
        if len(journal) < 2 or (journal[0] == dump.prev and journal[1] == dump.last):
            return 0
        pos = dump.prev[1] - journal[0][1]
        if not (0 < pos < len(journal) - 1 and journal[pos] == dump.prev and journal[pos + 1] == dump.last):
            return 0
        kept = [journal[i] for i in range(pos, len(journal))]
    finally:
        journal._destroy()
    rewrite_journal(journal_path, kept)
    return pos


class _DurableMetaStorer(MetaStorer):
    """pysyncobj's term/vote/commit-index file, written with :func:`replace_durably`."""

    def storeMeta(self, meta: dict[str, Any]) -> None:  # noqa: N802 - pysyncobj's name
        replace_durably(Path(self.getPath()), pysyncobj_dumps(meta))


class FlushedJournal:
    """pysyncobj's FileJournal, made durable (``fsync=True``).

    Every change of the log is msync'ed before pysyncobj goes on, so a
    follower acknowledges only flushed entries. The term/vote file (which
    also holds the commit index, rewritten once a second under load) is
    replaced durably: temp file, fsync, rename, fsync of the directory,
    before pysyncobj sends the vote or message that depends on it.

    Trimming the log after a snapshot writes a new journal and renames it
    over the old one (:func:`rewrite_journal`) instead of pysyncobj's
    rewrite in place, which a power cut could leave torn.
    """

    def __init__(self, inner: FileJournal, meta_path: Path) -> None:
        self._inner = inner
        self._meta = meta_path
        self._path = meta_path.with_suffix("")  # pysyncobj names it journal + ".meta"
        inner._FileJournal__metaStorer = _DurableMetaStorer(str(meta_path))  # type: ignore[attr-defined]
        inner.flush()
        fsync_path(self._path)  # a journal just created: its size and its name in the directory
        fsync_path(self._path.parent)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __getitem__(self, item: Any) -> Any:
        return self._inner[item]

    def __len__(self) -> int:
        return len(self._inner)

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._inner.add(command, idx, term)
        self._inner.flush()

    def clear(self) -> None:
        self._inner.clear()
        self._inner.flush()

    def deleteEntriesFrom(self, entry_from: int) -> None:  # noqa: N802 - pysyncobj's name
        self._inner.deleteEntriesFrom(entry_from)
        self._inner.flush()

    def deleteEntriesTo(self, entry_to: int) -> None:  # noqa: N802
        kept = [self._inner[i] for i in range(entry_to, len(self._inner))]
        self._inner.onOneSecondTimer()  # a commit index not yet stored, before the journal is reopened
        rewrite_journal(self._path, kept)  # raises before anything changed, if it does
        self._inner._destroy()
        self._inner = FileJournal(str(self._path))
        self._inner._FileJournal__metaStorer = _DurableMetaStorer(str(self._meta))  # type: ignore[attr-defined]

    def setCurrentTerm(self, term: int, voted_for: Any) -> None:  # noqa: N802
        self._inner.setCurrentTerm(term, voted_for)  # stored durably before a vote is sent

    def onOneSecondTimer(self) -> None:  # noqa: N802
        self._inner.onOneSecondTimer()
