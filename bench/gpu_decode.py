"""A decode step against the physical limit, and transformers' static batch on the same device.

    python -m bench.gpu_decode --device cuda [--model FILE.gguf] [--json FILE]

Three measurements, in one process, on one device (meant for a GPU; runs on the CPU too):

1. The limit: a decode step must read every weight it multiplies by at least once, so at c=1
   it takes at least (bytes of the matrices) / (memory bandwidth). The bandwidth is measured
   here (a 1 GiB device copy: read + write), and so is the launch overhead: a graph's replay,
   and the time a tiny kernel costs inside a graph (256 of them replayed) times the kernels a
   decode step launches (counted by the profiler in an eager step).
2. rillm's engine: a 128-token prompt, then decode steps at c=1, timed one by one (the
   median), with CUDA graphs and with `enforce_eager`; and output tokens/s, time to first
   token and time per output token at c=1/8/32/128 (128 in, 128 out, greedy, no EOS), with
   the device memory the engine holds.
3. transformers' `generate` on the same weights (rillm's dequantized tensors loaded into
   transformers' model, dense, in the same dtype): a static batch of C prompts of 128 tokens,
   128 new tokens each; time to first token is its prefill (`max_new_tokens=1`).

rillm's c=1 step is held to 3x the limit plus the step's launch overhead (exit status 1
beyond): the issue's bar, which on a GPU only CUDA graphs reach; the stricter reading (3x the
limit plus one graph launch) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.loader import default_model_path, load_model
from rillm.sampling_params import SamplingParams

INPUT, OUTPUT = 128, 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times[1:])


def graph_replay(device: torch.device, kernels: int) -> float:
    """Seconds of one replay of a graph of `kernels` tiny kernels (0 on the CPU: no graphs)."""
    if device.type != "cuda":
        return 0.0
    x = torch.zeros(1, device=device)
    x.add_(1)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(kernels):
            x.add_(1)
    times = []
    for _ in range(200):
        start = time.perf_counter()
        graph.replay()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernels_per_step(engine: LLMEngine) -> int:
    """Device kernels one eager decode step launches (the profiler's count; 0 on the CPU)."""
    if engine.runner.device.type != "cuda":
        return 0
    from torch.profiler import ProfilerActivity, profile

    (prompt,) = prompts(engine.model_config.vocab_size, 1, seed=3)
    engine.add_request("count", prompt, SamplingParams(temperature=0, max_tokens=3,
                                                       ignore_eos=True))
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def matrix_bytes(engine: LLMEngine) -> int:
    """Bytes of every matrix a decode step multiplies by (the embedding's rows excepted)."""
    total = 0
    for module in engine.runner.model.modules():
        method = getattr(module, "method", None)
        weight = getattr(method, "weight", None)
        if isinstance(weight, torch.Tensor):
            total += weight.numel() * weight.element_size()
    return total


def prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, INPUT), generator=generator).tolist()


def step_times(engine: LLMEngine, steps: int, seed: int) -> list[float]:
    """A prompt prefilled, then the times of `steps` single decode steps."""
    (prompt,) = prompts(engine.model_config.vocab_size, 1, seed)
    engine.add_request("step", prompt, SamplingParams(temperature=0, max_tokens=steps + 1,
                                                      ignore_eos=True))
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()  # reads the sampled token back: the step is done on the device
        times.append(time.perf_counter() - start)
    return times


def engine_level(engine: LLMEngine, concurrency: int, seed: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=OUTPUT, ignore_eos=True)
    first: dict[str, float] = {}
    start = time.perf_counter()
    for i, prompt in enumerate(prompts(engine.model_config.vocab_size, concurrency, seed)):
        engine.add_request(f"c{concurrency}-{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - start)
    wall = time.perf_counter() - start
    ttft = statistics.mean(first.values())
    return {"output_tok_s": concurrency * OUTPUT / wall, "ttft_s": ttft,
            "tpot_ms": 1000 * (wall - ttft) / (OUTPUT - 1)}


def transformers_level(model, device: torch.device, vocab: int, concurrency: int,
                       seed: int) -> dict[str, float]:
    ids = torch.tensor(prompts(vocab, concurrency, seed), device=device)
    mask = torch.ones_like(ids)

    def run(new_tokens: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - start

    run(2)  # warm-up
    ttft = run(1)
    wall = run(OUTPUT)
    return {"output_tok_s": concurrency * OUTPUT / wall, "ttft_s": ttft,
            "tpot_ms": 1000 * (wall - ttft) / (OUTPUT - 1)}


def transformers_model(path: str, loaded, dtype: torch.dtype, device: torch.device):
    """transformers' model of the GGUF's architecture holding rillm's dequantized tensors (the
    GGUF reader of recent transformers keeps the blocks quantized: not the dense baseline)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dict(loaded.weights), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model.to(device).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    path = args.model or default_model_path()
    loaded = load_model(path)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(device)
                                 if device.type == "cuda" else "cpu",
                                 "torch": torch.__version__, "dtype": args.dtype,
                                 "model": os.path.basename(path)}

    bw = bandwidth(device)
    launch = graph_replay(device, 1)
    per_kernel = graph_replay(device, 256) / 256
    config = EngineConfig(model=path, device=args.device, dtype=args.dtype,
                          max_num_seqs=max(args.concurrency), max_model_len=1024,
                          max_num_batched_tokens=max(2048, INPUT * 8))
    engine = LLMEngine(config, loaded=loaded)
    weights = matrix_bytes(engine)
    limit = weights / bw
    print(f"device {report['device']}: copy bandwidth {bw / 1e9:.0f} GB/s, graph launch "
          f"{launch * 1e6:.1f} us; matrices {weights / 2**20:.0f} MiB -> limit "
          f"{limit * 1e6:.1f} us a step", flush=True)

    graphs = statistics.median(step_times(engine, args.steps, seed=1))
    levels = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for concurrency in args.concurrency:
        levels[concurrency] = engine_level(engine, concurrency, seed=10 + concurrency)
        print(f"rillm c={concurrency}: {levels[concurrency]}", flush=True)
    held = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0)
    engine.close()
    del engine
    eager_engine = LLMEngine(replace(config, enforce_eager=True), loaded=loaded)
    eager = statistics.median(step_times(eager_engine, args.steps, seed=1))
    kernels = kernels_per_step(eager_engine)
    eager_engine.close()
    del eager_engine
    bar = 3 * limit + kernels * per_kernel
    strict = 3 * limit + launch
    print(f"rillm c=1 step: {graphs * 1e6:.0f} us ({'graphs' if device.type == 'cuda' else 'cpu'}),"
          f" {eager * 1e6:.0f} us eager; {kernels} kernels a step at {per_kernel * 1e6:.2f} us "
          f"each in a graph; 3x limit + the step's launches = {bar * 1e6:.0f} us, 3x limit + "
          f"one launch = {strict * 1e6:.0f} us", flush=True)

    dtype = EngineConfig(dtype=args.dtype, device=args.device).torch_dtype
    model = transformers_model(path, loaded, dtype, device)
    baseline = {}
    for concurrency in args.concurrency:
        baseline[concurrency] = transformers_level(model, device, loaded.config.vocab_size,
                                                   concurrency, seed=10 + concurrency)
        print(f"transformers c={concurrency}: {baseline[concurrency]}", flush=True)

    report.update(bandwidth_gb_s=bw / 1e9, launch_us=launch * 1e6,
                  kernel_in_graph_us=per_kernel * 1e6, kernels_per_step=kernels,
                  strict_bar_us=strict * 1e6,
                  matrix_mib=weights / 2**20, limit_us=limit * 1e6,
                  step_us_graphs=graphs * 1e6, step_us_eager=eager * 1e6, bar_us=bar * 1e6,
                  engine_peak_mib=held, rillm=levels, transformers=baseline)
    print("\n| c | rillm tok/s | transformers tok/s | rillm TTFT ms | transformers TTFT ms "
          "| rillm TPOT ms | transformers TPOT ms |\n|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        r, t = levels[c], baseline[c]
        print(f"| {c} | {r['output_tok_s']:.0f} | {t['output_tok_s']:.0f} | "
              f"{r['ttft_s'] * 1e3:.1f} | {t['ttft_s'] * 1e3:.1f} | {r['tpot_ms']:.2f} | "
              f"{t['tpot_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if device.type == "cuda" and graphs > bar:
        print(f"FAIL: the c=1 step ({graphs * 1e6:.0f} us) is over 3x the limit plus its "
              "launches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
