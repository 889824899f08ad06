"""Typed access to a GGUF file's key/value metadata, with errors that name the file."""

from __future__ import annotations

from typing import Any

from rillm.loader.errors import ModelLoadError
from rillm.loader.gguf_file import GGUFFile

_MISSING = object()


class GGUFMetadata:
    """The metadata of one open GGUF file.

    Values come back as plain Python objects (int, float, bool, str, or a list of those for
    arrays); `require` turns an absent key into a ModelLoadError naming the file and the key.
    """

    def __init__(self, reader: GGUFFile, path: str) -> None:
        self._reader = reader
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self._reader

    def get(self, key: str, default: Any = None) -> Any:
        return self._reader.get(key, default)

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise ModelLoadError(self.path, f"metadata key {key!r} is missing")
        return value

    def require_int(self, key: str) -> int:
        return self._int(key, self.require(key))

    def get_int(self, key: str, default: int) -> int:
        return self._int(key, self.get(key, default))

    def _int(self, key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            # e.g. a per-layer head_count_kv array, as written for models with varying layers.
            raise ModelLoadError(
                self.path, f"metadata key {key!r} is {value!r}, expected one integer"
            )
        return value
