"""Stream an answer with Anthropic's SDK (what tools built for Claude speak): rillm serves the
Messages API at the same address as the OpenAI one.

    rillm serve &                       # in another terminal
    python examples/stream_anthropic.py "Why is the sky blue?"
"""

import os
import sys

import anthropic

client = anthropic.Anthropic(
    api_key=os.environ.get("ANTHROPIC_API_KEY", "EMPTY"),
    base_url=os.environ.get("ANTHROPIC_BASE_URL", "http://localhost:8000"),
)
model = client.models.list().data[0].id
question = sys.argv[1] if len(sys.argv) > 1 else "Write a haiku about rivers."

with client.messages.stream(
    model=model,
    max_tokens=300,  # required by the Messages API
    system="Answer in a few sentences.",
    messages=[{"role": "user", "content": question}],
) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
    message = stream.get_final_message()
print(f"\n[{message.stop_reason}: {message.usage.input_tokens} tokens in, "
      f"{message.usage.output_tokens} out]")
