"""The parameter names and shapes a config implies, and the check that loaded weights have them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rillm.arch_config import ModelArchConfig
from rillm.loader.errors import ModelLoadError


def expected_weight_shapes(config: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a model with this config has, by Hugging Face name, with its shape."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        if config.architecture == "gemma3":  # norms around the MLP too
            shapes[f"{layer}.pre_feedforward_layernorm.weight"] = (hidden,)
            shapes[f"{layer}.post_feedforward_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.self_attn.q_proj.weight"] = (q_out, hidden)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (hidden, q_out)
        if config.attention_bias:
            shapes[f"{layer}.self_attn.q_proj.bias"] = (q_out,)
            shapes[f"{layer}.self_attn.k_proj.bias"] = (kv_out,)
            shapes[f"{layer}.self_attn.v_proj.bias"] = (kv_out,)
        if config.qk_norm:
            shapes[f"{layer}.self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{layer}.mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{layer}.mlp.down_proj.weight"] = (hidden, config.intermediate_size)
    return shapes


def check_weights(shapes: Mapping[str, Sequence[int]], config: ModelArchConfig,
                  path: str) -> None:
    """Raise ModelLoadError unless the weights' `shapes` (by name) are exactly the names and
    shapes `config` implies.

    Checking here, at load time, turns a config/checkpoint mismatch into a message naming the file
    and the tensor, instead of a shape error deep inside the first forward pass.
    """
    expected = expected_weight_shapes(config)
    missing = sorted(expected.keys() - shapes.keys())
    if missing:
        raise ModelLoadError(path, f"missing tensor(s): {_first_few(missing)}")
    unexpected = sorted(shapes.keys() - expected.keys())
    if unexpected:
        raise ModelLoadError(path, f"unexpected tensor(s): {_first_few(unexpected)}")
    for name, shape in expected.items():
        actual = tuple(shapes[name])
        if actual != shape:
            raise ModelLoadError(
                path, f"tensor {name} has shape {list(actual)}, the config implies {list(shape)}"
            )


def _first_few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
