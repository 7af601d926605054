"""A small blocking client for a raftcoord cluster's HTTP endpoint.

It speaks the etcd v3 JSON shapes for key-values and ``/raftcoord/v1/`` for
the rest, and turns error answers back into raftcoord exceptions. The CLI is
built on it; a script that wants the cluster without embedding a replica can
use it too.

Theory of operation: retries must never apply a write twice.

* Every write carries a request id, ``X-Raftcoord-Request:
  <client>:<seq>:<lowest_outstanding>``, under a session the client
  registers lazily (``POST /raftcoord/v1/session``) before its first write.
  The state machine remembers the result of each id, so the same id sent to
  two nodes applies at most once.
* A request is sent in two steps: the head with ``Expect: 100-continue``,
  then, once the node answers ``100 Continue``, the body. A node that cannot
  be connected to, or that does not answer the head within the dial timeout
  (a paused or wedged process), never saw the body: the request provably was
  not sent, and the next endpoint is tried at once.
* A failure after the body went out (a read timeout, a reset, a 504, an
  answer that is not a raftcoord answer) may hide an applied write: the
  client retries under the SAME id on the other endpoints until the deadline,
  and if no node confirms the outcome raises :class:`UnknownOutcomeError`
  ("may have been applied"), never a plain timeout.
* ``session_expired`` or ``duplicate_request`` on a write that may have been
  attempted before is also an unknown outcome; on a first attempt the write
  provably did not apply, so the client registers a new session and sends it
  once more.
* Reads apply nothing and are retried freely.

Every answer is checked against the shape it must have; anything else is an
error naming the endpoint, never a silent success.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import math
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from raftcoord.client_http import (
    Endpoint,
    Malformed,
    MaybeSent,
    NotSent,
    Stream,
    exchange,
    open_stream,
    parse_endpoint,
)

from raftcoord.errors import (
    AuthError,
    CompactedError,
    ConflictError,
    DecodeError,
    InvalidInputError,
    KeyNotFoundError,
    RaftcoordError,
    RequestTooLargeError,
    TimeoutError,
    UnavailableError,
    UnknownOutcomeError,
    error_from_code,
)
from raftcoord.keys import RESERVED_PREFIXES, prefix_end

__all__ = ["Client", "b64", "check_timeout", "unb64"]

log = logging.getLogger(__name__)

#: The request id header of contract C1.
REQUEST_HEADER: Final = "X-Raftcoord-Request"
#: The route that registers a client session.
SESSION_PATH: Final = "/raftcoord/v1/session"
#: Longest accepted timeout, in seconds; a day is already absurd for one request.
MAX_TIMEOUT: Final = 3600.0
#: The most a ``messages`` listing follows ``more: true`` before it stops.
MAX_MESSAGE_PAGES: Final = 1000
#: The largest answer body read by default (the server caps responses at 32 MiB of kvs).
DEFAULT_MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
#: Longest server error message carried into an exception.
_MAX_MESSAGE: Final = 500

_BY_STATUS: dict[int, type[RaftcoordError]] = {
    400: InvalidInputError,
    401: AuthError,
    403: AuthError,
    404: KeyNotFoundError,
    409: ConflictError,
    410: CompactedError,
    413: RequestTooLargeError,
    503: UnavailableError,
    504: TimeoutError,
}
#: Codes that, on a write, mean "the outcome of an earlier attempt is unknown".
_AMBIGUOUS_CODES: Final = frozenset({"session_expired", "duplicate_request"})
#: 5xx codes that say the request certainly did not apply (C1: everything else may have).
_NOT_APPLIED_CODES: Final = frozenset({"unavailable", "not_leader", "replica_failed", "timeout"})
_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def b64(data: bytes) -> str:
    """Base64 text, as etcd's JSON gateway carries bytes."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    """Bytes from etcd's base64 text (absent means empty); anything else is a DecodeError."""
    if text is None:
        return b""
    if not isinstance(text, str):
        raise DecodeError(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("a key or value is not valid base64") from None


def check_timeout(value: Any, name: str) -> float:
    """``value`` as a timeout in seconds: finite, above 0 and at most an hour."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{name}: must be a number of seconds, got {value!r}", field=name)
    seconds = float(value)
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise InvalidInputError(f"{name}: must be more than 0 and at most {MAX_TIMEOUT:g} seconds, got {value!r}",
                                field=name)
    return seconds


@dataclass
class _Request:
    """One write's request id: [client, seq, lowest outstanding seq]."""

    client: str
    seq: int
    low: int

    def header(self) -> str:
        return f"{self.client}:{self.seq}:{self.low}"


class Client:
    """A client of one cluster, given the client URLs of some of its nodes.

    ``timeout`` bounds each call, retries included; ``dial_timeout`` bounds
    connecting to a node and its first sign of life, after which the next
    endpoint is tried. Safe to share between threads.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 10.0,
        dial_timeout: float = 2.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not endpoints:
            raise InvalidInputError("no endpoints given (use --endpoints or --config)", field="endpoints")
        self._endpoints = [parse_endpoint(e) for e in endpoints]
        self.endpoints = [e.url for e in self._endpoints]
        if token is not None and (not token or not token.isascii() or not token.isprintable()):
            raise InvalidInputError("token: must be printable ASCII text", field="token")
        self.token = token
        self.timeout = check_timeout(timeout, "timeout")
        self.dial_timeout = check_timeout(dial_timeout, "dial_timeout")
        self.max_response_bytes = max_response_bytes
        self._lock = threading.Lock()
        self._preferred: Endpoint | None = None
        self._session: str | None = None
        #: False once a node answered that it has no session route (an older server).
        self._sessions_supported = True
        self._seq = itertools.count(1)
        self._in_flight: set[int] = set()
        self._ssl: ssl.SSLContext | None = None

    # ------------------------------------------------------------ transport

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self._ssl is None and any(e.scheme == "https" for e in self._endpoints):
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _ordered(self) -> list[Endpoint]:
        preferred = self._preferred
        if preferred is None or preferred not in self._endpoints:
            return list(self._endpoints)
        return [preferred] + [e for e in self._endpoints if e != preferred]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        endpoint: str | None = None,
        write: bool = False,
        check: Callable[[Any], Any] | None = None,
        timeout: float | None = None,
        retry: bool = True,
    ) -> Any:
        """One request, answered by the first endpoint that can (or ``endpoint``).

        ``write`` marks a request that changes state: it carries a request id
        and is retried only under that id. ``check`` validates (and may
        convert) the decoded answer, raising ``ValueError``, ``KeyError`` or
        ``TypeError`` for one that is malformed. ``retry=False`` tries each
        endpoint once.
        """
        payload = None if body is None else json.dumps(body).encode("utf-8")
        deadline = time.monotonic() + (self.timeout if timeout is None else check_timeout(timeout, "timeout"))
        fixed = parse_endpoint(endpoint) if endpoint else None
        # A POST to a write route is a write even if the caller forgot to say so.
        if not (write or method == "POST" and path.partition("?")[0] in _WRITE_PATHS):
            targets = [fixed] if fixed else self._ordered()
            return self._attempts(method, path, payload, targets, deadline, check, False, None, retry)
        req = self._begin_write(deadline)
        # After the session is registered: the node that answered it goes first.
        targets = [fixed] if fixed else self._ordered()
        try:
            try:
                return self._attempts(method, path, payload, targets, deadline, check, True, req, retry)
            except _Resend:
                # session_expired/duplicate_request on a write tried only once: it
                # did not apply. A fresh session, one more time (C1).
                self._end_write(req)
                with self._lock:
                    if req is not None and self._session == req.client:
                        self._session = None
                req = self._begin_write(deadline)
                return self._attempts(method, path, payload, targets, deadline, check, True, req, retry, resent=True)
        finally:
            self._end_write(req)

    def _attempts(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        targets: list[Endpoint],
        deadline: float,
        check: Callable[[Any], Any] | None,
        write: bool,
        req: _Request | None,
        retry: bool,
        *,
        resent: bool = False,
    ) -> Any:
        maybe_sent = False
        last = "no endpoint was tried"
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        if req is not None:
            headers[REQUEST_HEADER] = req.header()

        def maybe_applied(why: str) -> None:
            nonlocal maybe_sent
            if write:
                maybe_sent = True
                if req is None:  # without a request id nothing may be sent again
                    raise self._unknown(method, path, why)

        backoff = 0.05
        for round_no in itertools.count():
            again = False  # another round may help: a node was alive but slow, or said "later"
            for ep in targets:
                if time.monotonic() >= deadline:
                    break
                # Each round gives a slow node longer to show a sign of life; with no
                # other node to move on to, a retried call just waits for this one.
                wait = self.dial_timeout * 2 ** min(round_no, 10)
                if len(targets) == 1 and retry:
                    wait = max(wait, deadline - time.monotonic())
                # A node that hangs after taking the request may keep at most half of
                # what is left, so another can still confirm it (under the same id).
                now = time.monotonic()
                until = deadline if len(targets) == 1 else min(deadline, now + max(2 * self.dial_timeout,
                                                                                   (deadline - now) / 2))
                try:
                    answer = exchange(ep, method, path, payload, headers, deadline=until, wait=wait,
                                      dial_timeout=self.dial_timeout, max_response_bytes=self.max_response_bytes,
                                      ssl_context=self._ssl_context())
                except NotSent as exc:
                    last, again = str(exc), again or exc.alive
                    continue
                except MaybeSent as exc:
                    last, again = str(exc), True
                    maybe_applied(last)
                    continue
                except Malformed as exc:
                    last = f"{exc} (is it a raftcoord endpoint?)"
                    maybe_applied(last)
                    continue
                if 200 <= answer.status < 300:
                    try:
                        out = _decode(answer.body)
                        if check is not None:
                            out = check(out)
                    except (Malformed, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                        last = f"{ep}: answered {answer.status} with something that is not a raftcoord answer: {exc}"
                        if answer.sent:
                            maybe_applied(last)
                        continue
                    self._preferred = ep
                    return out
                err, code = _error(answer.status, answer.body, ep)
                if req is not None and (code in _AMBIGUOUS_CODES or (answer.status == 409 and code is None)):
                    # A 409 without a text code: etcd's gRPC number hides which one it was.
                    if maybe_sent or resent:
                        raise self._unknown(method, path, f"{ep}: {err.message}")
                    raise _Resend()
                if answer.status >= 500 or answer.status == 429:
                    last, again = f"{ep}: {err.message}", True
                    if answer.sent and answer.status not in (429, 503) and code not in _NOT_APPLIED_CODES:
                        maybe_applied(last)
                    continue
                if maybe_sent:
                    raise self._unknown(method, path, f"{ep}: {err.message}")
                raise err
            if not retry or not again or time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
            backoff = min(1.0, backoff * 2)
        if maybe_sent:
            raise self._unknown(method, path, last)
        where = ", ".join(e.url for e in targets)
        raise UnavailableError(f"no endpoint answered ({where}): {last}")

    @staticmethod
    def _unknown(method: str, path: str, why: str) -> UnknownOutcomeError:
        return UnknownOutcomeError(
            f"{method} {path}: outcome unknown, the write may have been applied "
            f"(no node confirmed it before the deadline; last: {why})"
        )

    # ------------------------------------------------------------ sessions

    def _begin_write(self, deadline: float) -> _Request | None:
        """A request id for the next write (registering a session first if needed)."""
        client = self._session_id(deadline)
        if client is None:
            return None
        with self._lock:
            seq = next(self._seq)
            self._in_flight.add(seq)
            return _Request(client, seq, min(self._in_flight))

    def _end_write(self, req: _Request | None) -> None:
        if req is not None:
            with self._lock:
                self._in_flight.discard(req.seq)

    def _session_id(self, deadline: float) -> str | None:
        with self._lock:
            if self._session is not None or not self._sessions_supported:
                return self._session
        left = deadline - time.monotonic()
        if left <= 0:
            raise UnavailableError("the deadline passed before a client session was registered")
        try:
            # Registering twice only leaves a spare session the store evicts: retried freely.
            client = self.call("POST", SESSION_PATH, {}, check=_session_answer, timeout=left)
        except KeyNotFoundError:
            # An older node without sessions: writes go without an id and are never resent.
            log.info("the endpoint has no %s route; writes carry no request id", SESSION_PATH)
            with self._lock:
                self._sessions_supported = False
            return None
        with self._lock:
            if self._session is None:
                # seq keeps counting across sessions, so in-flight writes of the old one stay distinct.
                self._session = client
            return self._session

    # ------------------------------------------------------------ key-values

    def put(self, key: bytes, value: bytes) -> int:
        """Set a key; returns the revision."""
        return self.call("POST", "/v3/kv/put", {"key": b64(key), "value": b64(value)}, write=True,
                         check=_revision)

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
        return dict(self.call("POST", "/v3/kv/range", body, check=_range_answer))

    def get(self, key: bytes, *, serializable: bool = False) -> dict[str, Any]:
        """One key; raises KeyNotFoundError if absent."""
        out = self.range(key, serializable=serializable)
        if not out["kvs"]:
            raise KeyNotFoundError(f"key {key.decode('utf-8', 'backslashreplace')!r} not found", field="key")
        return dict(out["kvs"][0])

    def scan(
        self,
        prefix: bytes,
        *,
        limit: int = 0,
        descending: bool = False,
        serializable: bool = False,
        user_only: bool = False,
    ) -> dict[str, Any]:
        """Every key under ``prefix`` (every key for an empty prefix).

        ``user_only`` leaves out the node and message records (the keys under
        the coordinator's headers): the range is read in up to three pieces
        around them, one after another, so ``count`` and ``more`` are of the
        user keys and ``revision`` is the newest of the pieces'.
        """
        key, end = (prefix, prefix_end(prefix)) if prefix else (b"\x00", b"\x00")
        if not user_only:
            return self.range(key, end, limit=limit, descending=descending, serializable=serializable)
        pieces = _without_reserved(key, end)
        if descending:
            pieces.reverse()
        kvs: list[dict[str, Any]] = []
        count, revision = 0, 0
        for start, stop in pieces:
            left = limit - len(kvs) if limit else 0
            # Once the limit is reached, the other pieces are only counted.
            out = self.range(start, stop, limit=left if left or not limit else 1, descending=descending,
                             serializable=serializable, keys_only=bool(limit) and not left)
            if not limit or left:
                kvs.extend(out["kvs"])
            count += out["count"]
            revision = max(revision, out["revision"])
        kvs = kvs[:limit] if limit else kvs
        return {"kvs": kvs, "count": count, "more": count > len(kvs), "revision": revision}

    def delete(self, key: bytes, *, prefix: bool = False) -> int:
        """Delete a key (or every user key under a prefix); returns how many."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))

        def check(out: Any) -> int:
            _revision(out)
            return _uint(out.get("deleted", 0), "deleted")

        return int(self.call("POST", "/v3/kv/deleterange", body, write=True, check=check))

    # ------------------------------------------------------------ raftcoord

    def status(self, *, endpoint: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """One node's status (the first reachable one, or ``endpoint``, tried once)."""
        return dict(self.call("GET", "/raftcoord/v1/status", endpoint=endpoint, check=_status_answer,
                              timeout=timeout, retry=endpoint is None))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node's state record."""

        def check(out: Any) -> list[dict[str, Any]]:
            records = out["nodes"] if isinstance(out, dict) else out
            if not isinstance(records, list) or not all(isinstance(n, dict) for n in records):
                raise Malformed("nodes is not a list of objects")
            return records

        return list(self.call("GET", "/raftcoord/v1/nodes", check=check))

    def post(self, type: str | int, event: str | int | None = None, payload: Any = None) -> dict[str, Any]:
        """Post a message; returns it with its clock."""
        body: dict[str, Any] = {"type": type}
        if event is not None:
            body["event"] = event
        if payload is not None:
            body["payload"] = payload

        def check(out: Any) -> dict[str, Any]:
            message = _object(out)["message"]
            _uint(_object(message)["clock"], "clock")
            return dict(message)

        return dict(self.call("POST", "/raftcoord/v1/messages", body, write=True, check=check))

    def messages(self, since: int | None = None, limit: int = 0, *,
                 max_pages: int = MAX_MESSAGE_PAGES) -> list[dict[str, Any]]:
        """Messages with a clock above ``since``, in clock order (all for ``limit=0``).

        The endpoint answers in pages; this follows them until done, for at
        most ``max_pages`` pages, and stops with an error on a page that does
        not move past the previous one.
        """
        out: list[dict[str, Any]] = []
        for _ in range(max_pages):
            query = {}
            if since is not None:
                query["since"] = str(since)
            if limit:
                query["limit"] = str(limit - len(out))
            path = "/raftcoord/v1/messages" + ("?" + urllib.parse.urlencode(query) if query else "")
            page = self.call("GET", path, check=lambda p: _messages_page(p, since))
            out.extend(page["messages"])
            if not page["more"] or not page["messages"] or (limit and len(out) >= limit):
                return out[:limit] if limit else out
            since = int(page["messages"][-1]["clock"])
        raise UnavailableError(
            f"the listing did not end after {max_pages} pages ({len(out)} messages); narrow it with since/limit"
        )


    # ------------------------------------------------------------ streams

    def _open_stream(self, method: str, path: str, body: Any = None) -> Stream:
        """Open a streaming answer on the first endpoint that gives one, within the timeout."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + self.timeout
        last, backoff = "no endpoint was tried", 0.05
        for round_no in itertools.count():
            for ep in self._ordered():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(left, self.dial_timeout * 2 ** min(round_no, 10))
                try:
                    out = open_stream(ep, method, path, payload, headers, wait=wait,
                                      dial_timeout=min(self.dial_timeout, left),
                                      max_response_bytes=self.max_response_bytes, ssl_context=self._ssl_context())
                except (NotSent, MaybeSent, Malformed) as exc:
                    last = str(exc)
                    continue
                if isinstance(out, Stream):
                    self._preferred = ep
                    return out
                err, _code = _error(out.status, out.body, ep)
                if out.status >= 500 or out.status == 429:
                    last = f"{ep}: {err.message}"
                    continue
                raise err
            if time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
            backoff = min(1.0, backoff * 2)
        where = ", ".join(e.url for e in self._endpoints)
        raise UnavailableError(f"no endpoint answered ({where}): {last}")

    def _follow(self, open_at: Callable[[], Stream], idle_timeout: float | None) -> Iterator[Any]:
        """The JSON lines of a stream, reopened (by ``open_at``, which resumes) whenever it breaks or ends."""
        pause = 0.05
        while True:
            stream = open_at()
            got = False
            try:
                for line in stream.lines(idle_timeout):
                    got = True
                    try:
                        yield json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        raise Malformed(f"{stream.endpoint}: a stream line is not JSON") from None
            except OSError as exc:
                log.info("stream from %s broke (%s); resuming", stream.endpoint, exc)
                # Resume on the next node first: this one may be gone.
                ordered = self._ordered()
                if stream.endpoint in ordered and len(ordered) > 1:
                    self._preferred = ordered[(ordered.index(stream.endpoint) + 1) % len(ordered)]
            except Malformed as exc:
                raise DecodeError(f"{exc} (is it a raftcoord endpoint?)") from None
            finally:
                stream.close()
            # A node that ends streams at once must not make this a busy loop.
            pause = 0.05 if got else min(1.0, pause * 2)
            time.sleep(pause)

    def watch(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        prefix: bool = False,
        start_revision: int | None = None,
        prev_kv: bool = False,
        filters: Sequence[str] = (),
        progress_notify: bool = False,
        idle_timeout: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Watch a key or range through ``POST /v3/watch``; yields one answer per revision.

        Each answer is ``{"revision", "events"}``; an event is ``{"type"
        ("PUT" or "DELETE"), "kv", "prev_kv"}`` with kvs as :meth:`range`
        gives them (``prev_kv`` None unless asked). With ``progress_notify``
        an answer with no events reports the revision reached. The watch
        starts at ``start_revision`` (None: the next revision). When the
        stream breaks or the node ends it (it stops, or nothing arrived in
        ``idle_timeout`` seconds), the watch resumes on another endpoint
        from the next revision, so no revision is missed or repeated; if no
        endpoint answers within the client's timeout it raises
        UnavailableError. A start revision older than the kept history
        raises CompactedError with ``compact_revision``.
        """
        if prefix:
            range_end = prefix_end(key)
        create: dict[str, Any] = {"key": b64(key)}
        if range_end:
            create["range_end"] = b64(range_end)
        if prev_kv:
            create["prev_kv"] = True
        if filters:
            create["filters"] = list(filters)
        if progress_notify:
            create["progress_notify"] = True
        next_revision = start_revision or 0

        def open_at() -> Stream:
            body = {"create_request": {**create, **({"start_revision": next_revision} if next_revision else {})}}
            return self._open_stream("POST", "/v3/watch", body)

        for line in self._follow(open_at, idle_timeout):
            if "error" in _object(line):
                raise _stream_error(line["error"])
            result = _object(line["result"])
            revision = _uint(_object(result.get("header", {})).get("revision", 0), "revision")
            if result.get("compact_revision"):
                compact = _uint(result["compact_revision"], "compact_revision")
                raise CompactedError(
                    f"watch: revision {next_revision} was compacted; the oldest revision kept is {compact}",
                    field="start_revision", compact_revision=compact)
            if result.get("canceled"):
                raise UnavailableError(f"watch canceled by the node: {result.get('cancel_reason') or 'no reason'}")
            if result.get("created"):
                if not next_revision:  # from now on: the node's revision when the watch began
                    next_revision = revision + 1
                continue
            events = [_watch_event(e) for e in result.get("events", [])]
            events = [e for e in events if e["kv"]["mod_revision"] >= next_revision]
            if result.get("events") and not events:
                continue  # a revision already yielded, sent again after a resume
            if events:
                revision = events[-1]["kv"]["mod_revision"]
            if revision < next_revision - 1 or (not events and not progress_notify):
                continue
            next_revision = max(next_revision, revision + 1)
            yield {"revision": revision, "events": events}

    def follow_messages(self, since: int | None = None, *,
                        idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Messages with a clock above ``since`` (None: from now on), then each new one, as they come.

        Resumes on another endpoint after the last clock seen when the
        stream breaks; a ``since`` below what is kept raises CompactedError
        with ``oldest_clock``. Messages of every node are included.
        """
        last = since

        def open_at() -> Stream:
            query = {"follow": "1", "consistency": "serializable"}
            if last is not None:
                query["since"] = str(last)
            return self._open_stream("GET", "/raftcoord/v1/messages?" + urllib.parse.urlencode(query))

        for line in self._follow(open_at, idle_timeout):
            if "error" in _object(line):
                raise _stream_error(line["error"])
            clock = _uint(line.get("clock"), "clock")
            if last is not None and clock <= last:
                continue
            last = clock
            yield line


class _Resend(Exception):
    """A first attempt was refused for its session: register anew and send once more."""


#: Routes whose POST changes state.
_WRITE_PATHS: Final = frozenset({"/v3/kv/put", "/v3/kv/deleterange", "/v3/kv/txn", "/raftcoord/v1/messages"})


def _without_reserved(key: bytes, end: bytes) -> list[tuple[bytes, bytes]]:
    """``[key, end)`` (``end`` ``b"\\0"``: to the end) minus the coordinator's key ranges, in order."""
    pieces = [(key, end)]
    for reserved in RESERVED_PREFIXES:
        stop = prefix_end(reserved)
        kept = []
        for lo, hi in pieces:
            if lo < reserved:  # the part below the reserved range
                kept.append((lo, reserved if hi == b"\x00" or hi > reserved else hi))
            if hi == b"\x00" or hi > stop:  # the part above it
                kept.append((max(lo, stop), hi))
        pieces = kept
    return pieces


# ---------------------------------------------------------------- answers


def _stream_error(error: Any) -> RaftcoordError:
    """The error an ``{"error": ...}`` line of a stream stands for."""
    data = _object(error)
    message = data.get("message")
    message = " ".join(message.split())[:_MAX_MESSAGE] if isinstance(message, str) and message else "stream error"
    field = data.get("field") if isinstance(data.get("field"), str) else None
    code = data.get("code") if isinstance(data.get("code"), str) else None
    if code is not None:
        return error_from_code(code, message, field, details=data)
    status = data.get("http_code")
    return _BY_STATUS.get(status if isinstance(status, int) else 0, RaftcoordError)(message, field=field)


def _kv(kv: Any) -> dict[str, Any]:
    kv = _object(kv)
    return {
        "key": unb64(kv.get("key")),
        "value": unb64(kv.get("value")),
        "create_revision": _uint(kv.get("create_revision", 0), "create_revision"),
        "mod_revision": _uint(kv.get("mod_revision", 0), "mod_revision"),
        "version": _uint(kv.get("version", 0), "version"),
    }


def _watch_event(event: Any) -> dict[str, Any]:
    event = _object(event)
    kind = event.get("type", "PUT")
    if kind not in ("PUT", "DELETE"):
        raise Malformed(f"event type {str(kind)[:20]!r} is not PUT or DELETE")
    prev = event.get("prev_kv")
    return {"type": kind, "kv": _kv(event["kv"]), "prev_kv": None if prev is None else _kv(prev)}


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Malformed(f"not JSON: {type(exc).__name__}") from None


def _error(status: int, body: bytes, ep: Endpoint) -> tuple[RaftcoordError, str | None]:
    """The error an error answer stands for (its code wins over its status), and that text code."""
    try:
        data = _decode(body)
    except Malformed:
        data = None
    if not isinstance(data, dict):
        data = {}
    message = data.get("message") or data.get("error")
    if not isinstance(message, str) or not message:
        message = f"HTTP {status} from {ep}"
    message = " ".join(message.split())[:_MAX_MESSAGE]
    field = data.get("field") if isinstance(data.get("field"), str) else None
    code = _code_of(data)
    if code is not None:
        err = error_from_code(code, message, field, details=data)
        if type(err) is not RaftcoordError:
            return err, code
    return _BY_STATUS.get(status, RaftcoordError)(message, field=field), code


def _code_of(data: Mapping[str, Any]) -> str | None:
    """The raftcoord error code of an error body.

    raftcoord's own routes put it in ``code``; under ``/v3/`` that is etcd's
    gRPC number, so the text code may travel beside it.
    """
    for name in ("code", "raftcoord_code", "reason"):
        value = data.get(name)
        if isinstance(value, str) and value:
            return value
    details = data.get("details")
    if isinstance(details, list):
        for d in details:
            if isinstance(d, dict) and isinstance(d.get("code"), str):
                return str(d["code"])
    return None


def _object(out: Any) -> dict[str, Any]:
    if not isinstance(out, dict):
        raise Malformed(f"expected a JSON object, got {type(out).__name__}")
    return out


def _uint(value: Any, what: str) -> int:
    """A non-negative integer as etcd's JSON carries it (a number or decimal text)."""
    if isinstance(value, bool):
        raise Malformed(f"{what} is not an integer")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    raise Malformed(f"{what} is not a non-negative integer")


def _revision(out: Any) -> int:
    return _uint(_object(_object(out)["header"])["revision"], "revision")


def _status_answer(out: Any) -> dict[str, Any]:
    if not isinstance(_object(out).get("role"), str):
        raise Malformed("no role in the status")
    return out


def _session_answer(out: Any) -> str:
    client = _object(out)["client"]
    if not isinstance(client, str) or not _SESSION_ID.fullmatch(client):
        raise Malformed("client is not a session id")
    return client


def _range_answer(out: Any) -> dict[str, Any]:
    revision = _revision(out)
    raw_kvs = out.get("kvs", [])
    if not isinstance(raw_kvs, list):
        raise Malformed("kvs is not a list")
    kvs = []
    for kv in raw_kvs:
        kv = _object(kv)
        kvs.append(
            {
                "key": unb64(kv.get("key")),
                "value": unb64(kv.get("value")),
                "create_revision": _uint(kv.get("create_revision", 0), "create_revision"),
                "mod_revision": _uint(kv.get("mod_revision", 0), "mod_revision"),
                "version": _uint(kv.get("version", 0), "version"),
            }
        )
    more = out.get("more", False)
    if not isinstance(more, bool):
        raise Malformed("more is not true or false")
    return {"kvs": kvs, "count": _uint(out.get("count", 0), "count"), "more": more, "revision": revision}


def _messages_page(out: Any, since: int | None) -> dict[str, Any]:
    page = _object(out)
    messages, more = page["messages"], page.get("more", False)
    if not isinstance(messages, list) or not isinstance(more, bool):
        raise Malformed("messages is not a list or more is not true or false")
    floor = -1 if since is None else since
    for m in messages:
        clock = _uint(_object(m).get("clock"), "clock")
        if clock <= floor:
            # Pages must move forward, or following ``more`` would never end.
            raise Malformed(f"message clock {clock} does not follow {floor}")
        floor = clock
    return {"messages": messages, "more": more}
