"""The chat page at / in a real headless Chromium (Debian's, driven by Playwright).

Waits use Playwright's locators and `expect`: the page's Content-Security-Policy forbids eval,
which `page.wait_for_function` needs; the first test runs under that policy on purpose, to prove
the page's own scripts do."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from rillm.server.page import STATIC
from tests.live_server import Server, read_metrics, wait_until_idle

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT = 60_000  # ms; a short answer takes about a second here


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "chromium is needed (make test installs it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def watch_errors(page: Page, dialogs: bool = True) -> list[str]:
    """Uncaught exceptions and console errors of the page, and (`dialogs`) any dialog it opens."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"exception: {exc}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    if dialogs:
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    return errors


def set_fields(page: Page, **fields: str) -> None:
    """Fill fields of the settings panel as a user does (each fires `change`)."""
    page.click("#settings-toggle")
    for name, value in fields.items():
        selector = "#" + name.replace("_", "-")
        page.fill(selector, value)
        page.dispatch_event(selector, "change")
    page.click("#settings-close")


def ask(page: Page, text: str) -> None:
    """Send a message and wait until its answer has finished streaming."""
    before = page.locator(".assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    expect(page.locator(".assistant")).to_have_count(before + 1)
    expect(page.locator(".streaming")).to_have_count(0, timeout=ANSWER_TIMEOUT)


def served_models(page: Page) -> None:
    expect(page.locator("#model option")).not_to_have_count(0)


def test_vendored_scripts_match_their_pinned_releases():
    manifest = json.loads((STATIC / "vendor" / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        digest = hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest()
        pinned = f"{entry['package']}@{entry['version']}"
        assert digest == entry["sha256"], f"{name} differs from {pinned} (tools/vendor_web.py)"


def test_page_streams_an_answer_and_stop_aborts_on_the_server(server, browser):
    page = browser.new_page()
    errors = watch_errors(page)
    response = page.goto(server.base_url + "/")
    assert response is not None
    assert "script-src 'self'" in response.headers["content-security-policy"]
    served_models(page)
    assert page.input_value("#model") == "SmolLM2-135M-Instruct"

    set_fields(page, max_tokens="40", temperature="0")
    ask(page, "What is the capital of France?")
    assert "Paris" in page.locator(".assistant .content").last.inner_text()
    stats = page.locator(".assistant .stats").last.inner_text()
    assert "first token" in stats and "tok/s" in stats, stats

    # A long answer: watch it grow while streaming, then stop it.
    set_fields(page, max_tokens="2000")
    page.fill("#input", "Write a very long story about a lighthouse keeper.")
    page.click("#send")
    answer = page.locator(".assistant .content").nth(1)
    expect(answer).not_to_have_text("", timeout=ANSWER_TIMEOUT)
    first = len(answer.inner_text())
    deadline = time.monotonic() + 30
    while len(answer.inner_text()) <= first:
        assert time.monotonic() < deadline, "the answer did not grow"
        time.sleep(0.1)
    assert read_metrics(server)["rillm:num_requests_running"] >= 1
    # Renaming the conversation redraws it; the answer streams on into the new drawing.
    page.locator(".conversation.current .rename").click()
    page.fill(".conversation input", "Lighthouse")
    page.press(".conversation input", "Enter")
    expect(page.locator(".conversation.current .open")).to_have_text("Lighthouse")
    grown = len(answer.inner_text())
    while len(answer.inner_text()) <= grown:
        assert time.monotonic() < deadline, "the answer stopped growing after a rename"
        time.sleep(0.1)
    page.click("#stop")
    expect(page.locator(".assistant .stats").last).to_contain_text("stopped")
    metrics = wait_until_idle(server)
    assert metrics["rillm:num_requests_running"] == 0
    assert metrics["rillm:kv_cache_blocks_in_use"] == 0
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert not errors, errors  # nothing the page runs was refused by its own policy
    page.context.close()


def test_model_html_runs_nothing_and_code_blocks_render(server, browser):
    # bypass_csp: the page's policy would stop inline script on its own; here only the page's
    # escaping and sanitizing stand between the model and the DOM.
    context = browser.new_context(bypass_csp=True,
                                  permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    errors = watch_errors(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.base_url + "/")
    served_models(page)
    output = ("Run this:\n\n```python\nprint(1)\n```\n\n"
              "<img src=x onerror=\"window.pwned='img'\"> "
              "<script>window.pwned='script'</script>\n\n"
              "![chart](http://127.0.0.1:9/leak.png) [docs](javascript:window.pwned='link')")
    # vLLM's structured outputs make the real model write exactly this.
    set_fields(page, extra=json.dumps({"structured_outputs": {"choice": [output]}}))
    ask(page, "Show me some code.")

    content = page.locator(".assistant .content").last
    expect(content.locator("pre > code")).to_have_text("print(1)\n")
    assert content.locator("img, script, iframe, [onerror]").count() == 0
    expect(content).to_contain_text("<img src=x onerror=")  # shown as the model wrote it
    assert content.locator("a[href^='javascript']").count() == 0
    content.locator("a", has_text="docs").click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert not [url for url in requested if "leak" in url or url.endswith("/x")], requested

    content.locator(".copy-code").click()
    expect(content.locator(".copy-code")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print(1)\n"

    # The conversation is kept in the browser: a reload shows it again, rendered the same way.
    stats = page.locator(".assistant .stats").inner_text()
    page.reload()
    expect(page.locator(".conversation")).to_have_count(1)
    expect(page.locator(".assistant .content pre > code")).to_have_text("print(1)\n")
    assert page.locator(".assistant .stats").inner_text() == stats
    assert page.locator(".user .content").inner_text() == "Show me some code."
    assert page.evaluate("window.pwned") is None
    assert not errors, errors
    context.close()


def test_conversations_regenerate_edit_themes_and_phone_width(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    errors = watch_errors(page, dialogs=False)  # deleting asks for a confirmation
    page.goto(server.base_url + "/")
    served_models(page)
    set_fields(page, max_tokens="24", temperature="0", system="You are a helpful assistant.")
    ask(page, "What is the capital of France?")
    assert "Paris" in page.locator(".assistant .content").inner_text()

    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    ask(page, "What is the capital of Germany?")
    conversations = page.locator(".conversation")
    expect(conversations).to_have_count(2)
    expect(conversations.first).to_have_class("conversation current")  # most recent first

    # Switching shows each conversation's own messages.
    conversations.nth(1).locator(".open").click()
    expect(page.locator(".user .content")).to_have_text("What is the capital of France?")
    conversations.nth(0).locator(".open").click()
    expect(page.locator(".user .content")).to_have_text("What is the capital of Germany?")

    # Rename.
    page.locator(".conversation.current .rename").click()
    page.fill(".conversation input", "Geography")
    page.press(".conversation input", "Enter")
    expect(page.locator(".conversation.current .open")).to_have_text("Geography")
    expect(page.locator("#title")).to_have_text("Geography")

    # Regenerate replaces the last answer with a new request's answer.
    served = read_metrics(server)["vllm:e2e_request_latency_seconds_count"]
    page.evaluate("document.querySelector('.assistant').dataset.old = '1'")
    page.locator(".assistant .regenerate").click()
    expect(page.locator(".assistant")).to_have_count(1)
    expect(page.locator(".streaming")).to_have_count(0, timeout=ANSWER_TIMEOUT)
    assert page.locator(".assistant[data-old]").count() == 0
    assert "Berlin" in page.locator(".assistant .content").inner_text()
    assert read_metrics(server)["vllm:e2e_request_latency_seconds_count"] == served + 1

    # Edit-and-resend: the question changes, the old answer goes, a new one comes.
    page.locator(".user .edit").click()
    page.fill(".edit-box", "What is the capital of France?")
    page.locator(".edit-send").click()
    expect(page.locator(".assistant")).to_have_count(1)
    expect(page.locator(".streaming")).to_have_count(0, timeout=ANSWER_TIMEOUT)
    assert page.locator(".user .content").inner_text() == "What is the capital of France?"
    answer = page.locator(".assistant .content").inner_text()
    assert "Paris" in answer and "Berlin" not in answer

    # Themes: the system's by default, the button switches and is remembered.
    ARTIFACTS.mkdir(exist_ok=True)
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    page.screenshot(path=str(ARTIFACTS / "chat-page-light.png"))
    page.click("#theme")
    page.reload()
    served_models(page)
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(247, 248, 250)"
    page.screenshot(path=str(ARTIFACTS / "chat-page-dark.png"))

    # Delete (after a confirmation); a reload keeps what is left.
    page.once("dialog", lambda dialog: dialog.accept())
    other = page.locator(".conversation", has_text="France")
    other.hover()
    other.locator(".delete").click()
    expect(conversations).to_have_count(1)
    page.reload()
    expect(conversations).to_have_count(1)
    expect(conversations.first.locator(".open")).to_have_text("Geography")

    # A phone: one column, no sideways scrolling, the conversations in a drawer.
    phone = context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    phone_errors = watch_errors(phone)
    phone.goto(server.base_url + "/")
    served_models(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    expect(phone.locator("#sidebar")).not_to_be_in_viewport()
    phone.screenshot(path=str(ARTIFACTS / "chat-page-phone.png"))
    phone.click("#menu")
    expect(phone.locator("#sidebar")).to_be_in_viewport()
    phone.locator(".conversation .open").click()
    expect(phone.locator("#sidebar")).not_to_be_in_viewport()
    expect(phone.locator(".user .content")).to_have_text("What is the capital of France?")
    assert not errors and not phone_errors, errors + phone_errors
    context.close()


def test_page_uses_the_api_key_and_another_server(guarded_server: Server, browser):
    # The page comes from another origin (http://chat.localhost, which the server allows by
    # CORS) and is pointed at the server with ?base=. Chromium asks the user before a page it
    # cannot place on this machine reaches a loopback address (a public http:// origin may not
    # at all): the permission is that answer.
    context = browser.new_context(permissions=["local-network-access"])
    page = context.new_page()
    page.route("http://chat.localhost/**", lambda route: route.fulfill(response=route.fetch(
        url=route.request.url.replace("http://chat.localhost", guarded_server.base_url))))
    page.goto(f"http://chat.localhost/?base={guarded_server.base_url}")
    expect(page.locator("#status")).to_contain_text("models")  # 401: no key yet
    page.click("#settings-toggle")
    assert page.input_value("#base") == guarded_server.base_url
    page.fill("#api-key", "sesame")
    page.dispatch_event("#api-key", "change")
    page.click("#settings-close")
    expect(page.locator("#model option")).to_have_count(2)
    set_fields(page, max_tokens="3")
    ask(page, "Hi")
    expect(page.locator(".assistant .stats")).to_contain_text("tokens")
    assert not page.locator(".assistant .error").inner_text()
    # The key lives for this tab only: in sessionStorage, never in localStorage (which any
    # later page of the origin, and every later visit, can read).
    key = json.loads(page.evaluate("sessionStorage.getItem('rillm-api-key')"))
    assert key == {"base": guarded_server.base_url, "key": "sesame"}
    stored = page.evaluate("JSON.stringify(Object.entries(localStorage))")
    assert "sesame" not in stored and "rillm-chat:" in stored
    # A link naming another server does not get the key, and its server is not kept.
    sent: list[dict[str, str]] = []

    def other_server(route):
        sent.append(route.request.headers)
        route.fulfill(status=401, json={"error": {"message": "who are you?"}})

    page.route("http://other.localhost/**", other_server)
    page.goto("http://chat.localhost/?base=http://other.localhost")
    expect(page.locator("#status")).to_contain_text("who are you?")
    assert sent and not any("authorization" in headers for headers in sent), sent
    assert page.input_value("#api-key") == ""
    assert json.loads(page.evaluate("localStorage.getItem('rillm-settings')"))["base"] == ""
    page.goto(f"http://chat.localhost/?base={guarded_server.base_url}")
    expect(page.locator("#model option")).to_have_count(2)  # its key again
    context.close()


def test_reasoning_is_collapsed_until_opened(reasoning_server, browser):
    page = browser.new_page()
    errors = watch_errors(page)
    page.goto(reasoning_server.base_url + "/")
    served_models(page)
    # The qwen3 parser splits what the model writes inside <think> into the reasoning field.
    output = "<think>The user greets me; a greeting back is enough.</think>Hello there!"
    set_fields(page, extra=json.dumps({"structured_outputs": {"choice": [output]}}))
    ask(page, "Hello")
    answer = page.locator(".assistant")
    expect(answer.locator(".content")).to_have_text("Hello there!")
    thought = answer.locator(".reasoning .thought")
    expect(thought).to_have_text("The user greets me; a greeting back is enough.")
    expect(thought).to_be_hidden()
    answer.locator(".reasoning summary").click()
    expect(thought).to_be_visible()
    assert not errors, errors
    page.context.close()
