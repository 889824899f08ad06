"""The paged KV cache: zeroed, committed only as it is written, on huge pages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rillm.attention import KVCache


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc")
def test_cpu_cache_is_zero_committed_as_used_and_asks_for_huge_pages():
    # 24 MiB a tensor: the cache must read as zeros, commit memory only where blocks are written,
    # and (where the kernel offers transparent huge pages) be eligible for them: decode attention
    # reads blocks scattered over the whole cache, and its speed relies on few TLB misses.
    cache = KVCache(4096, 16, 3, 64, torch.bfloat16, torch.device("cpu"))
    address = cache.key.data_ptr()
    assert address % (2 << 20) == 0
    assert not cache.key.any() and not cache.value.any()
    assert int(_mapping_of(address)["Rss"].split()[0]) < 4096  # KiB: untouched, only zero pages
    cache.key[:, :16] = 1.0  # one block of each head
    assert int(_mapping_of(address)["Rss"].split()[0]) <= 3 * 2048 + 4
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert _mapping_of(address)["THPeligible"] == "1"
    assert cache.key.sum().item() == 3 * 16 * 64
