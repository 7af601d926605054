"""Range reads of a client's chosen size, taken from a reader in steps and bounded in bytes.

:func:`read_range` answers an etcd-style range from a reader of one revision
(``backend.read_view``) a step at a time, so a view can release the replica's
state lock between steps, and refuses the answer with
:class:`LimitExceededError` as soon as it would pass its byte budget, before
it is built in full. A chunked view (one with ``count`` and ``scan``) is
walked; a plain store is paged by offset, where offsets are cheap. The
coordinator's ``range``, ``scan`` and transactions read through it.
"""

from __future__ import annotations

from dataclasses import replace

from raftcoord.backends import Reader
from raftcoord.errors import LimitExceededError
from raftcoord.store import KeyValue, RangeResult

__all__ = ["KV_OVERHEAD_BYTES", "read_range"]

#: Bytes a key-value costs in an answer beyond its key and value (revisions, framing).
KV_OVERHEAD_BYTES = 32


def read_range(
    reader: Reader,
    key: bytes,
    range_end: bytes,
    *,
    limit: int,
    offset: int,
    descending: bool,
    budget: int,
    keys_only: bool,
    count_only: bool,
    page: int,
) -> RangeResult:
    """A range read from ``reader``, ``page`` keys a step, refused once it passes ``budget`` bytes.

    A ``reader`` that also has ``count(key, range_end)`` and ``scan(key,
    range_end, *, descending)`` (a chunked view) is walked rather than paged.
    """
    count_fn = getattr(reader, "count", None)
    if count_only:
        if count_fn is not None:
            count = count_fn(key, range_end)
        else:
            count = reader.range(key, range_end, limit=1, offset=offset, descending=descending).count
        return RangeResult((), count, bool(limit) and count > min(count, offset) + limit)
    kvs: list[KeyValue] = []
    used = 0

    def take(kv: KeyValue) -> None:
        nonlocal used
        used += len(kv.key) + KV_OVERHEAD_BYTES + (0 if keys_only else len(kv.value))
        if used > budget:
            raise LimitExceededError(
                f"the range's answer would pass {budget} bytes (max_response_bytes); "
                "ask for fewer keys with limit, keys_only or a narrower range",
                field="max_response_bytes",
            )
        kvs.append(replace(kv, value=b"") if keys_only else kv)

    scan = getattr(reader, "scan", None)
    if scan is not None and count_fn is not None:
        # A chunked view: walk it and stop at the limit or the budget.
        count = count_fn(key, range_end)
        if offset < count:
            skipped = 0
            for kv in scan(key, range_end, descending=descending):
                if skipped < offset:
                    skipped += 1
                    continue
                take(kv)
                if limit and len(kvs) >= limit:
                    break
    else:
        # A store, where offsets are cheap: page by offset.
        first: int | None = None
        while True:
            step = min(page, limit - len(kvs)) if limit else page
            res = reader.range(key, range_end, limit=step, offset=offset + len(kvs), descending=descending)
            first = res.count if first is None else first
            for kv in res.kvs:
                take(kv)
            if not res.more or not res.kvs or (limit and len(kvs) >= limit):
                break
        assert first is not None
        count = first
    return RangeResult(tuple(kvs), count, bool(limit) and count > min(count, offset) + limit)
