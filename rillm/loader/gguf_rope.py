"""RoPE scaling of a GGUF file, rewritten as the Hugging Face `rope_scaling` dict it came from."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rillm.loader.errors import ModelLoadError
from rillm.loader.gguf_metadata import GGUFMetadata

# Llama 3.x were trained at this context before their rope was stretched. Only the ratios
# original_context / {low,high}_freq_factor matter, so the choice cannot change the frequencies;
# it only makes the recovered factors come out as the familiar 1.0 and 4.0.
_LLAMA3_ORIGINAL_CONTEXT = 8192


def rope_scaling_from_gguf(
    meta: GGUFMetadata,
    arch: str,
    rope_freqs: np.ndarray | None,
    rope_theta: float,
    head_dim: int,
) -> dict[str, Any] | None:
    """The `rope_scaling` dict for a file's `{arch}.rope.scaling.*` keys and `rope_freqs` tensor.

    None means plain RoPE. Raises ModelLoadError for a scaling llama.cpp can express and the
    rest of rillm cannot.
    """
    kind = meta.get(f"{arch}.rope.scaling.type")
    if rope_freqs is not None:
        if kind not in (None, "none"):
            raise ModelLoadError(
                meta.path, f"both rope_freqs and rope scaling type {kind!r} are set"
            )
        original = meta.get(
            f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT
        )
        return llama3_rope_scaling(meta.path, rope_freqs, rope_theta, head_dim, original)
    if kind is None:
        # Files older than the rope.scaling.* keys wrote only a linear factor.
        linear = meta.get(f"{arch}.rope.scale_linear")
        if linear is None or linear == 1.0:
            return None
        return {"rope_type": "linear", "factor": float(linear)}
    if kind == "none":
        return None
    factor = float(meta.require(f"{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        optional = {
            "original_max_position_embeddings": f"{arch}.rope.scaling.original_context_length",
            "beta_fast": f"{arch}.rope.scaling.yarn_beta_fast",
            "beta_slow": f"{arch}.rope.scaling.yarn_beta_slow",
        }
        scaling.update({hf: meta.get(key) for hf, key in optional.items() if key in meta})
        return scaling
    raise ModelLoadError(meta.path, f"unsupported rope scaling type {kind!r}")


def llama3_rope_scaling(
    path: str, rope_freqs: np.ndarray, rope_theta: float, head_dim: int, original_context: int
) -> dict[str, Any]:
    """Recover Llama 3's rope_scaling parameters from llama.cpp's per-frequency divisors.

    llama.cpp does not store Llama 3's `factor`, `low_freq_factor` and `high_freq_factor`; its
    converter bakes them into `rope_freqs`, one divisor per rotary frequency: 1 for short
    wavelengths, `factor` for long ones, and in between `1 / ((1 - s) / factor + s)` where the
    blend `s` is linear in 1 / wavelength. So `factor` is the largest divisor, and a line fitted
    through the blends of the in-between frequencies gives the two freq factors.
    """
    divisors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if divisors.size != head_dim // 2:
        raise ModelLoadError(
            path, f"rope_freqs has {divisors.size} entries, expected head_dim / 2 = {head_dim // 2}"
        )
    factor = float(divisors.max())
    inv_wavelength = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    middle = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if factor <= 1.0 or middle.sum() < 2:
        raise ModelLoadError(path, "rope_freqs does not follow Llama 3's rope scaling")
    blend = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_wavelength[middle], blend, 1)
    # blend = (original_context * inv_wavelength - low) / (high - low)
    low = -intercept * original_context / slope
    high = low + original_context / slope
    scaling = {
        "rope_type": "llama3",
        "factor": _round(factor),
        "low_freq_factor": _round(low),
        "high_freq_factor": _round(high),
        "original_max_position_embeddings": int(original_context),
    }
    if not np.allclose(llama3_divisors(scaling, rope_theta, head_dim), divisors, rtol=1e-4):
        raise ModelLoadError(path, "rope_freqs does not follow Llama 3's rope scaling")
    return scaling


def llama3_divisors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp stores as `rope_freqs` for a Llama 3 rope_scaling dict (float64)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    blend = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - blend) / factor + blend)


def _round(value: float) -> float:
    # rope_freqs is float32: keep six significant digits so 4.0 does not print as 3.9999998.
    return float(f"{value:.6g}")
