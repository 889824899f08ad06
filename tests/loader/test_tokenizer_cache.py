"""The GGUF tokenizer cache: a second load reads tokenizer.json and behaves exactly like the
tokenizer built from the file."""

from __future__ import annotations

import os
from pathlib import Path

from rillm.loader import default_model_path
from rillm.loader.tokenizer import load_gguf_tokenizer

TEXTS = ["Hello, world!", "  spaces\tand\nnewlines  ", "Ünïcödé 🤖 and 中文",
         "<|im_start|>user\nHi<|im_end|>", "def f(x):\n    return x ** 2"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_a_cached_tokenizer_is_the_same_tokenizer(tmp_path):
    path = default_model_path()
    built = load_gguf_tokenizer(path, cache_dir=str(tmp_path))
    entries = os.listdir(tmp_path)
    assert len(entries) == 1 and os.path.isfile(tmp_path / entries[0] / "tokenizer.json")
    cached = load_gguf_tokenizer(path, cache_dir=str(tmp_path))
    assert len(cached) == len(built) and cached.all_special_ids == built.all_special_ids
    assert cached.eos_token_id == built.eos_token_id
    assert cached.chat_template == built.chat_template
    for text in TEXTS:
        ids = built.encode(text, add_special_tokens=False)
        assert cached.encode(text, add_special_tokens=False) == ids
        assert cached.decode(ids) == built.decode(ids)
        assert cached(text)["input_ids"] == built(text)["input_ids"]
    assert cached.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        built.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)


def test_a_broken_cache_entry_is_rebuilt_not_an_error(tmp_path):
    path = default_model_path()
    load_gguf_tokenizer(path, cache_dir=str(tmp_path))
    (entry,) = os.listdir(tmp_path)
    (tmp_path / entry / "tokenizer.json").write_text("{not json")
    tokenizer = load_gguf_tokenizer(path, cache_dir=str(tmp_path))
    assert tokenizer.encode("Hello", add_special_tokens=False)
    assert (tmp_path / entry / "tokenizer.json").read_text().startswith("{\n")  # saved again


def test_an_unwritable_cache_is_skipped(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    tokenizer = load_gguf_tokenizer(default_model_path(), cache_dir=str(blocked / "sub"))
    assert tokenizer.encode("Hello", add_special_tokens=False)


def _poisoned_entry(cache: Path) -> Path:
    """A cache entry for the default model whose chat template someone else wrote."""
    load_gguf_tokenizer(default_model_path(), cache_dir=str(cache))
    (entry,) = cache.iterdir()
    (entry / "chat_template.jinja").write_text("POISON {{ messages }}")
    return entry


def test_a_cache_others_can_write_is_neither_read_nor_written(tmp_path):
    """Its chat template would run on every request: a cache directory every user can write
    is not trusted (rillm/private_cache.py)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    entry = _poisoned_entry(shared)
    shared.chmod(0o777)
    tokenizer = load_gguf_tokenizer(default_model_path(), cache_dir=str(shared))
    assert "POISON" not in tokenizer.chat_template
    assert list(shared.iterdir()) == [entry]


def test_a_cached_file_others_can_write_is_replaced(tmp_path):
    entry = _poisoned_entry(tmp_path)
    (entry / "chat_template.jinja").chmod(0o666)
    tokenizer = load_gguf_tokenizer(default_model_path(), cache_dir=str(tmp_path))
    assert "POISON" not in tokenizer.chat_template
    template = entry / "chat_template.jinja"  # saved again, this user's alone
    assert "POISON" not in template.read_text() and template.stat().st_mode & 0o022 == 0
