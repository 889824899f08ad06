"""Profile decode steps of the engine: C requests, prefilled, then N decode steps under the
torch profiler. Prints the top operators by self CPU time and the mean step time.

    python -m bench.profile_step --concurrency 1 --engine gguf@1
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engines import make_engine
from rillm.loader import load_model
from rillm.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--engine", default="float32", help="a spec from bench/engines.py")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--by-shape", action="store_true",
                        help="group operators by their input shapes too")
    args = parser.parse_args()
    bench_engine = make_engine(args.engine, load_model(args.model))
    bench_engine.activate()
    engine = bench_engine.engine
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    for i in range(args.concurrency):
        prompt = torch.randint(100, engine.model_config.vocab_size, (args.input_len,),
                               generator=generator).tolist()
        engine.add_request(f"r{i}", prompt, params)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(5):
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"decode step, {args.concurrency} requests: median {1000 * times[len(times) // 2]:.1f} "
          f"ms, min {1000 * times[0]:.1f} ms (threads={torch.get_num_threads()})")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            engine.step()
    averages = prof.key_averages(group_by_input_shape=args.by_shape)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
