"""The block layout and its strictly causal attention mask (METHOD 1.1-1.3). The only place that builds them.

A padded batch `x` (`[B, N]` input ids, HF-style labels with -100 on untrained tokens, a 0/1 padding mask) is
expanded in two steps:

1. `sample_blocks` draws the random plan: which positions are anchors, each block's size `k`, which slots are
   revealed and which revealed slots carry noise. All randomness lives here, drawn from one `torch.Generator`.
2. `expand_batch` lays the plan out deterministically. All `N` main tokens come first (so the main stream is the
   original batch), then each example's blocks in anchor order. Every slot carries its metadata: type (main /
   mask / pad), anchor column, block index and position id; the attention rule of METHOD 1.2 is a function of
   that metadata alone (`allowed_attention`), turned into a dense 4D additive mask for `sdpa`/`eager`.

Worked example (one example, N=4, the last two tokens are the response, K=2)::

    x      = [a, b, c, d]            labels = [-100, -100, c, d]     (c, d are response tokens)
    anchors: i with x_{i+1} a response token -> i in {1, 2}; say both drawn, k=2 at i=1 and k=1 at i=2
    slot:     a    b    c    d  | [M]  [M] | [M]
    column:   0    1    2    3  |  4    5  |  6
    position: 0    1    2    3  |  2    3  |  3
    anchor:   0    1    2    3  |  1    1  |  2
    label:    -    c    d    -  |  d    -  |  -        (slot o of anchor i predicts x_{i+o+1})

The block at anchor 1 sees `a, b` and itself causally, exactly as a plain forward over `a, b, [M], [M]` would.

    >>> import torch
    >>> x = torch.tensor([[10, 11, 12, 13]]); lab = torch.tensor([[-100, -100, 12, 13]]); am = torch.ones_like(x)
    >>> plan = BlockPlan(k=torch.tensor([[0, 2, 1, 0]]), reveal=torch.zeros(1, 4, 2, dtype=torch.bool),
    ...                  noise=torch.full((1, 4, 2), -1))
    >>> ex = expand_batch(x, lab, am, plan, mask_token_id=99)
    >>> ex.input_ids.tolist(), ex.position_ids.tolist(), ex.labels.tolist()
    ([[10, 11, 12, 13, 99, 99, 99]], [[0, 1, 2, 3, 2, 3, 3]], [[-100, 12, 13, -100, 13, -100, -100]])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE = -100
MAIN, MASK_SLOT, PAD_SLOT = 0, 1, 2  # slot types


@dataclass
class BlockPlan:
    """The random choices of one batch: `k[b, i]` is the block size at anchor `i` (0 = no anchor);
    `reveal[b, i, j]` says slot `j+1` of that block shows its true token; `noise[b, i, j]` is the random token
    that replaces a revealed one, or -1 to keep the true token."""

    k: torch.Tensor  # [B, N] long
    reveal: torch.Tensor  # [B, N, K] bool
    noise: torch.Tensor  # [B, N, K] long


@dataclass
class ExpandedBatch:
    """The expanded batch (`L = N + the largest number of mask slots in a row`) and its slot metadata."""

    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], already shifted: slot s predicts labels[b, s]
    position_ids: torch.Tensor  # [B, L]
    slot_type: torch.Tensor  # [B, L] MAIN / MASK_SLOT / PAD_SLOT
    anchor: torch.Tensor  # [B, L] anchor column (own column for main tokens, -1 for padding)
    block: torch.Tensor  # [B, L] block index within the row for mask slots, -1 otherwise
    offset: torch.Tensor  # [B, L] slot number o = 1..k within its block, 0 otherwise
    num_main: int  # N: columns 0..N-1 are the main tokens

    def to(self, device: torch.device | str) -> ExpandedBatch:
        """The same batch with every tensor moved to `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense 4D additive mask `[B, 1, L, L]` (0 where allowed, the dtype's minimum elsewhere)."""
        allowed = allowed_attention(self.slot_type, self.anchor, self.block, self.position_ids)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Keyword arguments for a Hugging Face causal LM forward over the expanded batch."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask(dtype),
        }


def pad_batch(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of `input_ids`/`labels` lists into `[B, N]` tensors with a 0/1 `attention_mask`.

    >>> b = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    >>> b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        m = len(r["input_ids"])
        ids[b, :m] = torch.as_tensor(r["input_ids"])
        labels[b, :m] = torch.as_tensor(r["labels"])
        mask[b, :m] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def allowed_attention(
    slot_type: torch.Tensor, anchor: torch.Tensor, block: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """METHOD 1.2 as a boolean `[B, L, L]` tensor (query rows, key columns).

    A query sees a key iff the key is a main token whose column is <= the query's anchor column, or both are
    mask slots of the same block and the key's position is <= the query's. A padding query sees only itself
    (so softmax never meets an all-masked row); nothing sees padding.
    """
    q_type, k_type = slot_type.unsqueeze(2), slot_type.unsqueeze(1)
    history = (k_type == MAIN) & (anchor.unsqueeze(1) <= anchor.unsqueeze(2)) & (q_type != PAD_SLOT)
    same_block = (
        (q_type == MASK_SLOT)
        & (k_type == MASK_SLOT)
        & (block.unsqueeze(1) == block.unsqueeze(2))
        & (position_ids.unsqueeze(1) <= position_ids.unsqueeze(2))
    )
    eye = torch.eye(slot_type.shape[1], dtype=torch.bool, device=slot_type.device)
    return history | same_block | (eye & (q_type == PAD_SLOT))


def eligible_anchors(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B, N]` bool: position `i` may be an anchor iff it is a real token and `x_{i+1}` is a response token."""
    nxt_trained = torch.zeros_like(attention_mask, dtype=torch.bool)
    nxt_trained[:, :-1] = (labels[:, 1:] != IGNORE) & attention_mask[:, 1:].bool()
    return nxt_trained & attention_mask.bool()


def sample_blocks(
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_k: int,
    p_anchor: float,
    fixed_k: bool = False,
    reveal: bool = True,
    noise: float = 0.1,
    noise_ids: torch.Tensor | None = None,
    max_expanded_len: int | None = None,
    generator: torch.Generator | None = None,
) -> BlockPlan:
    """Draw anchors **per example**, block sizes, reveals and noise for one batch (METHOD 1.1, 1.3).

    `noise_ids` lists the token ids noise may use (non-special tokens); without it no noise is drawn.
    `max_expanded_len` caps `N + slots` per row: when a row's blocks do not fit, a random subset of its
    anchors that fits is kept, so late positions are not starved. The same generator state gives the same plan.
    """
    B, N = labels.shape
    dev = labels.device
    draw = dict(generator=generator, device=dev)
    # Every draw has a fixed shape whatever the options, so a seed means the same thing across settings.
    u_anchor = torch.rand(B, N, **draw)
    k = torch.randint(1, max_k + 1, (B, N), **draw)
    ratio = torch.rand(B, N, 1, **draw)
    u_reveal = torch.rand(B, N, max_k, **draw)
    u_noise = torch.rand(B, N, max_k, **draw)
    n_noise = max(1, len(noise_ids)) if noise_ids is not None else 1
    noise_pick = torch.randint(0, n_noise, (B, N, max_k), **draw)
    priority = torch.rand(B, N, **draw)

    anchors = eligible_anchors(labels, attention_mask) & (u_anchor < p_anchor)
    if fixed_k:
        k = torch.full_like(k, max_k)
    k = torch.where(anchors, k, torch.zeros_like(k))

    if max_expanded_len is not None:
        budget = max_expanded_len - N
        # Visit anchors in random order and keep those whose running total of slots still fits the budget.
        order = torch.argsort(torch.where(anchors, priority, torch.full_like(priority, 2.0)), dim=1)
        running = torch.gather(k, 1, order).cumsum(1)
        keep = torch.zeros_like(anchors).scatter_(1, order, running <= budget)
        k = torch.where(keep, k, torch.zeros_like(k))

    # Slot j (0-based) of the block at i stands for x_{i+j+1}: it can only be revealed if that token exists.
    j = torch.arange(max_k, device=dev)
    target = torch.arange(N, device=dev).view(1, N, 1) + j + 1
    real = attention_mask.bool()
    target_real = torch.gather(real, 1, target.clamp(max=N - 1).view(1, -1).expand(B, -1)).view(B, N, max_k)
    exists = (target < N) & target_real & (j < k.unsqueeze(2))
    revealed = exists & (u_reveal < ratio) if reveal else torch.zeros_like(exists)
    if noise_ids is not None and len(noise_ids) > 0 and noise > 0:
        noisy = revealed & (u_noise < noise)
        noise_tok = torch.where(noisy, noise_ids.to(dev)[noise_pick], torch.full_like(noise_pick, -1))
    else:
        noise_tok = torch.full_like(noise_pick, -1)
    return BlockPlan(k=k, reveal=revealed, noise=noise_tok)


def expand_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    plan: BlockPlan,
    mask_token_id: int,
) -> ExpandedBatch:
    """Lay out the main tokens and the planned mask blocks (no randomness; no Python loop over tokens)."""
    B, N = input_ids.shape
    dev = input_ids.device
    real = attention_mask.bool()
    main_pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # handles left padding too
    main_labels = torch.full_like(labels, IGNORE)
    main_labels[:, :-1] = torch.where(real[:, 1:] & real[:, :-1], labels[:, 1:], IGNORE)

    # Blocks in row-major (example, anchor) order, and the slots they expand into.
    bb, ii = plan.k.nonzero(as_tuple=True)
    kk = plan.k[bb, ii]
    per_row = plan.k.sum(1)
    L = N + int(per_row.max()) if B > 0 else N
    block_first = kk.cumsum(0) - kk  # first slot of each block, counted over the whole batch
    row_first = (per_row.cumsum(0) - per_row)[bb]  # first slot of each block's row
    block_in_row = torch.arange(len(bb), device=dev) - torch.searchsorted(bb, bb)  # 0, 1, .. within a row
    slot_block = torch.repeat_interleave(torch.arange(len(bb), device=dev), kk)
    j = torch.arange(len(slot_block), device=dev) - block_first[slot_block]  # 0-based slot in block
    sb, si = bb[slot_block], ii[slot_block]
    col = N + (block_first - row_first)[slot_block] + j

    stands_for = (si + j + 1).clamp(max=N - 1)
    tokens = torch.full_like(sb, mask_token_id)
    rev = plan.reveal[sb, si, j]
    noise = plan.noise[sb, si, j]
    tokens = torch.where(rev, input_ids[sb, stands_for], tokens)
    tokens = torch.where(rev & (noise >= 0), noise, tokens)
    target = si + j + 2
    target_c = target.clamp(max=N - 1)
    slot_labels = torch.where((target < N) & real[sb, target_c], labels[sb, target_c], IGNORE)

    def fill(main: torch.Tensor, slots: torch.Tensor, pad_value: int) -> torch.Tensor:
        out = torch.full((B, L), pad_value, dtype=main.dtype, device=dev)
        out[:, :N] = main
        out[sb, col] = slots.to(main.dtype)
        return out

    cols = torch.arange(N, device=dev).expand(B, N)
    neg = torch.full((B, N), -1, dtype=torch.long, device=dev)
    return ExpandedBatch(
        input_ids=fill(torch.where(real, input_ids, 0), tokens, 0),
        labels=fill(main_labels, slot_labels, IGNORE),
        position_ids=fill(torch.where(real, main_pos, 0), main_pos[sb, si] + j + 1, 0),
        slot_type=fill(torch.where(real, MAIN, PAD_SLOT), torch.full_like(sb, MASK_SLOT), PAD_SLOT),
        anchor=fill(torch.where(real, cols, neg), si, -1),
        block=fill(neg, block_in_row[slot_block], -1),
        offset=fill(torch.zeros_like(neg), j + 1, 0),
        num_main=N,
    )


def build_expanded_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    max_k: int,
    p_anchor: float,
    fixed_k: bool = False,
    reveal: bool = True,
    noise: float = 0.1,
    noise_ids: torch.Tensor | None = None,
    max_expanded_len: int | None = None,
    generator: torch.Generator | None = None,
) -> ExpandedBatch:
    """`sample_blocks` then `expand_batch`: what training and calibration call."""
    plan = sample_blocks(
        labels, attention_mask, max_k=max_k, p_anchor=p_anchor, fixed_k=fixed_k, reveal=reveal, noise=noise,
        noise_ids=noise_ids, max_expanded_len=max_expanded_len, generator=generator,
    )
    return expand_batch(input_ids, labels, attention_mask, plan, mask_token_id)


def prompt_of(input_ids: list[int], labels: list[int]) -> list[int]:
    """The ids before the last trained span: what self-distillation (`fluid_cli.regenerate`) continues.

    >>> prompt_of([1, 5, 6, 7, 8, 9, 2], [-100, -100, 6, 7, -100, 9, 2])
    [1, 5, 6, 7, 8]
    """
    end = len(labels)
    while end and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return list(input_ids[:start])
