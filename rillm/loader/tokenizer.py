"""Tokenizer and chat template from a checkpoint, through transformers' own readers."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rillm.loader.errors import ModelLoadError
from rillm.private_cache import UntrustedCache, private_dir, private_file

logger = logging.getLogger(__name__)


def load_hf_tokenizer(directory: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer saved in a Hugging Face model directory (never touches the network)."""
    return _checked(
        directory, lambda: AutoTokenizer.from_pretrained(directory, local_files_only=True)
    )


CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "rillm", "tokenizers")


def load_gguf_tokenizer(path: str, cache_dir: str | None = CACHE_DIR) -> PreTrainedTokenizerBase:
    """The fast tokenizer described by a GGUF file's `tokenizer.*` metadata.

    Building it parses the whole vocabulary out of the file (seconds for 49k tokens), so the
    result is saved under `cache_dir`, keyed by the file's path, size and modification time
    (and the transformers version), and later loads read that instead. None: no cache. A cache
    that cannot be written or read is skipped, never an error."""
    directory, name = os.path.split(os.path.abspath(path))
    cached = _cache_entry(path, cache_dir)
    if cached is not None and os.path.isfile(os.path.join(cached, "tokenizer.json")):
        try:
            return load_hf_tokenizer(_private_entry(cached))
        except (ModelLoadError, UntrustedCache):
            shutil.rmtree(cached, ignore_errors=True)  # rebuilt and saved again below
    tokenizer = _checked(path, lambda: AutoTokenizer.from_pretrained(directory, gguf_file=name))
    if cached is not None:
        _save(tokenizer, cached)
    return tokenizer


def _cache_entry(path: str, cache_dir: str | None) -> str | None:
    """The entry for `path` in `cache_dir`; None: no cache, or one another user could have
    written (its chat template would run on every request; rillm/private_cache.py)."""
    if cache_dir is None:
        return None
    try:
        stat = os.stat(path)
        private_dir(Path(cache_dir))
    except UntrustedCache as reason:
        logger.warning("the tokenizer cache is not used: %s", reason)
        return None
    except OSError:
        return None
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24])


def _private_entry(entry: str) -> str:
    """`entry` once it and each file in it are this user's alone (else UntrustedCache)."""
    private_dir(Path(entry))
    for name in os.listdir(entry):
        private_file(Path(entry) / name)
    return entry


def _save(tokenizer: PreTrainedTokenizerBase, target: str) -> None:
    """Write the tokenizer to `target` atomically (a finished directory or none at all)."""
    staging = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".partial-")
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # fails if another process got there first: fine
    except OSError:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


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
