"""The optimistic transaction of ``Coordinator.transact()``: reads recorded, writes buffered.

A :class:`Transaction` reads through the coordinator's local (serializable)
reads and remembers the revision of every key and range it saw; its writes
stay in memory. :meth:`Transaction.commit` sends everything as one ``txn``
command whose compares re-check each read, so it applies only if nothing the
transaction read has changed meanwhile, and raises :class:`ConflictError`
otherwise. A stale replica can therefore only cause a conflict, never a
wrong commit. (The state machine's own evaluation of txn commands is
``txn.py``.)

Like kazoo's recipes, it is built only from the coordinator's public calls
(``read``, ``range``, ``execute``), which it takes as its first argument,
and this module does not import the coordinator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, TypeVar

from raftcoord.arguments import check_key, check_order, check_value, check_writable_key, prefix_range
from raftcoord.backends import Consistency
from raftcoord.errors import ConflictError, KeyNotFoundError, RaftcoordError
from raftcoord.keys import is_reserved
from raftcoord.store import RangeResult, Store

__all__ = ["Transaction", "TransactionHost"]

T = TypeVar("T")


class TransactionHost(Protocol):
    """The public calls of a coordinator that a :class:`Transaction` uses."""

    def read(self, fn: Callable[[Store], T], *, consistency: Consistency | None = None) -> T:
        """Run ``fn`` on the local store at the given consistency."""

    def range(self, key: bytes, range_end: bytes = b"", *, consistency: Consistency | None = None) -> RangeResult:
        """An etcd-style range read, bounded in size."""

    def execute(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """Run one state-machine command and return its result map (errors raised)."""


class Transaction:
    """Reads recorded, writes buffered; see :meth:`Coordinator.transact`."""

    def __init__(self, coordinator: TransactionHost) -> None:
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
        check_key(key)
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
        check_order(order)
        key, end = prefix_range(prefix)
        # Through the coordinator's range: a view, read in steps, bounded in size.
        kvs = self._coord.range(key, end, consistency="serializable").kvs
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
        check_writable_key(key)
        self._writes[key] = check_value(value)

    def remove(self, key: bytes) -> None:
        """Buffer a delete of ``key``; raises KeyNotFoundError if it is absent."""
        self.get(key)
        check_writable_key(key)
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

