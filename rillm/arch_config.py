"""The hyper-parameters of a Llama-family architecture, whichever file they were read from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
