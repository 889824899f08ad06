"""Tiny random-weight Hugging Face models of each supported architecture, for loader tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma3_text": Gemma3TextConfig,
}


def tiny_config(model_type: str, vocab_size: int, **overrides) -> PretrainedConfig:
    """64 wide, 2 layers, 4 query heads sharing 2 KV heads: every weight shape is distinct."""
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    sizes.update(overrides)
    return _CONFIGS[model_type](**sizes)


def tiny_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A float32 model with random weights, norms included (they start as all ones otherwise)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    return model.eval()


def hf_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's parameters by name, without the tied head's duplicate."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state
