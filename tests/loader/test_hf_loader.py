"""load_hf_dir on tiny random models saved by transformers' own save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from rillm.loader import ModelLoadError, load_hf_dir
from tests.loader.tiny_models import hf_state_dict, tiny_config, tiny_model


@pytest.fixture
def save_tiny(tmp_path, smollm_tokenizer):
    """Save a tiny model of `model_type` with the default model's tokenizer; return (dir, model)."""

    def save(model_type: str, dtype: torch.dtype = torch.float32, max_shard_size=None, **overrides):
        config = tiny_config(model_type, len(smollm_tokenizer), **overrides)
        model = tiny_model(config).to(dtype)
        directory = tmp_path / model_type
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(directory, **kwargs)
        smollm_tokenizer.save_pretrained(directory)
        return directory, model

    return save


def _assert_same_weights(loaded, model):
    reference = hf_state_dict(model)
    assert loaded.weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert loaded.weights[name].dtype == tensor.dtype, name
        assert torch.equal(loaded.weights[name], tensor), name


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("mistral", {"sliding_window": 32}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {"head_dim": 32}),
    ],
)
def test_weights_and_config_match_the_saved_model(save_tiny, model_type, overrides):
    directory, model = save_tiny(model_type, **overrides)

    loaded = load_hf_dir(directory)

    _assert_same_weights(loaded, model)
    config, hf = loaded.config, model.config
    assert config.architecture == model_type
    assert config.vocab_size == hf.vocab_size
    assert config.hidden_size == 64 and config.intermediate_size == 96
    assert config.num_hidden_layers == 2
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.head_dim == overrides.get("head_dim", 16)
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.rope_scaling is None
    assert config.max_position_embeddings == 256
    assert config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    assert config.attention_bias == (model_type == "qwen2")
    assert config.qk_norm == (model_type == "qwen3")
    assert config.sliding_window == overrides.get("sliding_window")
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert loaded.path == str(directory)


def test_tokenizer_and_chat_template_come_from_the_directory(save_tiny, smollm_tokenizer):
    directory, _ = save_tiny("llama")

    loaded = load_hf_dir(directory)

    assert loaded.tokenizer.is_fast
    text = "Hello, rivers!"
    assert loaded.tokenizer(text).input_ids == smollm_tokenizer(text).input_ids
    assert loaded.chat_template == smollm_tokenizer.chat_template


def test_llama3_rope_scaling_is_kept(save_tiny):
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    directory, _ = save_tiny("llama", rope_parameters={"rope_theta": 500000.0, **rope})

    config = load_hf_dir(directory).config

    assert config.rope_scaling == rope
    assert config.rope_theta == 500000.0


def test_pre_transformers_5_config_keys(save_tiny):
    # Older checkpoints: rope_theta at top level, rope_scaling with "type", eos as a list.
    directory, _ = save_tiny("llama")
    raw = json.loads((directory / "config.json").read_text())
    del raw["rope_parameters"]
    raw.update(
        rope_theta=250000.0, rope_scaling={"type": "linear", "factor": 2.0}, eos_token_id=[2, 0]
    )
    (directory / "config.json").write_text(json.dumps(raw))

    config = load_hf_dir(directory).config

    assert config.rope_theta == 250000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.eos_token_ids == (2, 0)


def test_generation_config_adds_end_of_turn_ids(save_tiny):
    directory, _ = save_tiny("llama")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    assert load_hf_dir(directory).config.eos_token_ids == (2, 1)


def test_sharded_bfloat16_checkpoint(save_tiny):
    directory, model = save_tiny("qwen2", dtype=torch.bfloat16, max_shard_size="2MB")
    assert len(list(directory.glob("*.safetensors"))) > 1

    loaded = load_hf_dir(directory)

    _assert_same_weights(loaded, model)
    assert all(t.dtype == torch.bfloat16 for t in loaded.weights.values())


def test_missing_tensor_is_named(save_tiny):
    from safetensors.torch import load_file, save_file

    directory, _ = save_tiny("llama")
    file = directory / "model.safetensors"
    weights = load_file(file)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, file, metadata={"format": "pt"})

    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight") as caught:
        load_hf_dir(directory)
    assert str(directory) in str(caught.value)


def test_config_that_contradicts_the_weights_is_refused(save_tiny):
    directory, _ = save_tiny("llama")
    raw = json.loads((directory / "config.json").read_text())
    raw["intermediate_size"] = 128
    (directory / "config.json").write_text(json.dumps(raw))

    with pytest.raises(ModelLoadError, match="mlp.gate_proj.weight has shape"):
        load_hf_dir(directory)
