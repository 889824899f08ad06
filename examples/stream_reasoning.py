"""Stream an answer, printing a reasoning model's thinking apart from its answer.

Reasoning models served with a reasoning parser put their thinking in `delta.reasoning`
and the answer in `delta.content`; other models only ever fill `delta.content`.

    python examples/stream_reasoning.py "Is 97 a prime number?"
"""

import os
import sys

from openai import OpenAI

client = OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
    base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
)
model = client.models.list().data[0].id
question = sys.argv[1] if len(sys.argv) > 1 else "Is 97 a prime number?"

in_reasoning = False
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    stream=True,
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
