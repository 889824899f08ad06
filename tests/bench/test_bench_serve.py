"""`rillm bench serve` against real `rillm serve` processes: what it reports adds up."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rillm.bench.serve import (
    RequestResult,
    Workload,
    level_prompts,
    make_prompts,
    prompts_needed,
    stats_ms,
    summarize,
)
from tests.live_server import free_port


def bench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rillm.cli", "bench", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_two_servers_side_by_side_with_json_and_plot(server, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    run = bench("--server", f"a={server.v1}", "--server", f"b={server.v1}",
                "--concurrency", "1", "3", "--num-prompts", "6", "--input-len", "24",
                "--output-len", "12", "--json", str(out_json), "--plot", str(out_png))
    assert run.returncode == 0, run.stderr
    assert "out tok/s" in run.stdout and "TTFT p50 ms" in run.stdout
    report = json.loads(out_json.read_text())
    results = report["results"]
    assert sorted((r["server"], r["concurrency"]) for r in results) == [
        ("a", 1), ("a", 3), ("b", 1), ("b", 3)]
    for r in results:
        assert r["completed"] == 6 and r["failures"] == 0
        # ignore_eos: every request generates exactly --output-len tokens.
        assert r["output_tokens"] == 6 * 12
        assert r["output_throughput"] == r["output_tokens"] / r["duration_s"]
        assert 0 < r["ttft_ms"]["p50"] <= r["e2el_ms"]["p50"]
        assert 0 < r["tpot_ms"]["mean"] < r["e2el_ms"]["mean"]
        assert r["ttft_ms"]["p50"] <= r["ttft_ms"]["p90"] <= r["ttft_ms"]["p99"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_endpoint_conversations_and_request_rate(server):
    run = bench("--server", server.v1, "--endpoint", "chat", "--dataset", "conversations",
                "--natural-length", "--output-len", "16", "--concurrency", "2",
                "--request-rate", "4", "--num-prompts", "4", "--rounds", "2")
    assert run.returncode == 0, run.stderr
    assert "4/0" in run.stdout


def test_a_server_that_refuses_is_reported_as_failures(server):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    run = bench("--server", f"dead={dead}", "--model", "x", "--concurrency", "1",
                "--num-prompts", "2", "--output-len", "4", "--input-len", "8")
    assert run.returncode == 1
    assert "0/2" in run.stdout


def test_prompts_have_the_requested_length(smollm_tokenizer):
    prompts = make_prompts(smollm_tokenizer, Workload(input_len=64), 5)
    assert len({p.text for p in prompts}) == 5
    assert all(abs(p.num_tokens - 64) <= 6 for p in prompts)
    fixed = make_prompts(smollm_tokenizer, Workload(dataset="fixed", input_len=32), 3)
    assert len({p.text for p in fixed}) == 1


def test_no_level_or_round_resends_a_prompt(smollm_tokenizer):
    """A repeated prompt would meet the server's prefix cache and skip its prefill."""
    counts = [8, 32, 128] * 3  # three levels, three rounds
    prompts = make_prompts(smollm_tokenizer, Workload(input_len=16), prompts_needed(counts))
    slices = level_prompts(prompts, counts)
    assert [len(s) for s in slices] == counts
    sent = [p.text for s in slices for p in s] + [prompts[0].text]  # and the warm-up
    assert len(set(sent)) == len(sent) == len(prompts)
    with pytest.raises(ValueError, match="prompts needed"):
        level_prompts(prompts[:-1], counts)


def test_percentiles_interpolate_like_numpy():
    values = [0.001 * v for v in (1, 2, 3, 4, 10)]
    s = stats_ms(values)
    assert math.isclose(s["mean"], 4.0) and math.isclose(s["p50"], 3.0)
    assert math.isclose(s["p90"], 7.6) and math.isclose(s["p99"], 9.76)
    assert math.isnan(stats_ms([])["p50"])


def test_tpot_and_summary_of_known_requests():
    ok = RequestResult(ok=True, ttft=0.1, latency=1.1, itls=[0.25] * 4, output_tokens=11,
                       prompt_tokens=5)
    failed = RequestResult(ok=False, error="HTTP 500: boom")
    level = summarize("s", 2, None, [ok, ok, failed], duration=2.0)
    assert math.isclose(ok.tpot, 0.1)
    assert (level.completed, level.failures, level.output_tokens) == (2, 1, 22)
    assert math.isclose(level.output_throughput, 11.0)
    assert math.isclose(level.total_throughput, 16.0)
    assert level.errors == ["HTTP 500: boom"]
