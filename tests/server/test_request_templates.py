"""A request's own chat template, on a server that trusts them (--trust-request-chat-template):
it renders in a sandbox process bounded in time, memory and output, so a hostile one is that
request's 400 while everyone else is served."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.startup_memory import rss_mib
from tests.live_server import Server, start_server
from tests.server.test_errors import assert_error

TIMEOUT = 2.0
ASK = [{"role": "user", "content": "Hi"}]
PLAIN = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def trusting_server() -> Iterator[Server]:
    yield from start_server("--trust-request-chat-template",
                            "--chat-template-timeout", str(TIMEOUT))


def tokenize(server: Server, template: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/tokenize", timeout=120,
                      json={"messages": ASK, "chat_template": template})


def rendered(server: Server, template: str) -> str:
    ids = tokenize(server, template).json()["tokens"]
    return httpx.post(f"{server.base_url}/detokenize", json={"tokens": ids},
                      timeout=30).json()["prompt"]


def test_a_request_template_renders(trusting_server):
    assert rendered(trusting_server, PLAIN) == "<user>Hi<assistant>"
    error = assert_error(tokenize(trusting_server, "{{ raise_exception('no users here') }}"),
                         400, param="messages")
    assert "no users here" in error["message"]


def test_a_runaway_template_is_stopped_and_nobody_waits_for_it(trusting_server):
    """Nested loops of 10^6 x 10^6: without a sandbox they spin a core for days (Jinja's
    sandbox bounds one range, not two in a row)."""
    runaway = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
               "{% endfor %}")
    answer: list[httpx.Response] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: answer.append(tokenize(trusting_server, runaway)))
    thread.start()
    time.sleep(0.5)
    while thread.is_alive():
        asked = time.monotonic()
        health = httpx.get(f"{trusting_server.base_url}/health", timeout=10)
        assert health.status_code == 200 and time.monotonic() - asked < 1.0
        time.sleep(0.2)
    error = assert_error(answer[0], 400, param="chat_template", code="chat_template_timeout")
    assert f"{TIMEOUT:g} s" in error["message"]
    assert time.monotonic() - started < TIMEOUT + 5  # the first use starts the worker too
    # The worker is started afresh for the next template.
    assert rendered(trusting_server, PLAIN) == "<user>Hi<assistant>"


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**10 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
], ids=["repeat", "doubling"])
def test_a_template_that_wants_a_terabyte_is_refused(trusting_server, template):
    before = rss_mib(trusting_server.process.pid)[0]
    error = assert_error(tokenize(trusting_server, template), 400, param="chat_template")
    # The memory bound, or the time bound where reaching 1 GiB takes longer than TIMEOUT.
    assert "MiB" in error["message"] or error["code"] == "chat_template_timeout", error
    assert rss_mib(trusting_server.process.pid)[0] < before + 100  # the server's own: untouched
    assert rendered(trusting_server, PLAIN) == "<user>Hi<assistant>"


def test_a_rendering_longer_than_any_body_is_refused(trusting_server):
    """Over 8 MiB of prompt text (the body bound) from a few bytes of template."""
    template = "{% for i in range(100000) %}{{ 'abcdefghij' * 10 }}{% endfor %}"
    error = assert_error(tokenize(trusting_server, template), 400, param="chat_template")
    assert "characters" in error["message"]
