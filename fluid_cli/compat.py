"""Version-sensitive transformers calls, wrapped in one place.

transformers 5.x changes APIs between minor versions; the supported range is pinned in pyproject.toml and
every call whose meaning moved lives here.
"""

from __future__ import annotations

import inspect

from torch.nn import Module
from transformers import Cache


def cache_length(cache: Cache) -> int:
    """Number of tokens held in the cache."""
    return int(cache.get_seq_length())


def crop_cache(cache: Cache, keep: int) -> None:
    """Drop cached tokens so that exactly `keep` remain.

    `DynamicCache.crop(n)` with a positive `n` meant "keep n" in 5.17 and raises from 5.2x on; `crop(-m)`,
    "drop the last m", means the same in both, so that is the only form used.
    """
    drop = cache_length(cache) - keep
    if drop < 0:
        raise ValueError(f"cannot keep {keep} tokens of a cache holding {cache_length(cache)}")
    if drop:
        cache.crop(-drop)


def cache_kwarg(decoder: Module) -> str:
    """The keyword under which `decoder.forward` takes its KV cache.

    transformers renamed `past_key_values` to `cache` (the old name still works from 5.2x on, with a
    deprecation warning on every model class), so the name is read off the signature.
    """
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
