"""A preallocated KV cache in which every batch row writes at its own positions.

transformers' `StaticCache` writes all rows of a batch at the same cache positions, so rows that advance by
different amounts (each accepts its own number of drafted tokens) would leave holes that must be masked for the
rest of the generation, and the cache would grow by the widest row's feed at every step. Here instead the cache
column of a token *is* its position in its own row: a forward writes row `b`'s fed tokens at the columns the
decoder names (`RowSlots.write`, `[batch, fed]`), and rolling a row back after a rejected draft is only moving
that row's length: stale columns past it are never attended (the decoder's attention mask stops at each query's
own position) and are overwritten by the next forward. Padding rows of a ragged batch write to the last column,
which no real query can reach.

Allocated once for `batch x (longest prompt + max_new_tokens + the widest feed)`; shapes and addresses never
change, so a decode step can be captured by `torch.compile` / CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class RowSlots:
    """Where the next forward writes (`write[b, j]`: the column of row `b`'s fed token `j`) and how many columns
    it reads (`kv_len`, a prefix of the allocation: eager decoding reads no more than the longest row needs)."""

    write: torch.Tensor
    kv_len: int
    max_len: int = field(default=0)
    rows: int | None = None  # rows allocated (None: the first forward's); a forward may feed the first few only


class _RowLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False

    def __init__(self, slots: RowSlots):
        super().__init__()
        self.slots = slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads = key_states.shape[1]
        shape = (self.slots.rows or key_states.shape[0], heads, self.slots.max_len)
        self.keys = key_states.new_zeros((*shape, key_states.shape[-1]))
        self.values = value_states.new_zeros((*shape, value_states.shape[-1]))
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True
        # CUDA graphs (compiled decoding on a GPU) write tensors in place only at addresses marked as fixed, and the
        # marking must happen outside compiled code: the decoder's first forward on a new cache runs eagerly.
        # Unguarded: a new cache makes CUDA graphs record the step again rather than dynamo recompile it.
        torch._dynamo.mark_static_address(self.keys, guard=False)
        torch._dynamo.mark_static_address(self.values, guard=False)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows = key_states.shape[0]  # the first rows of the cache: a server's idle rows at the end are not fed
        index = self.slots.write[:, None, :, None]
        self.keys[:rows].scatter_(2, index.expand_as(key_states), key_states)
        self.values[:rows].scatter_(2, index.expand_as(value_states), value_states)
        n = self.slots.kv_len
        return self.keys[:rows, :, :n], self.values[:rows, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.kv_len, 0

    def get_seq_length(self) -> int:
        return self.slots.kv_len

    def get_max_length(self) -> int:
        return self.slots.max_len

    def reset(self) -> None:  # the decoder owns the lengths; nothing to clear
        pass


class RowCache(Cache):
    """One `_RowLayer` per decoder layer, all reading the same `RowSlots`."""

    def __init__(self, num_layers: int, max_len: int, device: torch.device, rows: int | None = None):
        self.slots = RowSlots(write=torch.zeros(1, 1, dtype=torch.long, device=device), kv_len=1, max_len=max_len,
                              rows=rows)
        super().__init__(layers=[_RowLayer(self.slots) for _ in range(num_layers)])
