"""The hyper-parameters of a Llama-family architecture, whichever file they were read from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    """One of SUPPORTED_ARCHITECTURES."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict[str, Any] | None = None
    """Hugging Face's rope_scaling dict ("rope_type": "llama3", "linear", ...); None: plain RoPE."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on the Q/K/V projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each head of Q and K before RoPE (Qwen3)."""
    sliding_window: int | None = None
    """Keys a query of a windowed layer sees, its own included (None: no window)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "sliding_attention" or "full_attention" (Gemma 3's local and global layers);
    None: every layer is windowed if `sliding_window` is set (Mistral), none otherwise."""
    rope_local_theta: float | None = None
    """The RoPE base of the windowed layers where it differs from `rope_theta` (Gemma 3: 10k,
    without `rope_scaling`)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by its inverse square root (Gemma); None: head_dim's."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def windowed(self, layer: int) -> bool:
        """Whether layer `layer` attends within `sliding_window` only."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


GEMMA3_GLOBAL_EVERY = 6
"""Gemma 3: every sixth layer is global (full attention), the rest local (windowed)."""


def gemma3_layer_types(num_layers: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
                 for i in range(num_layers))
