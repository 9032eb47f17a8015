"""Slow, oversized and malformed requests against a real ``computeplane api`` process.

The server runs with a 1 second deadline for request headers, a 1 second deadline for the
body and a 4096 byte body limit. Clients here speak HTTP/1.1 over raw sockets, so they can
stall, trickle or send bytes no HTTP library would. Whatever a client does, the server must
respond with a 4xx or close the connection, never return a 5xx, and keep serving other clients.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from conftest import Keys
from support.api_server import ApiProcess, ApiServers

pytestmark = pytest.mark.e2e

HEAD_TIMEOUT_SECONDS = 1.0
BODY_TIMEOUT_SECONDS = 1.0
MAX_REQUEST_BYTES = 4096

# Generous, because the machine may be busy, while a correct server responds in about a second.
RESPONSE_DEADLINE_SECONDS = 20.0
SLOW_CLIENTS = 50
# Attempts at serving a request while every slow client still keeps its connection open.
SLOW_CLIENT_ATTEMPTS = 3

INSTANCES = "/v1/compute/instances"
INVALID_KEY_BODY = b'{"instance_type": "gpu_1x_h100_sxm5", "ssh_key": "not-a-key"}'


@dataclass(frozen=True)
class Server:
    """The API process under test and its admin key."""

    api: ApiProcess
    admin_key: str

    def connect(self) -> socket.socket:
        connection = socket.create_connection((self.api.host, self.api.port), timeout=10.0)
        connection.settimeout(RESPONSE_DEADLINE_SECONDS)
        return connection

    def head(self, method: str, path: str, *headers: str) -> bytes:
        """Return a request line and headers with the admin key, ending in a blank line."""
        lines = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.api.host}:{self.api.port}",
            f"Authorization: Key {self.admin_key}",
            *headers,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def list_instances(self) -> httpx.Response:
        with httpx.Client(base_url=self.api.base_url, timeout=RESPONSE_DEADLINE_SECONDS) as client:
            return client.get(INSTANCES, headers=Keys.header(self.admin_key))


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json_error(self) -> dict[str, str]:
        assert self.headers.get("content-type") == "application/json", self.headers
        error: dict[str, str] = json.loads(self.body)["error"]
        return error


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("slow-requests")
    servers = ApiServers(
        base / "data",
        f"sqlite:///{base / 'computeplane.db'}",
        env={
            "COMPUTEPLANE_REQUEST_HEAD_TIMEOUT_SECONDS": str(HEAD_TIMEOUT_SECONDS),
            "COMPUTEPLANE_REQUEST_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_SECONDS),
            "COMPUTEPLANE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        },
    )
    try:
        servers.initialize()
        api = servers.start()
        yield Server(api, servers.admin_key)
    finally:
        servers.stop()


@pytest.fixture(autouse=True)
def still_serving(server: Server) -> Iterator[None]:
    """After each test, check that the process runs and serves a normal request."""
    yield
    assert server.api.process.running, server.api.process.describe()
    response = server.list_instances()
    assert response.status_code == 200, response.text


def read_response(connection: socket.socket) -> RawResponse | None:
    """Read one response with a Content-Length body, or return None if the server closes first.

    Raises TimeoutError if neither happens within the socket's timeout.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _receive(connection)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = _receive(connection)
        assert chunk, f"connection closed after {len(body)} of {length} body bytes"
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body)


def _receive(connection: socket.socket) -> bytes:
    try:
        return connection.recv(65536)
    except ConnectionResetError:
        return b""


def wait_closed(connection: socket.socket) -> bytes:
    """Read until the server closes the connection and return what it sent before closing.

    Raises TimeoutError if the connection is still open after the socket's timeout.
    """
    received = b""
    while chunk := _receive(connection):
        received += chunk
    return received


def is_waiting(connection: socket.socket) -> bool:
    """Return whether the connection is open with no response yet, without blocking."""
    readable, _, _ = select.select([connection], [], [], 0)
    return not readable


def assert_error(response: RawResponse | None, status: int, code: str) -> None:
    assert response is not None, "the server closed the connection without a response"
    assert response.status == status, response
    error = response.json_error()
    assert error["type"] == "validation_error", error
    assert error["code"] == code, error
    assert error["request_id"] == response.headers.get("x-request-id"), response


def chunked(body: bytes, chunk_size: int) -> bytes:
    """Encode ``body`` in chunked transfer coding, with the final empty chunk."""
    parts = [
        f"{len(body[start : start + chunk_size]):x}\r\n".encode()
        + body[start : start + chunk_size]
        + b"\r\n"
        for start in range(0, len(body), chunk_size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def padded_json(size: int) -> bytes:
    """Return the invalid-key create body padded with spaces to exactly ``size`` bytes."""
    return INVALID_KEY_BODY + b" " * (size - len(INVALID_KEY_BODY))


# --- request heads ----------------------------------------------------------------------------


def test_partial_head_is_disconnected(server: Server) -> None:
    started = time.monotonic()
    with server.connect() as connection:
        connection.sendall(f"GET {INSTANCES} HTTP/1.1\r\nHost: localhost\r\n".encode())

        received = wait_closed(connection)

    assert received == b""
    # The server closes at the deadline, not before. The socket timeout is the upper bound.
    assert time.monotonic() - started >= HEAD_TIMEOUT_SECONDS * 0.9


def test_trickled_head_is_disconnected(server: Server) -> None:
    """Check that steady progress does not extend the head deadline, which counts from the
    connection."""
    header_bytes = b"X-Padding: " + b"a" * 400
    closed = False
    deadline = time.monotonic() + RESPONSE_DEADLINE_SECONDS
    with server.connect() as connection:
        connection.sendall(f"GET {INSTANCES} HTTP/1.1\r\n".encode())
        for byte in header_bytes:
            try:
                connection.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            readable, _, _ = select.select([connection], [], [], 0.1)
            if readable:
                closed = _receive(connection) == b""
                break
            if time.monotonic() > deadline:
                break

    assert closed, "the server kept a trickling request head open"


# --- request bodies ---------------------------------------------------------------------------


def test_partial_body_gets_408(server: Server) -> None:
    with server.connect() as connection:
        head = server.head(
            "POST", INSTANCES, "Content-Type: application/json", "Content-Length: 100"
        )
        connection.sendall(head + b'{"instance_type"')

        response = read_response(connection)

    assert_error(response, 408, "request_timeout")


def test_trickled_body_gets_408(server: Server) -> None:
    body = b"{" + b" " * 28 + b"}"
    with server.connect() as connection:
        head = server.head(
            "POST", INSTANCES, "Content-Type: application/json", f"Content-Length: {len(body)}"
        )
        connection.sendall(head)
        # One byte every 0.3 s takes 9 s in all, far past the 1 s deadline for the body.
        for byte in body:
            connection.sendall(bytes([byte]))
            readable, _, _ = select.select([connection], [], [], 0.3)
            if readable:
                break

        response = read_response(connection)

    assert_error(response, 408, "request_timeout")


@pytest.mark.parametrize(
    ("size", "status", "code"),
    [
        (MAX_REQUEST_BYTES, 400, "invalid_ssh_key"),
        (MAX_REQUEST_BYTES + 1, 413, "request_too_large"),
    ],
)
def test_content_length_limit(server: Server, size: int, status: int, code: str) -> None:
    with server.connect() as connection:
        head = server.head(
            "POST", INSTANCES, "Content-Type: application/json", f"Content-Length: {size}"
        )
        connection.sendall(head + padded_json(size))

        response = read_response(connection)

    assert_error(response, status, code)


def test_oversized_content_length_rejected_at_once(server: Server) -> None:
    """Check that 413 arrives without the body, because a server that waited would send 408."""
    with server.connect() as connection:
        head = server.head(
            "POST",
            INSTANCES,
            "Content-Type: application/json",
            f"Content-Length: {MAX_REQUEST_BYTES * 100}",
        )
        connection.sendall(head)

        response = read_response(connection)

    assert_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    ("size", "status", "code"),
    [
        (MAX_REQUEST_BYTES, 400, "invalid_ssh_key"),
        (MAX_REQUEST_BYTES + 1, 413, "request_too_large"),
        (MAX_REQUEST_BYTES * 4, 413, "request_too_large"),
    ],
)
def test_chunked_body_limit(server: Server, size: int, status: int, code: str) -> None:
    with server.connect() as connection:
        head = server.head(
            "POST", INSTANCES, "Content-Type: application/json", "Transfer-Encoding: chunked"
        )
        connection.sendall(head)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # The server may send 413 and close before the last chunks are sent.
            connection.sendall(chunked(padded_json(size), 1000))

        response = read_response(connection)

    assert_error(response, status, code)


# --- many slow clients ------------------------------------------------------------------------


def open_slow_clients(server: Server) -> list[socket.socket]:
    """Open ``SLOW_CLIENTS`` connections that stall: half in the head, half in the body."""
    connections = []
    partial_body = (
        server.head("POST", INSTANCES, "Content-Type: application/json", "Content-Length: 100")
        + b'{"instance_type"'
    )
    for number in range(SLOW_CLIENTS):
        connection = server.connect()
        connections.append(connection)
        if number % 2:
            connection.sendall(partial_body)
        else:
            connection.sendall(f"GET {INSTANCES} HTTP/1.1\r\nHost: x\r\n".encode())
    return connections


def test_slow_clients_do_not_block_others(server: Server) -> None:
    """Check that a normal request is served while 50 stalled clients keep connections open.

    The deadlines end the stalled connections after about a second, so the test checks that
    all 50 were still waiting when the normal response arrived, and tries again if a busy
    machine made it slower than that.
    """
    held_throughout = False
    for _ in range(SLOW_CLIENT_ATTEMPTS):
        connections = open_slow_clients(server)
        try:
            response = server.list_instances()
            held_throughout = all(is_waiting(connection) for connection in connections)
            assert response.status_code == 200, response.text
            for connection in connections:
                leftover = read_response(connection)
                assert leftover is None or leftover.status == 408, leftover
        finally:
            for connection in connections:
                connection.close()
        if held_throughout:
            break

    assert held_throughout, (
        f"in {SLOW_CLIENT_ATTEMPTS} attempts, some slow client was answered or disconnected "
        "before the normal request finished"
    )


# --- malformed HTTP ---------------------------------------------------------------------------

MALFORMED_REQUESTS = {
    "binary-garbage": b"\x00\xff\xfe\x16\x03\x01 garbage\r\n\r\n",
    "not-http": b"HELLO WORLD\r\n\r\n",
    "unknown-version": b"GET / HTTP/9.9\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "invalid-content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "negative-content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "huge-content-length": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n"
    ),
    "length-and-chunked": (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "invalid-chunk-size": (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    ),
    "space-in-header-name": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS)
def test_malformed_request_gets_400_or_close(server: Server, request_bytes: bytes) -> None:
    with server.connect() as connection:
        connection.sendall(request_bytes)

        response = read_response(connection)

    if response is not None:
        assert response.status == 400, response
