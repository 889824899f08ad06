"""rillm: an LLM inference engine and OpenAI-compatible streaming server."""

from rillm.outputs import CompletionOutput, Logprob, RequestOutput
from rillm.sampling_params import SamplingParams
from rillm.structured_outputs import StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams",
           "StructuredOutputsParams", "__version__"]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and the model code; `import rillm` for SamplingParams stays light.
    if name == "LLM":
        from rillm.engine.offline import LLM

        return LLM
    raise AttributeError(f"module 'rillm' has no attribute {name!r}")
