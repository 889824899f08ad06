"""A Hugging Face `config.json` (plus `generation_config.json`) read into a ModelArchConfig."""

from __future__ import annotations

import json
import os
from typing import Any

from rillm.arch_config import SUPPORTED_ARCHITECTURES, ModelArchConfig, gemma3_layer_types
from rillm.loader.errors import ModelLoadError

# What transformers assumes when a config leaves these out (identical for all four model types).
_DEFAULT_RMS_NORM_EPS = 1e-6
_DEFAULT_ROPE_THETA = 10000.0


def read_hf_config(directory: str) -> ModelArchConfig:
    """The architecture described by `directory/config.json`.

    Raises ModelLoadError naming config.json when it is missing, not JSON, of an unsupported
    `model_type`, lacks a required size, or asks for a feature rillm does not implement.
    """
    path = os.path.join(directory, "config.json")
    raw = _read_json(path)
    model_type = raw.get("model_type")
    model_type = _MODEL_TYPES.get(str(model_type), model_type)
    if raw.get("model_type") == "gemma3":
        raise ModelLoadError(path, "model_type 'gemma3' is the multimodal Gemma 3 "
                             "(Gemma3ForConditionalGeneration); rillm serves the text model "
                             "(Gemma3ForCausalLM, model_type 'gemma3_text')")
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelLoadError(
            path, f"unsupported model_type {model_type!r} (supported: {supported})"
        )
    if raw.get("mlp_bias"):
        raise ModelLoadError(path, "mlp_bias=true is unsupported")

    def required(key: str) -> Any:
        if raw.get(key) is None:
            raise ModelLoadError(path, f"{key!r} is missing")
        return raw[key]

    hidden = int(required("hidden_size"))
    heads = int(required("num_attention_heads"))
    if model_type == "gemma3":
        return _gemma3_config(path, directory, raw, required)
    rope = _rope_parameters(raw)
    eos = _token_ids(raw.get("eos_token_id")) + _token_ids(_generation_eos(directory))
    return ModelArchConfig(
        architecture=model_type,
        vocab_size=int(required("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(required("intermediate_size")),
        num_hidden_layers=int(required("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))),
        max_position_embeddings=int(required("max_position_embeddings")),
        rope_scaling=_rope_scaling(rope),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has Q/K/V biases (its config has no switch); Mistral never does.
        attention_bias=model_type == "qwen2"
        or (model_type != "mistral" and bool(raw.get("attention_bias", False))),
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window(path, model_type, raw),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


_MODEL_TYPES = {"gemma3_text": "gemma3"}
"""config.json model_type -> rillm's architecture name, where they differ."""


def _gemma3_config(path: str, directory: str, raw: dict[str, Any], required) -> ModelArchConfig:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if raw.get(key) is not None:
            raise ModelLoadError(path, f"{key}={raw[key]} is unsupported")
    activation = raw.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ModelLoadError(path, f"hidden_activation {activation!r} is unsupported")
    hidden, heads = int(required("hidden_size")), int(required("num_attention_heads"))
    layers = int(required("num_hidden_layers"))
    head_dim = int(raw.get("head_dim") or 256)
    # transformers 5: rope_parameters per layer type; older configs: rope_theta (global),
    # rope_local_base_freq and rope_scaling.
    params = raw.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or raw.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    rope_theta = float(full.get("rope_theta", raw.get("rope_theta", 1_000_000.0)))
    local_theta = float(local.get("rope_theta", raw.get("rope_local_base_freq", 10_000.0)))
    layer_types = raw.get("layer_types")
    if layer_types is None:
        layer_types = gemma3_layer_types(layers)
    if len(layer_types) != layers or not set(layer_types) <= {"sliding_attention",
                                                              "full_attention"}:
        raise ModelLoadError(path, f"layer_types {layer_types!r} do not match the layers")
    eos = _token_ids(raw.get("eos_token_id")) + _token_ids(_generation_eos(directory))
    return ModelArchConfig(
        architecture="gemma3",
        vocab_size=int(required("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(required("intermediate_size")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
        rope_theta=rope_theta,
        max_position_embeddings=int(required("max_position_embeddings")),
        rope_scaling=_rope_scaling(full),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        attention_bias=bool(raw.get("attention_bias", False)),
        qk_norm=True,
        sliding_window=int(raw.get("sliding_window") or 4096),
        layer_types=tuple(layer_types),
        rope_local_theta=local_theta,
        query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or head_dim),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(path, "not a JSON object")
    return raw


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (which also holds rope_theta); older configs
    # write `rope_scaling`, or nothing for plain RoPE.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return dict(rope)


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """The HF dict with `rope_type` always set (old configs say `type`), None for plain RoPE."""
    scaling = {key: value for key, value in rope.items() if key not in ("rope_theta", "type")}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type in (None, "default"):
        return None
    scaling["rope_type"] = rope_type
    return scaling


def _sliding_window(path: str, model_type: str, raw: dict[str, Any]) -> int | None:
    if model_type == "mistral":
        return raw.get("sliding_window")
    # Qwen configs always carry a sliding_window value, but only use_sliding_window turns it on,
    # and then only for the layers past max_window_layers: a per-layer window we do not model.
    if raw.get("use_sliding_window"):
        raise ModelLoadError(
            path, "use_sliding_window=true (per-layer sliding window) is unsupported"
        )
    return None


def _generation_eos(directory: str) -> Any:
    # Chat checkpoints often list their end-of-turn token only here (Llama 3's <|eot_id|>).
    path = os.path.join(directory, "generation_config.json")
    return _read_json(path).get("eos_token_id") if os.path.isfile(path) else None


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
