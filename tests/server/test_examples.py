"""The examples in examples/ run unchanged against `rillm serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(server, name: str, *args: str) -> str:
    env = {**os.environ, "OPENAI_BASE_URL": server.v1, "OPENAI_API_KEY": "EMPTY",
           "ANTHROPIC_BASE_URL": server.base_url, "ANTHROPIC_API_KEY": "EMPTY"}
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stream_chat_prints_the_answer(server):
    # The example samples at the default temperature: check that an answer arrived whole.
    out = run_example(server, "stream_chat.py", "What is the capital of France?")
    assert len(out.strip()) > 10 and out.endswith("\n")


def test_collect_stream_reports_finish_and_usage(server):
    out = run_example(server, "collect_stream.py", "Name three rivers.")
    answer, _, summary = out.rstrip("\n").rpartition("\n")
    assert answer.strip()
    assert summary.startswith("[finish_reason=") and "completion_tokens=" in summary


@pytest.mark.parametrize("question", ["Is 97 a prime number?"])
def test_stream_reasoning_prints_content_for_a_plain_model(server, question):
    out = run_example(server, "stream_reasoning.py", question)
    assert out.strip() and "[reasoning]" not in out


def test_stream_responses_prints_text_then_the_items_and_usage(server):
    out = run_example(server, "stream_responses.py", "Name three rivers.")
    text, _, rest = out.partition("\n[message ")
    assert text.strip() and rest.startswith(("completed]", "incomplete]"))
    assert rest.rstrip("\n").splitlines()[-1].startswith(("[completed: ", "[incomplete: "))


def test_stream_anthropic_prints_text_then_the_stop_reason(server):
    out = run_example(server, "stream_anthropic.py", "Name three rivers.")
    text, _, summary = out.rstrip("\n").rpartition("\n")
    assert text.strip()
    assert summary.startswith(("[end_turn: ", "[max_tokens: ")) and summary.endswith(" out]")
