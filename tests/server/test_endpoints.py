"""The small endpoints: health, version, tokenize, detokenize, metrics."""

from __future__ import annotations

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
