"""The HTTP/1.1 exchange under :mod:`raftcoord.client`: one request, one node.

It exists so the client can tell a request that provably never reached a
handler from one that may have. A request with a body goes out in two steps:
the head with ``Expect: 100-continue``, then the body once the node answers
``100 Continue`` (aiohttp, the endpoint's server, does so before it runs the
handler). So:

* no connection (refused, no such host, connect timeout), or no first byte of
  an answer within the dial timeout (a paused or wedged process whose kernel
  still accepts connections): the body never left, :class:`NotSent`;
* a failure after the body left (read timeout, reset): :class:`MaybeSent`;
* an answer that is not HTTP, or too large: :class:`Malformed`.

Every wait is bounded by the caller's deadline, the whole answer included:
a node that drips one byte a second cannot hold a caller past it. One
connection per request (``Connection: close``): the CLI makes one or two
requests per run, and no pooled socket can go stale.

:func:`open_stream` sends a request whose answer stays open (a watch, a
followed message box) and returns a :class:`Stream` that yields the body's
lines as they arrive.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from raftcoord.errors import InvalidInputError

__all__ = ["Answer", "Endpoint", "Malformed", "MaybeSent", "NotSent", "Stream", "exchange", "open_stream",
           "parse_endpoint"]

#: Longest accepted status line or header line of an answer.
_MAX_LINE: Final = 65536
_MAX_HEADERS: Final = 100
_HOST: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9\-_.]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class Endpoint:
    """One node's client URL, checked: scheme, host, port and path prefix."""

    scheme: str
    host: str
    port: int
    prefix: str

    @property
    def netloc(self) -> str:
        """``host:port``, with an IPv6 address in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint as a base URL without a trailing slash."""
        return f"{self.scheme}://{self.netloc}{self.prefix}"

    def __str__(self) -> str:
        return self.url


def parse_endpoint(text: str) -> Endpoint:
    """``host:port`` or an http(s) URL as an :class:`Endpoint`; InvalidInputError if malformed."""
    if not isinstance(text, str):
        raise InvalidInputError(f"endpoint {text!r} is not text", field="endpoints")
    shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    raw = text.strip()
    if not raw:
        raise InvalidInputError("an endpoint is empty", field="endpoints")

    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(f"endpoint {shown!r}: {why} (expected host:port or http://host:port)",
                                 field="endpoints")

    if not raw.isascii() or not raw.isprintable():
        raise bad("not printable ASCII")
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parsed = urllib.parse.urlsplit(raw)
        port = parsed.port
    except ValueError as exc:
        raise bad(str(exc)) from None
    if parsed.scheme not in ("http", "https"):
        raise bad(f"scheme {parsed.scheme!r} is not http or https")
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise bad("has a query, fragment or user part")
    host = parsed.hostname or ""
    if not host:
        raise bad("no host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    elif not _HOST.fullmatch(host) or len(host) > 253:
        raise bad(f"{host!r} is not a host name or address")
    if port is None:
        port = 443 if parsed.scheme == "https" else 2379
    if not 1 <= port <= 65535:
        raise bad(f"port {port} is not in 1-65535")
    return Endpoint(parsed.scheme, host, port, parsed.path.rstrip("/"))


class NotSent(Exception):
    """The request's body never left: no handler can have run it.

    ``alive`` says the node was reached but did not answer in time (worth
    another try before the deadline); False means it could not be reached.
    """

    def __init__(self, message: str, *, alive: bool) -> None:
        super().__init__(message)
        self.alive = alive


class MaybeSent(Exception):
    """The body left but no answer came back: a write may have applied."""


class Malformed(Exception):
    """An answer that is not what a raftcoord endpoint sends."""


@dataclass
class Answer:
    """A final answer; ``sent`` says whether the request's body went out."""

    status: int
    body: bytes
    sent: bool


class _Reader:
    """Reads one HTTP/1.1 answer from a socket, never past a deadline."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.deadline = deadline
        self.limit = limit

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the deadline passed")
        self.sock.settimeout(left)

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the first byte; False on a clean close."""
        self.sock.settimeout(max(0.001, min(seconds, self.deadline - time.monotonic())))
        return bool(self.file.peek(1))

    def line(self) -> bytes:
        self._arm()
        line = self.file.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise Malformed("a header line is too long")
        if not line:
            raise ConnectionResetError("the connection closed in the middle of the answer")
        return line

    def head(self) -> tuple[int, dict[str, str]]:
        status_line = self.line().decode("latin-1").rstrip("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise Malformed(f"not an HTTP answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            line = self.line().decode("latin-1").rstrip("\r\n")
            if not line:
                return int(code), headers
            name, sep, value = line.partition(":")
            if not sep:
                raise Malformed(f"a malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        raise Malformed(f"more than {_MAX_HEADERS} header lines")

    def exactly(self, n: int) -> bytes:
        chunks = []
        while n > 0:
            self._arm()
            chunk = self.file.read1(min(n, 65536))
            if not chunk:
                raise ConnectionResetError("the connection closed in the middle of the answer body")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def body(self, headers: Mapping[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                size_text = self.line().split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise Malformed("a malformed chunk size") from None
                if size == 0:
                    while self.line().strip():  # trailers
                        pass
                    return bytes(out)
                if len(out) + size > self.limit:
                    raise Malformed(f"the answer is larger than {self.limit} bytes")
                out += self.exactly(size)
                self.exactly(2)
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isascii() or not length_text.isdigit() or len(length_text) > 18:
                raise Malformed(f"a malformed Content-Length {length_text[:40]!r}")
            if int(length_text) > self.limit:
                raise Malformed(f"the answer is larger than {self.limit} bytes")
            return self.exactly(int(length_text))
        out = bytearray()
        while True:
            self._arm()
            chunk = self.file.read1(65536)
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > self.limit:
                raise Malformed(f"the answer is larger than {self.limit} bytes")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror or exc})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def exchange(ep: Endpoint, method: str, path: str, payload: bytes | None, headers: Mapping[str, str], *,
             deadline: float, wait: float, dial_timeout: float, max_response_bytes: int,
             ssl_context: ssl.SSLContext | None = None) -> Answer:
    """One HTTP exchange with one node, never past ``deadline``.

    ``wait`` bounds the wait for the node's first byte (``100 Continue``
    or an answer); ``dial_timeout`` bounds connecting. Raises NotSent,
    MaybeSent or Malformed (only once the body left) on failure.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise NotSent(f"{ep}: the deadline passed before it was tried", alive=True)
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=min(dial_timeout, left))
        if ep.scheme == "https":
            sock = (ssl_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=ep.host)
    except OSError as exc:
        raise NotSent(f"{ep}: cannot connect: {_reason(exc)}", alive=False) from None
    try:
        lines = [f"{method} {ep.prefix}{path} HTTP/1.1", f"Host: {ep.netloc}", "Connection: close",
                 "Accept: application/json"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if payload is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}",
                      "Expect: 100-continue"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        sent = False
        try:
            sock.settimeout(max(0.001, min(wait, deadline - time.monotonic())))
            sock.sendall(head)
            reader = _Reader(sock, deadline, max_response_bytes)
            if not reader.wait(wait):
                raise NotSent(f"{ep}: closed the connection without an answer", alive=False)
            while True:
                status, answer_headers = reader.head()
                if status == 100 and payload is not None and not sent:
                    sent = True
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock.sendall(payload)
                    continue
                if 100 <= status < 200:
                    continue
                sent = sent or payload is None
                return Answer(status, reader.body(answer_headers), sent)
        except Malformed as exc:
            if not sent and payload is not None:
                raise NotSent(f"{ep}: {exc}", alive=False) from None
            raise Malformed(f"{ep}: {exc}") from None
        except OSError as exc:
            if not sent and payload is not None:
                if isinstance(exc, socket.timeout):
                    raise NotSent(f"{ep}: no answer within {wait:g} s (dial timeout)", alive=True) from None
                raise NotSent(f"{ep}: {_reason(exc)}", alive=False) from None
            raise MaybeSent(f"{ep}: {_reason(exc)}") from None
    finally:
        sock.close()


class Stream:
    """An answer that stays open: status 200 and a body read as it arrives.

    :meth:`lines` yields the body's lines (chunked or not) until the node
    ends the answer; it raises ``OSError`` when the connection breaks, or
    times out after ``idle_timeout`` seconds without a byte, and
    :class:`Malformed` for a line longer than ``max_line`` bytes.
    """

    def __init__(self, ep: Endpoint, sock: socket.socket, reader: _Reader, headers: Mapping[str, str],
                 max_line: int) -> None:
        self.endpoint = ep
        self._sock = sock
        self._reader = reader
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._max_line = max_line

    def _read(self, idle_timeout: float | None) -> bytes:
        """The next piece of the body; b"" at its end."""
        self._sock.settimeout(idle_timeout)
        file = self._reader.file
        if not self._chunked:
            return file.read1(65536)
        size_line = file.readline(_MAX_LINE + 1)
        if not size_line:
            raise ConnectionResetError("the connection closed in the middle of the stream")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise Malformed(f"{self.endpoint}: a malformed chunk size") from None
        if size == 0:
            return b""
        if size > self._max_line:
            raise Malformed(f"{self.endpoint}: a stream chunk is larger than {self._max_line} bytes")
        data = file.read(size + 2)
        if len(data) < size + 2:
            raise ConnectionResetError("the connection closed in the middle of a chunk")
        return data[:size]

    def lines(self, idle_timeout: float | None = None) -> Iterator[bytes]:
        """Each non-empty line of the body, as it arrives."""
        buf = b""
        while True:
            data = self._read(idle_timeout)
            if not data:
                if buf.strip():
                    yield buf
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line
            if len(buf) > self._max_line:
                raise Malformed(f"{self.endpoint}: a stream line is longer than {self._max_line} bytes")

    def close(self) -> None:
        """Close the connection (the node ends the stream when it notices)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def open_stream(ep: Endpoint, method: str, path: str, payload: bytes | None, headers: Mapping[str, str], *,
                wait: float, dial_timeout: float, max_response_bytes: int,
                ssl_context: ssl.SSLContext | None = None) -> Answer | Stream:
    """Send a request that answers with a stream (a read: sent in one go).

    Returns the open :class:`Stream` for a 200, else the whole error
    :class:`Answer` (read within ``wait`` seconds). Raises NotSent when the
    node cannot be reached or shows no sign of life within ``wait`` seconds,
    MaybeSent or Malformed for a broken or garbled head.
    """
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=dial_timeout)
        if ep.scheme == "https":
            sock = (ssl_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=ep.host)
    except OSError as exc:
        raise NotSent(f"{ep}: cannot connect: {_reason(exc)}", alive=False) from None
    try:
        lines = [f"{method} {ep.prefix}{path} HTTP/1.1", f"Host: {ep.netloc}", "Accept: application/json"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if payload is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        sock.settimeout(wait)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b""))
        reader = _Reader(sock, time.monotonic() + wait, max_response_bytes)
        if not reader.wait(wait):
            raise NotSent(f"{ep}: closed the connection without an answer", alive=False)
        while True:
            status, answer_headers = reader.head()
            if not 100 <= status < 200:
                break
        if status != 200:
            answer = Answer(status, reader.body(answer_headers), True)
            sock.close()
            return answer
        return Stream(ep, sock, reader, answer_headers, max_response_bytes)
    except socket.timeout:
        sock.close()
        raise NotSent(f"{ep}: no answer within {wait:g} s", alive=True) from None
    except Malformed as exc:
        sock.close()
        raise Malformed(f"{ep}: {exc}") from None
    except OSError as exc:
        sock.close()
        raise MaybeSent(f"{ep}: {_reason(exc)}") from None
