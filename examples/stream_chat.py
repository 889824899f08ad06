"""Stream a chat answer from rillm (or any OpenAI-compatible server) as it is generated.

    rillm serve &                       # in another terminal
    python examples/stream_chat.py "Why is the sky blue?"
"""

import os
import sys

from openai import OpenAI

client = OpenAI(
    api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
    base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
)
model = client.models.list().data[0].id
question = sys.argv[1] if len(sys.argv) > 1 else "Write a haiku about rivers."

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    max_tokens=400,  # without it, a model that rambles may go on to its context length
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content is not None:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
