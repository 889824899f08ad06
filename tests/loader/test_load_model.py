"""load_model's dispatch on what a path is, and the errors users see for bad paths and files."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import pytest

from rillm.loader import DEFAULT_MODEL_NAME, ModelLoadError, default_model_path, load_model
from tests.loader.gguf_files import TOKENS, write_tiny_gguf
from tests.loader.tiny_models import hf_state_dict, tiny_config, tiny_model


@pytest.fixture
def tiny_gguf(tmp_path):
    config = tiny_config("qwen3", len(TOKENS), head_dim=16)
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf", "qwen3", config, _weights(config))


def _weights(config):
    return hf_state_dict(tiny_model(config))


@pytest.fixture(autouse=True)
def _models_dir(tmp_path):
    (tmp_path / "models").mkdir()


def test_default_model_is_the_installed_smollm2_file():
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gguf_file_and_directory_holding_one(tiny_gguf):
    by_file = load_model(tiny_gguf)
    by_directory = load_model(str(tiny_gguf.parent))
    assert by_file.path == by_directory.path == str(tiny_gguf)
    assert by_file.config == by_directory.config
    assert by_file.config.architecture == "qwen3"


def test_hf_directory(tmp_path, smollm_tokenizer):
    config = tiny_config("qwen2", len(smollm_tokenizer))
    tiny_model(config).save_pretrained(tmp_path / "hf")
    smollm_tokenizer.save_pretrained(tmp_path / "hf")
    assert load_model(tmp_path / "hf").config.architecture == "qwen2"


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_model(str(missing))
    assert str(missing) in str(caught.value)


@pytest.mark.parametrize("cut", ["metadata", "tensor data"])
def test_truncated_gguf(tmp_path, cut):
    # The first 1 MB ends inside the token list; dropping the last 1 MB loses tensor bytes.
    truncated = tmp_path / "cut.gguf"
    shutil.copyfile(default_model_path(), truncated)
    size = truncated.stat().st_size
    os.truncate(truncated, 1 << 20 if cut == "metadata" else size - (1 << 20))
    with pytest.raises(ModelLoadError, match="not a valid GGUF") as caught:
        load_model(truncated)
    assert str(truncated) in str(caught.value)


def test_garbage_named_gguf(tmp_path):
    garbage = tmp_path / "x.gguf"
    garbage.write_bytes(b"definitely not a model\n" * 100)
    with pytest.raises(ModelLoadError, match="not a valid GGUF") as caught:
        load_model(garbage)
    assert str(garbage) in str(caught.value)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", gguf.np.zeros((4, 8), dtype=gguf.np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'") as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def _hf_dir_with_config(tmp_path, text: str):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(text)
    return directory


def test_unsupported_model_type(tmp_path):
    directory = _hf_dir_with_config(tmp_path, json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'") as caught:
        load_model(directory)
    assert str(directory / "config.json") in str(caught.value)


def test_invalid_config_json(tmp_path):
    directory = _hf_dir_with_config(tmp_path, '{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match="not valid JSON") as caught:
        load_model(directory)
    assert str(directory / "config.json") in str(caught.value)


def test_hf_directory_without_safetensors(tmp_path):
    config = tiny_config("llama", 16)
    directory = tmp_path / "hf"
    config.save_pretrained(directory)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(directory)


def test_directory_with_several_ggufs(tiny_gguf):
    shutil.copy(tiny_gguf, tiny_gguf.parent / "other.gguf")
    with pytest.raises(ModelLoadError, match="several .gguf files"):
        load_model(tiny_gguf.parent)


def test_empty_directory_and_other_files(tmp_path):
    with pytest.raises(ModelLoadError, match="neither config.json nor a .gguf"):
        load_model(tmp_path / "models")
    text = tmp_path / "model.bin"
    text.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(text)
