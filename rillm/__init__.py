"""rillm: an LLM inference engine and OpenAI-compatible streaming server."""

from rillm.outputs import CompletionOutput, Logprob, RequestOutput
from rillm.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
