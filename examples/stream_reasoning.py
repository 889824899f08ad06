"""Stream an answer, printing a reasoning model's thinking apart from its answer.

Reasoning models served with a reasoning parser put their thinking in `delta.reasoning`
and the answer in `delta.content`; other models only ever fill `delta.content`.

    rillm serve MODEL --reasoning-parser qwen3      # or deepseek_r1
    python examples/stream_reasoning.py "Is 97 a prime number?"

The default model (SmolLM2) does not think on its own. `--demo` makes it: the output is
constrained to `<think>…</think>answer` with a regex (structured outputs), so a server
started with `--reasoning-parser qwen3` streams both parts.
"""

import os
import sys

from openai import OpenAI

client = OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
    base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
)
model = client.models.list().data[0].id
args = [arg for arg in sys.argv[1:] if arg != "--demo"]
question = args[0] if args else "Is 97 a prime number?"
extra_body = {}
if "--demo" in sys.argv:
    extra_body["structured_outputs"] = {"regex": r"<think>[^<>]{20,160}</think>[^<>]{1,300}"}

in_reasoning = False
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    stream=True,
    max_tokens=200,
    extra_body=extra_body,
)
for chunk in stream:
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    reasoning = getattr(delta, "reasoning", None)
    if reasoning:
        if not in_reasoning:
            print("[reasoning] ", end="")
            in_reasoning = True
        print(reasoning, end="", flush=True)
    if delta.content:
        if in_reasoning:
            print("\n[answer] ", end="")
            in_reasoning = False
        print(delta.content, end="", flush=True)
print()
