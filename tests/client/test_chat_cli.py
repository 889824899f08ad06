"""`rillm chat` as a person uses it: one-shot, piped, and interactive in a real terminal (tmux)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.live_server import Server, read_metrics, start_server, wait_until_idle

RILLM = [sys.executable, "-m", "rillm.cli"]


def streamed_text(server, question: str) -> str:
    client = OpenAI(api_key="EMPTY", base_url=server.v1)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": question}],
        temperature=0, max_tokens=30, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_one_shot_and_piped_print_exactly_the_streamed_text(server):
    question = "What is the capital of France?"
    expected = streamed_text(server, question) + "\n"
    flags = ["--base-url", server.v1, "--temperature", "0", "--max-tokens", "30"]
    one_shot = subprocess.run([*RILLM, "chat", "-p", question, *flags], capture_output=True,
                              text=True, timeout=120)
    piped = subprocess.run([*RILLM, "chat", *flags], input=question, capture_output=True,
                           text=True, timeout=120)
    assert one_shot.returncode == 0 and piped.returncode == 0, one_shot.stderr + piped.stderr
    assert one_shot.stdout == expected
    assert piped.stdout == expected


def test_problems_are_one_line_not_a_traceback(server, guarded_server):
    cases = [
        (["--base-url", "http://127.0.0.1:9/v1"], "cannot reach"),
        (["--base-url", guarded_server.v1, "--api-key", "wrong"], "API key"),
        (["--base-url", server.v1, "--model", "no-such-model"], "does not know model"),
    ]
    for flags, expected in cases:
        result = subprocess.run([*RILLM, "chat", "-p", "hi", *flags], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


class Tmux:
    def __init__(self, command: list[str]) -> None:
        self.name = f"rillm-{uuid.uuid4().hex[:8]}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50",
                        " ".join(command)], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def paste(self, text: str) -> None:
        """As a terminal pastes: inside bracketed-paste markers, where the program asked for
        them (tmux's paste-buffer -p)."""
        subprocess.run(["tmux", "set-buffer", "-b", self.name, text], check=True)
        subprocess.run(["tmux", "paste-buffer", "-p", "-d", "-b", self.name, "-t", self.name],
                       check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name, "-S", "-200"],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            assert time.monotonic() < deadline, f"timed out; screen:\n{screen}"
            time.sleep(0.1)

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name],
                              capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_interactive_chat_in_a_terminal(server):
    assert shutil.which("tmux"), "tmux is needed for this test"
    term = Tmux([*RILLM, "chat", "--base-url", server.v1, "--temperature", "0",
                 "--max-tokens", "400"])
    try:
        term.wait_for(lambda s: "rillm chat" in s and s.rstrip().endswith(">"))
        term.send("What is the capital of France?", "Enter")
        screen = term.wait_for(lambda s: "tok/s" in s)
        assert "Paris" in screen
        assert "completion tokens" in screen

        # A long answer, stopped with Ctrl-C mid-stream: the server aborts it.
        term.send("Write a very long story about a dragon, with many chapters.", "Enter")
        deadline = time.monotonic() + 30
        while read_metrics(server)["rillm:num_requests_running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        term.send("C-c")
        term.wait_for(lambda s: "(stopped)" in s)
        metrics = wait_until_idle(server)
        assert metrics["rillm:num_requests_running"] == 0
        assert metrics["rillm:kv_cache_blocks_in_use"] == 0
        assert term.alive()  # still chatting

        term.send("/reset", "Enter")
        term.wait_for(lambda s: "(conversation cleared)" in s)
        term.send("/exit", "Enter")
        deadline = time.monotonic() + 10
        while term.alive():
            assert time.monotonic() < deadline, "chat did not exit"
            time.sleep(0.1)
    finally:
        term.kill()
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200


@pytest.fixture(scope="module")
def logged_server() -> Iterator[Server]:
    """Its log has a line per request with the sampling settings the request carried."""
    yield from start_server("--enable-log-requests")


def request_lines(server: Server) -> list[str]:
    return [line for line in open(server.log_path).read().splitlines()
            if "prompt tokens" in line and "generated" in line]


def wait_for_lines(server: Server, count: int) -> list[str]:
    deadline = time.monotonic() + 30
    while len(lines := request_lines(server)) < count:
        assert time.monotonic() < deadline, lines
        time.sleep(0.1)
    return lines


def test_line_editing_history_paste_and_settings(logged_server, tmp_path):
    """The up arrow recalls a question from an earlier session; three pasted lines are one
    message (one request); /set temperature reaches the next request."""
    assert shutil.which("tmux"), "tmux is needed for this test"
    command = ["env", f"XDG_DATA_HOME={tmp_path / 'data'}", *RILLM, "chat", "--base-url",
               logged_server.v1, "--max-tokens", "8"]
    first = Tmux(command)
    try:
        first.wait_for(lambda s: "rillm chat" in s)
        first.send("What is the capital of Italy?", "Enter")
        first.wait_for(lambda s: "tok/s" in s)
        first.send("/exit", "Enter")
        deadline = time.monotonic() + 10
        while first.alive():  # exits by itself, its history written
            assert time.monotonic() < deadline, "chat did not exit"
            time.sleep(0.1)
    finally:
        first.kill()
    assert "What is the capital of Italy?" in (tmp_path / "data" / "rillm" /
                                               "chat_history").read_text()

    term = Tmux(command)
    saved = tmp_path / "conversation.json"
    try:
        term.wait_for(lambda s: "rillm chat" in s)
        term.send("Up")  # the last line of the earlier session: /exit
        term.wait_for(lambda s: "> /exit" in s)
        term.send("Up")
        term.wait_for(lambda s: "> What is the capital of Italy?" in s)
        term.send("C-c")  # leave the recalled line: a fresh prompt
        term.wait_for(lambda s: "(Ctrl-D or /exit to quit)" in s)
        before = len(request_lines(logged_server))
        term.paste("line one\nline two\nline three")
        term.wait_for(lambda s: "line three" in s)
        term.send("Enter")
        term.wait_for(lambda s: s.count("tok/s") >= 1)
        assert len(wait_for_lines(logged_server, before + 1)) == before + 1
        term.send(f"/save {saved}", "Enter")
        term.wait_for(lambda s: "(saved" in s)
        messages = json.loads(saved.read_text())["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == [
            "line one\nline two\nline three"]

        term.send("/set temperature 0.3", "Enter")
        term.wait_for(lambda s: "(temperature = 0.3)" in s)
        term.send("/show", "Enter")
        term.wait_for(lambda s: "temperature: 0.3" in s and "max_tokens: 8" in s)
        term.send("Say hi.", "Enter")
        lines = wait_for_lines(logged_server, before + 2)
        assert "temperature=0.3 " in lines[-1] and "temperature=0.3 " not in lines[-2]
        term.send("/exit", "Enter")
    finally:
        term.kill()
