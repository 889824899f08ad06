"""Slow, stalled and too many clients, on raw sockets against a real `rillm serve`: each is cut
off within its bound, and the server goes on serving everyone else."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.live_server import Server, read_metrics, start_server, wait_until_idle

HEADER_TIMEOUT = 1.0
SEND_TIMEOUT = 2.0
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def strict_server() -> Iterator[Server]:
    yield from start_server(
        "--header-timeout", str(HEADER_TIMEOUT), "--send-timeout", str(SEND_TIMEOUT),
        "--max-connections", str(MAX_CONNECTIONS), "--max-num-seqs", "1",
        "--max-queued-requests", "1")


def connect(server: Server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    host, port = server.base_url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    sock.settimeout(15)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (a timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def still_serving(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    reply = httpx.post(f"{server.v1}/completions", timeout=60,
                       json={"prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


def test_a_dribbled_header_gets_408_and_the_connection_closed(strict_server):
    """Slowloris: a header line every 0.3 s would hold the socket for ever; the whole header
    must arrive within --header-timeout."""
    sock = connect(strict_server)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    answer = b""
    with sock:
        for i in range(40):
            try:
                sock.sendall(b"X-Slow-%d: x\r\n" % i)
            except OSError:
                break
            time.sleep(0.3)
            sock.setblocking(False)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            sock.setblocking(True)
            if answer:
                break
    assert time.monotonic() - started < HEADER_TIMEOUT + 3
    status, error = error_of(answer)
    assert status == 408 and error["code"] == "request_timeout"
    still_serving(strict_server)


def test_a_silent_connection_is_closed(strict_server):
    with connect(strict_server) as sock:
        started = time.monotonic()
        assert read_all(sock) == b""  # closed, nothing said: it never asked anything
        assert time.monotonic() - started < HEADER_TIMEOUT + 3


def test_a_stalled_body_is_cut_off(strict_server):
    """R.U.D.Y.: a body that stops half way holds its request for ever without a bound."""
    with connect(strict_server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        started = time.monotonic()
        read_all(sock)
        assert time.monotonic() - started < HEADER_TIMEOUT + 3
    still_serving(strict_server)
    assert read_metrics(strict_server)["rillm:num_http_requests_active"] == 0


@pytest.mark.parametrize("complete", [True, False])
def test_oversized_headers_are_refused(strict_server, complete):
    """100 KB of headers: a 431 when it arrives whole, a 400 while it is still incomplete."""
    header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n"
    with connect(strict_server) as sock:
        sock.sendall(header + (b"\r\n" if complete else b""))
        status, error = error_of(read_all(sock))
    assert status == (431 if complete else 400), error
    assert error["type"] == "invalid_request_error"
    still_serving(strict_server)


@pytest.mark.parametrize("request_head", [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 20000000\r\n\r\n",
], ids=["header", "body"])
def test_an_answer_reaches_a_client_that_is_still_sending(strict_server, request_head):
    """The server answers (400, 413) and ends the connection while the client is still
    sending: the answer must arrive, not be lost to a reset (a closed socket with unread
    input resets the connection, and did about one time in three)."""
    expected = 400 if b"GET" in request_head else 413
    for _ in range(10):
        sock = connect(strict_server)
        payload = request_head + b"a" * 2_000_000

        def keep_sending(sock: socket.socket = sock, payload: bytes = payload) -> None:
            try:
                for start in range(0, len(payload), 2000):
                    sock.send(payload[start:start + 2000])
            except OSError:
                pass  # the server stopped reading: expected once it has answered

        sender = threading.Thread(target=keep_sending)
        sender.start()
        with sock:
            status, error = error_of(read_all(sock))
        sender.join(timeout=15)
        assert status == expected, error
    still_serving(strict_server)


def test_connections_past_the_bound_get_503_with_retry_after(strict_server):
    held = [connect(strict_server) for _ in range(MAX_CONNECTIONS)]
    try:
        with connect(strict_server) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_all(extra)
        status, error = error_of(answer)
        assert status == 503 and error["code"] == "too_many_connections"
        assert b"\r\nretry-after: 1\r\n" in answer.partition(b"\r\n\r\n")[0].lower()
    finally:
        for sock in held:
            sock.close()
    still_serving(strict_server)


def test_a_stream_nobody_reads_is_dropped_and_frees_its_place(strict_server):
    """A client that asks for a long stream and reads nothing: once the socket's buffers are
    full, --send-timeout later the connection is dropped, the request aborted, its KV blocks
    freed and its place in the queue given back — while the client still holds its socket."""
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 6000, "ignore_eos": True, "stream": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    sock = connect(strict_server, rcvbuf=4096)
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        deadline = time.monotonic() + 90
        while read_metrics(strict_server)["rillm:num_http_requests_active"] != 0:
            assert time.monotonic() < deadline, "the unread stream still holds its place"
            time.sleep(0.5)
        metrics = wait_until_idle(strict_server)
        assert metrics["rillm:kv_cache_blocks_in_use"] == 0
        still_serving(strict_server)
    log = open(strict_server.log_path).read()
    assert "read nothing for 2 s" in log
