"""etcd v3 JSON-gateway shapes, translated to and from raftcoord's store.

This module is sans-I/O: it turns parsed JSON request bodies into store
commands (see :mod:`raftcoord.store`) and store results into the JSON that
etcd's grpc-gateway would send. :mod:`raftcoord.endpoint` does the HTTP.

The JSON mapping is proto3's, as etcd's gateway speaks it:

* ``bytes`` fields (keys, values) are base64 (standard or URL-safe, padding
  optional on input; standard with padding on output);
* ``int64``/``uint64`` fields are JSON strings on output; on input both a
  number and a decimal string are accepted;
* enums are their names (``"EQUAL"``, ``"VALUE"``, ``"DESCEND"``); their
  numbers are accepted on input;
* a field with its default value (0, ``""``, ``false``, an empty list) is
  left out of a response, as the gateway does; ``null`` on input means the
  default;
* field names are the proto names (``range_end``); the lowerCamelCase JSON
  names (``rangeEnd``) are accepted on input too.

Anything a request gets wrong raises :class:`InvalidInputError` whose
``field`` is the path of the bad field (``compare[0].target``). Unknown
fields are refused, as the gateway refuses them. What etcd has and raftcoord
does not (leases, point-in-time reads, nested transactions) is refused with
a message that says so, never silently ignored.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from raftcoord.errors import CompactedError, InvalidInputError, LimitExceededError
from raftcoord.txn import KV_OVERHEAD

__all__ = [
    "ETCD_VERSION",
    "RangeQuery",
    "WatchCancel",
    "WatchCreate",
    "WatchProgress",
    "b64",
    "check_request",
    "delete_command",
    "delete_response",
    "grpc_code",
    "header",
    "key_result",
    "kv_json",
    "parse_range",
    "put_command",
    "parse_watch_request",
    "put_response",
    "range_response",
    "range_txn",
    "stream_error",
    "txn_command",
    "txn_response",
    "uint_str",
    "watch_event_json",
    "watch_response",
]

#: The etcd API version this endpoint speaks (sent by ``GET /version``).
ETCD_VERSION: Final = "3.5.0"

#: gRPC codes for HTTP statuses: InvalidArgument 3, Unauthenticated 16,
#: NotFound 5, Unimplemented 12, FailedPrecondition 9, OutOfRange 11,
#: ResourceExhausted 8, Unavailable 14, DeadlineExceeded 4 (Internal 13 else).
_CODE_BY_STATUS: Final = {
    400: 3,
    401: 16,
    404: 5,
    405: 12,
    409: 9,
    410: 11,
    413: 8,
    501: 12,
    503: 14,
    504: 4,
}

INT64_MAX: Final = 2**63 - 1
UINT64_MAX: Final = 2**64 - 1


def grpc_code(http_status: int) -> int:
    """The gRPC code an etcd error body carries for an HTTP status."""
    if http_status in _CODE_BY_STATUS:
        return _CODE_BY_STATUS[http_status]
    return 3 if 400 <= http_status < 500 else 13


# --------------------------------------------------------------------------
# Request parsing: a small proto3-JSON reader driven by field tables


class _Enum:
    def __init__(self, *names: str) -> None:
        self.names = names


BYTES: Final = "bytes"
INT64: Final = "int64"
BOOL: Final = "bool"
_SORT_ORDER: Final = _Enum("NONE", "ASCEND", "DESCEND")
_SORT_TARGET: Final = _Enum("KEY", "VERSION", "CREATE", "MOD", "VALUE")
_COMPARE_RESULT: Final = _Enum("EQUAL", "GREATER", "LESS", "NOT_EQUAL")
_COMPARE_TARGET: Final = _Enum("VERSION", "CREATE", "MOD", "VALUE", "LEASE")

_RANGE_REQUEST: Final[dict[str, Any]] = {
    "key": BYTES,
    "range_end": BYTES,
    "limit": INT64,
    "revision": INT64,
    "sort_order": _SORT_ORDER,
    "sort_target": _SORT_TARGET,
    "serializable": BOOL,
    "keys_only": BOOL,
    "count_only": BOOL,
    "min_mod_revision": INT64,
    "max_mod_revision": INT64,
    "min_create_revision": INT64,
    "max_create_revision": INT64,
}
_PUT_REQUEST: Final[dict[str, Any]] = {
    "key": BYTES,
    "value": BYTES,
    "lease": INT64,
    "prev_kv": BOOL,
    "ignore_value": BOOL,
    "ignore_lease": BOOL,
}
_DELETE_REQUEST: Final[dict[str, Any]] = {"key": BYTES, "range_end": BYTES, "prev_kv": BOOL}
_COMPARE: Final[dict[str, Any]] = {
    "result": _COMPARE_RESULT,
    "target": _COMPARE_TARGET,
    "key": BYTES,
    "version": INT64,
    "create_revision": INT64,
    "mod_revision": INT64,
    "value": BYTES,
    "lease": INT64,
    "range_end": BYTES,
}
_REQUEST_OP: Final[dict[str, Any]] = {
    "request_range": "object",
    "request_put": "object",
    "request_delete_range": "object",
    "request_txn": "object",
}
_TXN_REQUEST: Final[dict[str, Any]] = {"compare": "list", "success": "list", "failure": "list"}
_OTHER_REQUESTS: Final[dict[str, dict[str, Any]]] = {
    "StatusRequest": {},
    "MemberListRequest": {"linearizable": BOOL},
}

_FILTER_TYPE: Final = _Enum("NOPUT", "NODELETE")
_WATCH_REQUEST: Final[dict[str, Any]] = {
    "create_request": "object",
    "cancel_request": "object",
    "progress_request": "object",
}
_WATCH_CREATE_REQUEST: Final[dict[str, Any]] = {
    "key": BYTES,
    "range_end": BYTES,
    "start_revision": INT64,
    "progress_notify": BOOL,
    "filters": "list",
    "prev_kv": BOOL,
    "watch_id": INT64,
    "fragment": BOOL,
}
_WATCH_CANCEL_REQUEST: Final[dict[str, Any]] = {"watch_id": INT64}

_INT_TEXT: Final = re.compile(r"^-?[0-9]{1,20}$")
_B64_TEXT: Final = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def _bad(path: str, problem: str) -> InvalidInputError:
    return InvalidInputError(f"{path}: {problem}", field=path)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


#: The lowerCamelCase aliases of each field table, by the table's id (the tables are module constants).
_ALIASES: dict[int, tuple[Mapping[str, Any], dict[str, str]]] = {}


def _aliases(spec: Mapping[str, Any]) -> dict[str, str]:
    # Built once per table: a regex per field per request cost a tenth of a range request.
    known = _ALIASES.get(id(spec))
    if known is None or known[0] is not spec:
        known = (spec, {_camel(name): name for name in spec})
        _ALIASES[id(spec)] = known
    return known[1]


def _fields(value: Any, spec: Mapping[str, Any], path: str, what: str) -> dict[str, Any]:
    """Read one JSON object by its field table; absent and null fields are left out."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(path or "body", f"must be a JSON object ({what}), not {_json_type(value)}")
    aliases = _aliases(spec)
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for raw_name, raw in value.items():
        name = raw_name if raw_name in spec else aliases.get(raw_name)
        where = _join(path, raw_name)
        if name is None:
            known = ", ".join(spec) or "none"
            raise _bad(where, f"unknown field in {what} (known fields: {known})")
        if name in seen:
            raise _bad(_join(path, name), "given twice (as proto and JSON name)")
        seen.add(name)
        if raw is None:
            continue
        out[name] = _convert(raw, spec[name], _join(path, name))
    return out


def _convert(raw: Any, kind: Any, path: str) -> Any:
    if kind == BYTES:
        return _unb64(raw, path)
    if kind == INT64:
        return _int64(raw, path)
    if kind == BOOL:
        if not isinstance(raw, bool):
            raise _bad(path, f"must be true or false, not {_json_type(raw)}")
        return raw
    if isinstance(kind, _Enum):
        if isinstance(raw, str) and raw in kind.names:
            return raw
        if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(kind.names):
            return kind.names[raw]
        raise _bad(path, f"{raw!r} is not one of {', '.join(kind.names)}")
    if kind == "list":
        if not isinstance(raw, list):
            raise _bad(path, f"must be a JSON array, not {_json_type(raw)}")
        return raw
    if kind == "object":
        if not isinstance(raw, Mapping):
            raise _bad(path, f"must be a JSON object, not {_json_type(raw)}")
        return raw
    raise AssertionError(f"unknown field kind {kind!r}")  # pragma: no cover


def _unb64(raw: Any, path: str) -> bytes:
    if not isinstance(raw, str):
        raise _bad(path, f"must be a base64 string, not {_json_type(raw)}")
    if not _B64_TEXT.match(raw) or len(raw.rstrip("=")) % 4 == 1:
        raise _bad(path, f"{_clip(raw)!r} is not valid base64")
    text = raw.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(path, f"{_clip(raw)!r} is not valid base64") from None


def _int64(raw: Any, path: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise _bad(path, f"must be an integer (a number or a decimal string), not {_json_type(raw)}")
    if isinstance(raw, str):
        if not _INT_TEXT.match(raw):
            raise _bad(path, f"{_clip(raw)!r} is not a decimal integer")
        raw = int(raw)
    if not -INT64_MAX - 1 <= raw <= UINT64_MAX:
        raise _bad(path, f"{raw} does not fit in 64 bits")
    return raw


def _uint(value: int, path: str, *, maximum: int = INT64_MAX) -> int:
    if value < 0:
        raise _bad(path, f"must be 0 or more, got {value}")
    if value > maximum:
        raise _bad(path, f"must be at most {maximum}, got {value}")
    return value


def _key(fields: Mapping[str, Any], path: str) -> bytes:
    key = fields.get("key", b"")
    if not key:
        raise _bad(_join(path, "key"), "key is not provided (it must be non-empty base64)")
    return key


def _unsupported(fields: Mapping[str, Any], path: str, names: tuple[str, ...], why: str) -> None:
    for name in names:
        if fields.get(name):
            raise _bad(_join(path, name), why)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _clip(text: str, size: int = 40) -> str:
    return text if len(text) <= size else text[:size] + "..."


def check_request(body: Any, message: str) -> dict[str, Any]:
    """Check a request that carries no keys (``StatusRequest``, ``MemberListRequest``)."""
    return _fields(body, _OTHER_REQUESTS[message], "", message)


# --------------------------------------------------------------------------
# Range


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeQuery:
    """A checked ``RangeRequest``."""

    key: bytes
    range_end: bytes = b""
    limit: int = 0
    revision: int = 0
    descending: bool = False
    #: "key", "version", "create", "mod" or "value".
    sort_target: str = "key"
    serializable: bool = False
    keys_only: bool = False
    count_only: bool = False
    min_mod_revision: int = 0
    max_mod_revision: int = 0
    min_create_revision: int = 0
    max_create_revision: int = 0

    @property
    def single_key(self) -> bool:
        """True for a read of one key with no filter or sort: :func:`key_result` can answer it."""
        return not self.range_end and not self.filtered

    @property
    def filtered(self) -> bool:
        """True when the range needs more than the store's key-ordered scan."""
        return self.sort_target != "key" or any(
            (self.min_mod_revision, self.max_mod_revision, self.min_create_revision, self.max_create_revision)
        )


def parse_range(body: Any, path: str = "") -> RangeQuery:
    """A ``RangeRequest`` JSON object as a :class:`RangeQuery`."""
    f = _fields(body, _RANGE_REQUEST, path, "RangeRequest")
    numbers = {
        name: _uint(f.get(name, 0), _join(path, name))
        for name in ("limit", "min_mod_revision", "max_mod_revision", "min_create_revision", "max_create_revision")
    }
    return RangeQuery(
        key=_key(f, path),
        range_end=f.get("range_end", b""),
        revision=max(0, f.get("revision", 0)),  # as etcd: <= 0 means the newest
        descending=f.get("sort_order") == "DESCEND",
        sort_target=f.get("sort_target", "KEY").lower(),
        serializable=f.get("serializable", False),
        keys_only=f.get("keys_only", False),
        count_only=f.get("count_only", False),
        **numbers,
    )


def range_txn(q: RangeQuery) -> dict[str, Any]:
    """``q`` as a read-only store txn of one range op, for ``read_txn``.

    A read-only txn is answered off the Raft thread, a page at a time, and
    its result is bounded by ``max_response_bytes``. A filtered or sorted
    query reads the whole range (as etcd does for these) and
    :func:`range_response` filters, sorts and cuts it.
    """
    op: dict[str, Any] = {"op": "range", "key": q.key, "range_end": q.range_end}
    if not q.filtered:
        op.update(limit=q.limit, sort_order="desc" if q.descending else "asc",
                  keys_only=q.keys_only, count_only=q.count_only)
    elif q.count_only:
        op["count_only"] = True  # the count is of the range, before filters (as etcd)
    return {"op": "txn", "compare": [], "success": [op], "failure": []}


def key_result(q: RangeQuery, kv: Any, revision: int, *, max_bytes: int) -> dict[str, Any]:
    """What ``read_txn(range_txn(q))`` returns for a :attr:`~RangeQuery.single_key` query.

    ``kv`` is the key's :class:`~raftcoord.store.KeyValue` (or None) as read
    at ``revision``. Refused with LimitExceededError, as ``read_txn`` refuses
    it, when the answer would pass ``max_bytes`` (``max_response_bytes``).
    """
    count = 0 if kv is None else 1
    more = bool(q.limit) and count > q.limit
    if q.count_only or kv is None:
        kvs: list[dict[str, Any]] = []
    else:
        cost = len(kv.key) + (0 if q.keys_only else len(kv.value)) + KV_OVERHEAD
        if cost > max_bytes:
            raise LimitExceededError(
                f"txn range results exceed {max_bytes} bytes (setting max_response_bytes); "
                "narrow the ranges, or use limit, keys_only or count_only",
                field="max_response_bytes",
            )
        kvs = [kv.to_map(keys_only=q.keys_only)]
    return {"ok": True, "revision": revision, "succeeded": True,
            "responses": [{"op": "range", "kvs": kvs, "count": count, "more": more}]}


def range_response(q: RangeQuery, result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``RangeResponse`` (no header) for ``q`` from the result of :func:`range_txn`.

    Raises CompactedError or InvalidInputError when ``q`` asked for another
    revision than the one read (raftcoord keeps only the current one).
    """
    revision = int(result["revision"])
    if q.revision and q.revision != revision:
        if q.revision > revision:
            raise _bad("revision", f"revision {q.revision} is a future revision (current {revision})")
        raise CompactedError(
            f"revision: revision {q.revision} has been compacted; raftcoord keeps only the current "
            f"revision ({revision})",
            field="revision",
        )
    res = result["responses"][0]
    kvs: list[Mapping[str, Any]] = list(res.get("kvs") or ())
    count = int(res.get("count") or 0)
    more = bool(res.get("more"))
    if q.filtered and not q.count_only:
        kvs = [kv for kv in kvs if _passes(kv, q)]
        if q.sort_target != "key":
            name = _SORT_FIELD[q.sort_target]
            empty: Any = b"" if name == "value" else 0
            kvs.sort(key=lambda kv: kv.get(name) or empty, reverse=q.descending)
        elif q.descending:
            kvs.reverse()
        more = bool(q.limit) and len(kvs) > q.limit
        if q.limit:
            kvs = kvs[: q.limit]
    out: dict[str, Any] = {}
    if kvs and not q.count_only:
        out["kvs"] = [kv_json(kv, keys_only=q.keys_only) for kv in kvs]
    if more:
        out["more"] = True
    if count:
        out["count"] = str(count)
    return out


_SORT_FIELD: Final = {"version": "version", "create": "create_revision", "mod": "mod_revision", "value": "value"}


def _passes(kv: Mapping[str, Any], q: RangeQuery) -> bool:
    mod, create = kv.get("mod_revision") or 0, kv.get("create_revision") or 0
    return not (
        (q.min_mod_revision and mod < q.min_mod_revision)
        or (q.max_mod_revision and mod > q.max_mod_revision)
        or (q.min_create_revision and create < q.min_create_revision)
        or (q.max_create_revision and create > q.max_create_revision)
    )


# --------------------------------------------------------------------------
# Put and delete


def put_command(body: Any, path: str = "") -> dict[str, Any]:
    """A ``PutRequest`` JSON object as a store ``put`` command."""
    f = _fields(body, _PUT_REQUEST, path, "PutRequest")
    _unsupported(f, path, ("lease",), "leases are not supported by raftcoord")
    _unsupported(f, path, ("ignore_value", "ignore_lease"), "not supported by raftcoord")
    return {"op": "put", "key": _key(f, path), "value": f.get("value", b""), "prev_kv": f.get("prev_kv", False)}


def delete_command(body: Any, path: str = "") -> dict[str, Any]:
    """A ``DeleteRangeRequest`` JSON object as a store ``delete`` command."""
    f = _fields(body, _DELETE_REQUEST, path, "DeleteRangeRequest")
    cmd: dict[str, Any] = {"op": "delete", "key": _key(f, path), "prev_kv": f.get("prev_kv", False)}
    if f.get("range_end"):
        cmd["range_end"] = f["range_end"]
    return cmd


def put_response(result: Mapping[str, Any]) -> dict[str, Any]:
    """A store ``put`` result as a ``PutResponse`` (no header)."""
    return {"prev_kv": kv_json(result["prev_kv"])} if result.get("prev_kv") else {}


def delete_response(result: Mapping[str, Any]) -> dict[str, Any]:
    """A store ``delete`` result as a ``DeleteRangeResponse`` (no header)."""
    out: dict[str, Any] = {}
    if result.get("deleted"):
        out["deleted"] = str(result["deleted"])
    if result.get("prev_kvs"):
        out["prev_kvs"] = [kv_json(kv) for kv in result["prev_kvs"]]
    return out


# --------------------------------------------------------------------------
# Transactions

_TARGETS: Final = {
    "VERSION": ("version", "version"),
    "CREATE": ("create", "create_revision"),
    "MOD": ("mod", "mod_revision"),
    "VALUE": ("value", "value"),
}
_UNION: Final = ("version", "create_revision", "mod_revision", "value", "lease")


def txn_command(body: Any, *, max_ops: int | None = None) -> dict[str, Any]:
    """A ``TxnRequest`` JSON object as a store ``txn`` command.

    With ``max_ops``, a txn with more compares, or more ops in a branch, is
    refused (LimitExceededError naming ``max_txn_ops``) before its ops are read.
    """
    f = _fields(body, _TXN_REQUEST, "", "TxnRequest")
    if max_ops is not None:
        for name in ("compare", "success", "failure"):
            n = len(f.get(name, []))
            if n > max_ops:
                raise LimitExceededError(
                    f"{name}: too many operations in txn request: {n} (max_txn_ops is {max_ops})",
                    field="max_txn_ops",
                )
    compare = [_compare(c, f"compare[{i}]") for i, c in enumerate(f.get("compare", []))]
    branches = {
        branch: [_request_op(op, f"{branch}[{i}]") for i, op in enumerate(f.get(branch, []))]
        for branch in ("success", "failure")
    }
    return {"op": "txn", "compare": compare, **branches}


def _compare(raw: Any, path: str) -> dict[str, Any]:
    f = _fields(raw, _COMPARE, path, "Compare")
    target = f.get("target", "VERSION")
    if target == "LEASE":
        raise _bad(_join(path, "target"), "LEASE compares are not supported by raftcoord (no leases)")
    store_target, union_field = _TARGETS[target]
    given = [name for name in _UNION if name in f]
    if len(given) > 1:
        raise _bad(_join(path, given[1]), f"only one of {', '.join(_UNION)} may be set")
    if given and given[0] != union_field:
        raise _bad(_join(path, given[0]), f"target {target} compares {union_field}, not {given[0]}")
    value: Any
    if target == "VALUE":
        value = f.get("value", b"")
    else:
        value = _uint(f.get(union_field, 0), _join(path, union_field))
    out = {"key": _key(f, path), "target": store_target, "result": f.get("result", "EQUAL").lower(), "value": value}
    if f.get("range_end"):
        out["range_end"] = f["range_end"]
    return out


def _request_op(raw: Any, path: str) -> dict[str, Any]:
    f = _fields(raw, _REQUEST_OP, path, "RequestOp")
    if len(f) != 1:
        problem = "is empty" if not f else f"sets {len(f)} requests"
        raise _bad(path, f"{problem}; set exactly one of {', '.join(_REQUEST_OP)}")
    (name, inner), = f.items()
    where = _join(path, name)
    if name == "request_put":
        return put_command(inner, where)
    if name == "request_delete_range":
        return delete_command(inner, where)
    if name == "request_range":
        q = parse_range(inner, where)
        if q.filtered:
            raise _bad(where, "sort_target other than KEY and revision filters are not supported inside a txn")
        if q.revision:
            raise _bad(_join(where, "revision"), "point-in-time reads are not supported inside a txn")
        return {
            "op": "range",
            "key": q.key,
            "range_end": q.range_end,
            "limit": q.limit,
            "sort_order": "desc" if q.descending else "asc",
            "keys_only": q.keys_only,
            "count_only": q.count_only,
        }
    raise _bad(where, "nested transactions are not supported by raftcoord")


def txn_response(result: Mapping[str, Any]) -> dict[str, Any]:
    """A store ``txn`` result as a ``TxnResponse`` (no top-level header)."""
    revision = int(result["revision"])
    responses = []
    for resp in result.get("responses", []):
        inner: dict[str, Any] = {"header": header(revision=revision)}
        if resp["op"] == "range":
            if resp.get("kvs"):
                inner["kvs"] = [kv_json(kv) for kv in resp["kvs"]]
            if resp.get("more"):
                inner["more"] = True
            if resp.get("count"):
                inner["count"] = str(resp["count"])
            responses.append({"response_range": inner})
        elif resp["op"] == "put":
            inner.update(put_response(resp))
            responses.append({"response_put": inner})
        else:
            inner.update(delete_response(resp))
            responses.append({"response_delete_range": inner})
    out: dict[str, Any] = {}
    if result.get("succeeded"):
        out["succeeded"] = True
    if responses:
        out["responses"] = responses
    return out


# --------------------------------------------------------------------------
# Watch


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchCreate:
    """A checked ``WatchCreateRequest``; ``range_end`` as given (etcd's rules apply)."""

    key: bytes
    range_end: bytes = b""
    #: 0: from the next revision.
    start_revision: int = 0
    progress_notify: bool = False
    filters: tuple[str, ...] = ()
    prev_kv: bool = False
    #: 0: the server picks one.
    watch_id: int = 0


@dataclass(frozen=True, slots=True)
class WatchCancel:
    """A checked ``WatchCancelRequest``."""

    watch_id: int


@dataclass(frozen=True, slots=True)
class WatchProgress:
    """A ``WatchProgressRequest``: report the revision every watch of the stream has reached."""


def parse_watch_request(body: Any) -> WatchCreate | WatchCancel | WatchProgress:
    """One ``WatchRequest`` of a watch stream: exactly one of create, cancel or progress."""
    f = _fields(body, _WATCH_REQUEST, "", "WatchRequest")
    if len(f) != 1:
        problem = "is empty" if not f else f"sets {len(f)} requests"
        raise _bad("body", f"the WatchRequest {problem}; set exactly one of {', '.join(_WATCH_REQUEST)}")
    (name, inner), = f.items()
    if name == "progress_request":
        _fields(inner, {}, name, "WatchProgressRequest")
        return WatchProgress()
    if name == "cancel_request":
        c = _fields(inner, _WATCH_CANCEL_REQUEST, name, "WatchCancelRequest")
        return WatchCancel(c.get("watch_id", 0))
    c = _fields(inner, _WATCH_CREATE_REQUEST, name, "WatchCreateRequest")
    if c.get("fragment"):
        raise _bad(f"{name}.fragment", "fragmented watch responses are not supported by raftcoord")
    filters = []
    for i, raw in enumerate(c.get("filters", [])):
        kind = _convert(raw, _FILTER_TYPE, f"{name}.filters[{i}]")
        if kind not in filters:
            filters.append(kind)
    key, range_end = c.get("key", b""), c.get("range_end", b"")
    if not key and range_end == b"\0":
        key = b"\0"  # every key: etcd reads an empty key with range_end "\0" so
    if not key:
        raise _bad(f"{name}.key", "key is not provided (it must be non-empty base64)")
    return WatchCreate(
        key=key,
        range_end=range_end,
        start_revision=_uint(c.get("start_revision", 0), f"{name}.start_revision"),
        progress_notify=c.get("progress_notify", False),
        filters=tuple(filters),
        prev_kv=c.get("prev_kv", False),
        watch_id=_uint(c.get("watch_id", 0), f"{name}.watch_id"),
    )


def watch_event_json(event: Any) -> dict[str, Any]:
    """A watch event (``type``, ``kv``, ``prev_kv``) as an ``mvccpb.Event``; PUT, the default, is left out."""
    out: dict[str, Any] = {"kv": kv_json(event.kv)}
    if event.type == "DELETE":
        out["type"] = "DELETE"
    if event.prev_kv is not None:
        out["prev_kv"] = kv_json(event.prev_kv)
    return out


def watch_response(
    header: Mapping[str, Any],
    watch_id: int,
    *,
    events: tuple[Any, ...] | list[Any] = (),
    created: bool = False,
    canceled: bool = False,
    compact_revision: int = 0,
    cancel_reason: str = "",
) -> dict[str, Any]:
    """One line of the gateway's watch stream: ``{"result": WatchResponse}``, defaults left out."""
    result: dict[str, Any] = {"header": dict(header)}
    if watch_id:
        result["watch_id"] = str(int(watch_id))
    if created:
        result["created"] = True
    if canceled:
        result["canceled"] = True
    if compact_revision:
        result["compact_revision"] = uint_str(compact_revision)
    if cancel_reason:
        result["cancel_reason"] = cancel_reason
    if events:
        result["events"] = [watch_event_json(e) for e in events]
    return {"result": result}


def stream_error(status: int, message: str) -> dict[str, Any]:
    """An error inside a stream whose head was sent already, as grpc-gateway writes one."""
    return {"error": {"grpc_code": grpc_code(status), "http_code": status, "message": message,
                      "http_status": _HTTP_REASONS.get(status, "Error")}}


_HTTP_REASONS: Final = {400: "Bad Request", 410: "Gone", 413: "Request Entity Too Large", 500: "Internal Server Error",
                        503: "Service Unavailable"}


# --------------------------------------------------------------------------
# Output helpers


def b64(data: bytes) -> str:
    """Standard base64 with padding, as the gateway writes bytes."""
    return base64.b64encode(data).decode("ascii")


def uint_str(value: int) -> str:
    """An int64/uint64 as the gateway writes it: a decimal string."""
    return str(int(value))


def kv_json(kv: Any, *, keys_only: bool = False) -> dict[str, Any]:
    """A ``mvccpb.KeyValue`` (a KeyValue or its map) in JSON; empty and zero fields are left out."""
    m = kv if isinstance(kv, Mapping) else kv.to_map()
    out: dict[str, Any] = {"key": b64(m["key"])}
    for name in ("create_revision", "mod_revision", "version"):
        if m.get(name):
            out[name] = uint_str(m[name])
    if not keys_only and m.get("value"):
        out["value"] = b64(m["value"])
    return out


def header(*, cluster_id: int = 0, member_id: int = 0, revision: int = 0, raft_term: int = 0) -> dict[str, Any]:
    """A ``ResponseHeader``; zero fields are left out, as the gateway does."""
    fields = {"cluster_id": cluster_id, "member_id": member_id, "revision": revision, "raft_term": raft_term}
    return {name: uint_str(value) for name, value in fields.items() if value}
