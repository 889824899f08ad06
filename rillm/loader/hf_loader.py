"""Load a Hugging Face model directory: config.json, *.safetensors and the saved tokenizer."""

from __future__ import annotations

import glob
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rillm.loader.errors import ModelLoadError
from rillm.loader.hf_config import read_hf_config
from rillm.loader.loaded_model import LoadedModel
from rillm.loader.tokenizer import chat_template_of, load_hf_tokenizer
from rillm.loader.weight_layout import check_weights

# Buffers some older checkpoints saved alongside the parameters; recomputed by the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a Llama/Mistral/Qwen2/Qwen3 checkpoint saved by `save_pretrained`.

    Weights keep the safetensors files' dtype. Raises ModelLoadError naming the file at fault for
    a missing or bad config.json, no or unreadable safetensors, or missing/mis-shaped tensors.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelLoadError(path, "not a directory")
    config = read_hf_config(path)
    weights = _read_safetensors(path)
    if config.tie_word_embeddings:
        # Some checkpoints save the tied head anyway; the contract is that it is absent.
        weights.pop("lm_head.weight", None)
    check_weights({name: t.shape for name, t in weights.items()}, config, path)
    tokenizer = load_hf_tokenizer(path)
    return LoadedModel(config, weights, tokenizer, chat_template_of(tokenizer), path)


def _read_safetensors(directory: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(glob.escape(directory), "*.safetensors")))
    if not files:
        raise ModelLoadError(directory, "no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            shard = load_file(file, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(file, f"cannot read safetensors: {exc}") from exc
        for name, tensor in shard.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name in weights:
                raise ModelLoadError(file, f"tensor {name!r} also appears in another shard")
            weights[name] = tensor
    return weights
