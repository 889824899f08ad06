"""Attention over the paged KV cache: the cache, the backends and the layer models call."""

from rillm.attention.backends import AttentionMetadata, PagedAttention, SequenceGroup
from rillm.attention.kv_cache import KVCache
from rillm.attention.layer import Attention, apply_rotary

__all__ = ["Attention", "AttentionMetadata", "KVCache", "PagedAttention", "SequenceGroup",
           "apply_rotary"]
