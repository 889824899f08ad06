"""A Hugging Face directory's generation_config.json: the sampling defaults its authors chose.

vLLM applies them (`--generation-config auto`) to requests that leave a parameter unset; so
does rillm. Only the keys present in the file count (as in vLLM, `do_sample` is not read).
"""

from __future__ import annotations

import json
import os

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "max_new_tokens")


def sampling_defaults(directory: str) -> dict[str, float]:
    """The sampling keys of `directory`/generation_config.json; {} where there is none.
    ValueError where the file is not a JSON object."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    defaults = {key: float(data[key]) for key in SAMPLING_KEYS
                if isinstance(data.get(key), int | float) and not isinstance(data[key], bool)}
    return defaults
