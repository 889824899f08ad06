"""load_gguf against transformers' own GGUF reader, on the default model and on tiny files."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rillm.loader import ModelLoadError, default_model_path, load_gguf
from tests.loader.gguf_files import CHAT_TEMPLATE, TOKENS, write_tiny_gguf
from tests.loader.tiny_models import hf_state_dict, tiny_config, tiny_model


def _transformers_reference(path: str):
    directory, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


def _assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]):
    """Bit-identical: both sides dequantize the same blocks with the same float32 arithmetic."""
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == tensor.shape, name
        difference = (ours[name] - tensor).abs().max().item()
        assert torch.equal(ours[name], tensor), f"{name}: max difference {difference}"


def _state(hf_config) -> dict[str, torch.Tensor]:
    return hf_state_dict(tiny_model(hf_config))


# -- the default model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model(default_loaded):
    """load_model(None), shared with the rest of the suite (tests/conftest.py)."""
    return default_loaded


@pytest.fixture(scope="module")
def reference_model(default_reference):
    return default_reference


def test_default_model_weights_match_transformers(default_model, reference_model):
    # The reference dequantizes and undoes llama.cpp's Q/K reordering on its own; a loader that
    # forgot the reordering would differ on every q_proj and k_proj.
    assert default_model.config.tie_word_embeddings
    reference = hf_state_dict(reference_model)
    _assert_same_weights(default_model.weights, reference)


def test_default_model_config_matches_transformers(default_model, reference_model):
    ours, theirs = default_model.config, reference_model.config
    assert ours.architecture == "llama"
    assert ours.vocab_size == theirs.vocab_size == 49152
    assert ours.hidden_size == theirs.hidden_size
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.num_hidden_layers == theirs.num_hidden_layers
    assert ours.num_attention_heads == theirs.num_attention_heads
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.head_dim == theirs.head_dim
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rope_scaling is None
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert not ours.attention_bias and not ours.qk_norm
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_ids == (theirs.eos_token_id,)


def test_default_model_tokenizer_and_chat_template(default_model):
    tokenizer = default_model.tokenizer
    assert tokenizer.is_fast
    text = "Rivers run to the sea, ünïcödé and 12345."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    # SmolLM2's file says add_bos_token = false: plain encoding adds no special token.
    assert ids[0] != default_model.config.bos_token_id
    assert tokenizer.convert_ids_to_tokens(list(default_model.config.eos_token_ids)) == [
        "<|im_end|>"
    ]
    assert default_model.chat_template is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}],
        chat_template=default_model.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert default_model.path == default_model_path()


# -- tiny files, one per architecture ----------------------------------------------------------

_TINY_CASES = {
    # (model_type, config overrides)
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},
    # Heads wider than hidden / heads, as in real Qwen3 (q_proj out 512 != hidden 64). 128 because
    # transformers' GGUF reader ignores qwen3.attention.key_length and assumes 128.
    "qwen3": {"tie_word_embeddings": False, "head_dim": 128},
}


@pytest.mark.parametrize("arch", sorted(_TINY_CASES))
def test_tiny_f32_file_round_trips_hf_weights(tmp_path, arch):
    hf_config = tiny_config(arch, len(TOKENS), **_TINY_CASES[arch])
    model = tiny_model(hf_config)
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, hf_config, hf_state_dict(model))

    loaded = load_gguf(path)

    _assert_same_weights(loaded.weights, hf_state_dict(model))
    _assert_same_weights(loaded.weights, hf_state_dict(_transformers_reference(str(path))))
    config = loaded.config
    assert config.architecture == arch
    assert config.vocab_size == len(TOKENS) == len(loaded.tokenizer)
    assert config.head_dim == hf_config.head_dim
    assert config.tie_word_embeddings == hf_config.tie_word_embeddings
    assert config.attention_bias == (arch == "qwen2")
    assert config.qk_norm == (arch == "qwen3")
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert loaded.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_q8_0_file_matches_transformers(tmp_path, arch):
    hf_config = tiny_config(arch, len(TOKENS), **_TINY_CASES[arch])
    model = tiny_model(hf_config)
    path = write_tiny_gguf(
        tmp_path / "q8.gguf",
        arch,
        hf_config,
        hf_state_dict(model),
        qtype=gguf.GGMLQuantizationType.Q8_0,
    )

    loaded = load_gguf(path)

    _assert_same_weights(loaded.weights, hf_state_dict(_transformers_reference(str(path))))
    # 8-bit blocks: close to the originals, not equal.
    for name, tensor in hf_state_dict(model).items():
        torch.testing.assert_close(loaded.weights[name], tensor, rtol=0, atol=0.05, msg=name)


def test_end_of_turn_token_also_ends_generation(tmp_path):
    hf_config = tiny_config("llama", len(TOKENS))
    metadata = {"tokenizer.ggml.eot_token_id": 0}
    path = write_tiny_gguf(
        tmp_path / "m.gguf", "llama", hf_config, _state(hf_config), metadata=metadata
    )
    assert load_gguf(path).config.eos_token_ids == (2, 0)


# -- RoPE scaling ------------------------------------------------------------------------------


def _llama_cpp_rope_freqs(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """The divisors llama.cpp's converter writes as rope_freqs.weight for Llama 3 rope scaling."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * np.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def _hf_llama3_inv_freq(rope_scaling: dict, theta: float, head_dim: int) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_config(
        "llama", 16, head_dim=head_dim, hidden_size=4 * head_dim, max_position_embeddings=131072
    )
    config.rope_parameters = {"rope_theta": theta, **rope_scaling}
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return inv_freq


def test_llama3_rope_freqs_become_hf_rope_scaling(tmp_path):
    theta, head_dim = 500000.0, 128
    hf_config = tiny_config(
        "llama",
        len(TOKENS),
        hidden_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        rope_theta=theta,
    )
    freqs = _llama_cpp_rope_freqs(theta, head_dim, factor=8.0, low=1.0, high=4.0, original=8192)
    path = write_tiny_gguf(
        tmp_path / "l3.gguf",
        "llama",
        hf_config,
        _state(hf_config),
        extra_tensors={"rope_freqs.weight": freqs},
    )

    loaded = load_gguf(path)

    assert loaded.config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in loaded.weights


def test_llama3_rope_freqs_recovered_up_to_scale(tmp_path):
    # Trained at 4096, not 8192: the file cannot tell, but the frequencies must still agree.
    theta, head_dim = 500000.0, 64
    hf_config = tiny_config(
        "llama",
        len(TOKENS),
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        rope_theta=theta,
    )
    freqs = _llama_cpp_rope_freqs(theta, head_dim, factor=32.0, low=1.0, high=4.0, original=4096)
    path = write_tiny_gguf(
        tmp_path / "l3.gguf",
        "llama",
        hf_config,
        _state(hf_config),
        extra_tensors={"rope_freqs.weight": freqs},
    )

    scaling = load_gguf(path).config.rope_scaling

    truth = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    torch.testing.assert_close(
        _hf_llama3_inv_freq(scaling, theta, head_dim),
        _hf_llama3_inv_freq(truth, theta, head_dim),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (
            {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
            {"rope_type": "linear", "factor": 2.0},
        ),
        ({"llama.rope.scaling.type": "none"}, None),
        (
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 4.0,
                "llama.rope.scaling.original_context_length": 64,
            },
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        ),
    ],
)
def test_rope_scaling_metadata(tmp_path, metadata, expected):
    hf_config = tiny_config("llama", len(TOKENS))
    path = write_tiny_gguf(
        tmp_path / "m.gguf", "llama", hf_config, _state(hf_config), metadata=metadata
    )
    assert load_gguf(path).config.rope_scaling == expected


# -- files we refuse ---------------------------------------------------------------------------


def test_unsupported_tensor_type_names_the_type(tmp_path):
    hf_config = tiny_config("llama", len(TOKENS))
    state = _state(hf_config)
    del state["model.layers.0.self_attn.o_proj.weight"]
    # Q8_1 is a real GGUF type (llama.cpp uses it for activations) that gguf cannot dequantize:
    # 64 x 64 values in blocks of 32, 40 bytes a block.
    q8_1 = np.zeros((64, 80), dtype=np.uint8)
    raw = {"blk.0.attn_output.weight": (q8_1, gguf.GGMLQuantizationType.Q8_1)}
    path = write_tiny_gguf(tmp_path / "q81.gguf", "llama", hf_config, state, raw_tensors=raw)

    with pytest.raises(ModelLoadError, match="Q8_1") as caught:
        load_gguf(path)
    assert str(path) in str(caught.value)


def test_mixture_of_experts_tensor_is_refused(tmp_path):
    hf_config = tiny_config("llama", len(TOKENS))
    extra = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 96, 64), dtype=np.float32)}
    path = write_tiny_gguf(
        tmp_path / "moe.gguf", "llama", hf_config, _state(hf_config), extra_tensors=extra
    )
    with pytest.raises(ModelLoadError, match="blk.0.ffn_gate_exps.weight"):
        load_gguf(path)


def test_missing_layer_tensor_is_named(tmp_path):
    hf_config = tiny_config("qwen3", len(TOKENS))
    state = _state(hf_config)
    del state["model.layers.1.self_attn.k_norm.weight"]
    path = write_tiny_gguf(tmp_path / "m.gguf", "qwen3", hf_config, state)
    with pytest.raises(ModelLoadError, match="model.layers.1.self_attn.k_norm.weight"):
        load_gguf(path)


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    hf_config = tiny_config("llama", len(TOKENS))
    freqs = np.linspace(1.0, 3.0, hf_config.head_dim // 2, dtype=np.float32) ** 2
    extra = {"rope_freqs.weight": freqs}
    path = write_tiny_gguf(
        tmp_path / "m.gguf", "llama", hf_config, _state(hf_config), extra_tensors=extra
    )
    with pytest.raises(ModelLoadError, match="Llama 3's rope scaling"):
        load_gguf(path)
