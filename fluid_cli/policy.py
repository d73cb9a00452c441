"""Cost-aware horizons: choose each block's length to maximise expected tokens per unit of time.

With verification on, decoding is lossless, so the only thing a horizon decides is speed. A block of `k` slots
(slot 0 is the greedy token, slots `1..k-1` are drafts) is verified by one forward that also drafts the next block
with `m` mask rows. If the drafts of slots `1..j-1` are accepted and slot `j` is not, the block commits `j`
tokens plus the correction, and the next block needs one more forward (`[correction, masks]`) before it can be
drafted; if all are accepted, the block commits `k` tokens and the next block is already drafted. With `a_i` the
probability that draft `i` is accepted given that the drafts before it were:

    tokens(k) = sum_{j=1..k-1} P_{j-1} (1 - a_j) (j + 1)  +  P_{k-1} k          P_j = a_1 ... a_j
    time(k)   = c(k + m)  +  (1 - P_{k-1}) c(1 + m)                          c(q): a forward of q rows

and `k = 1` is a plain step: one token for `c(1 + m)`. The rule picks the `k` with the largest
`tokens(k) / time(k)`, each `k` costed in the steady state where the forwards around it append `m = k - 1` masks;
so `k = 1` (plain greedy decoding, no mask rows) whenever drafting does not pay.

- `c(q)` comes from a `CostTable`: measured once per model, device, dtype and batch size by timing real decode
  forwards (`fluid_cli.decode` probes it and caches it on disk), or given (tests, `flat`).
- `a_i` comes from the first draft's own confidence in slot `i` (its top probability), corrected by running
  statistics per slot position: the ratio of right drafts to the confidence they were drafted with (a slot seen
  rarely borrows the ratio of the slot before it). Every first draft counts, used or
  not: the greedy text committed afterwards says which of its slots were right, so the statistics are not biased
  toward the drafts the rule chose to use. A model whose drafts are over-confident, or a prompt far from the
  training data, gets shorter horizons after a few blocks.
- `m`, the mask rows appended to a forward (the next block's widest horizon, chosen before its drafts are
  seen), reaches one slot beyond the best `k` under the acceptance rates of all first drafts so far (so that the
  next slot's rate is learnt too). When that best `k` is 1, decoding runs
  plain one-row steps and looks at a first draft only now and then: after `EXPLORE` steps, twice as long after
  every look that did not pay (up to `EXPLORE_MAX`).

Worked example: drafts that are always right (`a_i = 1`) and flat costs pick the longest block; steep costs,
or drafts that are never right, pick `k = 1`:

    >>> flat, steep = CostTable.flat(), CostTable({1: 1.0, 32: 40.0})
    >>> best_horizon([1.0] * 7, 8, flat), best_horizon([1.0] * 7, 8, steep)
    (8, 1)
    >>> best_horizon([0.0] * 7, 8, flat), best_horizon([0.9, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], 8, flat)
    (1, 2)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fluid_cli.io import write_json_atomic

EXPLORE, EXPLORE_MAX = 16, 128  # plain steps between looks at a first draft when drafting does not pay
PRIOR = 2.0  # pseudo-observations behind every running estimate
FIRST_GUESS = 0.5  # acceptance rate assumed before anything was seen
SESSION_WEIGHT = 16.0  # at most this many of the session's observations stand behind a new generation's estimates
CACHE_ENV = "FLUID_CACHE_DIR"


# --------------------------------------------------------------------------------------------- costs


class CostTable:
    """`c(q)`: the time of a forward over `q` new rows, relative to a one-row forward; linear between the
    measured points and beyond the last two.

    >>> c = CostTable({1: 1.0, 8: 1.3, 16: 1.5})
    >>> c(1), round(c(4), 3), c(16), round(c(24), 3)
    (1.0, 1.129, 1.5, 1.7)
    """

    def __init__(self, points: dict[int, float]):
        if 1 not in points or any(q < 1 or not 0 < t < math.inf for q, t in points.items()):
            raise ValueError("a cost table needs c(1) and positive, finite costs at q >= 1")
        base = points[1]
        self.points = sorted((int(q), float(t) / base) for q, t in points.items())
        self._memo: dict[int, float] = {}

    @classmethod
    def flat(cls) -> CostTable:
        """Every forward costs the same (a GPU at batch 1, roughly)."""
        return cls({1: 1.0, 2: 1.0})

    def __call__(self, q: int) -> float:
        if q in self._memo:
            return self._memo[q]
        pts = self.points
        if len(pts) == 1:
            value = pts[0][1]
        else:
            i = next((i for i in range(1, len(pts)) if pts[i][0] >= q), len(pts) - 1)
            (q0, t0), (q1, t1) = pts[i - 1], pts[i]
            value = max(t0 + (t1 - t0) * (q - q0) / (q1 - q0), 1e-6)
        self._memo[q] = value
        return value

    def to_dict(self) -> dict[str, float]:
        return {str(q): t for q, t in self.points}


def cost_cache_path(key: dict[str, object]) -> Path:
    """Where a probed table is kept: `$FLUID_CACHE_DIR` (default `~/.cache/fluid`) / costs-<hash of key>.json."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fluid")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"costs-{digest}.json"


def load_cached_costs(key: dict[str, object]) -> CostTable | None:
    """The table measured before for `key`; None when there is none, or when the file is damaged (a notice says so;
    the caller measures the costs again and its save replaces the file)."""
    path = cost_cache_path(key)
    if not path.is_file():
        return None
    try:
        points = json.loads(path.read_text())["points"]
        return CostTable({int(q): float(t) for q, t in points.items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        Console(stderr=True).print(f"[yellow]{path}: a damaged forward-cost cache; measuring the costs again[/]")
        return None


def save_cached_costs(key: dict[str, object], table: CostTable) -> None:
    try:
        write_json_atomic(cost_cache_path(key), {"key": key, "points": table.to_dict()})
    except OSError:
        pass  # a read-only home folder only costs a probe next time


# --------------------------------------------------------------------------------------------- the rule


def block_value(accept: list[float], k: int, masks: int, cost: CostTable) -> tuple[float, float]:
    """`(tokens(k), time(k))` of the module docstring; `accept[i - 1]` is `a_i`.

    >>> block_value([0.5, 0.5], 3, 2, CostTable.flat())  # cut at slot 1: 2 tokens, at 2: 3, none: 3
    (2.5, 1.75)
    """
    if k == 1:
        return 1.0, cost(1 + masks)
    reach, tokens = 1.0, 0.0
    for j in range(1, k):
        a = accept[j - 1]
        tokens += reach * (1.0 - a) * (j + 1)
        reach *= a
    tokens += reach * k
    return tokens, cost(k + masks) + (1.0 - reach) * cost(1 + masks)


def best_horizon(accept: list[float], cap: int, cost: CostTable) -> int:
    """The `k` in `1..cap` with the most expected tokens per unit of time (the shortest among equals), each `k`
    with `k - 1` masks appended to its forwards: `block_value` for every `k` in one pass (this runs once per
    block, so its cost is per-block overhead)."""
    best_k, best_rate = 1, 1.0 / cost(1)
    reach, cut_tokens = 1.0, 0.0  # P_{k-1}, and the tokens of the blocks cut before slot k
    for k in range(2, cap + 1):
        a = accept[k - 2]
        cut_tokens += reach * (1.0 - a) * k
        reach *= a
        rate = (cut_tokens + reach * k) / (cost(2 * k - 1) + (1.0 - reach) * cost(k))
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


@dataclass
class Acceptance:
    """Running statistics per draft slot `i = 1..K-1`: how often it was verified, accepted, and the summed
    confidence it was drafted with."""

    trials: list[float]
    hits: list[float]
    confidence: list[float]

    @classmethod
    def empty(cls, max_k: int) -> Acceptance:
        n = max(max_k - 1, 0)
        return cls([0.0] * n, [0.0] * n, [0.0] * n)

    def record(self, confidence: list[float], accepted: int) -> None:
        """A verified block whose drafts had `confidence` (slots 1..k-1) and whose first `accepted` slots
        (slot 0 included) verification kept."""
        for i in range(1, min(accepted + 1, len(confidence) + 1)):
            self.trials[i - 1] += 1
            self.hits[i - 1] += i < accepted
            self.confidence[i - 1] += confidence[i - 1]


@dataclass
class CostPolicy:
    """The cost-aware rule for one generation, with the statistics of the session it belongs to."""

    max_k: int
    cost: CostTable
    session: Acceptance
    own: Acceptance = field(init=False)
    plain_steps: int = 0  # forwards without mask rows since the last look at a first draft
    explore: int = EXPLORE  # plain steps before the next look

    def __post_init__(self) -> None:
        self.own = Acceptance.empty(self.max_k)
        self._width: int | None = None  # the forecast's best width, until the next record

    def _mix(self, i: int) -> tuple[float, float, float]:
        """(trials, hits, confidence) of slot i: this generation's, plus at most SESSION_WEIGHT of the session's."""
        s = self.session
        w = min(1.0, SESSION_WEIGHT / s.trials[i]) if s.trials[i] else 0.0
        o = self.own
        return o.trials[i] + w * s.trials[i], o.hits[i] + w * s.hits[i], o.confidence[i] + w * s.confidence[i]

    def acceptance(self, confidence: list[float]) -> list[float]:
        """`a_i` from the first draft's confidences, each scaled by how right slot i's drafts were for their
        confidence (the scale of slot i - 1 standing in while slot i has few observations)."""
        out, trust = [], 1.0
        for i, c in enumerate(confidence):
            _, hits, conf = self._mix(i)
            trust = (hits + PRIOR * trust) / (conf + PRIOR)
            out.append(min(0.999, c * trust))
        return out

    def forecast(self) -> list[float]:
        """`a_i` before a draft is seen: how often slot i's drafts were right (slot i - 1's rate standing in while
        slot i has few observations)."""
        out, rate = [], FIRST_GUESS
        for i in range(self.max_k - 1):
            trials, hits, _ = self._mix(i)
            rate = (hits + PRIOR * rate) / (trials + PRIOR)
            out.append(rate)
        return out

    def masks(self, cap: int) -> int:
        """Mask rows to append to the next forward (0: a plain step): the best `k` under the acceptance rates of
        all first drafts so far; when that is 1, plain steps, with a look at a first draft after `explore` of them
        (twice as many after every look that did not pay)."""
        if cap <= 1:
            return 0
        if self._width is None:  # the rates change only when a draft is recorded
            self._width = best_horizon(self.forecast(), self.max_k, self.cost)
        width = min(self._width, cap)
        if width > 1:  # one slot further than the rates say pays: how else would its rate be learnt
            width = min(width + 1, cap)
        if width == 1:
            self.plain_steps += 1
            if self.plain_steps < self.explore:
                return 0
            width = cap  # look at a first draft now and then: a stretch of predictable text may have begun
            self.explore = min(2 * self.explore, EXPLORE_MAX)
        self.plain_steps = 0
        return width - 1

    def horizon(self, confidence: list[float], cap: int) -> int:
        return best_horizon(self.acceptance(confidence), cap, self.cost)

    def record(self, confidence: list[float], accepted: int) -> None:
        """A first draft's outcome: its confidences in slots 1.. and how many slots (slot 0 included) the greedy
        text confirmed, whether the block used them or not."""
        self.own.record(confidence, accepted)
        self.session.record(confidence, accepted)
        self._width = None
        if accepted > 1:  # a draft was right: look again soon if decoding falls back to plain steps
            self.explore = EXPLORE
