"""The default model's greedy tokens against transformers on one device, and batch invariance.

    python -m bench.device_parity --device cuda [--model FILE.gguf] [--json FILE]

The checks tests/engine/test_engine_parity.py makes on the CPU, for any device (the CUDA
path is run by bench/cuda_check.sh on a lent GPU):
- float32 (the GGUF dequantized): rillm's 64 greedy tokens for 5 chat questions equal
  transformers' on the same device, token for token (exit 1 otherwise);
- bfloat16: how many leading tokens agree with transformers in bfloat16 (reported, not held:
  two bfloat16 implementations may round a close call differently);
- float32 batch invariance: 3 requests give the same tokens alone and in a batch of 16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.loader import default_model_path, load_model
from rillm.sampling_params import SamplingParams
from tests.engine.helpers import chat_ids, run
from tests.engine.test_engine_parity import QUESTIONS, mixed_prompts

TOKENS = 64


def reference_tokens(path: str, device: str, dtype: torch.dtype, prompts: dict[str, list[int]],
                     eos: int) -> dict[str, list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path), dtype=dtype)
    model = model.to(device).eval()
    tokens = {}
    for name, ids in prompts.items():
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=TOKENS,
                                 min_new_tokens=TOKENS, do_sample=False, pad_token_id=eos)
        tokens[name] = out[0, len(ids):].tolist()
    del model
    return tokens


def ours(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    return {name: list(out.outputs[0].token_ids) for name, out in run(engine, prompts,
                                                                      params).items()}


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens that agree."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="the GGUF (default: the installed one)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    path = args.model or default_model_path()
    loaded = load_model(path)
    tokenizer = loaded.tokenizer
    prompts = {f"q{i}": chat_ids(tokenizer, q) for i, q in enumerate(QUESTIONS)}
    eos = tokenizer.eos_token_id
    results: dict[str, object] = {"device": args.device, "model": os.path.basename(path)}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(args.device)

    started = time.perf_counter()
    exact = LLMEngine(EngineConfig(model=path, device=args.device, dtype="float32",
                                   quantization="none"), loaded=loaded)
    got = ours(exact, prompts)
    expected = reference_tokens(path, args.device, torch.float32, prompts, eos)
    float32 = {name: got[name] == expected[name] for name in prompts}
    results["float32_greedy_equal"] = float32

    mixed = mixed_prompts(tokenizer, 16)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batch = run(exact, mixed, params)
    invariant = {}
    for target in ("p0", "p4", "p9"):
        alone = run(exact, {"alone": mixed[target]}, params)["alone"]
        invariant[target] = alone.outputs[0].token_ids == batch[target].outputs[0].token_ids
    results["float32_batch_invariant"] = invariant
    del exact

    half = LLMEngine(EngineConfig(model=path, device=args.device, dtype="bfloat16",
                                  quantization="none"), loaded=loaded)
    got16 = ours(half, prompts)
    expected16 = reference_tokens(path, args.device, torch.bfloat16, prompts, eos)
    results["bfloat16_agreeing_tokens"] = {name: agreement(got16[name], expected16[name])
                                           for name in prompts}
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if all(float32.values()) and all(invariant.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
