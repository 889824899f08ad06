"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as one PyTorch module tree.

Checkpoints use Hugging Face's parameter names. Projections that read the same input are held
fused (`PACKED_MODULES`: Q, K and V as `qkv_proj`; gate and up as `gate_up_proj`), one matmul
instead of several; `build_model` concatenates the checkpoint's tensors into them. The forward
takes one flat batch of tokens from many sequences ([T] ids and positions) and the paged KV
cache; there is no batch dimension and no padding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rillm.model.config import ModelArchConfig
from rillm.model.int4_linear import GGUFBlocks, Int4Linear, Int8Weight
from rillm.worker.attention import AttentionMetadata, KVCache, paged_attention

PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Fused module -> the checkpoint's modules whose output rows it holds, in order."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False
        """rillm's C++ `rms_norm` (set by build_model, bfloat16/float16 on the CPU): one op
        instead of eight, the same roundings; only the squares are summed in another order,
        which is why the float32 path, the one held to transformers bit for bit, keeps these."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dim() == 2 and x.is_contiguous():
            return torch.ops.rillm.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the weights' dtype, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a batch (rotate-half layout)."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_inv_freq(config: ModelArchConfig) -> torch.Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths are slowed by `factor`,
    short ones kept, and the band between blended smoothly."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(in_band, blended, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_size = config.hidden_size, self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.sizes = (q_size, kv_size, kv_size)
        self.qkv_proj: nn.Module = nn.Linear(hidden, sum(self.sizes), bias=config.attention_bias)
        self.o_proj: nn.Module = nn.Linear(q_size, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(tokens, heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv[:, : self.num_heads], qkv[:, self.num_heads : heads], qkv[:, heads:]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        if metadata.cpu_kernels:  # rotate, and store K/V: one C++ op, the same arithmetic
            q = torch.ops.rillm.rotary_cache_write(
                q, k, v, cos, sin, cache.key, cache.value, metadata.slot_mapping
            )
        else:
            if self.q_norm is None:  # Q and K heads side by side: one rotary pass, not two
                qk = apply_rotary(qkv[:, :heads], cos, sin)
                q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            else:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            cache.write(metadata.slot_mapping, k, v)
        return self.o_proj(paged_attention(q, cache, metadata, self.scale))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj: nn.Module = nn.Linear(hidden, 2 * inner, bias=False)
        self.down_proj: nn.Module = nn.Linear(inner, hidden, bias=False)
        self.fused = False
        """rillm's C++ `silu_mul` (set by build_model on the CPU outside float32): SiLU(gate) *
        up in one pass and one rounding, for bfloat16 activations (decode_layer uses it too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused and gate_up.dtype == torch.bfloat16 and gate_up.dim() == 2:
            return self.down_proj(torch.ops.rillm.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, cache, metadata)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.fused_decode_rows = 0
        """Decode steps of up to this many sequences run each layer as one C++ op
        (`torch.ops.rillm.decode_layer`, the same kernels and roundings as the layers' own
        forward with the C++ kernels); set by build_model where every layer can (any number
        of sequences where the bfloat16 copies are packed for oneDNN)."""
        self.fused_decode_weights: list[list[torch.Tensor]] = []
        self.fused_decode_shape: tuple[float, int, int, float] = (0.0, 0, 0, 0.0)
        """(attention scale, heads, KV heads, RMSNorm eps) for the fused decode path."""
        self.fused_decode_int4_rows = 0
        """Up to this many rows its matmuls run on the int4 blocks, above on bfloat16."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary_emb(positions, x.dtype)
        if (metadata.cpu_kernels and metadata.decode_only
                and x.shape[0] <= self.fused_decode_rows):
            return self.norm(self._fused_decode(x, rope, caches, metadata))
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, rope, cache, metadata)
        return self.norm(x)

    def _fused_decode(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        (group,) = metadata.groups
        assert group.context_lens is not None
        cos, sin = rope
        scale, heads, kv_heads, eps = self.fused_decode_shape
        decode_layer = torch.ops.rillm.decode_layer.default
        for weights, cache in zip(self.fused_decode_weights, caches, strict=True):
            x = decode_layer(x, weights, cos, sin, cache.key, cache.value, metadata.slot_mapping,
                             group.block_tables, group.context_lens, cache.block_size, scale,
                             heads, kv_heads, eps, self.fused_decode_int4_rows)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head: nn.Module = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        metadata: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] in float32, only for the rows asked for."""
        hidden = self.model(input_ids, positions, caches, metadata)
        return self.lm_head(hidden[logits_indices]).float()


def build_model(
    config: ModelArchConfig,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    quantized: Mapping[str, GGUFBlocks] | None = None,
    cpu_kernels: bool = False,
    dense_int8: bool = False,
    gguf_kernel: bool = True,
) -> LlamaForCausalLM:
    """Build on the meta device and take the checkpoint's tensors as the parameters.

    `dtype` is the activations' and the dense weights' dtype. With `quantized` (a GGUF file's
    blocks by Hugging Face name), every Linear whose weights are all there keeps them quantized
    and multiplies with the int4 kernel (CPU only; see int4_linear.py); `weights` must still
    hold every tensor (the embedding lookup reads the dense copy). `cpu_kernels`: rillm's C++
    kernels are loaded (rillm/kernels); RMSNorm outside float32 and the int4 matmuls use them.
    `dense_int8`: the quantized Linears' copy for more rows than the int4 kernel takes is int8
    (`quantization="int8"`), not bfloat16. `gguf_kernel=False` keeps them off rillm's
    gguf_linear (int8 activations), for comparing against the bfloat16-activation paths.
    """
    with torch.device("meta"), _no_random_init():
        model = LlamaForCausalLM(config)
    state = _pack(weights)
    swapped = (_quantize_linears(model, config, state, quantized, dtype, cpu_kernels, dense_int8,
                                 gguf_kernel) if quantized else [])
    for name in swapped:
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.bias", None)
    # A fresh copy of each tensor: loaders may hand out views of file buffers that are
    # misaligned for the matmul kernels (seen: 100x slower linear layers for batch > 1).
    state = {
        name: tensor.to(device=device, dtype=dtype, copy=True).contiguous()
        for name, tensor in state.items()
    }
    tied_dense = config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if tied_dense:
        model.lm_head.weight = model.model.embed_tokens.weight
    if config.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    missing = [m for m in missing if m.rpartition(".")[0] not in swapped]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the {config.architecture} architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)
    if cpu_kernels and dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, (RMSNorm, LlamaMLP)):
                module.fused = True
    if cpu_kernels:
        _enable_fused_decode(model.model, config)
    return model.eval()


def _enable_fused_decode(model: LlamaModel, config: ModelArchConfig) -> None:
    """Let decode steps run each layer as one C++ op where every layer is what that op does:
    bfloat16, RMSNorm and SiLU * up on the C++ kernels, no q/k norms, all four matmuls on
    rillm's kernels (no bias, no doubled input): gguf_linear's blocks (any number of
    sequences), or the int4 kernel with oneDNN-packed bfloat16 or int8 copies. Without the
    packed copies (PyTorch without oneDNN) only steps within the int4 kernel's rows."""
    weights: list[list[torch.Tensor]] = []
    int4_rows: list[int] = []
    packed = True
    for layer in model.layers:
        assert isinstance(layer, LlamaDecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        linears = [m for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
                   if isinstance(m, Int4Linear) and m.rillm_kernel and m.bias is None
                   and not m.duplicate_input]
        if (attn.q_norm is not None or len(linears) != 4 or not mlp.fused
                or not all(n.fused and n.weight.dtype == torch.bfloat16 for n in norms)):
            return
        blocks = [t for m in linears for t in ((m.gguf, _EMPTY, _EMPTY) if m.gguf is not None
                                               else (m.packed, m.scales, m.mins))]
        dense = [_EMPTY if m.dense is None else m.dense.weight for m in linears]
        # Per-row scales and the few-rows packing of int8 copies; empty for the others.
        int8 = [m.dense if isinstance(m.dense, Int8Weight) else None for m in linears]
        dense_scales = [_EMPTY if w is None else w.scales for w in int8]
        few_rows = [_EMPTY if w is None or w.few_rows is None else w.few_rows for w in int8]
        weights.append([norms[0].weight, *blocks[:6], norms[1].weight, *blocks[6:], *dense,
                        *dense_scales, *few_rows])
        int4_rows.extend(m.max_int4_rows for m in linears)
        packed = packed and all(m.gguf is not None or (m.dense is not None and m.dense.packed)
                                for m in linears)
    model.fused_decode_weights = weights
    model.fused_decode_shape = (config.head_dim**-0.5, config.num_attention_heads,
                                config.num_key_value_heads, config.rms_norm_eps)
    model.fused_decode_int4_rows = min(int4_rows, default=0)
    model.fused_decode_rows = (1 << 30) if packed else model.fused_decode_int4_rows


_EMPTY = torch.empty(0)


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """Skip the random initialisation of Linear and Embedding weights: every parameter is
    replaced by the checkpoint's. On the meta device it would compute nothing, but its first
    call imports torch._dynamo (~1.1 s of a server's start-up)."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(nn.init, name) for name in names}

    def keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in names:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _pack(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with each PACKED_MODULES group concatenated along the rows."""
    state = dict(weights)
    for fused, parts in PACKED_MODULES.items():
        first = f".{parts[0]}."
        for name in [n for n in weights if first in n]:
            names = [name.replace(first, f".{p}.") for p in parts]
            state[name.replace(first, f".{fused}.")] = torch.cat([state.pop(n) for n in names])
    return state


def _quantize_linears(
    model: LlamaForCausalLM,
    config: ModelArchConfig,
    state: dict[str, torch.Tensor],
    quantized: Mapping[str, GGUFBlocks],
    dtype: torch.dtype,
    cpu_kernels: bool,
    dense_int8: bool,
    gguf_kernel: bool,
) -> list[str]:
    """Swap in Int4Linear for every Linear whose checkpoint matrices are all quantized (on
    rillm's int4 kernel with `cpu_kernels`). `state`: the packed checkpoint. Returns the
    (fused) module names swapped."""
    lm_head_source = "model.embed_tokens" if config.tie_word_embeddings else "lm_head"
    sources: dict[str, list[str]] = {"lm_head": [lm_head_source]}
    for i in range(config.num_hidden_layers):
        for fused, parts in PACKED_MODULES.items():
            block = "self_attn" if fused == "qkv_proj" else "mlp"
            sources[f"model.layers.{i}.{block}.{fused}"] = [
                f"model.layers.{i}.{block}.{p}" for p in parts
            ]
        sources[f"model.layers.{i}.self_attn.o_proj"] = [f"model.layers.{i}.self_attn.o_proj"]
        sources[f"model.layers.{i}.mlp.down_proj"] = [f"model.layers.{i}.mlp.down_proj"]
    swapped = []
    for name, sources_of in sources.items():
        blocks = [quantized.get(f"{p}.weight") for p in sources_of]
        if any(b is None for b in blocks):
            continue
        dense = state[f"{lm_head_source if name == 'lm_head' else name}.weight"]
        bias = state.get(f"{name}.bias")
        bias = None if bias is None else bias.to(dtype)
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        linear = Int4Linear(blocks, dense, bias,  # type: ignore[arg-type]
                            rillm_kernel=cpu_kernels, dense_int8=dense_int8,
                            gguf_kernel=gguf_kernel)
        setattr(owner, attr, linear)
        swapped.append(name)
    return swapped
