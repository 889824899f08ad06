"""Engines for the benchmarks, one per configuration spec, sharing one loaded model.

A spec is `NAME[@THREADS]`: float32 or bfloat16 (dense weights of that dtype, the exact path),
gguf (the default on a CPU: the file's blocks, bfloat16 activations, rounded to int8 per block
of 32 for rillm's gguf_linear where the CPU has AVX-512 VNNI), gguf-torch (the same file on
PyTorch's kernels alone: `--no-cpu-kernels`, what a CPU without rillm's kernels runs);
`@1` or `@2` sets torch's intra-op threads while that engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.loader import LoadedModel

SPECS: dict[str, dict[str, object]] = {
    "float32": {"dtype": "float32", "quantization": "none"},
    "bfloat16": {"dtype": "bfloat16", "quantization": "none"},
    "gguf": {"quantization": "gguf"},
    "gguf-torch": {"quantization": "gguf", "cpu_kernels": False},
}


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
    config = EngineConfig(**{**SPECS[name], **options})  # type: ignore[arg-type]
    engine = LLMEngine(config, loaded=loaded)
    return BenchEngine(spec, engine, int(threads) if threads else None)
