"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as one PyTorch module tree.

Each module takes its weights from a `Checkpoint` in its constructor (Hugging Face names) and
its kernel choices from the process's `KernelPlan`. The forward takes one flat batch of tokens
from many sequences ([T] ids and positions) and the paged KV cache; there is no batch dimension
and no padding:

    h = x + o_proj(attn(rope(q), rope(k), v))        q, k, v = qkv_proj(input_layernorm(x))
    out = h + down_proj(silu(gate) * up)              gate, up = gate_up_proj(post_norm(h))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rillm.arch_config import ModelArchConfig
from rillm.attention import Attention, AttentionMetadata, KVCache, PagedAttention
from rillm.kernels.plan import KernelPlan
from rillm.model.checkpoint import Checkpoint
from rillm.model.fused_decode import FusedDecode, FusedLayerWeights
from rillm.model.parallel import all_reduce
from rillm.model.rotary import RotaryEmbedding

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, ops: Any | None) -> None:
        """`ops`: the plan's fused ops (KernelPlan.norm_ops), None for PyTorch's."""
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.ops = ops
        self.fused = ops is not None
        """rillm's fused `rms_norm` (outside float32; C++ on the CPU, Triton on CUDA): one op
        instead of eight, the same roundings; only the squares are summed in another order
        (and Triton's square root and division are a few float32 ulps from PyTorch's), which is
        why the float32 path, the one held to transformers bit for bit, keeps these."""
        self._add_norm = getattr(ops, "add_rms_norm", None) if ops is not None else None
        """The residual add and the norm as one op, where the fused ops have it (Triton's)."""

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): one kernel where the fused ops have it (Triton's),
        the sum rounded as PyTorch's add rounds it."""
        if (self._add_norm is not None and x.dim() == 2 and x.is_contiguous()
                and residual.is_contiguous() and residual.dtype == x.dtype):
            return self._add_norm(x, residual, self.weight, self.eps)  # type: ignore[no-any-return]
        h = x + residual
        return self(h), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None and x.dim() == 2 and x.is_contiguous():
            return self.ops.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelArchConfig, prefix: str, checkpoint: Checkpoint,
                 plan: KernelPlan, attention: PagedAttention) -> None:
        super().__init__()
        self.shard = shard = checkpoint.shard
        self.head_dim = d = config.head_dim
        if shard.parallel:  # this rank's heads (tensor parallelism: rillm/model/parallel.py)
            (q0, q1), (k0, k1) = shard.heads(config.num_attention_heads,
                                             config.num_key_value_heads)
            self.num_heads, self.num_kv_heads = q1 - q0, k1 - k0
            q_rows, kv_rows = (q0 * d, q1 * d), (k0 * d, k1 * d)
            self.qkv_proj = checkpoint.linear(f"{prefix}.qkv_proj",
                                              rows=[q_rows, kv_rows, kv_rows])
            self.o_proj = checkpoint.linear(f"{prefix}.o_proj", cols=q_rows)
        else:
            self.num_heads = config.num_attention_heads
            self.num_kv_heads = config.num_key_value_heads
            self.qkv_proj = checkpoint.linear(f"{prefix}.qkv_proj")
            self.o_proj = checkpoint.linear(f"{prefix}.o_proj")
        kv_size = self.num_kv_heads * d
        self.sizes = (self.num_heads * d, kv_size, kv_size)
        """The q, k, v widths of qkv_proj's output (this rank's)."""
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            eps, fused = config.rms_norm_eps, plan.norm_ops()
            self.q_norm = RMSNorm(checkpoint.tensor(f"{prefix}.q_norm.weight"), eps, fused)
            self.k_norm = RMSNorm(checkpoint.tensor(f"{prefix}.k_norm.weight"), eps, fused)
        layer = int(prefix.split(".")[2])  # model.layers.{i}.self_attn
        self.attn = Attention(attention, config.attention_scale, plan.rotary_ops(),
                              config.windowed(layer))

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        tokens, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(tokens, heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv[:, : self.num_heads], qkv[:, self.num_heads : heads], qkv[:, heads:]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return all_reduce(self.o_proj(self.attn(q, k, v, rope, cache, metadata)), self.shard)


class LlamaMLP(nn.Module):
    def __init__(self, prefix: str, checkpoint: Checkpoint, plan: KernelPlan,
                 intermediate_size: int) -> None:
        super().__init__()
        self.shard = shard = checkpoint.shard
        if shard.parallel:  # this rank's slice of the MLP
            part = shard.split(intermediate_size)
            self.gate_up_proj = checkpoint.linear(f"{prefix}.gate_up_proj", rows=[part, part])
            self.down_proj = checkpoint.linear(f"{prefix}.down_proj", cols=part)
        else:
            self.gate_up_proj = checkpoint.linear(f"{prefix}.gate_up_proj")
            self.down_proj = checkpoint.linear(f"{prefix}.down_proj")
        self.ops = plan.norm_ops()
        self.fused = self.ops is not None
        """rillm's fused `silu_mul`: SiLU(gate) * up in one pass and one rounding, for bfloat16
        activations (decode_layer uses it too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.ops is not None and gate_up.dtype == torch.bfloat16 and gate_up.dim() == 2:
            return all_reduce(self.down_proj(self.ops.silu_mul(gate_up)), self.shard)
        gate, up = gate_up.chunk(2, dim=-1)
        return all_reduce(self.down_proj(F.silu(gate) * up), self.shard)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, prefix: str, checkpoint: Checkpoint,
                 plan: KernelPlan, attention: PagedAttention) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(checkpoint.tensor(f"{prefix}.input_layernorm.weight"),
                                       eps, plan.norm_ops())
        self.self_attn = LlamaAttention(config, f"{prefix}.self_attn", checkpoint, plan,
                                        attention)
        self.post_attention_layernorm = RMSNorm(
            checkpoint.tensor(f"{prefix}.post_attention_layernorm.weight"), eps,
            plan.norm_ops())
        self.mlp = LlamaMLP(f"{prefix}.mlp", checkpoint, plan, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache,
                metadata: AttentionMetadata) -> torch.Tensor:
        normed, h = self.post_attention_layernorm.add(
            self.self_attn(self.input_layernorm(x), rope, cache, metadata), x)
        return h + self.mlp(normed)

    def fused_decode_weights(self) -> FusedLayerWeights | None:
        """This layer's weights for FusedDecode, or None where decode_layer does not compute
        what this layer does."""
        attn, mlp = self.self_attn, self.mlp
        methods = [m.method for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                      mlp.down_proj)]
        norms = (self.input_layernorm, self.post_attention_layernorm)
        matrices = [m.packed for m in methods]
        if (any(m is None for m in matrices)
                or any(m.bias is not None for m in methods) or attn.q_norm is not None
                or not mlp.fused
                or not all(n.fused and n.weight.dtype == torch.bfloat16 for n in norms)):
            return None
        return FusedLayerWeights(norms[0].weight, norms[1].weight,
                                 [m for m in matrices if m is not None])


class LlamaModel(nn.Module):
    def __init__(self, config: ModelArchConfig, checkpoint: Checkpoint, plan: KernelPlan,
                 attention: PagedAttention) -> None:
        super().__init__()
        self.embed_tokens = checkpoint.embedding("model.embed_tokens.weight")
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, f"model.layers.{i}", checkpoint, plan, attention)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(checkpoint.tensor("model.norm.weight"), config.rms_norm_eps,
                            plan.norm_ops())
        self.rotary_emb = RotaryEmbedding(config, checkpoint.device)
        self.fused_decode = (_fused_decode(self.layers, config)
                             if plan.fused_decode and not checkpoint.shard.parallel else None)
        """Decode-only steps run each layer as one C++ op (fused_decode.py; not under tensor
        parallelism: it has no all-reduce between its matmuls)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                caches: Sequence[KVCache], metadata: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary_emb(positions, x.dtype)
        if self.fused_decode is not None and metadata.decode_only:
            return self.norm(self.fused_decode(x, rope, caches, metadata))
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, rope, cache, metadata)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig, checkpoint: Checkpoint, plan: KernelPlan,
                 attention: PagedAttention) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, checkpoint, plan, attention)
        if config.tie_word_embeddings:
            embed = self.model.embed_tokens
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


def _fused_decode(layers: nn.ModuleList, config: ModelArchConfig) -> FusedDecode | None:
    weights = [layer.fused_decode_weights() for layer in layers
               if isinstance(layer, LlamaDecoderLayer)]
    windowed = {config.windowed(i) for i in range(len(layers))}
    if any(w is None for w in weights) or len(windowed) > 1:  # one window for every layer
        return None
    window = config.sliding_window if windowed == {True} else None
    return FusedDecode([w for w in weights if w is not None], config.attention_scale,
                       config.num_attention_heads, config.num_key_value_heads,
                       config.rms_norm_eps, window)
