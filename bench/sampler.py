"""What a decode step of a big-vocabulary model spends outside the layers: the lm_head matmul
and the sampler, beside the whole step, at several batch sizes.

    python -m bench.sampler --model gemma3-270m --batch 1 8 32

The logits are the model's own (a fixed text's positions, so their spread is a real model's:
what top_p's candidate set depends on). Reported per step, milliseconds (median of --repeats):
the whole greedy decode step (engine.step with B running requests), the lm_head alone, and the
sampler under each setting a client sends.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from bench.perplexity import DEFAULT_TEXT, logits_of
from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.loader import load_model
from rillm.sampling_params import SamplingParams
from rillm.worker.sampler import Sampler
from rillm.worker.sampling_batch import SamplingBatch

SETTINGS = {
    "greedy": SamplingParams(temperature=0),
    "temperature 0.8": SamplingParams(temperature=0.8),
    "top_k 40": SamplingParams(temperature=0.8, top_k=40),
    "top_p 0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "top_k 40 + top_p 0.95": SamplingParams(temperature=0.8, top_k=40, top_p=0.95),
    "min_p 0.05": SamplingParams(temperature=0.8, min_p=0.05),
}


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def step_ms(engine: LLMEngine, batch: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=repeats + 8, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(100, 20000, (64,), generator=generator).tolist()
        engine.add_request(f"s{batch}-{i}", prompt, params)
    engine.step()  # the prefills
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    loaded = load_model(args.model)
    engine = LLMEngine(EngineConfig(max_num_batched_tokens=4096), loaded=loaded)
    vocab = loaded.config.vocab_size
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        tokens = loaded.tokenizer(f.read())["input_ids"]
    text_logits = logits_of(engine, tokens, 256).float()
    lm_head = engine.runner.model.lm_head
    hidden = loaded.config.hidden_size
    sampler = Sampler(engine.kernels.argmax)
    print(f"{args.model}: vocabulary {vocab}, hidden {hidden}, {torch.get_num_threads()} threads")
    header = ["B", "decode step", "lm_head", *SETTINGS]
    print(" | ".join(header))
    for batch in args.batch:
        rows = text_logits[torch.linspace(0, len(tokens) - 1, batch).long()].contiguous()
        x = torch.randn(batch, hidden, dtype=engine.dtype)
        cells = [str(batch), f"{step_ms(engine, batch, args.repeats):.2f}",
                 f"{median_ms(lambda x=x: lm_head(x), args.repeats):.2f}"]
        for params in SETTINGS.values():
            sampling = SamplingBatch.build([params] * batch, list(range(batch)),
                                           [[1]] * batch, [[]] * batch,
                                           loaded.config.eos_token_ids, vocab, "cpu")
            cells.append(f"{median_ms(lambda s=sampling, r=rows: sampler(r, s), args.repeats):.2f}")
        print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
