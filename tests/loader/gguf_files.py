"""Tiny GGUF files for tests, written the way llama.cpp's converter writes real ones.

The naming table and the Q/K reordering here are written independently of the loader (from
llama.cpp's conventions), so a round trip through them checks the loader rather than itself.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.loader import kquants

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIAL_TOKENS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
"""A byte-level BPE vocabulary small enough to keep test models tiny (262 tokens)."""
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"

_HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of Llama Q/K rows: each head's two halves interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    arch: str,
    hf_config,  # a transformers LlamaConfig / Qwen2Config / Qwen3Config
    state_dict: dict[str, torch.Tensor],
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    metadata: dict[str, object] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    raw_tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """Write `state_dict` (HF names) as a GGUF of `arch`, matrices stored as `qtype`, or as
    `qtypes[suffix]` for a name ending in that suffix (a K-quant mix: tests/loader/kquants.py
    writes the K-quants).

    `extra_tensors` are written as they are under their GGUF names; `raw_tensors` are bytes
    already encoded in the given type.
    """
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(hf_config.num_hidden_layers)
    writer.add_context_length(hf_config.max_position_embeddings)
    writer.add_embedding_length(hf_config.hidden_size)
    writer.add_feed_forward_length(hf_config.intermediate_size)
    writer.add_head_count(hf_config.num_attention_heads)
    writer.add_head_count_kv(hf_config.num_key_value_heads)
    writer.add_key_length(hf_config.head_dim)
    writer.add_value_length(hf_config.head_dim)
    writer.add_rope_dimension_count(hf_config.head_dim)
    writer.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
    writer.add_rope_freq_base(hf_config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(TOKENS) - len(SPECIAL_TOKENS)))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))

    for name, tensor in state_dict.items():
        values = tensor.detach().to(torch.float32).numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, hf_config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, hf_config.num_key_value_heads)
        stored_type = next((t for suffix, t in (qtypes or {}).items() if name.endswith(suffix)),
                           qtype)
        if values.ndim == 2 and stored_type != gguf.GGMLQuantizationType.F32:
            stored = kquants.quantize(values, stored_type)
            writer.add_tensor(gguf_name(name), stored, raw_shape=stored.shape,
                              raw_dtype=stored_type)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(values))
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    for name, (data, raw_type) in (raw_tensors or {}).items():
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
