"""Tokenizer and chat template from a checkpoint, through transformers' own readers."""

from __future__ import annotations

import os
from collections.abc import Callable

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rillm.loader.errors import ModelLoadError


def load_hf_tokenizer(directory: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer saved in a Hugging Face model directory (never touches the network)."""
    return _checked(
        directory, lambda: AutoTokenizer.from_pretrained(directory, local_files_only=True)
    )


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer described by a GGUF file's `tokenizer.*` metadata."""
    directory, name = os.path.split(os.path.abspath(path))
    return _checked(path, lambda: AutoTokenizer.from_pretrained(directory, gguf_file=name))


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's default chat template, None when it has none."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        # Some checkpoints ship several named templates ("default", "tool_use", ...).
        template = template.get("default")
    return template if isinstance(template, str) else None


def _checked(path: str, load: Callable[[], PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
    # transformers raises a zoo of types (OSError, ValueError, KeyError, ...) for an unreadable
    # tokenizer; each becomes one ModelLoadError naming the checkpoint.
    try:
        tokenizer = load()
    except Exception as exc:
        raise ModelLoadError(path, f"cannot load the tokenizer: {exc}") from exc
    if not tokenizer.is_fast:
        raise ModelLoadError(
            path, f"only a slow tokenizer ({type(tokenizer).__name__}) is available"
        )
    return tokenizer
