"""Prefill attention on its own: a step's prompt chunks against the paged cache, rillm's
kernel (`paged_prefill_attention`) against the path it replaced (gather + masked SDPA).

    PYTHONPATH=. python -m bench.prefill_attention --prompts 8 --prompt-len 128

Prints µs per layer (median and best of 20 calls, each path twice, alternating) and the
largest difference between the two outputs. Both paths run bf16 through
`rillm.attention`'s two prefill backends with the metadata each builds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from rillm.attention import KVCache, PagedAttention, SequenceGroup
from rillm.attention.backends import KernelDecode, KernelPrefill, TorchPrefill
from rillm.kernels import load_cpu_kernels

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M


def timed(fn: Callable[[], torch.Tensor], calls: int = 20) -> list[float]:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--cached", type=int, default=0,
                        help="keys already in the cache before each prompt's chunk")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not load_cpu_kernels():
        raise SystemExit("rillm's C++ kernels could not be built (see the log)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    keys = args.cached + args.prompt_len
    per_prompt = -(-keys // BLOCK)
    num_blocks = args.prompts * per_prompt + 16
    cache = KVCache(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, torch.bfloat16, torch.device("cpu"))
    cache.key.copy_(torch.randn(cache.key.shape, generator=gen))
    cache.value.copy_(torch.randn(cache.value.shape, generator=gen))
    tables = torch.randperm(num_blocks, generator=gen)[: args.prompts * per_prompt]
    tables = tables.view(args.prompts, per_prompt).contiguous()
    query_lens = torch.full((args.prompts,), args.prompt_len)
    starts = torch.full((args.prompts,), args.cached)
    offsets = torch.cumsum(query_lens, 0) - query_lens
    tokens = args.prompts * args.prompt_len
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen).bfloat16()
    paths = {}
    group = SequenceGroup(query_lens, starts, offsets, tables)
    cpu = torch.device("cpu")
    for name, prefill in (("kernel", KernelPrefill(BLOCK, cpu)),
                          ("gather + SDPA", TorchPrefill(BLOCK, cpu))):
        attention = PagedAttention(KernelDecode(BLOCK, cpu), prefill)
        metadata = attention.build(torch.zeros(tokens, dtype=torch.long), None, group)
        paths[name] = (lambda a=attention, m=metadata: a.forward(q, cache, m, HEAD_DIM**-0.5))
    results: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(2):
        for name, fn in paths.items():
            results[name] += timed(fn)
    outputs = [fn().float() for fn in paths.values()]
    print(f"{args.prompts} prompts of {args.prompt_len} tokens after {args.cached} cached, "
          f"{args.threads} threads; max |difference| {(outputs[0] - outputs[1]).abs().max():.4f}")
    for name, times in results.items():
        print(f"  {name:14s} {statistics.median(times) * 1e6:7.0f} µs a layer "
              f"(min {min(times) * 1e6:.0f})")


if __name__ == "__main__":
    main()
