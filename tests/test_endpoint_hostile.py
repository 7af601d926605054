"""Hostile HTTP clients against a real listening endpoint (raw sockets on 127.0.0.1).

Each input a client can send, however malformed, slow or abandoned, gets a
4xx or a closed connection, costs bounded time and memory, and leaves at most
one throttled log line: never a 500 and never a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from raftcoord.coordinator import Coordinator
from raftcoord.endpoint import make_app, serve

#: Short timeouts so that the tests take seconds.
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0


class Served:
    """The endpoint of a memory coordinator, served on an ephemeral port from a thread."""

    def __init__(self, max_connections: int = 64, max_request_bytes: int | None = None) -> None:
        self.coord = Coordinator.memory("n1")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        app = make_app(self.coord, body_timeout=BODY_TIMEOUT)

        async def start() -> Any:
            return await serve(app, "127.0.0.1", 0, header_timeout=HEADER_TIMEOUT, max_connections=max_connections)

        self.runner = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.runner.addresses[0][1]

    def connect(self) -> socket.socket:
        """A raw connection to the endpoint."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def request(self, raw: bytes) -> bytes:
        """Send ``raw`` and read until the server closes or a response is complete."""
        with self.connect() as sock:
            sock.sendall(raw)
            return read_response(sock)

    def close(self) -> None:
        """Stop serving and the loop."""
        async def shutdown() -> None:
            await self.runner.cleanup()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.coord.close()


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read what the server sends until it closes, or until a full response with Content-Length arrived."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    return int(response.split(b" ", 2)[1])


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent before."""
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, data
            data += chunk
    except ConnectionResetError:
        return True, data
    except socket.timeout:
        return False, data


@pytest.fixture
def served() -> Iterator[Served]:
    """A served endpoint."""
    s = Served()
    yield s
    s.close()


def no_traceback(caplog: pytest.LogCaptureFixture, most: int = 1) -> None:
    """No record carries a traceback, none is above INFO, and at most ``most`` lines were written."""
    records = [r for r in caplog.records if r.name.startswith(("raftcoord", "aiohttp", "asyncio"))]
    assert not [r for r in records if r.exc_info or "Traceback" in r.getMessage()], caplog.text
    assert not [r for r in records if r.levelno > logging.INFO], caplog.text
    assert len(records) <= most, caplog.text


def post(path: str, body: bytes, **headers: str) -> bytes:
    """A raw POST request."""
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def serving(s: Served) -> bool:
    """The endpoint still answers /version."""
    return status_of(s.request(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200


# ------------------------------------------------------------------ d11


def test_issue6_d11_json_integer_of_5000_digits(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """An integer of more than 4,300 digits in a body is a 400, not a 500, without a traceback."""
    with caplog.at_level(logging.INFO):
        for path in ("/v3/kv/put", "/v3/kv/range", "/raftcoord/v1/messages"):
            response = served.request(post(path, b'{"key": ' + b"1" * 5000 + b"}"))
            assert status_of(response) == 400, response[:300]
    no_traceback(caplog, most=3)


def test_issue6_d11_gzip_encoding_with_plain_body(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """Content-Encoding: gzip with a body of {} is a 400 without a traceback; real gzip works."""
    with caplog.at_level(logging.INFO):
        for path in ("/v3/kv/put", "/v3/maintenance/status", "/raftcoord/v1/messages"):
            response = served.request(post(path, b"{}", Content_Encoding="gzip"))
            assert status_of(response) == 400, response[:300]
    no_traceback(caplog, most=3)
    response = served.request(post("/v3/maintenance/status", gzip.compress(b"{}"), Content_Encoding="gzip"))
    assert status_of(response) == 200, response[:300]


def test_issue6_d11_partial_body_then_disconnect(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """A client that sends half a body and goes away leaves no traceback, and the node serves on."""
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            with served.connect() as sock:
                sock.sendall(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"key\":")
                time.sleep(0.05)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(caplog.records) < 5:
            time.sleep(0.05)  # give the server time to notice (or to log a traceback)
        time.sleep(0.2)
        assert serving(served)
    no_traceback(caplog, most=5)


def test_issue6_d11_control_byte_in_header(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """A control byte in a header is a 400 (or a closed connection) with at most one line, no traceback."""
    with caplog.at_level(logging.INFO):
        response = served.request(b"GET /version HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\nConnection: close\r\n\r\n")
        assert response == b"" or status_of(response) == 400, response[:300]
    no_traceback(caplog)
    assert serving(served)


def test_issue6_d11_malformed_http_floods_only_a_throttled_log(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """Fifty malformed requests write at most the refusal burst to the log."""
    from raftcoord.endpoint import REFUSAL_LOG_BURST

    with caplog.at_level(logging.INFO):
        for _ in range(50):
            served.request(b"GET /version HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n")
    no_traceback(caplog, most=REFUSAL_LOG_BURST)


# ------------------------------------------------------------------- d6


def test_issue6_d6_partial_headers_timed_out(served: Served) -> None:
    """A connection that never finishes its request head is closed after the header timeout."""
    with served.connect() as sock:
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        closed, _ = closed_within(sock, HEADER_TIMEOUT + 3)
        assert closed and time.monotonic() - started < HEADER_TIMEOUT + 3


def test_issue6_d6_slow_header_drip_timed_out(served: Served) -> None:
    """Dripping a header byte by byte does not keep the connection open past the timeout."""
    with served.connect() as sock:
        started = time.monotonic()
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n")
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT + 3:
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            done, _ = closed_within(sock, 0.2)
            if done:
                closed = True
                break
        assert closed


def test_issue6_d6_idle_connection_closed(served: Served) -> None:
    """A connection that sends nothing is closed after the header timeout."""
    with served.connect() as sock:
        closed, _ = closed_within(sock, HEADER_TIMEOUT + 3)
        assert closed


def test_issue6_d6_partial_body_timed_out(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """A body that stops halfway gets a 408 and a closed connection after the body timeout."""
    with caplog.at_level(logging.INFO), served.connect() as sock:
        sock.sendall(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"key\":")
        started = time.monotonic()
        closed, data = closed_within(sock, BODY_TIMEOUT + 5)
        assert closed and time.monotonic() - started < BODY_TIMEOUT + 5
        assert status_of(data) == 408, data[:300]
    no_traceback(caplog)


def test_issue6_d6_keepalive_connection_still_works(served: Served) -> None:
    """Two requests on one connection within the timeout are both answered."""
    with served.connect() as sock:
        for _ in range(2):
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(read_response(sock)) == 200


def test_issue6_d6_connections_bounded() -> None:
    """Beyond max_connections, new connections are closed at once; the endpoint serves on."""
    s = Served(max_connections=4)
    try:
        held = [s.connect() for _ in range(4)]
        time.sleep(0.2)
        extra = s.connect()
        closed, _ = closed_within(extra, 2)
        assert closed
        extra.close()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # the closed ones are forgotten soon
            try:
                if serving(s):
                    break
            except (OSError, IndexError, ValueError):
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        s.close()


# ------------------------------------------------------------------- d2


def test_issue6_d2_oversized_body_refused_before_it_is_read(served: Served) -> None:
    """A Content-Length over max_request_bytes is a 413 naming it, without waiting for the body."""
    with served.connect() as sock:
        sock.sendall(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{")
        started = time.monotonic()
        data = read_response(sock, timeout=5)
        assert status_of(data) == 413 and b"max_request_bytes" in data, data[:300]
        assert time.monotonic() - started < BODY_TIMEOUT


def test_issue6_d2_oversized_chunked_body_is_413(served: Served) -> None:
    """A chunked body that grows past max_request_bytes is a 413 naming it."""
    from raftcoord.endpoint import MAX_BODY_BYTES

    chunk = b"x" * 65536
    with served.connect() as sock:
        sock.sendall(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server may close before the client finished
        data = read_response(sock, timeout=5)
        assert status_of(data) == 413 and b"max_request_bytes" in data, data[:300]


# ------------------------------------------------------------ issue 8: the watch stream


def test_issue8_4_watch_request_that_never_ends_is_408(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    """A first watch request that stops halfway gets a 408 and a closed connection after the body timeout."""
    with caplog.at_level(logging.INFO), served.connect() as sock:
        sock.sendall(b"POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"10\r\n{\"create_request\r\n")
        closed, data = closed_within(sock, BODY_TIMEOUT + 5)
        assert closed and status_of(data) == 408, data[:300]
    no_traceback(caplog)
    assert serving(served)


def test_issue8_4_watch_request_larger_than_the_limit_is_413(served: Served) -> None:
    """One watch request object growing past max_request_bytes is a 413 naming it, without reading it all."""
    from raftcoord.endpoint import MAX_BODY_BYTES

    chunk = b"x" * 65536
    with served.connect() as sock:
        start = b'{"create_request": "'
        sock.sendall(b"POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(start) + start + b"\r\n")
        try:
            for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass  # the server may close before the client finished
        data = read_response(sock, timeout=5)
        assert status_of(data) == 413 and b"max_request_bytes" in data, data[:300]


@pytest.mark.parametrize("body", [b"xyz", b"{\"create_request\": {\"key\": \"YQ==\"}} 7", b"\xff{}"],
                         ids=["not-json", "trailing-number", "not-utf8"])
def test_issue8_4_watch_body_that_is_not_json_objects_is_400(served: Served, body: bytes,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A watch body that is not a sequence of JSON objects: 400 at once, or an error line ending the stream."""
    with caplog.at_level(logging.INFO):
        data = served.request(post("/v3/watch", body))
    if body.startswith(b"{"):  # the first request is good: the stream starts, then ends with an error line
        assert status_of(data) == 200 and b'"error"' in data and b'"http_code":400' in data, data[:500]
    else:
        assert status_of(data) == 400, data[:300]
    no_traceback(caplog, most=2)
    assert serving(served)
