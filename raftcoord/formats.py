"""Format versions: what this node writes, what it can read, and what it refuses (issue 10).

A rolling upgrade runs old and new code side by side, so every byte layout
that crosses from one node to another (a Raft log entry, a snapshot) or
outlives the process (the snapshot file, a backup) carries a version, and a
node that meets a version newer than it knows stops with a message that says
so, instead of guessing at the bytes or acknowledging what it did not apply.

Log entries
-----------
An entry is one of (``ENTRY_FORMAT`` 1, the only one this code writes):

* a plain command: canonical CBOR, whose first byte is never 0xFF (CBOR's
  "break", which begins no data item);
* a batch, :data:`BATCH_MAGIC` and its length-prefixed commands
  (``proposals.encode_batch``), none of which begins with 0xFF;
* a version frame, :data:`VERSION_MAGIC` then one byte ``N``, then the
  format-``N`` payload. This code writes none: format 1 is never framed, so
  a frame names a format a later version defines.

:func:`check_entry` is the replica's first step on every committed entry.
Anything else that begins with 0xFF (a version frame, or framing this code
does not know) raises :class:`~raftcoord.errors.NewerFormatError`, and the
replica fail-stops on it. The check is a one-byte test for a plain command.

Snapshots and files
-------------------
The store's snapshot format (``store.SNAPSHOT_FORMAT``, reads
``store._READABLE_FORMATS``), the replica's snapshot file
(``raftfiles.DUMP_VERSION``) and the backup file (``backup.py``) keep their
own numbers beside their own code; :func:`known_formats` gathers them in one
place for ``raftcoord version`` and the node status. This module imports
nothing but the error classes, so the pure layers could use it too.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

from raftcoord.errors import NewerFormatError

__all__ = ["BATCH_MAGIC", "ENTRY_FORMAT", "KNOWN_ENTRY_FORMATS", "VERSION_MAGIC", "check_entry", "describe",
           "describe_known", "known_formats", "newer_message"]

#: The entry format this code writes.
ENTRY_FORMAT: Final = 1
#: The entry formats this code applies. A version frame is never among them:
#: format 1 is written unframed (a plain command or a batch).
KNOWN_ENTRY_FORMATS: Final = frozenset({1})
#: The first bytes of an entry that carries several commands (a batch, format 1).
BATCH_MAGIC: Final = b"\xffrcB"
#: The first bytes of an entry of format ``N``: this, then the byte ``N``, then the payload.
VERSION_MAGIC: Final = b"\xffrcV"
_FRAMED: Final = 0xFF
_UPGRADE: Final = "upgrade this node"


def newer_message(what: str, met: int, known: Any, advice: str = _UPGRADE) -> str:
    """The one wording of "newer than this node knows": what was met, what is known, what to do."""
    return f"{what} {met} is newer than this node knows ({_span(known)}): {advice}"


def check_entry(entry: bytes) -> None:
    """Raise NewerFormatError unless this node knows the framing of the Raft entry ``entry``.

    A plain command (the hot path) costs one byte test; a batch passes here,
    and ``proposals.decode_batch`` checks its commands as it splits them.
    """
    if not entry or entry[0] != _FRAMED:
        return
    if entry.startswith(BATCH_MAGIC):
        return
    raise NewerFormatError(describe(entry), field="entry")


def describe(entry: bytes) -> str:
    """Why a framed entry (one beginning with 0xFF, not a batch) cannot be applied here."""
    if entry.startswith(VERSION_MAGIC) and len(entry) > len(VERSION_MAGIC):
        n = entry[len(VERSION_MAGIC)]
        if n > max(KNOWN_ENTRY_FORMATS):
            return newer_message("log entry format", n, KNOWN_ENTRY_FORMATS)
        return (f"log entry framed as format {n}, which this node never frames (it knows "
                f"{_span(KNOWN_ENTRY_FORMATS)}, written unframed): {_UPGRADE}, or the entry is damaged")
    return (f"log entry begins with 0x{entry[:4].hex()} (unknown entry framing; this node knows entry format "
            f"{_span(KNOWN_ENTRY_FORMATS)}): {_UPGRADE}, or the entry is damaged")


def known_formats() -> dict[str, dict[str, Any]]:
    """The formats this node writes and reads: log entries, store snapshots, snapshot files, backups.

    ``{"entry": {"writes": 1, "reads": [1]}, "snapshot": {...}, "snapshot_file": {...},
    "backup": {...}}``; a part whose module is missing or names no version is left out.
    """
    out: dict[str, dict[str, Any]] = {"entry": {"writes": ENTRY_FORMAT, "reads": sorted(KNOWN_ENTRY_FORMATS)}}
    # Looked up when asked, not imported above: the numbers live beside their code
    # (the replica layer and backup.py), and this module stays importable anywhere.
    for part, module, writes, reads in (
        ("snapshot", "raftcoord.store", "SNAPSHOT_FORMAT", "_READABLE_FORMATS"),
        ("snapshot_file", "raftcoord.raftfiles", "DUMP_VERSION", "READABLE_DUMP_VERSIONS"),
        ("backup", "raftcoord.backup", "BACKUP_VERSION", "READABLE_BACKUP_VERSIONS"),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        w = getattr(mod, writes, None)
        if not isinstance(w, int):
            continue
        r = getattr(mod, reads, None)
        out[part] = {"writes": w, "reads": sorted(r) if r else [w]}
    return out


_LABELS: Final = {"entry": "log entry", "snapshot": "snapshot", "snapshot_file": "snapshot file", "backup": "backup"}


def describe_known() -> str:
    """:func:`known_formats` in one line: ``log entry 1 (reads 1), snapshot 5 (reads 1-5), ...``."""
    return ", ".join(f"{_LABELS.get(part, part)} {f['writes']} (reads {_span(f['reads'])})"
                     for part, f in known_formats().items())


def _span(known: Any) -> str:
    """``1``, ``1-5`` or ``1, 3``: a set of format numbers as a person reads it."""
    nums = sorted(known)
    if len(nums) > 1 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{nums[0]}-{nums[-1]}"
    return ", ".join(map(str, nums))
