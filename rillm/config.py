"""EngineConfig: everything the engine is built from, frozen once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZATIONS = ("auto", "none", "gguf")
_RETIRED = {"int4": "it is called gguf now",
            "int8": "it was removed (no faster than gguf, and "
            "lossy beyond the file's own quantization: docs/benchmark-history.md)"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16",
                 "fp16": "float16"}


STEP_DEFAULTS = {"cpu": (64, 1024), "cuda": (256, 8192)}
"""(max_num_seqs, max_num_batched_tokens) the command line gives a device when not told: a
GPU's steps are wider (vLLM's GPU defaults); EngineConfig's own defaults are the CPU's."""


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None
    """A GGUF file, a Hugging Face directory, or None for the default model."""
    dtype: str = "auto"
    """auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16."""
    device: str = "cpu"
    max_model_len: int | None = None
    """None: the model's context length, capped by what the KV cache holds."""
    block_size: int = 16
    kv_cache_space_gib: float = 0.5
    """Memory for the KV cache; on the CPU it is committed only as blocks are first written
    (2 MiB at a time where the kernel gives transparent huge pages)."""
    num_kv_blocks: int | None = None
    """Overrides kv_cache_space_gib when set."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_prefix_caching: bool = True
    seed: int = 0
    """Seeds the per-request seeds of requests that bring none."""
    num_threads: int | None = None
    """Torch intra-op threads for the model's steps, set in whichever thread runs them (torch
    keeps the count per thread); None: every core this process may run on."""
    cpu_kernels: bool = True
    """On the CPU, use rillm's C++ kernels (rillm/kernels; which ones run is the KernelPlan
    logged at start-up), compiled on first use and cached; where they cannot be built, or
    False, the pure PyTorch path (same results to rounding)."""
    quantization: str = "auto"
    """What to do with a GGUF file's quantized matrices (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K,
    Q6_K; other types are always dequantized): "gguf" keeps the file's blocks and multiplies by
    them as they are, "none" dequantizes them to `dtype`; "auto" (the default) is "gguf" when
    dtype is auto and the device the CPU, else "none". With rillm's C++ kernels on a CPU with
    AVX-512 VNNI, "gguf" runs every matmul on the blocks times the activations rounded to int8
    per block of 32 (llama.cpp's arithmetic for these formats); elsewhere PyTorch's int4 kernel
    up to 4 rows and a bfloat16 copy of the weights packed for oneDNN above for Q4_1 / Q8_0,
    and a dense bfloat16 copy (logged) for the others. Perplexity within 0.6% of the
    dequantized float32 model (BENCHMARKS.md). Unlike "none", rounding depends on the kernels'
    blocking, so a request's greedy tokens can differ alone and in a batch; "none" is the
    exact, batch-invariant reference path."""

    gpu_memory_utilization: float = 0.9
    """On CUDA, the fraction of the card's memory the engine may hold, the model included:
    the KV cache takes what is left of it after the model loads (vLLM's flag). Not on the
    CPU, where kv_cache_space_gib sizes the cache."""
    tensor_parallel_size: int = 1
    """Processes the model is split over (rillm/engine/tensor_parallel.py): each holds its
    share of the attention heads and of the MLP; 1: no split."""
    enforce_eager: bool = False
    """On CUDA, run decode steps op by op instead of replaying CUDA graphs captured at start-up
    (vLLM's flag; rillm/worker/decode_graphs.py). Nothing is captured on the CPU."""

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_space_gib <= 0:
            raise ValueError("kv_cache_space_gib must be positive")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        _ = self.torch_dtype  # raises for an unknown dtype
        if self.quantization in _RETIRED:
            raise ValueError(f"quantization {self.quantization}: {_RETIRED[self.quantization]}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be {', '.join(QUANTIZATIONS)}; "
                             f"got {self.quantization!r}")
        if self.quantization == "gguf" and self.device != "cpu":
            raise ValueError(f"quantization {self.quantization} runs on the CPU only")

    @property
    def torch_dtype(self) -> torch.dtype:
        name = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if name == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        if name not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        return DTYPES[name]

    @property
    def keep_gguf_quantization(self) -> bool:
        """Whether the model keeps a GGUF file's quantized matrices (see `quantization`)."""
        if self.quantization == "auto":
            return self.dtype == "auto" and self.device == "cpu"
        return self.quantization == "gguf"

    def model_dtype(self, quantized: bool) -> torch.dtype:
        """The activations' dtype for a model that does (or does not) keep a GGUF's blocks: the
        block kernels take bfloat16, so such a model under dtype auto runs in bfloat16."""
        if quantized and DTYPE_ALIASES.get(self.dtype, self.dtype) == "auto":
            return torch.bfloat16
        return self.torch_dtype
