"""Stream a chat answer and collect it into one string, with the finish reason and usage.

    python examples/collect_stream.py "Name three rivers."
"""

import os
import sys

from openai import OpenAI

client = OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
    base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
)
model = client.models.list().data[0].id
question = sys.argv[1] if len(sys.argv) > 1 else "Name three rivers."

parts = []
finish_reason = None
usage = None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    max_tokens=200,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    if not chunk.choices:
        continue
    choice = chunk.choices[0]
    if choice.delta.content:
        parts.append(choice.delta.content)
    if choice.finish_reason is not None:
        finish_reason = choice.finish_reason

answer = "".join(parts)
print(answer)
print(f"[finish_reason={finish_reason} prompt_tokens={usage.prompt_tokens} "
      f"completion_tokens={usage.completion_tokens}]")
