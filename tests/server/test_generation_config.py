"""A Hugging Face directory's generation_config.json sets the sampling defaults of what a
request leaves unset (vLLM's --generation-config auto); `--generation-config vllm` ignores it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.live_server import start_server
from tests.loader.tiny_models import tiny_config, tiny_model

ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm_tokenizer):
    directory = tmp_path_factory.mktemp("generation-config") / "tiny"
    tiny_model(tiny_config("llama", len(smollm_tokenizer))).save_pretrained(directory)
    smollm_tokenizer.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "max_new_tokens": 3,
         "top_k": 1, "temperature": 0.7}))
    return directory


def chat(server, **body) -> dict:
    return httpx.post(f"{server.v1}/chat/completions", timeout=60, json={
        "messages": ASK, "ignore_eos": True, **body}).json()


def test_the_models_defaults_apply_to_what_a_request_leaves_unset(model_dir):
    server_gen = start_server(str(model_dir), "--max-model-len", "128")
    server = next(server_gen)
    try:
        reply = chat(server, seed=1)
        assert reply["usage"]["completion_tokens"] == 3  # max_new_tokens
        assert reply["choices"][0]["finish_reason"] == "length"
        # top_k 1: whatever the seed, the one most likely token.
        texts = {chat(server, seed=seed)["choices"][0]["message"]["content"]
                 for seed in (2, 3, 4)}
        assert texts == {reply["choices"][0]["message"]["content"]}
        # What the request sets wins.
        assert chat(server, max_tokens=5)["usage"]["completion_tokens"] == 5
        assert len({chat(server, seed=seed, top_k=0, temperature=2.0, max_tokens=8)[
            "choices"][0]["message"]["content"] for seed in (5, 6, 7)}) > 1
        completion = httpx.post(f"{server.v1}/completions", timeout=60, json={
            "prompt": "Once", "ignore_eos": True}).json()
        assert completion["usage"]["completion_tokens"] == 3
        log = open(server.log_path).read()
        assert "sampling defaults from generation_config.json" in log
    finally:
        server_gen.close()


def test_generation_config_vllm_ignores_them(model_dir):
    server_gen = start_server(str(model_dir), "--max-model-len", "64",
                              "--generation-config", "vllm")
    server = next(server_gen)
    try:
        reply = chat(server, seed=1)
        prompt = reply["usage"]["prompt_tokens"]
        assert reply["usage"]["completion_tokens"] == 64 - prompt  # to the context's end
    finally:
        server_gen.close()
