"""A small blocking client for a raftcoord cluster's HTTP endpoint.

It speaks the etcd v3 JSON shapes for key-values and ``/raftcoord/v1/`` for
the rest, tries the endpoints in turn when one cannot be reached, and turns
error answers back into raftcoord exceptions. The CLI is built on it; a
script that wants the cluster without embedding a replica can use it too.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from raftcoord.errors import (
    AuthError,
    CompactedError,
    ConflictError,
    InvalidInputError,
    KeyNotFoundError,
    RaftcoordError,
    TimeoutError,
    UnavailableError,
)
from raftcoord.keys import prefix_end

__all__ = ["Client", "b64", "unb64"]

log = logging.getLogger(__name__)

_BY_STATUS: dict[int, type[RaftcoordError]] = {
    400: InvalidInputError,
    401: AuthError,
    403: AuthError,
    404: KeyNotFoundError,
    409: ConflictError,
    410: CompactedError,
    503: UnavailableError,
    504: TimeoutError,
}


def b64(data: bytes) -> str:
    """Base64 text, as etcd's JSON gateway carries bytes."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    """Bytes from etcd's base64 text (absent means empty)."""
    return base64.b64decode(text or "")


def normalize_endpoint(endpoint: str) -> str:
    """``host:port`` or a URL, as a base URL without a trailing slash."""
    endpoint = endpoint.strip()
    if not endpoint:
        raise InvalidInputError("an endpoint is empty", field="endpoints")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parsed = urllib.parse.urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidInputError(f"endpoint {endpoint!r} is not an http URL or host:port", field="endpoints")
    return endpoint.rstrip("/")


class Client:
    """A client of one cluster, given the client URLs of some of its nodes."""

    def __init__(self, endpoints: Sequence[str], *, token: str | None = None, timeout: float = 10.0) -> None:
        if not endpoints:
            raise InvalidInputError("no endpoints given (use --endpoints or --config)", field="endpoints")
        self.endpoints = [normalize_endpoint(e) for e in endpoints]
        self.token = token
        self.timeout = timeout

    # ------------------------------------------------------------ transport

    def call(self, method: str, path: str, body: Any = None, *, endpoint: str | None = None) -> Any:
        """One request; the first reachable endpoint answers (or ``endpoint``)."""
        targets = [endpoint] if endpoint else self.endpoints
        last: Exception | None = None
        for base in targets:
            try:
                return self._call_one(base, method, path, body)
            except UnavailableError as exc:
                if exc.field != "connection":
                    raise
                last = exc
        assert last is not None
        raise UnavailableError(f"no endpoint could be reached ({', '.join(targets)}): {last.message}")

    def _call_one(self, base: str, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise self._error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UnavailableError(f"{base}: {reason}", field="connection") from None

    @staticmethod
    def _error(exc: urllib.error.HTTPError) -> RaftcoordError:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        message = body.get("message") or body.get("error") or f"HTTP {exc.code} {exc.reason}"
        cls = _BY_STATUS.get(exc.code, RaftcoordError)
        return cls(str(message), field=body.get("field"))

    # ------------------------------------------------------------ key-values

    def put(self, key: bytes, value: bytes) -> int:
        """Set a key; returns the revision."""
        out = self.call("POST", "/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return int(out["header"]["revision"])

    def range(
        self,
        key: bytes,
        range_end: bytes = b"",
        *,
        limit: int = 0,
        descending: bool = False,
        serializable: bool = False,
        keys_only: bool = False,
    ) -> dict[str, Any]:
        """An etcd range; keys and values in the answer are decoded to bytes."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end:
            body["range_end"] = b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if descending:
            body["sort_order"] = "DESCEND"
            body["sort_target"] = "KEY"
        if serializable:
            body["serializable"] = True
        if keys_only:
            body["keys_only"] = True
        out = self.call("POST", "/v3/kv/range", body)
        kvs = []
        for kv in out.get("kvs", []):
            kvs.append(
                {
                    "key": unb64(kv.get("key")),
                    "value": unb64(kv.get("value")),
                    "create_revision": int(kv.get("create_revision", 0)),
                    "mod_revision": int(kv.get("mod_revision", 0)),
                    "version": int(kv.get("version", 0)),
                }
            )
        return {"kvs": kvs, "count": int(out.get("count", 0)), "more": bool(out.get("more", False)),
                "revision": int(out["header"]["revision"])}

    def get(self, key: bytes, *, serializable: bool = False) -> dict[str, Any]:
        """One key; raises KeyNotFoundError if absent."""
        out = self.range(key, serializable=serializable)
        if not out["kvs"]:
            raise KeyNotFoundError(f"key {key.decode('utf-8', 'backslashreplace')!r} not found", field="key")
        return out["kvs"][0]

    def scan(self, prefix: bytes, *, limit: int = 0, descending: bool = False, serializable: bool = False) -> dict[str, Any]:
        """Every key under ``prefix`` (every key for an empty prefix)."""
        key, end = (prefix, prefix_end(prefix)) if prefix else (b"\x00", b"\x00")
        return self.range(key, end, limit=limit, descending=descending, serializable=serializable)

    def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete a key (or every user key under a prefix); returns how many."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        out = self.call("POST", "/v3/kv/deleterange", body)
        return int(out.get("deleted", 0))

    # ------------------------------------------------------------ raftcoord

    def status(self, *, endpoint: str | None = None) -> dict[str, Any]:
        """One node's status (the first reachable one, or ``endpoint``)."""
        return dict(self.call("GET", "/raftcoord/v1/status", endpoint=endpoint))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node's state record."""
        out = self.call("GET", "/raftcoord/v1/nodes")
        return list(out["nodes"] if isinstance(out, dict) else out)

    def post(self, type: str | int, event: str | int | None = None, payload: Any = None) -> dict[str, Any]:
        """Post a message; returns it with its clock."""
        body: dict[str, Any] = {"type": type}
        if event is not None:
            body["event"] = event
        if payload is not None:
            body["payload"] = payload
        out = self.call("POST", "/raftcoord/v1/messages", body)
        return dict(out.get("message", out))

    def messages(self, since: int | None = None, limit: int = 0) -> list[dict[str, Any]]:
        """Messages with a clock above ``since``, in clock order (all for ``limit=0``).

        The endpoint answers in pages; this follows them until done.
        """
        out: list[dict[str, Any]] = []
        while True:
            query = {}
            if since is not None:
                query["since"] = str(since)
            if limit:
                query["limit"] = str(limit - len(out))
            page = self.call("GET", "/raftcoord/v1/messages" + ("?" + urllib.parse.urlencode(query) if query else ""))
            out.extend(page["messages"])
            if not page.get("more") or not page["messages"] or (limit and len(out) >= limit):
                return out
            since = int(page["messages"][-1]["clock"])
