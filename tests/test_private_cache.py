"""The caches rillm loads code and templates from: only this user may have written them."""

from __future__ import annotations

import os

import pytest

from rillm.private_cache import UntrustedCache, private_dir, private_file

OTHER_UID = 65534  # nobody


def test_a_new_cache_is_created_private(tmp_path):
    made = private_dir(tmp_path / "cache" / "rillm" / "kernels")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o757])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(UntrustedCache, match="writable by every user"):
        private_dir(shared / "rillm")


def test_a_sticky_directory_like_tmp_is_trusted(tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert private_dir(sticky / "rillm").is_dir()


def test_a_directory_of_another_users_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedCache, match="another user"):
        private_dir(theirs)


def test_a_link_is_judged_by_where_it_leads(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "cache").symlink_to(shared)
    with pytest.raises(UntrustedCache):
        private_dir(tmp_path / "cache" / "rillm")


def test_cached_files(tmp_path):
    ours = tmp_path / "lib.so"
    ours.write_bytes(b"x")
    ours.chmod(0o644)
    assert private_file(ours) == ours
    link = tmp_path / "link.so"
    link.symlink_to(ours)
    with pytest.raises(UntrustedCache, match="not a regular file"):
        private_file(link)
    ours.chmod(0o646)
    with pytest.raises(UntrustedCache, match="every user"):
        private_file(ours)
    ours.chmod(0o644)
    os.chown(ours, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedCache, match="another user"):
        private_file(ours)
