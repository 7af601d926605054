"""Evaluating txn compares and range reads, with bounded work.

Both the state machine (a txn applied on the Raft thread) and the read path
(a read-only txn answered off it, :func:`read_txn`) evaluate compares and
ranges here, against a *reader*: anything with ``revision``, ``get(key)`` and
``range(key, range_end, *, limit, offset, descending)`` as :class:`Store` has.

Work is bounded by a :class:`Budget`: how many keys compares (and, on the
Raft thread, range reads) may cover, and how many bytes of range results may
be built. A range is counted in O(log n) and walked a page at a time, so a
request never costs more than its budget before it is refused with
:class:`LimitExceededError` ("limit_exceeded"). Pure, like the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

from raftcoord.commands import Compare, Range, Txn, decode_command
from raftcoord.errors import CommandError, LimitExceededError
from raftcoord.events import KeyValue, RangeResult

__all__ = [
    "MAX_TXN_KEYS",
    "MAX_TXN_RESULT_BYTES",
    "Budget",
    "Reader",
    "compares_hold",
    "is_read_only_txn",
    "kv_cost",
    "range_response",
    "read_txn",
]

#: Keys the compares of one txn may cover, together; on the Raft thread also
#: the keys its range reads may return. ``transact()``'s "keys" compares count.
MAX_TXN_KEYS: Final = 10_000
#: Bytes of range results one txn may build on the Raft thread.
MAX_TXN_RESULT_BYTES: Final = 4 * 1024 * 1024
#: What a key-value costs beyond its key and value (revisions, field names).
KV_OVERHEAD: Final = 32
_PAGE: Final = 1024


class Reader(Protocol):
    """What evaluating a txn reads: one revision of the key space."""

    @property
    def revision(self) -> int:
        """The revision the reader answers at."""

    def get(self, key: bytes) -> KeyValue | None:
        """One key, or None."""

    def range(
        self, key: bytes, range_end: bytes = b"", *, limit: int = 0, offset: int = 0, descending: bool = False
    ) -> RangeResult:
        """Keys of ``[key, range_end)``, etcd's conventions (see Store.range)."""


def kv_cost(kv: KeyValue, *, keys_only: bool = False) -> int:
    """The bytes a key-value counts for in a result budget."""
    return len(kv.key) + (0 if keys_only else len(kv.value)) + KV_OVERHEAD


class Budget:
    """What one txn may still cost; raises LimitExceededError when spent.

    ``range_keys`` says whether range reads draw on the key budget too (on
    the Raft thread they do; off it only their bytes are bounded).
    """

    def __init__(self, *, keys: int, result_bytes: int, bytes_setting: str | None, range_keys: bool) -> None:
        self.keys = keys
        self.result_bytes = result_bytes
        self.bytes_setting = bytes_setting
        self.range_keys = range_keys
        self._max_keys = keys
        self._max_bytes = result_bytes

    def take_keys(self, n: int, field: str) -> None:
        """Spend ``n`` keys of the budget."""
        self.keys -= n
        if self.keys < 0:
            raise LimitExceededError(
                f"txn compares and ranges may cover at most {self._max_keys} keys together", field=field
            )

    def take_bytes(self, n: int) -> None:
        """Spend ``n`` bytes of the result budget."""
        self.result_bytes -= n
        if self.result_bytes < 0:
            setting = f" (setting {self.bytes_setting})" if self.bytes_setting else ""
            raise LimitExceededError(
                f"txn range results exceed {self._max_bytes} bytes{setting}; "
                "narrow the ranges, or use limit, keys_only or count_only",
                field=self.bytes_setting or "responses",
            )


def compares_hold(reader: Reader, compares: tuple[Compare, ...], budget: Budget) -> bool:
    """True when every compare holds (evaluation stops at the first that fails)."""
    return all(_compare_holds(reader, c, budget) for c in compares)


def _compare_holds(reader: Reader, c: Compare, budget: Budget) -> bool:
    if not c.range_end:
        kv = reader.get(c.key)
        budget.take_keys(1, "compare")
        kvs: tuple[KeyValue, ...] = () if kv is None else (kv,)
    else:
        count = reader.range(c.key, c.range_end, limit=1).count
        budget.take_keys(count, "compare")
        if c.target == "keys" and count != len(c.value):
            return False
        kvs = reader.range(c.key, c.range_end).kvs if count else ()
    if c.target == "keys":
        return tuple((kv.key, kv.mod_revision) for kv in kvs) == c.value
    if not kvs:
        if c.target == "value":
            return False  # as in etcd: a missing key has no value to compare
        return _holds(0, c.value, c.result)
    for kv in kvs:
        actual = {
            "value": kv.value,
            "version": kv.version,
            "create": kv.create_revision,
            "mod": kv.mod_revision,
        }[c.target]
        if not _holds(actual, c.value, c.result):
            return False
    return True


def _holds(actual: Any, expected: Any, result: str) -> bool:
    if result == "equal":
        return bool(actual == expected)
    if result == "not_equal":
        return bool(actual != expected)
    if result == "greater":
        return bool(actual > expected)
    return bool(actual < expected)


def range_response(reader: Reader, op: Range, budget: Budget, field: str = "success") -> dict[str, Any]:
    """A range op's response map (``kvs``, ``count``, ``more``), within the budget."""
    first_n = 1 if op.count_only else (min(_PAGE, op.limit) if op.limit else _PAGE)
    page = reader.range(op.key, op.range_end, limit=first_n, offset=op.offset, descending=op.descending)
    count = page.count
    available = max(0, count - op.offset)
    take = min(available, op.limit) if op.limit else available
    more = bool(op.limit) and available > op.limit
    if op.count_only:
        return {"kvs": [], "count": count, "more": more}
    if budget.range_keys:
        budget.take_keys(take, field)
    kvs: list[dict[str, Any]] = []
    batch = page.kvs[:take]
    while True:
        for kv in batch:
            budget.take_bytes(kv_cost(kv, keys_only=op.keys_only))
            kvs.append(kv.to_map(keys_only=op.keys_only))
        left = take - len(kvs)
        if left <= 0 or not batch:
            break
        # Next page from just past the last key, not by offset: a reader may
        # walk an offset key by key, which would make paging quadratic.
        last = batch[-1].key
        if op.descending:
            nxt = reader.range(op.key, last, limit=min(_PAGE, left), descending=True)
        else:
            nxt = reader.range(last + b"\x00", op.range_end, limit=min(_PAGE, left))
        batch = nxt.kvs
    return {"kvs": kvs, "count": count, "more": more}


def is_read_only_txn(cmd: Any) -> bool:
    """True for a txn command whose branches hold only range ops (never raises).

    Such a txn changes nothing, so it can be answered as a read instead of
    being proposed through the log.
    """
    if isinstance(cmd, Txn):
        return cmd.read_only
    if not isinstance(cmd, Mapping) or cmd.get("op") != "txn":
        return False
    for branch in ("success", "failure"):
        ops = cmd.get(branch, [])
        if not isinstance(ops, (list, tuple)):
            return False
        if not all(isinstance(o, Mapping) and o.get("op") == "range" for o in ops):
            return False
    return True


def read_txn(reader: Reader, cmd: Mapping[str, Any] | Txn, *, max_result_bytes: int) -> dict[str, Any]:
    """Evaluate a read-only txn against ``reader``; the result a proposed one gets.

    Raises CommandError if ``cmd`` is malformed or writes, LimitExceededError
    (naming ``max_response_bytes``) if its ranges would build more than
    ``max_result_bytes`` or its compares cover too many keys.
    """
    txn = cmd if isinstance(cmd, Txn) else decode_command(cmd)
    if not isinstance(txn, Txn):
        raise CommandError(f"read_txn takes a txn, not {txn.op!r}", field="op")
    if not txn.read_only:
        raise CommandError("a txn that writes must be proposed, not read", field="op")
    budget = Budget(
        keys=MAX_TXN_KEYS, result_bytes=max_result_bytes, bytes_setting="max_response_bytes", range_keys=False
    )
    revision = reader.revision
    succeeded = compares_hold(reader, txn.compare, budget)
    branch = "success" if succeeded else "failure"
    ops = txn.success if succeeded else txn.failure
    responses = [{"op": "range", **range_response(reader, op, budget, branch)} for op in ops]  # type: ignore[arg-type]
    return {"ok": True, "revision": revision, "succeeded": succeeded, "responses": responses}
