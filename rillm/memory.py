"""Giving freed memory back to the system.

glibc's malloc keeps the pages of freed blocks for the process: after one request parsed
an 8 MiB body or tokenized a megabyte of emoji, the server's resident memory stays that much
higher with nothing running (the abuse suite grew it by ~40%). `trim()` asks malloc to return
the free pages (malloc_trim(0), every arena); elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

_MIN_INTERVAL = 1.0
"""Seconds between two trims at most once: a trim walks the heap (a few ms for a GiB)."""


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_trim()
_last = 0.0


def trim() -> None:
    """Return malloc's free pages to the system, at most once a second."""
    global _last
    now = time.monotonic()
    if _malloc_trim is None or now - _last < _MIN_INTERVAL:
        return
    _last = now
    _malloc_trim(0)
