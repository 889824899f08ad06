"""Caches rillm trusts: directories and files under ~/.cache that no other user can have written.

rillm loads what it caches there — a compiled kernel library (code run in the server process)
and tokenizers (with the chat template, run on every request). A directory another user can
write to, on the way to the cache or the cache itself, lets that user plant a library or a
template (a shared or mis-set home, an XDG cache on /tmp). So, as OpenSSH does for
authorized_keys, every directory from the root down to the cache must belong to this user or
root and be writable by no one else (a sticky directory such as /tmp excepted: others cannot
replace what is ours there), and a cached file must be a regular file of ours, writable by no
one else. What fails the check is not used: the kernels are built afresh elsewhere, the
tokenizer is read from the model file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UntrustedCache(Exception):
    """A cache directory or file another user could have written; the message says which."""


def private_dir(path: Path) -> Path:
    """`path`, created (mode 0700) where missing, once every directory on its real path is
    one only this user (or root) can write; UntrustedCache where one is not."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    real = Path(os.path.realpath(path))
    for directory in (real, *real.parents):
        _check(directory, os.stat(directory), directory_ok=True)
    return path


def private_file(path: Path) -> Path:
    """`path` where it is a regular file (not a link) of this user's or root's that no one
    else may write; UntrustedCache otherwise (FileNotFoundError where there is none)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedCache(f"{path} is not a regular file")
    _check(path, info, directory_ok=False)
    return path


def _check(path: Path, info: os.stat_result, directory_ok: bool) -> None:
    if info.st_uid not in (os.getuid(), 0):
        raise UntrustedCache(f"{path} belongs to another user (uid {info.st_uid})")
    if directory_ok and info.st_mode & stat.S_ISVTX:
        return  # sticky: others may add entries, not replace or rename ours
    if info.st_mode & stat.S_IWOTH:
        raise UntrustedCache(f"{path} is writable by every user")
    if info.st_mode & stat.S_IWGRP and info.st_gid != os.getgid():
        raise UntrustedCache(f"{path} is writable by group {info.st_gid}, not this user's own")
