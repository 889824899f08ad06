"""The chat page at / in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.live_server import read_metrics, wait_until_idle

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "chromium is needed (make test installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_page_streams_an_answer_and_stop_aborts_on_the_server(server, browser):
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.input_value("#model") == "SmolLM2-135M-Instruct"

    page.fill("#max-tokens", "40")
    page.fill("#temperature", "0")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    answer = page.locator(".assistant .content").last
    page.wait_for_function(
        "document.querySelector('.assistant .stats').textContent.includes('first token')",
        timeout=60_000)
    assert "Paris" in answer.inner_text()
    assert "tok/s" in page.locator(".assistant .stats").last.inner_text()

    # A long answer: watch it grow while streaming, then stop it.
    page.fill("#max-tokens", "2000")
    page.fill("#input", "Write a very long story about a lighthouse keeper.")
    page.click("#send")
    answer = page.locator(".assistant .content").last
    page.wait_for_function(
        "document.querySelectorAll('.assistant .content')[1].textContent.length > 5",
        timeout=60_000)
    first = len(answer.inner_text())
    deadline = time.monotonic() + 30
    while len(answer.inner_text()) <= first:
        assert time.monotonic() < deadline, "the answer did not grow"
        time.sleep(0.1)
    assert read_metrics(server)["rillm:num_requests_running"] >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page-streaming.png"), full_page=True)
    page.click("#stop")
    page.wait_for_function(
        "[...document.querySelectorAll('.assistant .stats')].pop().textContent === 'stopped'")
    metrics = wait_until_idle(server)
    assert metrics["rillm:num_requests_running"] == 0
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    page.close()


def test_page_uses_the_api_key(guarded_server, browser):
    page = browser.new_page()
    page.goto(guarded_server.base_url + "/")
    page.wait_for_function("document.querySelector('#status').textContent.includes('models')")
    page.fill("#api-key", "sesame")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model').options.length === 2")
    page.fill("#max-tokens", "3")
    page.fill("#input", "Hi")
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('.assistant .stats').textContent.includes('tokens')",
        timeout=60_000)
    assert not page.locator(".assistant .error").count()
    # The key lives for this tab only: in sessionStorage, never in localStorage (which any
    # later page of the origin, and every later visit, can read).
    assert page.evaluate("sessionStorage.getItem('rillm-api-key')") == "sesame"
    assert page.evaluate("localStorage.length") == 0
    page.close()
