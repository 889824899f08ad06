"""What a loader hands to the engine: the config, weights and tokenizer of one checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from rillm.arch_config import ModelArchConfig
from rillm.loader.gguf_blocks import GGUFBlocks


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint read into memory, whatever format it came from.

    Contract on `weights`:
    - the keys are exactly `expected_weight_shapes(config)`: Hugging Face parameter names
      (`model.layers.{i}.self_attn.q_proj.weight`, ...), with `lm_head.weight` present if and only
      if `config.tie_word_embeddings` is False;
    - every tensor is on the CPU, in Hugging Face layout (a Linear weight is `[out, in]`, Q and K
      rows in Hugging Face's rotary order, whatever order the file stored them in);
    - GGUF weights are float32, dequantized each time they are looked up (a matrix kept as
      blocks is never dequantized); safetensors weights keep the file's dtype, and the caller
      converts.
    """

    config: ModelArchConfig
    weights: Mapping[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    """A fast (Rust-backed) tokenizer; it adds BOS only when the checkpoint asks for it."""
    chat_template: str | None
    """The Jinja chat template shipped with the checkpoint, None when it has none."""
    path: str
    """The file or directory the model was loaded from."""
    quantized: dict[str, GGUFBlocks] = field(default_factory=dict)
    """A GGUF file's matrices in a block format rillm multiplies by (gguf_blocks.SUPPORTED_TYPES),
    as stored, by Hugging Face name (rows in Hugging Face order). `weights` dequantizes them."""
