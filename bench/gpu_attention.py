"""The GPU's attention backends side by side: rillm's Triton kernels against PyTorch's gather +
matmul / scaled_dot_product_attention over the same paged cache (SmolLM2-135M's shapes).

    python -m bench.gpu_attention [--device cuda]

Prints the median µs of one layer's attention, each backend building its metadata from the
same sequences (the metadata is built once, as a step does for all its layers) and leaves the
choice to the numbers: the CUDA plan runs Triton for both (rillm/kernels/plan.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rillm.attention import KVCache, PagedAttention, SequenceGroup
from rillm.attention.backends import TorchDecode, TorchPrefill, TritonDecode, TritonPrefill

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16


def timed(fn, device: torch.device, repeats: int = 50) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def case(device: torch.device, batch: int, context: int, queries: int,
         dtype: torch.dtype) -> dict[str, float]:
    blocks_each = -(-context // BLOCK)
    cache = KVCache(batch * blocks_each + 1, BLOCK, KV_HEADS, DIM, dtype, device)
    cache.key.normal_()
    cache.value.normal_()
    order = torch.randperm(batch * blocks_each).view(batch, blocks_each)  # scattered blocks
    num_new = torch.full((batch,), queries)
    starts = torch.full((batch,), context - queries)
    offsets = torch.arange(batch) * queries
    group = SequenceGroup(num_new, starts, offsets, order)
    q = torch.randn(batch * queries, HEADS, DIM, device=device, dtype=dtype)
    slots = torch.zeros(batch * queries, dtype=torch.int64, device=device)
    decode = queries == 1
    torch_name = "torch-gather" if decode else "torch-sdpa"
    pairs = {"triton": PagedAttention(TritonDecode(BLOCK, device), TritonPrefill(BLOCK, device)),
             torch_name: PagedAttention(TorchDecode(BLOCK, dtype, device),
                                        TorchPrefill(BLOCK, device))}
    results = {}
    for name, attention in pairs.items():
        metadata = (attention.build(slots, group, None) if decode
                    else attention.build(slots, None, group))
        results[name] = timed(lambda a=attention, m=metadata: a.forward(
            q, cache, m, DIM**-0.5), device)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print("| step | sequences | keys each | queries each | backend | µs a layer |")
    print("|---|---|---|---|---|---|")
    for batch, context, queries in ((1, 256, 1), (32, 256, 1), (128, 256, 1), (32, 2048, 1),
                                    (1, 128, 128), (8, 128, 128), (4, 1024, 512)):
        kind = "decode" if queries == 1 else "prefill"
        for name, us in case(device, batch, context, queries, dtype).items():
            print(f"| {kind} | {batch} | {context} | {queries} | {name} | {us:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
