"""The one exception every loader raises for a model it cannot load."""

from __future__ import annotations

import os


class ModelLoadError(Exception):
    """A checkpoint could not be loaded.

    The message always names the file or directory at fault (when there is one) and says what is
    wrong with it, so the CLI and server can show it to the user as is.
    """

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")
