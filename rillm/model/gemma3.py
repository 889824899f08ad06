"""Gemma 3 (text): the Llama skeleton with Gemma's differences, as transformers computes them.

    h = x + post_attention_norm(o_proj(attn(q_norm(q), k_norm(k), v)))   (inputs: input_norm(x))
    out = h + post_feedforward_norm(down(gelu_tanh(gate) * up))          (inputs: pre_ff_norm(h))

- RMSNorm scales by (1 + w) in float32, then rounds (the checkpoints store w; a GGUF stores
  1 + w, which the loader takes back to w, as transformers' GGUF reader does);
- q and k are RMS-normalised per head before RoPE; scores are scaled by
  query_pre_attn_scalar^-1/2;
- local layers attend within a sliding window and rotate with their own RoPE base (10k); every
  sixth layer is global, with the model's base and scaling;
- the embedding is multiplied by sqrt(hidden) (rounded to the model's dtype), and the tied
  lm_head reads the same matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rillm.arch_config import ModelArchConfig
from rillm.attention import Attention, AttentionMetadata, KVCache, PagedAttention
from rillm.kernels.plan import KernelPlan
from rillm.model.checkpoint import Checkpoint
from rillm.model.rotary import RotaryEmbedding

Rope = tuple[torch.Tensor, torch.Tensor]


class GemmaRMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, ops: Any | None) -> None:
        super().__init__()
        self.scale = (1.0 + weight.float()).contiguous()
        """1 + w, in float32: what the reference multiplies by."""
        self.eps = eps
        self.ops = ops
        """The plan's fused ops (KernelPlan.norm_ops), whose `rms_norm_scaled` (outside
        float32; C++ on the CPU, Triton on CUDA) is one op instead of eight, 109 of them a
        decode step; None: PyTorch's (the float32 path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None and x.dim() in (2, 3) and x.stride(-1) == 1:
            return self.ops.rms_norm_scaled(x, self.scale, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.scale).to(x.dtype)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelArchConfig, layer: int, prefix: str, checkpoint: Checkpoint,
                 plan: KernelPlan, attention: PagedAttention) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.qkv_proj = checkpoint.linear(f"{prefix}.qkv_proj")
        self.o_proj = checkpoint.linear(f"{prefix}.o_proj")
        eps = config.rms_norm_eps
        fused = plan.norm_ops()
        self.q_norm = GemmaRMSNorm(checkpoint.tensor(f"{prefix}.q_norm.weight"), eps, fused)
        self.k_norm = GemmaRMSNorm(checkpoint.tensor(f"{prefix}.k_norm.weight"), eps, fused)
        self.windowed = config.windowed(layer)
        self.attn = Attention(attention, config.attention_scale, plan.rotary_ops(),
                              self.windowed)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        tokens, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(tokens, heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv[:, : self.num_heads], qkv[:, self.num_heads : heads], qkv[:, heads:]
        q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attn(q, k, v, rope, cache, metadata))


class Gemma3MLP(nn.Module):
    def __init__(self, prefix: str, checkpoint: Checkpoint, ops: Any | None) -> None:
        super().__init__()
        self.gate_up_proj = checkpoint.linear(f"{prefix}.gate_up_proj")
        self.down_proj = checkpoint.linear(f"{prefix}.down_proj")
        self.ops = ops
        """The plan's fused ops, whose `gelu_tanh_mul` is GELU(gate) * up in one pass and one
        rounding (bfloat16; C++ on the CPU, Triton on CUDA); None: PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.ops is not None and gate_up.dtype == torch.bfloat16 and gate_up.dim() == 2:
            return self.down_proj(self.ops.gelu_tanh_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, layer: int, checkpoint: Checkpoint,
                 plan: KernelPlan, attention: PagedAttention) -> None:
        super().__init__()
        prefix, eps = f"model.layers.{layer}", config.rms_norm_eps

        def norm(name: str) -> GemmaRMSNorm:
            return GemmaRMSNorm(checkpoint.tensor(f"{prefix}.{name}.weight"), eps,
                                plan.norm_ops())

        self.input_layernorm = norm("input_layernorm")
        self.self_attn = Gemma3Attention(config, layer, f"{prefix}.self_attn", checkpoint, plan,
                                         attention)
        self.post_attention_layernorm = norm("post_attention_layernorm")
        self.pre_feedforward_layernorm = norm("pre_feedforward_layernorm")
        self.mlp = Gemma3MLP(f"{prefix}.mlp", checkpoint, plan.norm_ops())
        self.post_feedforward_layernorm = norm("post_feedforward_layernorm")

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), rope, cache, metadata)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelArchConfig, checkpoint: Checkpoint, plan: KernelPlan,
                 attention: PagedAttention) -> None:
        super().__init__()
        self.embed_tokens = checkpoint.embedding("model.embed_tokens.weight")
        self.embed_scale = torch.tensor(config.hidden_size**0.5).to(
            device=checkpoint.device, dtype=checkpoint.dtype)
        """On the model's device: a copy to it in each step would wait for the device (and
        cannot be captured in a CUDA graph)."""
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, checkpoint, plan, attention)
            for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(checkpoint.tensor("model.norm.weight"), config.rms_norm_eps,
                                 plan.norm_ops())
        self.rotary_emb = RotaryEmbedding(config, checkpoint.device)
        local = replace(config, rope_theta=config.rope_local_theta or config.rope_theta,
                        rope_scaling=None)
        self.rotary_local = RotaryEmbedding(local, checkpoint.device)
        self.fused_decode = None
        """Gemma's layers are not what decode_layer computes."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                caches: Sequence[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * self.embed_scale
        ropes = self.rotary_emb(positions, x.dtype), self.rotary_local(positions, x.dtype)
        for layer, cache in zip(self.layers, caches, strict=True):
            assert isinstance(layer, Gemma3DecoderLayer)
            x = layer(x, ropes[layer.self_attn.windowed], cache, metadata)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig, checkpoint: Checkpoint, plan: KernelPlan,
                 attention: PagedAttention) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config, checkpoint, plan, attention)
        embed = self.model.embed_tokens
        if config.tie_word_embeddings:
            tied = embed.weight if isinstance(embed, nn.Embedding) else None
            self.lm_head = checkpoint.linear("lm_head", sources=["model.embed_tokens"],
                                             tied=tied)
        else:
            self.lm_head = checkpoint.linear("lm_head")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                caches: Sequence[KVCache], metadata: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] in float32, only for the rows asked for."""
        hidden = self.model(input_ids, positions, caches, metadata)
        return self.lm_head(hidden[logits_indices], torch.float32)
