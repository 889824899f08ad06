"""Engines for the benchmarks, one per configuration spec, sharing one loaded model.

A spec is `NAME[@THREADS]`: float32, bfloat16 (dense weights of that dtype) or int4 (a GGUF
file's Q4_1 / Q8_0 matrices kept quantized, float32 activations), int4-bf16 (the default:
bfloat16 activations, rounded to int8 per block of 32 for rillm's gguf_linear),
int4-bf16acts (the default before gguf_linear: the int4 kernel on bfloat16 activations up to
4 rows, packed bfloat16 copies above), int4-bf16-pt (that on PyTorch's kernels alone: no
rillm C++ kernels), int8-bf16 (quantization int8: int4 up to 4 rows, int8 matmuls above);
`@1` or `@2` sets torch's intra-op threads while that engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.loader import LoadedModel
from rillm.model.llama import build_model
from rillm.worker.model_runner import ModelRunner

SPECS = {
    "float32": ("float32", "none"),
    "bfloat16": ("bfloat16", "none"),
    "int4": ("float32", "int4"),
    "int4-bf16": ("bfloat16", "int4"),
    "int4-bf16acts": ("bfloat16", "int4"),
    "int4x-bf16": ("bfloat16", "int4"),
    "int4-bf16-pt": ("bfloat16", "int4"),
    "int8-bf16": ("bfloat16", "int8"),
}
NO_CPU_KERNELS = {"int4-bf16-pt"}
EXACT = {"int4x-bf16"}
"""Specs that use the int4 kernel at every batch size (no dense bfloat16 copy)."""
BF16_ACTIVATIONS = {"int4-bf16acts", "int4x-bf16"}
"""Specs built off gguf_linear (bfloat16 activations into the int4 kernel)."""


@dataclass
class BenchEngine:
    spec: str
    engine: LLMEngine
    threads: int | None

    def activate(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)


def make_engine(spec: str, loaded: LoadedModel, **options: object) -> BenchEngine:
    name, _, threads = spec.partition("@")
    if name not in SPECS:
        raise SystemExit(f"unknown engine spec {spec!r} (known: {', '.join(SPECS)})")
    dtype, quantization = SPECS[name]
    if name in NO_CPU_KERNELS:
        options = {**options, "cpu_kernels": False}
    config = EngineConfig(dtype=dtype, quantization=quantization, **options)  # type: ignore[arg-type]
    engine = LLMEngine(config, loaded=loaded)
    if config.keep_gguf_quantization and (name in BF16_ACTIVATIONS
                                          or not _engine_keeps_quantization(engine)):
        # The engine does not pass the quantized blocks on yet: rebuild its runner with them.
        old = engine.runner
        model = build_model(loaded.config, loaded.weights, engine.dtype, torch.device("cpu"),
                            quantized=loaded.quantized, cpu_kernels=old.cpu_kernels,
                            dense_int8=quantization == "int8",
                            gguf_kernel=name not in BF16_ACTIVATIONS)
        num_blocks = old.caches[0].key.shape[1] // old.block_size
        engine.runner = ModelRunner(model, loaded.config, num_blocks, old.block_size,
                                    engine.dtype, torch.device("cpu"), cpu_kernels=old.cpu_kernels)
    if name in EXACT:
        from rillm.model.int4_linear import Int4Linear

        for module in engine.runner.model.modules():
            if isinstance(module, Int4Linear):
                module.max_int4_rows = 1 << 30
    return BenchEngine(spec, engine, int(threads) if threads else None)


def _engine_keeps_quantization(engine: LLMEngine) -> bool:
    from rillm.model.int4_linear import Int4Linear

    return any(isinstance(m, Int4Linear) for m in engine.runner.model.modules())
