"""Offline throughput of the engine: C concurrent requests of P prompt / O output tokens.

    python bench/offline_throughput.py                      # 1, 8 and 32 concurrent, 128/128
    python bench/offline_throughput.py --concurrency 1 32 --dtype bfloat16 --json out.json
    python -m bench.offline_throughput --engines float32 gguf gguf@2 --repeats 3

Each level submits C requests at once (random prompt tokens, ignore_eos so every request
generates exactly O tokens) and steps the engine until all finish. Reported: output tokens/s,
total (prompt + output) tokens/s, time to first token and time per output token (means over
requests). One warm-up request runs first so one-time costs are not counted.

With --engines (specs in bench/engines.py) the configurations run interleaved in one process:
each repeat runs every level on every engine in turn, and the table shows medians over the
repeats, so load from other processes on a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.loader import load_model
from rillm.sampling_params import SamplingParams


def run_level(engine: LLMEngine, concurrency: int, input_len: int, output_len: int,
              seed: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    first_token: dict[str, float] = {}
    finished: dict[str, float] = {}
    for i in range(concurrency):
        prompt = torch.randint(100, vocab, (input_len,), generator=generator).tolist()
        engine.add_request(f"c{concurrency}-{i}", prompt, params)
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        now = time.perf_counter()
        for out in outputs:
            first_token.setdefault(out.request_id, now)
            if out.finished:
                finished[out.request_id] = now
    elapsed = time.perf_counter() - start
    ttft = [first_token[r] - start for r in finished]
    tpot = [(finished[r] - first_token[r]) / (output_len - 1) for r in finished]
    return {
        "concurrency": concurrency,
        "elapsed_s": elapsed,
        "steps": steps,
        "output_tok_s": concurrency * output_len / elapsed,
        "total_tok_s": concurrency * (input_len + output_len) / elapsed,
        "mean_ttft_ms": 1000 * statistics.mean(ttft),
        "mean_tpot_ms": 1000 * statistics.mean(tpot),
    }


def compare(args: argparse.Namespace) -> None:
    from bench.engines import make_engine

    loaded = load_model(args.model)
    engines = [make_engine(spec, loaded, max_num_batched_tokens=args.max_num_batched_tokens)
               for spec in args.engines]
    for e in engines:
        e.activate()
        run_level(e.engine, 1, args.input_len, 8, seed=-1 & 0xFFFF)  # warm-up
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    print(f"load average before: {os.getloadavg()}", flush=True)
    for repeat in range(args.repeats):
        for c in args.concurrency:
            for e in engines:
                e.activate()
                r = run_level(e.engine, c, args.input_len, args.output_len, args.seed + repeat)
                runs.setdefault((e.spec, c), []).append(r)
                print(f"  repeat {repeat} {e.spec:>12} c={c:<3} {r['output_tok_s']:8.1f} tok/s "
                      f"TPOT {r['mean_tpot_ms']:6.1f} ms", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"medians over {args.repeats} interleaved repeats, "
          f"cpu={platform.processor() or platform.machine()}")
    print(f"{'engine':>12} {'conc':>5} {'out tok/s':>10} {'total tok/s':>12} {'TTFT ms':>9} "
          f"{'TPOT ms':>9} {'vs ' + args.engines[0]:>12}")
    results = []
    for c in args.concurrency:
        base = statistics.median(r["output_tok_s"] for r in runs[(args.engines[0], c)])
        for e in engines:
            rs = runs[(e.spec, c)]
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            med["engine"] = e.spec  # type: ignore[assignment]
            results.append(med)
            print(f"{e.spec:>12} {c:>5} {med['output_tok_s']:>10.1f} {med['total_tok_s']:>12.1f} "
                  f"{med['mean_ttft_ms']:>9.0f} {med['mean_tpot_ms']:>9.1f} "
                  f"{med['output_tok_s'] / base:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--engines", nargs="+", default=None,
                        help="compare these configurations interleaved (see bench/engines.py)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.engines:
        compare(args)
        return

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype,
                                    max_num_batched_tokens=args.max_num_batched_tokens))
    run_level(engine, 1, args.input_len, 8, seed=-1 & 0xFFFF)  # warm-up
    results = [run_level(engine, c, args.input_len, args.output_len, args.seed)
               for c in args.concurrency]
    base = results[0]["output_tok_s"]
    print(f"model={engine.model_path} dtype={engine.dtype} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()}")
    print(f"{'conc':>5} {'out tok/s':>10} {'total tok/s':>12} {'TTFT ms':>9} {'TPOT ms':>9} "
          f"{'vs c=' + str(results[0]['concurrency']):>7}")
    for r in results:
        print(f"{r['concurrency']:>5} {r['output_tok_s']:>10.1f} {r['total_tok_s']:>12.1f} "
              f"{r['mean_ttft_ms']:>9.0f} {r['mean_tpot_ms']:>9.1f} "
              f"{r['output_tok_s'] / base:>6.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
