"""Decode attention on its own, as a decode step meets it: one query per sequence, a layer's
cache read after the 29 other layers' caches have pushed it out of the CPU caches.

    PYTHONPATH=. python -m bench.decode_attention --sequences 32 --min-len 129 --max-len 256

Prints µs per layer (the median over rounds of the best of five passes over all layers) for
two block layouts: `random` (blocks anywhere in the cache, as a long-running server's tables
drift to) and `prefill-first` (each sequence's prompt blocks consecutive, its decode blocks
interleaved with the other sequences', as in a fresh server), each with the KV cache as
rillm allocates it (`KVCache`: huge pages where the kernel offers them) and on 4 KiB pages.
To compare two versions of the kernel, run this in each checkout in turn, a few times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rillm.attention import KVCache
from rillm.kernels import load_cpu_kernels

LAYERS, KV_HEADS, GROUP, HEAD_DIM, BLOCK = 30, 3, 3, 64, 16  # SmolLM2-135M


def small_pages(shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed bf16 tensor from calloc (4 KiB pages; no madvise)."""
    raw = np.zeros(shape[:-1] + (shape[-1] * 2,), dtype=np.uint8)
    return torch.from_numpy(raw).view(torch.bfloat16)


def block_tables(kind: str, sequences: int, per_sequence: int, prompt_blocks: int,
                 num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        chosen = torch.randperm(num_blocks, generator=gen)[: sequences * per_sequence]
        return chosen.view(sequences, per_sequence).contiguous()
    tables = torch.zeros(sequences, per_sequence, dtype=torch.long)
    tables[:, :prompt_blocks] = torch.arange(sequences * prompt_blocks).view(sequences, -1)
    decode = torch.arange(sequences * (per_sequence - prompt_blocks)) + sequences * prompt_blocks
    tables[:, prompt_blocks:] = decode.view(-1, sequences).t()
    return tables


def step(caches: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, tables: torch.Tensor,
         lens: torch.Tensor) -> None:
    """Every layer's decode attention, one after another."""
    for key, value in caches:
        torch.ops.rillm.paged_decode_attention(q, key, value, tables, lens, BLOCK,
                                               HEAD_DIM ** -0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=129)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, default=2048, help="cache blocks a layer")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not load_cpu_kernels():
        raise SystemExit("rillm's C++ kernels could not be built (see the log)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.sequences,), generator=gen)
    per_sequence = -(-args.max_len // BLOCK)
    q = torch.randn(args.sequences, KV_HEADS * GROUP, HEAD_DIM, generator=gen).bfloat16()
    layouts = {kind: block_tables(kind, args.sequences, per_sequence, args.min_len // BLOCK,
                                  args.num_blocks, gen) for kind in ("random", "prefill-first")}
    shape = (KV_HEADS, args.num_blocks * BLOCK, HEAD_DIM)
    results: dict[tuple[str, str], list[float]] = {}
    for pages in ("rillm", "4k"):
        caches = []
        for _ in range(LAYERS):
            if pages == "rillm":
                cache = KVCache(args.num_blocks, BLOCK, KV_HEADS, HEAD_DIM, torch.bfloat16,
                                torch.device("cpu"))
                key, value = cache.key, cache.value
            else:
                key, value = small_pages(shape), small_pages(shape)
            key.copy_(torch.randn(shape, generator=gen))
            value.copy_(torch.randn(shape, generator=gen))
            caches.append((key, value))
        for _ in range(args.rounds):
            for kind, tables in layouts.items():
                step(caches, q, tables, lens)
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    step(caches, q, tables, lens)
                    best = min(best, time.perf_counter() - start)
                results.setdefault((kind, pages), []).append(best / LAYERS * 1e6)
        del caches
    megabytes = int(lens.sum()) * KV_HEADS * HEAD_DIM * 2 * 2 / 1e6
    print(f"{args.sequences} sequences, {args.min_len}-{args.max_len} keys, "
          f"{megabytes:.2f} MB of keys and values a layer, {args.threads} threads")
    for (kind, pages), times in results.items():
        print(f"  {kind:13s} {pages:5s} pages: {statistics.median(times):6.0f} µs a layer "
              f"(min {min(times):.0f})")


if __name__ == "__main__":
    main()
