"""The kernel library is code the server loads: it is taken from the cache only where no other
user can have put it there."""

from __future__ import annotations

from rillm.kernels import library_path

NAME = "rillm_kernels_0123456789abcdef.so"


def test_the_cache_holds_the_library(tmp_path):
    cache = tmp_path / "kernels"
    assert library_path(cache, NAME) == cache / NAME
    assert cache.stat().st_mode & 0o777 == 0o700


def test_a_library_in_a_cache_others_can_write_is_not_taken(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / NAME).write_bytes(b"planted")
    chosen = library_path(shared, NAME)
    assert chosen.name == NAME and chosen.parent != shared and not chosen.exists()
    assert chosen.parent.stat().st_mode & 0o777 == 0o700


def test_a_linked_library_is_not_taken(tmp_path):
    cache = tmp_path / "kernels"
    cache.mkdir(mode=0o700)
    (tmp_path / "elsewhere.so").write_bytes(b"planted")
    (cache / NAME).symlink_to(tmp_path / "elsewhere.so")
    chosen = library_path(cache, NAME)
    assert chosen.parent != cache and not chosen.exists()
