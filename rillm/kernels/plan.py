"""KernelPlan: which kernels this process runs, decided once at start-up and logged in one line.

Every component that has a choice (attention backends, linear methods, RMSNorm, the fused decode
layer, the sampler's argmax) receives its slice of the plan in its constructor; nothing checks
the CPU or the loaded kernels anywhere else.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, replace
from typing import Any

import torch

from rillm.kernels import kernel_vectorized, load_cpu_kernels


class DecodeAttention(enum.Enum):
    PAGED_AVX512BF16 = "paged-avx512bf16"
    """rillm's paged_decode_attention on its AVX-512 BF16 path (bfloat16, head_dim 64/128/256)."""
    PAGED_CPP = "paged-cpp"
    """The same kernel's portable C++ path (float32 arithmetic, any dtype)."""
    TORCH = "torch-gather"
    """Gather the keys once per layer, two batched matmuls (any device)."""
    TRITON = "triton"
    """rillm's Triton kernel (CUDA): block tables read on the device, graph-capturable."""


class PrefillAttention(enum.Enum):
    PAGED_AVX512BF16 = "paged-avx512bf16"
    """rillm's paged_prefill_attention: 16-query tiles against only the keys they see."""
    TORCH_SDPA = "torch-sdpa"
    """Gather + scaled_dot_product_attention with a causal mask (the CPU's float32 path)."""
    TRITON = "triton"
    """rillm's Triton kernel (CUDA): query tiles against only the keys they see."""


class LinearKernel(enum.Enum):
    GGUF_VNNI = "gguf-vnni"
    """A GGUF's blocks on rillm's gguf_linear (int8 activations per block, VNNI)."""
    INT4_TORCH = "int4-torch"
    """A GGUF's blocks on PyTorch's int4 kernel, a oneDNN bfloat16 copy for larger batches."""
    DENSE = "dense"
    """Float weights (`quantization="none"`, Hugging Face directories)."""


@dataclass(frozen=True)
class KernelPlan:
    decode: DecodeAttention
    prefill: PrefillAttention
    linear: LinearKernel
    rotary_cache_write: bool
    """Rotary embedding + K/V cache write as one C++ op."""
    fused_norm: bool
    """RMSNorm (Gemma's too) and SiLU / tanh-GELU(gate) * up as C++ ops (outside float32,
    whose path keeps PyTorch's summation order, the one held to transformers)."""
    fused_decode: bool
    """Decode-only steps run each decoder layer as one C++ op (where every layer's matmuls
    are on gguf_linear; fused_decode.py)."""
    argmax: bool
    """The sampler's argmax on rillm's kernel."""
    triton: bool = False
    """The fused ops (rotary + cache write, norms, activations) are Triton's
    (rillm/kernels/triton_ops.py: a GPU) instead of rillm's C++ ops."""

    def ops(self) -> Any:
        """The namespace of the fused ops this plan runs (`rms_norm`, `rms_norm_scaled`,
        `silu_mul`, `gelu_tanh_mul`, `rotary_cache_write`, the same signatures either way)."""
        if self.triton:
            from rillm.kernels import triton_ops

            return triton_ops
        return torch.ops.rillm

    def rotary_ops(self) -> Any | None:
        """`ops()` where the rotation and the cache write are one op, None otherwise."""
        return self.ops() if self.rotary_cache_write else None

    def norm_ops(self) -> Any | None:
        """`ops()` where the norms and activations are fused, None where PyTorch runs them."""
        return self.ops() if self.fused_norm else None

    def describe(self) -> str:
        def on(flag: bool) -> str:
            return "on" if flag else "off"

        return (f"decode={self.decode.value} prefill={self.prefill.value} "
                f"linear={self.linear.value} rotary-cache-write={on(self.rotary_cache_write)} "
                f"fused-norm={on(self.fused_norm)} fused-decode={on(self.fused_decode)} "
                f"argmax={'cpp' if self.argmax else 'torch'}"
                + (" fused-ops=triton" if self.triton else ""))


TORCH_ONLY = KernelPlan(DecodeAttention.TORCH, PrefillAttention.TORCH_SDPA, LinearKernel.DENSE,
                        rotary_cache_write=False, fused_norm=False, fused_decode=False,
                        argmax=False)
"""PyTorch everywhere: no C++ compiler, `--no-cpu-kernels` (with dense weights), a GPU
without Triton."""

CUDA = replace(TORCH_ONLY, decode=DecodeAttention.TRITON, prefill=PrefillAttention.TRITON,
               rotary_cache_write=True, fused_norm=True, triton=True)
"""A GPU: dense weights (a GGUF's blocks dequantized once at load), Triton paged attention and
fused ops (rillm/kernels/triton_ops.py; the norms and activations outside float32, as on the
CPU), cuBLAS for the matmuls; nothing CPU-specific."""


def cuda_plan(dtype: torch.dtype) -> KernelPlan:
    """`CUDA` for a model in `dtype`: float32 keeps PyTorch's norms and activations (their
    summation order is the reference's); the rotation and cache write are exact either way."""
    return replace(CUDA, fused_norm=dtype != torch.float32)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_kernels(device: torch.device, dtype: torch.dtype, head_dim: int,
                    gguf_blocks: bool, cpu_kernels: bool, fusable_layers: bool) -> KernelPlan:
    """The plan for a model of `head_dim` in `dtype` on `device`. `gguf_blocks`: the model
    keeps a GGUF file's blocks; `cpu_kernels`: the user allows rillm's C++ kernels (they are
    built and loaded here); `fusable_layers`: the architecture's layers are what decode_layer
    computes (no q/k norms, no biases)."""
    if device.type == "cuda":
        if gguf_blocks:
            raise ValueError("a GPU runs a GGUF's weights dequantized (quantization auto or none)")
        return cuda_plan(dtype) if triton_available() else TORCH_ONLY
    blocks = LinearKernel.INT4_TORCH if gguf_blocks else LinearKernel.DENSE
    if device.type != "cpu" or not cpu_kernels or not load_cpu_kernels():
        return replace(TORCH_ONLY, linear=blocks)
    low_precision = dtype != torch.float32
    fast_dims = dtype == torch.bfloat16 and head_dim in (64, 128, 256)
    decode = (DecodeAttention.PAGED_AVX512BF16
              if fast_dims and kernel_vectorized("decode_attention")
              else DecodeAttention.PAGED_CPP)
    prefill = (PrefillAttention.PAGED_AVX512BF16
               if fast_dims and kernel_vectorized("prefill_attention")
               else PrefillAttention.TORCH_SDPA)
    linear = (LinearKernel.GGUF_VNNI if gguf_blocks and kernel_vectorized("gguf_linear")
              else blocks)
    fused_decode = (linear is LinearKernel.GGUF_VNNI and dtype == torch.bfloat16
                    and fusable_layers)
    return KernelPlan(decode, prefill, linear, rotary_cache_write=True,
                      fused_norm=low_precision, fused_decode=fused_decode, argmax=True)
