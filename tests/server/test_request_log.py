"""X-Request-Id is echoed and carried into the request log (--enable-log-requests), which says
what a request did without its text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import Server, start_server, wait_until_idle
from tests.server.test_errors import assert_error

SECRET = "the-prompt-text-never-logged"


@pytest.fixture(scope="module")
def logging_server() -> Iterator[Server]:
    yield from start_server("--enable-log-requests")


def test_the_request_id_is_echoed_and_logged(logging_server):
    headers = {"X-Request-Id": "trace-42.a:b_c"}
    reply = httpx.post(f"{logging_server.v1}/completions", headers=headers, timeout=60,
                       json={"prompt": SECRET, "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "trace-42.a:b_c"
    response_id = reply.json()["id"]
    wait_until_idle(logging_server)
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in Path(logging_server.log_path).read_text().splitlines()
                 if response_id in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (line,) = lines
    assert "X-Request-Id trace-42.a:b_c" in line and "3 generated" in line
    assert "finish length" in line and SECRET not in Path(logging_server.log_path).read_text()
    # Any route echoes it; none is needed.
    assert httpx.get(f"{logging_server.base_url}/health", headers=headers
                     ).headers["x-request-id"] == "trace-42.a:b_c"
    assert "x-request-id" not in httpx.get(f"{logging_server.base_url}/health").headers


@pytest.mark.parametrize("bad", ["x" * 129, "two words", "semi;colon"])
def test_a_malformed_request_id_is_a_400(logging_server, bad):
    reply = httpx.post(f"{logging_server.v1}/completions", headers={"X-Request-Id": bad},
                       json={"prompt": "Hi", "max_tokens": 1}, timeout=30)
    assert_error(reply, 400, code="invalid_request_id")
