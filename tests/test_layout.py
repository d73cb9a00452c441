"""The block layout and its attention rule (METHOD 1.1-1.3) against a loop-based reference and real models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluid_cli.layout import (
    IGNORE,
    MAIN,
    MASK_SLOT,
    PAD_SLOT,
    allowed_attention,
    build_expanded_batch,
    eligible_anchors,
    expand_batch,
    sample_blocks,
)
from tiny import ARCHITECTURES, tiny_model, tiny_tokenizer

MASK_ID = 7


# ------------------------------------------------------------------------------------ reference builder


def reference_expand(input_ids, labels, attention_mask, plan, mask_token_id):
    """Deliberately simple: one example, one anchor, one slot at a time, straight from METHOD 1.1-1.3."""
    B, N = input_ids.shape
    rows = []
    for b in range(B):
        length = [t for t in range(N) if attention_mask[b, t]]
        pos_of = {t: n for n, t in enumerate(length)}
        slots = []  # (input, label, position, type, anchor, block, offset)
        for t in range(N):
            if attention_mask[b, t]:
                nxt = labels[b, t + 1].item() if t + 1 < N and attention_mask[b, t + 1] else IGNORE
                slots.append((input_ids[b, t].item(), nxt, pos_of[t], MAIN, t, -1, 0))
            else:
                slots.append((0, IGNORE, 0, PAD_SLOT, -1, -1, 0))
        block = 0
        for i in range(N):
            k = plan.k[b, i].item()
            if k == 0:
                continue
            for o in range(1, k + 1):
                token = mask_token_id
                if plan.reveal[b, i, o - 1]:
                    token = input_ids[b, i + o].item()
                    if plan.noise[b, i, o - 1] >= 0:
                        token = plan.noise[b, i, o - 1].item()
                t = i + o + 1
                label = labels[b, t].item() if t < N and attention_mask[b, t] else IGNORE
                slots.append((token, label, pos_of[i] + o, MASK_SLOT, i, block, o))
            block += 1
        rows.append(slots)
    L = max(len(r) for r in rows)
    for r in rows:
        r += [(0, IGNORE, 0, PAD_SLOT, -1, -1, 0)] * (L - len(r))
    cols = list(zip(*[list(zip(*r)) for r in rows]))
    return [torch.tensor(c) for c in cols]


def reference_allowed(slot_type, anchor, block, position):
    B, L = slot_type.shape
    out = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        for q in range(L):
            for k in range(L):
                if slot_type[b, q] == PAD_SLOT:
                    out[b, q, k] = q == k
                elif slot_type[b, k] == MAIN and anchor[b, k] <= anchor[b, q]:
                    out[b, q, k] = True
                elif (slot_type[b, q] == MASK_SLOT and slot_type[b, k] == MASK_SLOT
                      and block[b, q] == block[b, k] and position[b, k] <= position[b, q]):
                    out[b, q, k] = True
    return out


def random_batch(seed: int, B: int, N: int, left_pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 90, (B, N), generator=g)
    lengths = torch.randint(2, N + 1, (B,), generator=g)
    lengths[0] = N
    am = torch.zeros(B, N, dtype=torch.long)
    labels = ids.clone()
    for b in range(B):
        n = int(lengths[b])
        span = slice(N - n, N) if left_pad else slice(0, n)
        am[b, span] = 1
        prompt = int(torch.randint(0, n, (1,), generator=g))
        start = span.start
        labels[b, start:start + prompt] = IGNORE
    labels[am == 0] = IGNORE
    # a prompt token inside the response, as in multi-turn data
    if N > 4:
        labels[0, N // 2] = IGNORE
    return ids, labels, am


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 4),
    N=st.integers(2, 14),
    max_k=st.integers(1, 6),
    p=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    fixed=st.booleans(),
    left_pad=st.booleans(),
    cap=st.sampled_from([None, 0, 10, 25]),
)
def test_vectorised_builder_matches_reference(seed, B, N, max_k, p, fixed, left_pad, cap):
    ids, labels, am = random_batch(seed, B, N, left_pad)
    g = torch.Generator().manual_seed(seed)
    plan = sample_blocks(labels, am, max_k=max_k, p_anchor=p, fixed_k=fixed, noise=0.3,
                         noise_ids=torch.arange(10, 90), max_expanded_len=None if cap is None else N + cap,
                         generator=g)
    ex = expand_batch(ids, labels, am, plan, MASK_ID)
    ref = reference_expand(ids, labels, am, plan, MASK_ID)
    got = [ex.input_ids, ex.labels, ex.position_ids, ex.slot_type, ex.anchor, ex.block, ex.offset]
    for name, a, b in zip(["input_ids", "labels", "position_ids", "slot_type", "anchor", "block", "offset"], got, ref):
        assert torch.equal(a, b), name
    allowed = allowed_attention(ex.slot_type, ex.anchor, ex.block, ex.position_ids)
    assert torch.equal(allowed, reference_allowed(*ref[3:6], ref[2]))


def test_plan_respects_the_rules():
    ids, labels, am = random_batch(3, 6, 40)
    eligible = eligible_anchors(labels, am)
    noise_ids = torch.arange(20, 30)
    for seed in range(30):
        plan = sample_blocks(labels, am, max_k=5, p_anchor=0.5, noise=0.5, noise_ids=noise_ids,
                             generator=torch.Generator().manual_seed(seed))
        anchors = plan.k > 0
        assert not (anchors & ~eligible).any(), "anchor at an ineligible position"
        assert plan.k.max() <= 5
        j = torch.arange(5)
        in_block = j < plan.k.unsqueeze(2)
        assert not (plan.reveal & ~in_block).any()
        target = torch.arange(40).view(1, 40, 1) + j + 1
        real_target = torch.zeros_like(plan.reveal)
        for b in range(6):
            real_target[b] = (target[0] < 40) & am[b][target[0].clamp(max=39)].bool()
        assert not (plan.reveal & ~real_target).any(), "revealed a token past the end"
        noisy = plan.noise >= 0
        assert not (noisy & ~plan.reveal).any()
        assert torch.isin(plan.noise[noisy], noise_ids).all()
    # fixed k and reproducibility
    a = sample_blocks(labels, am, max_k=4, p_anchor=0.5, fixed_k=True, generator=torch.Generator().manual_seed(1))
    b = sample_blocks(labels, am, max_k=4, p_anchor=0.5, fixed_k=True, generator=torch.Generator().manual_seed(1))
    assert set(a.k[a.k > 0].tolist()) == {4}
    assert torch.equal(a.k, b.k) and torch.equal(a.reveal, b.reveal)


def test_anchor_and_reveal_rates():
    ids, labels, am = random_batch(0, 8, 64)
    eligible = eligible_anchors(labels, am)
    plan = sample_blocks(labels, am, max_k=8, p_anchor=0.5, generator=torch.Generator().manual_seed(0))
    rate = (plan.k > 0).sum() / eligible.sum()
    assert 0.4 < rate < 0.6
    ks = plan.k[plan.k > 0].float()
    assert 3.5 < ks.mean() < 5.5  # U{1..8} has mean 4.5


def test_anchors_are_drawn_per_example():
    """A position where only some rows have a response token is still an anchor candidate in those rows."""
    N = 12
    ids = torch.arange(20, 20 + N).repeat(2, 1)
    labels = ids.clone()
    labels[0, :3] = IGNORE  # row 0: response from 3
    labels[1, :9] = IGNORE  # row 1: response from 9
    am = torch.ones_like(ids)
    plan = sample_blocks(labels, am, max_k=2, p_anchor=1.0, generator=torch.Generator().manual_seed(0))
    assert (plan.k[0] > 0).nonzero().flatten().tolist() == list(range(2, N - 1))
    assert (plan.k[1] > 0).nonzero().flatten().tolist() == list(range(8, N - 1))


def test_expanded_length_cap_keeps_a_fitting_subset():
    ids, labels, am = random_batch(1, 4, 30)
    plan = sample_blocks(labels, am, max_k=6, p_anchor=1.0, max_expanded_len=50,
                         generator=torch.Generator().manual_seed(0))
    assert (plan.k.sum(1) <= 20).all()
    assert (plan.k.sum(1) > 0).all()
    ex = expand_batch(ids, labels, am, plan, MASK_ID)
    assert ex.input_ids.shape[1] <= 50


def test_nothing_sees_padding_or_blocks():
    ids, labels, am = random_batch(5, 3, 16)
    ex = build_expanded_batch(ids, labels, am, mask_token_id=MASK_ID, max_k=4, p_anchor=0.7,
                              generator=torch.Generator().manual_seed(0))
    allowed = allowed_attention(ex.slot_type, ex.anchor, ex.block, ex.position_ids)
    L = ex.input_ids.shape[1]
    pad_key = (ex.slot_type == PAD_SLOT).unsqueeze(1).expand(-1, L, -1)
    off_diag = ~torch.eye(L, dtype=torch.bool)
    assert not (allowed & pad_key & off_diag).any()
    main_q = (ex.slot_type == MAIN).unsqueeze(2)
    mask_k = (ex.slot_type == MASK_SLOT).unsqueeze(1)
    assert not (allowed & main_q & mask_k).any(), "a main token sees a mask slot"
    add = ex.attention_mask()
    assert add.shape == (3, 1, L, L) and torch.equal(add[:, 0] == 0, allowed)


# ------------------------------------------------------------------------------------ invariants on real models


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_invariants_on_models(arch, attn, tokenizer):
    """(a) main logits == plain causal forward; (b) each block == a plain forward of x_0..x_i + block inputs."""
    model = tiny_model(arch, tokenizer, attn=attn).float()
    ids, labels, am = random_batch(11, 3, 18)
    ex = build_expanded_batch(ids, labels, am, mask_token_id=MASK_ID, max_k=5, p_anchor=0.6, noise=0.5,
                              noise_ids=torch.arange(10, 90), generator=torch.Generator().manual_seed(2))
    assert (ex.slot_type == MASK_SLOT).any()
    with torch.no_grad():
        full = model(**ex.model_inputs()).logits
        plain = model(input_ids=ids, attention_mask=am).logits
        real = am.bool()
        torch.testing.assert_close(full[:, :18][real], plain[real], atol=1e-5, rtol=1e-5)
        checked = 0
        for b in range(3):
            for blk in ex.block[b].unique().tolist():
                if blk < 0:
                    continue
                cols = (ex.block[b] == blk).nonzero().flatten()
                i = int(ex.anchor[b, cols[0]])
                prefix = ids[b][real[b]][: int(ex.position_ids[b, i]) + 1]
                seq = torch.cat([prefix, ex.input_ids[b, cols]]).unsqueeze(0)
                ref = model(input_ids=seq).logits[0, len(prefix):]
                torch.testing.assert_close(full[b, cols], ref, atol=1e-5, rtol=1e-5)
                checked += 1
        assert checked > 3
