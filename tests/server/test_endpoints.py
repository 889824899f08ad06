"""The small endpoints: health, version, tokenize, detokenize, metrics."""

from __future__ import annotations

import time

import httpx

from rillm import __version__


def test_health_version_and_metrics(server):
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.base_url}/version", timeout=10).json() == {"version": __version__}
    metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert "rillm:kv_cache_usage_perc" in metrics


def test_tokenize_and_detokenize_round_trip(server):
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Hello world"},
                        timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2
    assert tokens["max_model_len"] > 0
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]},
                      timeout=10).json()
    assert text == {"prompt": "Hello world"}
    chat = httpx.post(f"{server.base_url}/tokenize", timeout=10,
                      json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 5
    bad = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**9]}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_health_is_503_and_requests_retry_later_while_the_model_loads(server):
    health, chat, retry_after = server.seen_while_loading
    assert health == 503
    assert chat == 503 and retry_after is not None


def test_serve_says_once_which_kernels_it_runs(server):
    """One line at start-up names the decode / prefill attention, the linear method and the
    fused paths this process chose (the KernelPlan), before the "serving" line."""
    deadline = time.monotonic() + 10
    while True:
        with open(server.log_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if any(line.startswith("rillm: serving") for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    kernels = [i for i, line in enumerate(lines) if line.startswith("rillm: kernels: ")]
    serving = [i for i, line in enumerate(lines) if line.startswith("rillm: serving")]
    assert len(kernels) == 1 and serving and kernels[0] < serving[0], lines
    for part in ("decode=", "prefill=", "linear=", "fused-decode="):
        assert part in lines[kernels[0]]
