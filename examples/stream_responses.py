"""Stream an answer through the Responses API (what agents and coding tools speak), printing
text as it arrives and a line for each output item as it completes.

    rillm serve &                       # in another terminal
    python examples/stream_responses.py "Why is the sky blue?"
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

stream = client.responses.create(
    model=model,
    instructions="Answer in a few sentences.",
    input=question,
    max_output_tokens=300,
    stream=True,
)
for event in stream:
    if event.type == "response.output_text.delta":
        print(event.delta, end="", flush=True)
    elif event.type == "response.output_item.done":
        print(f"\n[{event.item.type} {event.item.status}]")
    elif event.type in ("response.completed", "response.incomplete"):
        usage = event.response.usage
        print(f"[{event.response.status}: {usage.input_tokens} tokens in, "
              f"{usage.output_tokens} out]")
