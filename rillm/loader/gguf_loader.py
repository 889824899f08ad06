"""Load a llama.cpp GGUF file: metadata to config, matrices as the file's blocks and as float32
Hugging Face weights dequantized when looked up (a matrix the model keeps as blocks never is)."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace

import gguf
import numpy as np
import torch

from rillm.arch_config import ModelArchConfig, gemma3_layer_types
from rillm.loader.errors import ModelLoadError
from rillm.loader.gguf_blocks import SUPPORTED_TYPES, GGUFBlocks, dequantize_blocks
from rillm.loader.gguf_file import GGUFFile, GGUFFormatError, GGUFTensor
from rillm.loader.gguf_metadata import GGUFMetadata
from rillm.loader.gguf_rope import rope_scaling_from_gguf
from rillm.loader.loaded_model import LoadedModel
from rillm.loader.tokenizer import chat_template_of, load_gguf_tokenizer
from rillm.loader.weight_layout import check_weights

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
"""`general.architecture` values we load. Mistral models are written as "llama" by llama.cpp."""

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GEMMA3_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",  # Llama's post-attention norm
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")
_GEMMA_END_OF_TURN = "<end_of_turn>"
"""Gemma's instruct models end a turn with it; the files name only <eos> as EOS."""
_ROPE_FREQS = "rope_freqs.weight"


def load_gguf(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a GGUF file of a supported architecture: its block matrices as stored (views of
    the file's memory map), every tensor as float32 on demand.

    Raises ModelLoadError naming the file for a corrupt or truncated file, an unsupported
    architecture or tensor type, or tensors that do not match the metadata.
    """
    path = os.fspath(path)
    reader = _open(path)
    meta = GGUFMetadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            path, f"unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    gemma = arch == "gemma3"
    config = _read_config(meta, arch, tensors)
    quantized = _read_blocks(config, tensors)
    weights = _read_weights(path, config, tensors, quantized)
    check_weights(weights.shapes, config, path)
    tokenizer = load_gguf_tokenizer(path)
    end_of_turn = tokenizer.convert_tokens_to_ids(_GEMMA_END_OF_TURN) if gemma else None
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        config = replace(config, eos_token_ids=tuple(dict.fromkeys(
            (*config.eos_token_ids, end_of_turn))))
    chat_template = chat_template_of(tokenizer) or meta.get("tokenizer.chat_template")
    return LoadedModel(config, weights, tokenizer, chat_template, path, quantized)


def _open(path: str) -> GGUFFile:
    if not os.path.isfile(path):
        raise ModelLoadError(path, "no such file")
    try:
        return GGUFFile(path)
    except (GGUFFormatError, OSError) as exc:
        raise ModelLoadError(path, f"not a valid GGUF file (corrupt or truncated?): {exc}") from exc


def _read_config(
    meta: GGUFMetadata, arch: str, tensors: dict[str, GGUFTensor]
) -> ModelArchConfig:
    hidden = meta.require_int(f"{arch}.embedding_length")
    heads = meta.require_int(f"{arch}.attention.head_count")
    head_dim = meta.get_int(f"{arch}.attention.key_length", hidden // heads)
    rotary_dim = meta.get_int(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ModelLoadError(
            meta.path, f"partial rotary embedding ({rotary_dim} of {head_dim} dims) is unsupported"
        )
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelLoadError(meta.path, "tensor 'token_embd.weight' is missing")
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    layers = meta.require_int(f"{arch}.block_count")
    gemma = arch == "gemma3"
    # Llama 3.1+ files carry their rope scaling as this tensor instead of as metadata.
    rope_freqs = tensors.get(_ROPE_FREQS)
    freq_divisors = None if rope_freqs is None else _dequantize(meta.path, rope_freqs)
    return ModelArchConfig(
        architecture=arch,
        # The embedding, not the token list, decides: some files pad the matrix past the vocabulary.
        vocab_size=int(embedding.shape[-1]),
        hidden_size=hidden,
        intermediate_size=meta.require_int(f"{arch}.feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=meta.get_int(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        max_position_embeddings=meta.require_int(f"{arch}.context_length"),
        rope_scaling=rope_scaling_from_gguf(meta, arch, freq_divisors, rope_theta, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm=arch in ("qwen3", "gemma3"),
        sliding_window=meta.get(f"{arch}.attention.sliding_window"),
        # llama.cpp's Gemma 3: local layers but every sixth, local RoPE base 10k, scores scaled
        # by head_dim^-1/2 (by (hidden / heads)^-1/2 in the 27B model, 62 layers).
        layer_types=gemma3_layer_types(layers) if gemma else None,
        rope_local_theta=10000.0 if gemma else None,
        query_pre_attn_scalar=(hidden / heads if layers == 62 else head_dim) if gemma else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_token_ids(meta),
    )


def _eos_token_ids(meta: GGUFMetadata) -> tuple[int, ...]:
    # llama.cpp ends generation on any end-of-generation token, not only EOS: chat models often
    # mark the end of a turn (Llama 3's <|eot_id|>) or of a tool call separately.
    keys = (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    )
    ids = (meta.get(key) for key in keys)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


class LazyWeights(Mapping[str, torch.Tensor]):
    """Tensors by name, each made (dequantized) when looked up and not kept: a model built
    from a GGUF takes every tensor once, and those it keeps as blocks never."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]],
                 shapes: dict[str, tuple[int, ...]]) -> None:
        self._makers, self.shapes = makers, shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def __contains__(self, name: object) -> bool:
        return name in self._makers  # Mapping's would make the tensor to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


def _read_weights(
    path: str, config: ModelArchConfig, tensors: dict[str, GGUFTensor],
    blocks: dict[str, GGUFBlocks],
) -> LazyWeights:
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for gguf_name, tensor in tensors.items():
        if gguf_name == _ROPE_FREQS:
            continue  # already folded into config.rope_scaling
        name = _hf_name(gguf_name, config.architecture)
        if name is None:
            raise ModelLoadError(path, f"unexpected tensor {gguf_name!r} for {config.architecture}")
        shapes[name] = tuple(int(d) for d in reversed(tensor.shape))
        if name in blocks:  # rows already in Hugging Face order
            makers[name] = functools.partial(dequantize_blocks, blocks[name])
            continue
        values = _dequantize(path, tensor)  # small (norms), or a type rillm does not keep
        if config.architecture == "llama":
            values = _unpermute_rotary(name, values, config)
        if config.architecture == "gemma3" and name.endswith("norm.weight"):
            values = values - np.float32(1)  # stored as 1 + w; the model (and HF) hold w
        makers[name] = functools.partial(torch.from_numpy, values)
    return LazyWeights(makers, shapes)


def _read_blocks(
    config: ModelArchConfig, tensors: dict[str, GGUFTensor]
) -> dict[str, GGUFBlocks]:
    """The matrices stored in a block format rillm keeps (SUPPORTED_TYPES), undequantized."""
    blocks: dict[str, GGUFBlocks] = {}
    for gguf_name, tensor in tensors.items():
        name = _hf_name(gguf_name, config.architecture)
        if name is None or tensor.tensor_type.name not in SUPPORTED_TYPES \
                or len(tensor.shape) != 2:
            continue
        rows, cols = (int(d) for d in reversed(tensor.shape))
        data = np.asarray(tensor.data).reshape(rows, -1)
        if config.architecture == "llama":
            data = _unpermute_rotary(name, data, config)
        blocks[name] = GGUFBlocks(tensor.tensor_type.name, data, (rows, cols))
    return blocks


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    table = _GEMMA3_BLOCK_TENSORS if arch == "gemma3" else _BLOCK_TENSORS
    match = _BLOCK_NAME.fullmatch(gguf_name)
    if match is None or match.group(2) not in table:
        return None
    return f"model.layers.{match.group(1)}.{table[match.group(2)]}"


def _dequantize(path: str, tensor: GGUFTensor) -> np.ndarray:
    """The tensor as an owned float32 array in HF layout (`[out, in]` for a matrix)."""
    # GGUF lists dimensions fastest-first, so [in, out] there is [out, in] here.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelLoadError(
            path, f"tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}"
        ) from exc
    # Copy: F32 data comes back as a view of the read-only memory map.
    return np.array(values, dtype=np.float32).reshape(shape)


def _unpermute_rotary(name: str, values: np.ndarray, config: ModelArchConfig) -> np.ndarray:
    """Undo llama.cpp's reordering of Llama's Q and K rows.

    Hugging Face Llama rotates the first half of each head against the second half; llama.cpp
    rotates adjacent pairs, so its converter interleaves each head's two halves (row j of the
    first half goes to 2j, row j of the second half to 2j + 1). Putting the rows back is what lets
    one rotary implementation serve both formats. Qwen files are written without this reordering.
    """
    if ".self_attn.q_proj." in name:
        heads = config.num_attention_heads
    elif ".self_attn.k_proj." in name:
        heads = config.num_key_value_heads
    else:
        return values
    rows = values.shape[0]
    per_head = values.reshape(heads, rows // heads // 2, 2, *values.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(values.shape)
