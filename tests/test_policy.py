"""The cost-aware horizon rule on synthetic acceptance curves and cost tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluid_cli.policy import EXPLORE, Acceptance, CostPolicy, CostTable, best_horizon, block_value

GPU_LIKE = CostTable.flat()  # a forward of 16 rows costs what one row costs
CPU_LIKE = CostTable({1: 1.0, 8: 1.3, 16: 1.4, 32: 1.6})  # measured on a 2-core CPU
STEEP = CostTable({1: 1.0, 2: 3.0, 32: 40.0})


def rate(accept: list[float], k: int, cost: CostTable) -> float:
    tokens, time = block_value(accept, k, k - 1, cost)
    return tokens / time


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=15), st.sampled_from([GPU_LIKE, CPU_LIKE, STEEP]))
def test_one_pass_finds_the_best_rate(accept, cost):
    cap = len(accept) + 1
    best = best_horizon(accept, cap, cost)
    assert rate(accept, best, cost) >= max(rate(accept, k, cost) for k in range(1, cap + 1)) - 1e-9


def test_flat_costs_take_the_longest_block_that_pays():
    assert best_horizon([0.95] * 15, 16, GPU_LIKE) == 16
    assert best_horizon([0.95, 0.95, 0.95, 0.0, 0.0], 6, GPU_LIKE) == 4  # nothing past slot 3 is ever right


def test_steep_costs_or_wrong_drafts_take_plain_steps():
    assert best_horizon([0.99] * 7, 8, STEEP) == 1
    assert best_horizon([0.05] * 7, 8, CPU_LIKE) == 1
    assert best_horizon([0.9] * 7, 8, CPU_LIKE) > 1


def test_cheaper_forwards_draw_longer_blocks():
    curve = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    assert best_horizon(curve, 8, GPU_LIKE) >= best_horizon(curve, 8, CPU_LIKE) >= best_horizon(curve, 8, STEEP)


def test_over_confident_drafts_get_shorter_horizons_as_they_fail():
    policy = CostPolicy(max_k=8, cost=CPU_LIKE, session=Acceptance.empty(8))
    confident = [0.95] * 7
    first = policy.horizon(confident, 8)
    for _ in range(20):  # every draft wrong at slot 1
        policy.record(confident, 1)
    assert first > 1 and policy.horizon(confident, 8) == 1
    assert policy.masks(8) == 0  # and the next forwards are plain steps


def test_plain_steps_look_at_a_draft_less_and_less_often_until_one_pays():
    policy = CostPolicy(max_k=8, cost=CPU_LIKE, session=Acceptance.empty(8))
    for _ in range(20):
        policy.record([0.5] * 7, 1)
    looks = [n for n in range(200) if policy.masks(8)]
    gaps = [b - a for a, b in zip(looks, looks[1:])]
    assert len(looks) >= 3 and gaps == sorted(gaps) and gaps[-1] > gaps[0]
    policy.record([0.9] * 7, 5)  # a draft that was right: look again soon
    assert policy.explore == EXPLORE


@pytest.mark.parametrize("shared", [True, False])
def test_a_new_generation_starts_from_what_the_session_learnt(shared):
    session = Acceptance.empty(8)
    if shared:  # earlier generations of the session: confident drafts, always wrong
        for _ in range(30):
            session.record([0.9] * 7, 1)
    fresh = CostPolicy(max_k=8, cost=CPU_LIKE, session=session)
    assert (fresh.horizon([0.9] * 7, 8) == 1) == shared
