"""Elastic-horizon parallel decoding with exact-greedy verification (METHOD 3), on token ids, many prompts at once.

State of a generation (a *row*) between forwards: the committed prefix, cached in its own row of a preallocated
KV cache (`fluid_cli.cache.RowCache`: a token's cache column is its position); the committed tokens not cached yet
(the prompt, or a correction); and the drafted block awaiting verification. One block:

1. **horizon** `K_t`: the cost-aware rule (`cost`, `fluid_cli.policy`: expected tokens per unit of time from the
   first draft's confidences, corrected online), the K-head on the prefix's last hidden state (`khead`), `max_k`
   (`fixed`), or the largest `k` whose mean predictive entropy over slots `0..k-1` is under `tau` (`entropy`);
   clamped to `[min_k, max_k]` and to the tokens left.
2. **draft**: slot 0 is the greedy token (the prefix's own prediction). The forward that produced it also fed
   mask rows, whose outputs are the first draft of slots `1..`: each slot whose top probability exceeds
   `threshold` takes its argmax. While slots stay open, a draft forward feeds the decided slots as tokens and the
   open ones as masks; the left-most open slot then takes its argmax. Draft forwards are never kept in the cache.
   A draft forward that, with every slot before an early-filled one decided, predicts another token there ends
   the block at that slot (verification would cut it there anyway).
3. **verify**: one causal forward over the block: slot `j` is accepted while it equals the greedy choice given
   slots `< j`; the first mismatch is replaced by that choice and ends the block. So every committed token is the
   greedy choice given its prefix, and the output equals greedy decoding (up to floating-point near-ties).
4. **commit** the accepted tokens (their KV stays cached: rolling back is moving the row's length); stop at EOS, a
   stop sequence, `max_new_tokens` or the end of the model's context.

**Sampling** (`temperature > 0`, per request): slot 0 is a sample of the model's warped distribution, each draft
a sample of its mask row's warped distribution `q`, and verification keeps a draft with probability
`min(1, p/q)`, else commits a sample of the residual `max(0, p - q)` and ends the block (`fluid_cli.acceptance`):
every committed token follows the model's own distribution. Each request draws its uniforms from its own
generator, in a fixed order per forward (`Decoder._sample`); horizons never look at drafted values.

Forwards that can share a pass do: the verify forward of block `t` also carries block `t+1`'s first draft,
`[block t, [M] x m]` (attention is causal, so the masks change nothing for the block; if the block is accepted
whole, its last output is the next slot 0 and the masks' outputs the next first draft); a cut block's correction
is fed, uncached, at the head of the next forward, `[correction, [M] x m]`; the prompt likewise. A one-token
block needs no verification. So a fully accepted block costs one forward. `threshold` 0 (the default with
verification) fills every slot from the first draft: no draft forward beyond the one shared with verification.

**Many prompts at once.** Every forward feeds all active rows, each with its own positions: a row's main rows
(committed or verified tokens) right-aligned in the first columns, its draft rows (masks, or decided slots) from
the next column on, padding elsewhere. Each row advances by its own accepted length; the attention mask lets a
query see its own row's columns up to its own position, so rejected drafts and padding are never seen and need
no compaction. A row that finishes frees its place for the next waiting prompt (continuous batching; `Decoder.serve`
takes prompts as they arrive, between forwards, and drops cancelled rows: `fluid serve`). With a draft-only LoRA
the gate is one column for the whole batch: main rows before it, draft rows from it on.

**Fixed shapes** (`compile=True`): every decode forward is `[batch, 2 max_k - 1]` over the whole cache (or
`[batch, 1]`, a plain step), so `torch.compile` (CUDA graphs on a GPU) captures two steps; the greedy choices,
confidences and the K-head are computed on the device and copied to the host once per forward.

Usage (token ids in, token ids out)::

    model = load_model("runs/stage1")
    result = fluid_decode(model, prompt_ids, DecodeSettings(eos_token_ids=(tok.eos_token_id,)))
    result.tokens, result.stats.tokens_per_forward
    results, batch = decode_batch(model, [ids_1, ids_2, ids_3], settings, batch_size=8)
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import transformers

from fluid_cli import __version__
from fluid_cli.acceptance import GREEDY, Sampling, accepted_length, choose, draft, sample, warp
from fluid_cli.cache import RowCache
from fluid_cli.compat import cache_kwarg
from fluid_cli.config import HORIZONS
from fluid_cli.errors import FluidError
from fluid_cli.hf import context_length, text_config
from fluid_cli.khead import horizon_from_curve, predict_horizon
from fluid_cli.model import FluidModel
from fluid_cli.policy import (
    Acceptance,
    CostPolicy,
    CostTable,
    load_cached_costs,
    save_cached_costs,
)

DEFAULT_ENTROPY_TAU = 2.8  # the entropy policy's tau when none is given (nats, the paper's K-head tau)
UNVERIFIED_THRESHOLD = 0.9  # without verification the threshold guards quality (METHOD 3.2)
PROBE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MASKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take an arbitrary 4D mask
CACHE_BLOCK = 256  # KV cache lengths are whole blocks of positions

BlockCallback = Callable[[list[int]], None]
StopCallback = Callable[[list[int]], int | None]


@dataclass
class DecodeSettings:
    # auto: cost with verification; without it khead when the head is calibrated, else entropy
    horizon: str = "auto"
    tau: float | None = None  # khead: the K* threshold (default: the calibrated tau); entropy: its threshold
    threshold: float | None = None  # fill a draft slot early above this probability (None: 0 verified, 0.9 not)
    max_k: int | None = None  # None -> model K
    min_k: int = 1
    verify: bool = True
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    # Given the generated ids, return how many to keep if a stop sequence just completed, else None. It must be a
    # pure function of the ids: drafted (not yet verified) tokens are checked with it to end a block early.
    stop: StopCallback | None = None
    compile: bool = False  # fixed-shape forwards through torch.compile (CUDA graphs on a GPU)
    costs: CostTable | None = None  # the cost policy's forward costs (None: measured once, cached on disk)
    sampling: Sampling = GREEDY  # every request's, unless its own `Request.sampling` says otherwise


@dataclass
class DecodeStats:
    new_tokens: int = 0
    forwards: int = 0  # forwards this generation took part in
    verify_forwards: int = 0  # forwards that checked drafted tokens (and, in the same pass, drafted the next block)
    draft_forwards: int = 0  # other forwards that fed mask rows (draft steps; caching a prompt or a correction)
    horizons: list[int] = field(default_factory=list)  # K_t per block
    accepted: list[int] = field(default_factory=list)  # tokens per block that verification accepted (slot 0 too)
    committed: list[int] = field(default_factory=list)  # tokens per block appended to the output
    wall_s: float = 0.0
    stop_reason: str = ""  # eos | stop | length (max_new_tokens) | context (the model's positions ran out)
    policy: str = ""  # the horizon policy that ran
    tau: float | None = None
    tau_source: str = ""  # flag (the caller's), calibration (the K-head's), default, or none (not used)
    threshold: float = 0.0
    exact_to: str = ""  # with verification: base (the original model's greedy decoding) or adapted (these weights')
    sampling: dict[str, Any] | None = None  # None: greedy; else temperature, top_p, top_k and the seed that ran

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else 0.0

    @property
    def forwards_per_token(self) -> float:
        return self.forwards / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mean_horizon(self) -> float:
        return sum(self.horizons) / len(self.horizons) if self.horizons else 0.0

    @property
    def mean_committed(self) -> float:
        return sum(self.committed) / len(self.committed) if self.committed else 0.0

    def to_dict(self) -> dict[str, Any]:
        derived = ("tokens_per_forward", "forwards_per_token", "tokens_per_s", "mean_horizon", "mean_committed")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids (prompt excluded; EOS kept, as HF generate does; stop trimming applied)
    stats: DecodeStats


@dataclass
class BatchStats:
    """One `decode_batch` call. Every forward is shared by the rows active in it: `row_forwards` (the sum of the
    rows' own `forwards`) counts a forward once per row, `forwards` once."""

    forwards: int = 0  # model calls for decoding
    probe_forwards: int = 0  # model calls that measured forward costs (not part of any generation)
    row_forwards: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    batch_size: int = 1
    compiled: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forwards if self.forwards else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "tokens_per_forward": self.tokens_per_forward}


@dataclass
class Request:
    """One prompt of a batch, with its own limit and stop rule (None: the settings')."""

    prompt: list[int]
    max_new_tokens: int | None = None
    stop: StopCallback | None = None
    sampling: Sampling | None = None


# --------------------------------------------------------------------------------------------- entry points


def fluid_decode(model: FluidModel, prompt_ids: list[int], settings: DecodeSettings,
                 on_block: BlockCallback | None = None) -> DecodeResult:
    """Decode one prompt with elastic horizons; `on_block` receives each block's tokens as they are committed."""
    return Decoder(model, settings).decode(prompt_ids, on_block)


def ar_decode(model: FluidModel, prompt_ids: list[int], settings: DecodeSettings,
              on_block: BlockCallback | None = None) -> DecodeResult:
    """Plain greedy decoding, one token per forward, through the same loop: the reference, with the same stats."""
    return Decoder(model, ar_settings(settings)).decode(prompt_ids, on_block)


def decode_batch(model: FluidModel, requests: list[list[int] | Request], settings: DecodeSettings, *,
                 batch_size: int = 8, on_block: Callable[[int, list[int]], None] | None = None
                 ) -> tuple[list[DecodeResult], BatchStats]:
    """Decode many prompts, `batch_size` at a time (a finished row takes the next waiting prompt). Results are in
    the order of `requests`; each equals that prompt's own batch-1 decoding. `on_block(i, tokens)` streams."""
    return Decoder(model, settings, batch_size=batch_size).run(requests, on_block)


def ar_settings(settings: DecodeSettings) -> DecodeSettings:
    """The settings of plain greedy decoding: one-token blocks, no drafts."""
    return replace(settings, horizon="fixed", max_k=1, min_k=1, tau=None, threshold=None)


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The settings checked against the model, with the defaults they leave to it resolved."""

    policy: str
    tau: float | None
    tau_source: str
    threshold: float
    max_k: int
    min_k: int
    objective: str


def resolve_plan(model: FluidModel, s: DecodeSettings) -> Plan:
    """Check `s` against the model and resolve its defaults (one-line errors for what cannot work)."""
    if s.horizon not in HORIZONS:
        raise FluidError(f"horizon = {s.horizon!r}: expected one of {', '.join(HORIZONS)}")
    head = model.meta.khead
    policy = s.horizon
    if policy == "auto":
        policy = "cost" if s.verify else "khead" if head.calibrated else "entropy"
    max_k = model.max_k if s.max_k is None else s.max_k
    if not 1 <= max_k <= model.max_k:
        raise FluidError(f"max_k = {max_k}: must be between 1 and the model's K = {model.max_k} "
                         "(the K-head and the training blocks stop there)")
    if not 1 <= s.min_k <= max_k:
        raise FluidError(f"min_k = {s.min_k}: must be between 1 and max_k = {max_k}")
    threshold = s.threshold if s.threshold is not None else (0.0 if s.verify else UNVERIFIED_THRESHOLD)
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise FluidError(f"threshold = {threshold}: must be a probability between 0 and 1")
    if s.tau is not None and not 0 < s.tau < math.inf:
        raise FluidError(f"tau = {s.tau}: must be a positive number of nats (e.g. 2.8)")
    if policy == "cost" and not s.verify:
        raise FluidError("horizon = cost: the cost-aware rule learns from verified drafts; without verification "
                         "choose the khead, entropy or fixed horizon")
    tau, source = s.tau, "flag" if s.tau is not None else "none"
    if policy in ("cost", "fixed") and s.tau is not None and max_k > 1:
        raise FluidError(f"tau = {s.tau}: the {policy} horizon does not use tau (it applies to the khead and entropy "
                         "horizons; the cost rule picks horizons from draft confidences and measured forward costs)")
    if policy == "khead":
        if model.meta.weights == "plain":
            raise FluidError("horizon = khead: a plain transformers model has no K-head (only a FLUID model's is "
                             "trained and calibrated): choose the cost, fixed or entropy horizon")
        if not head.calibrated:
            raise FluidError("horizon = khead: the model's K-head is not calibrated (run `fluid calibrate-khead`), "
                             "or choose the cost, fixed or entropy horizon")
        if head.objective == "gaussian":
            if s.tau is not None and head.tau is not None and abs(s.tau - head.tau) > 1e-9:
                raise FluidError(
                    f"tau = {s.tau:g}: the K-head is a Gaussian classifier calibrated at tau = {head.tau:g}, whose "
                    "horizons do not depend on a tau given now; recalibrate at that tau, or with "
                    "`--set khead.objective=loss-curve` for a tau chosen at generate time")
            tau, source = head.tau, "calibration"
        elif s.tau is None:
            if head.tau is None:
                raise FluidError("the model's K-head predicts loss curves and has no calibrated tau: pass --tau")
            tau, source = head.tau, "calibration"
    if policy == "entropy" and s.tau is None:
        tau, source = DEFAULT_ENTROPY_TAU, "default"
    plan = Plan(policy, tau, source, threshold, max_k, s.min_k, head.objective)
    check_sampling(plan, s.verify, s.sampling)
    return plan


def check_sampling(plan: Plan, verify: bool, sampling: Sampling) -> None:
    """Sampling is exact only with verification, and with every draft slot taken from the first draft: an early
    fill (`threshold` > 0) decides the block from the drafted values, which biases what is committed."""
    sampling.check()
    if sampling.greedy:
        return
    if not verify:
        raise FluidError(f"temperature = {sampling.temperature:g}: sampling needs verification (without it drafts are "
                         "committed unchecked and do not follow the model's distribution); drop --no-verify")
    if plan.threshold > 0:
        raise FluidError(f"threshold = {plan.threshold:g}: with sampling (temperature = {sampling.temperature:g}) "
                         "every draft slot comes from the first draft (threshold 0); an early fill would depend on "
                         "the drafted values and bias the output")


def generation_budget(model: FluidModel, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, str]:
    """How many tokens may be generated (`max_new_tokens`, cut at the end of the model's context) and why."""
    if not prompt_ids:
        raise FluidError("empty prompt: decoding needs at least one prompt token to condition on")
    if max_new_tokens < 0:
        raise FluidError(f"max_new_tokens = {max_new_tokens}: must be 0 or more")
    context = context_length(model.lm.config)
    if context is not None and len(prompt_ids) >= context:
        raise FluidError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of {context} "
                         "positions (max_position_embeddings): shorten it")
    if context is not None and len(prompt_ids) + max_new_tokens > context:
        return context - len(prompt_ids), "context"
    return max_new_tokens, "length"


# --------------------------------------------------------------------------------------------- one generation


class _Output:
    """The generated ids and the stopping rules: EOS, the stop callback, the token budget."""

    def __init__(self, eos: tuple[int, ...], stop: StopCallback | None, budget: int, limit_reason: str):
        self.ids: list[int] = []
        self.eos = set(eos)
        self.stop = stop
        self.budget, self.limit_reason = budget, limit_reason
        self.reason: str | None = None if budget > 0 else limit_reason

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def remaining(self) -> int:
        return self.budget - len(self.ids)

    def _end(self, ids: list[int]) -> tuple[str, int] | None:
        """Why the generation ends with these ids, and how many of them to keep; None if it goes on."""
        if ids[-1] in self.eos:
            return "eos", len(ids)
        if self.stop is not None and (keep := self.stop(ids)) is not None:
            return "stop", keep
        if len(ids) >= self.budget:
            return self.limit_reason, len(ids)
        return None

    def end_in(self, block: list[int]) -> tuple[int, bool]:
        """`(n, True)` if committing `block[:n]` would end the generation, else `(len(block), False)`."""
        ids = list(self.ids)
        for n, token in enumerate(block, start=1):
            ids.append(token)
            if self._end(ids):
                return n, True
        return len(block), False

    def commit(self, tokens: list[int]) -> list[int]:
        """Append tokens up to the one that ends the generation; return what was appended."""
        start = len(self.ids)
        for token in tokens:
            self.ids.append(token)
            end = self._end(self.ids)
            if end is not None:
                self.reason, keep = end
                del self.ids[keep:]
                break
        return self.ids[start:]


@dataclass
class _Feed:
    """What one row feeds to a forward: main rows (cached from `start` on) and draft rows after them."""

    main: list[int]
    draft: list[int]
    start: int
    verify: bool  # the main rows are a block under verification: every one needs its greedy choice
    head: bool  # the K-head reads the last main row's hidden state
    sampler: _Sampler | None = None  # a sampled row: its settings and random stream
    checks: list[int] = field(default_factory=list)  # sampled verification: the drafts main rows 0.. verify
    q: torch.Tensor | None = None  # ... and the distributions they were drawn from, `[len(checks), V]`


@dataclass
class _Sampler:
    sampling: Sampling
    generator: torch.Generator  # on the host: the same seed draws the same numbers on any device


@dataclass
class _Out:
    """A row's share of a forward's outputs."""

    main_ids: list[int]  # greedy choices of the main rows that were asked for (all, or the last one)
    draft_ids: list[int]
    draft_conf: list[float]
    draft_entropy: list[float]
    main_entropy: float
    head: list[float]
    draft_q: torch.Tensor | None = None  # sampled rows: the warped distributions the drafts were drawn from


class _Row:
    """One generation: the state machine of the module docstring, on the host."""

    def __init__(self, index: int, request: Request, budget: tuple[int, str], decoder: Decoder,
                 on_block: BlockCallback | None):
        self.index, self.decoder, self.plan = index, decoder, decoder.plan
        s = decoder.settings
        self.out = _Output(s.eos_token_ids, request.stop if request.stop is not None else s.stop, *budget)
        self.stats = DecodeStats(policy=self.plan.policy, tau=self.plan.tau, tau_source=self.plan.tau_source,
                                 threshold=self.plan.threshold, exact_to=decoder.model.meta.exact_to)
        self.on_block = on_block
        sampling = request.sampling if request.sampling is not None else s.sampling
        self.sampler: _Sampler | None = None
        if not sampling.greedy:
            seed = secrets.randbits(63) if sampling.seed is None else sampling.seed
            self.sampler = _Sampler(sampling, torch.Generator().manual_seed(seed))
            self.stats.sampling = {**sampling.to_dict(), "seed": seed}
        self.q: torch.Tensor | None = None  # sampled: the draft distributions of the block's slots 1..
        self.mask = decoder.model.mask_token_id
        self.length = 0  # cached tokens: positions 0..length-1 of this row's cache
        self.pending = list(request.prompt)  # committed, not cached yet
        self.block: list[int] = []  # drafted, awaiting verification (slot 0 is greedy already)
        self.slots: list[int | None] | None = None  # a block still being drafted
        # first drafts whose outcome the committed (greedy) text has not settled yet: (the output length when the
        # draft's slot 0 was committed, its drafts of slots 1.., their confidences); the cost policy learns from all
        # of them, used or not, so its estimates are not biased toward the drafts it chose to use
        self.previews: list[tuple[int, list[int], list[float]]] = []
        self.k, self.final = 0, False  # the block's horizon; whether it ends the generation if accepted
        self.masks = 0  # mask rows in the current feed
        self.cost = CostPolicy(self.plan.max_k, decoder.costs, decoder.session) if self.plan.policy == "cost" else None
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.out.done

    def result(self) -> DecodeResult:
        self.stats.wall_s = time.perf_counter() - self.started
        self.stats.new_tokens = len(self.out.ids)
        self.stats.stop_reason = self.out.reason or ""
        return DecodeResult(self.out.ids, self.stats)

    # -- what the next forward feeds --------------------------------------------------------------------------
    def feed(self) -> _Feed:
        if self.slots is not None:  # one more draft forward for the block being drafted
            last = max(j for j, s in enumerate(self.slots) if s is None)
            self.masks = 0
            return _Feed([], [self.mask if s is None else s for s in self.slots[:last]], self.length, False, False)
        main = self.block[:-1] if self.final else self.block or self.pending
        if self.final:
            self.masks = 0
        else:
            cap = min(self.plan.max_k, self.out.remaining - len(self.block))
            self.masks = self.cost.masks(cap) if self.cost is not None else max(cap - 1, 0)
            self.masks = max(self.masks, min(self.plan.min_k, cap) - 1)
        head = self.plan.policy == "khead" and not self.final
        checks = self.block[1:] if self.sampler is not None else []
        return _Feed(main, [self.mask] * self.masks, self.length, bool(self.block), head, self.sampler, checks,
                     self.q[: len(checks)] if checks else None)

    # -- what the forward said --------------------------------------------------------------------------------
    def absorb(self, out: _Out) -> None:
        self.stats.forwards += 1
        if self.slots is not None:
            self.stats.draft_forwards += 1
            self._refill(out)
            return
        if self.block:
            self.stats.verify_forwards += 1
            if not self._verify(out.main_ids):
                return
        else:
            if self.masks:
                self.stats.draft_forwards += 1
            self.length += len(self.pending)
            self.pending = []
        self._start_block(out)

    def _verify(self, choices: list[int]) -> bool:
        """Check the block against its rows' choices (greedy, or sampled: `fluid_cli.acceptance`); True if it was
        accepted whole and decoding goes on."""
        block = self.block
        n_ok = accepted_length(block, choices)
        self.block = []
        if n_ok < len(block):  # cut: keep the accepted tokens' KV, commit the correction uncached
            self.length += n_ok
            correction = choices[n_ok - 1]
            self._commit(block[:n_ok] + [correction], n_ok)
            self.pending, self.final = [correction], False
            return False
        self.length += len(block) - 1 if self.final else len(block)
        self._commit(block, n_ok)
        return not self.out.done

    def _start_block(self, out: _Out) -> None:
        p0 = out.main_ids[-1]
        cap = min(self.plan.max_k, self.out.remaining, self.masks + 1)
        k = self._horizon(out, cap)
        self.k = k
        self.q = out.draft_q
        if self.cost is not None and cap > 1:
            self.previews.append((len(self.out.ids), out.draft_ids[: cap - 1], out.draft_conf[: cap - 1]))
        slots: list[int | None] = [p0] + [None] * (k - 1)
        _fill(slots, out.draft_ids[: k - 1], out.draft_conf[: k - 1], self.plan.threshold, leftmost=False)
        if None in slots:
            self.slots = slots
        else:
            self._finish_block(slots)  # type: ignore[arg-type]

    def _horizon(self, out: _Out, cap: int) -> int:
        plan = self.plan
        if cap <= 1:
            return 1
        if plan.policy == "cost":
            k = self.cost.horizon(out.draft_conf[: cap - 1], cap)
        elif plan.policy == "khead":
            k = int(predict_horizon(torch.tensor(out.head), objective=plan.objective, tau=plan.tau))
        elif plan.policy == "entropy":  # entropy of the predictions for slots 0..cap-1
            k = int(horizon_from_curve(torch.tensor([out.main_entropy, *out.draft_entropy[: cap - 1]]), plan.tau))
        else:
            k = cap
        return min(max(k, plan.min_k), cap)

    def _refill(self, out: _Out) -> None:
        slots = self.slots
        early = _fill(slots, out.draft_ids, out.draft_conf, self.plan.threshold, leftmost=True)
        if early is not None:  # the draft, now sure of everything before it, disagrees with an early fill
            slots = slots[: early + 1]
        if None not in slots:
            self.slots = None
            self._finish_block(slots)  # type: ignore[arg-type]
        else:
            self.slots = slots

    def _finish_block(self, block: list[int]) -> None:
        length, final = self.out.end_in(block)
        block = block[:length]
        if len(block) == 1 or not self.decoder.settings.verify:  # commit as drafted; the next forward caches it
            self._commit(block, len(block))
            self.pending, self.final = block, False
        else:
            self.block, self.final = block, final

    def _commit(self, tokens: list[int], accepted: int) -> None:
        new = self.out.commit(tokens)
        if self.previews:
            self._settle_previews()
        self.stats.horizons.append(self.k)
        self.stats.accepted.append(accepted)
        self.stats.committed.append(len(new))
        if self.on_block is not None and new:
            self.on_block(new)

    def _settle_previews(self) -> None:
        """Record every first draft whose slots the committed text now decides: slot `j` was right if it is the
        token committed `j` places after slot 0 (committed tokens are the greedy ones), given slots before it
        were."""
        ids = self.out.ids
        pending = []
        for start, drafts, conf in self.previews:
            known = ids[start + 1: start + 1 + len(drafts)]
            right = next((j for j, (d, t) in enumerate(zip(drafts, known)) if d != t), len(known))
            if right < len(known):  # slot right + 1 was wrong
                self.cost.record(conf[: right + 1], right + 1)
            elif len(known) == len(drafts) or self.out.done:  # every slot decided, or the output ended: all right
                self.cost.record(conf[: len(known)], len(known) + 1)
            else:
                pending.append((start, drafts, conf))
        self.previews = pending


def _fill(slots: list[int | None], ids: list[int], conf: list[float], threshold: float, leftmost: bool
          ) -> int | None:
    """Output `j` (`ids`, `conf`) predicts slot `j+1`: the left-most open slot takes its argmax (when `leftmost`),
    every later open slot takes its argmax when its top probability exceeds `threshold`.

    A filled slot whose every earlier slot was already decided, and for which the new prediction differs, is
    replaced by the prediction and returned (the block should end there); None otherwise."""
    first_open = True
    decided = True  # every slot before the current one held a token when this forward was fed
    for j, (c, a) in enumerate(zip(conf, ids), start=1):
        if j >= len(slots):
            break
        if slots[j] is not None:
            if leftmost and decided and slots[j] != a:
                slots[j] = a
                return j
            continue
        decided = False
        if (leftmost and first_open) or c > threshold:
            slots[j] = a
        first_open = False
    return None


# --------------------------------------------------------------------------------------------- the engine


class Decoder:
    """A model ready to decode with fixed settings: the resolved plan, the forward costs and the acceptance
    statistics shared by its generations (the lm-eval adapter keeps one for a whole evaluation)."""

    def __init__(self, model: FluidModel, settings: DecodeSettings, *, batch_size: int = 1):
        if batch_size < 1:
            raise FluidError(f"batch size {batch_size}: must be at least 1")
        self.model, self.settings, self.batch_size = model, settings, batch_size
        attention = getattr(model.lm.config, "_attn_implementation", None) or "eager"
        if attention not in MASKED_ATTENTION:
            raise FluidError(f"attention implementation {attention!r}: FLUID decoding feeds a 4D attention mask (each "
                             f"row's own positions), which {', '.join(MASKED_ATTENTION)} take; load the model with "
                             "attn_implementation=\"sdpa\"")
        self.plan = resolve_plan(model, settings)
        self.session = Acceptance.empty(self.plan.max_k)
        self.costs: CostTable | None = settings.costs
        self.probe_forwards = 0
        self.cache_key = cache_kwarg(model.lm.get_decoder())
        self.device = model.device
        # a draft-only model's main rows are the base model's: an added mask token is not in its vocabulary
        self.suppress_main = model.meta.lora_scope == "draft" and not model.mask_in_base
        self.width = 2 * self.plan.max_k - 1  # the widest decode feed: a block of K and K - 1 masks
        self._compiled: Any = None
        self._cache: RowCache | None = None  # the cache of the forward being run
        self._caches: dict[int, RowCache] = {}  # by rows

    # -- public ---------------------------------------------------------------------------------------------------
    def decode(self, prompt: list[int] | Request, on_block: BlockCallback | None = None) -> DecodeResult:
        results, _ = self.run([prompt], None if on_block is None else lambda _, tokens: on_block(tokens))
        return results[0]

    def run(self, requests: list[list[int] | Request], on_block: Callable[[int, list[int]], None] | None = None,
            on_done: Callable[[int, DecodeResult], None] | None = None) -> tuple[list[DecodeResult], BatchStats]:
        """Decode `requests`, `batch_size` at a time; `on_block(i, tokens)` streams request `i`'s committed blocks,
        `on_done(i, result)` reports it finished. Results come back in the order of `requests`."""
        reqs = [r if isinstance(r, Request) else Request(list(r)) for r in requests]
        for r in reqs:
            if r.sampling is not None:
                check_sampling(self.plan, self.settings.verify, r.sampling)
        budgets = [generation_budget(self.model, r.prompt,
                                     self.settings.max_new_tokens if r.max_new_tokens is None else r.max_new_tokens)
                   for r in reqs]
        batch = BatchStats(batch_size=min(self.batch_size, len(reqs)) if reqs else 0, compiled=self.settings.compile)
        results: list[DecodeResult | None] = [None] * len(reqs)
        if not reqs:
            return [], batch
        started = time.perf_counter()
        max_len = max(len(r.prompt) + b for r, (b, _) in zip(reqs, budgets)) + self.width + 1
        waiting = deque(zip(range(len(reqs)), reqs, budgets))

        def finish(i: int, result: DecodeResult) -> None:
            results[i] = result
            if on_done is not None:
                on_done(i, result)

        if self.plan.policy == "cost" and self.costs is None:
            with torch.inference_mode():
                self.costs = self._probe_costs(reqs[0].prompt, batch)
        self.serve(lambda: waiting.popleft() if waiting else None, max_len, batch, on_block, finish)
        batch.wall_s = time.perf_counter() - started
        done = [r for r in results if r is not None]
        batch.new_tokens = sum(r.stats.new_tokens for r in done)
        return done, batch

    def serve(self, take: Callable[[], tuple[int, Request, tuple[int, str]] | None], max_len: int, batch: BatchStats,
              on_block: Callable[[int, list[int]], None] | None = None,
              on_done: Callable[[int, DecodeResult], None] | None = None,
              cancelled: Callable[[int], bool] | None = None) -> None:
        """Continuous batching on `batch.batch_size` rows of `max_len` cached positions (prompt, budget and the
        widest feed): whenever a row is free, between forwards, `take()` hands in the next request as `(key,
        request, its generation_budget)`, or None when none waits, so a request handed in while others decode
        starts at the next forward. Returns once no row is active and `take` has nothing. `cancelled(key)`, asked
        before every forward, drops that row without a result and frees its place. The forward costs of the cost
        policy must be known (`self.costs`): `run` measures them. Counts forwards into `batch`."""
        with torch.inference_mode():
            cache = self._row_cache(batch.batch_size, max_len)
            rows: list[_Row | None] = [None] * batch.batch_size

            def admit(b: int) -> None:
                while (item := take()) is not None:
                    key, request, budget = item
                    row = _Row(key, request, budget, self,
                               None if on_block is None else lambda tokens, key=key: on_block(key, tokens))
                    if not row.done:
                        rows[b] = row
                        return
                    finish(row)  # nothing to generate (max_new_tokens = 0)

            def finish(row: _Row) -> None:
                if on_done is not None:
                    on_done(row.index, row.result())

            while True:
                for b, row in enumerate(rows):
                    if row is not None and cancelled is not None and cancelled(row.index):
                        rows[b] = row = None
                    if row is None:
                        admit(b)
                if not any(rows):
                    return
                feeds = [row.feed() if row is not None else None for row in rows]
                outs = self._outputs(*self._step(cache, feeds), feeds)
                batch.forwards += 1
                batch.row_forwards += len([f for f in feeds if f is not None])
                for b, (row, out) in enumerate(zip(rows, outs)):
                    if row is None:
                        continue
                    row.absorb(out)
                    if row.done:
                        finish(row)
                        rows[b] = None

    def _row_cache(self, rows: int, max_len: int) -> RowCache:
        """The KV cache for `rows` rows of `max_len` positions: allocated once and kept while it fits (so a compiled
        step, which reads it at fixed addresses and sizes, is captured once); lengths grow in blocks of
        `CACHE_BLOCK` positions."""
        cache = self._caches.get(rows)
        if cache is None or cache.slots.max_len < max_len:
            size = -(-max_len // CACHE_BLOCK) * CACHE_BLOCK
            cache = self._caches[rows] = RowCache(text_config(self.model.lm.config).num_hidden_layers, size,
                                                  self.device, rows)
        return cache

    # -- one forward ------------------------------------------------------------------------------------------------
    def _step(self, cache: RowCache, feeds: list[_Feed | None]) -> tuple[torch.Tensor, int]:
        """One forward over every row's feed (`None`: an idle row): the last hidden states `[batch, q, hidden]` and
        the first draft column (each row's main rows end there)."""
        if not self.settings.compile:  # idle rows at the end (a server's free rows) cost compute: left out
            feeds = feeds[: max(b for b, f in enumerate(feeds) if f is not None) + 1]
        active = [f for f in feeds if f is not None]
        wm = max(len(f.main) for f in active)
        wd = max(len(f.draft) for f in active)
        # Two shapes: a plain step, [batch, 1], and a drafting step, [batch, 2K - 1] as K main and K - 1 draft
        # columns; a feed that fits neither (a prompt, a long correction) runs eagerly at its own shape, and so does
        # a new cache's first forward, which allocates it (at addresses CUDA graphs can keep: `fluid_cli.cache`).
        fixed = self.settings.compile and cache.layers[0].is_initialized and (
            wm + wd == 1 or (wm <= self.plan.max_k and wd < self.plan.max_k))
        if fixed and wm + wd > 1:
            wm, wd = self.plan.max_k, self.plan.max_k - 1
        q = wm + wd
        ids = [[0] * q for _ in feeds]
        pos = [[0] * q for _ in feeds]
        real = [[0] * q for _ in feeds]
        kv_len = 1
        for b, f in enumerate(feeds):
            if f is None:
                continue
            m, d = len(f.main), len(f.draft)
            ids[b][wm - m: wm + d] = f.main + f.draft
            pos[b][wm - m: wm + d] = range(f.start, f.start + m + d)
            real[b][wm - m: wm + d] = [1] * (m + d)
            kv_len = max(kv_len, f.start + m + d)
        packed = torch.tensor([ids, pos, real], dtype=torch.long).to(self.device, non_blocking=True)
        self._cache = cache  # the forward reads it from here (a compiled forward takes tensors and numbers only)
        cache.slots.kv_len = cache.slots.max_len if fixed else kv_len
        forward = self._compiled_forward() if fixed else self._forward
        return forward(packed, wm if wd else None), wm

    def _forward(self, packed: torch.Tensor, draft_from: int | None) -> torch.Tensor:
        """The model on `[batch, q]` rows (`packed` = ids, positions, real): the last hidden states."""
        ids, pos, real = packed[0], packed[1], packed[2].bool()
        cache = self._cache
        slots = cache.slots
        slots.write = torch.where(real, pos, slots.max_len - 1)  # padding writes the column no query reaches
        cols = torch.arange(slots.kv_len, device=ids.device)
        allowed = (cols <= pos[..., None]) & real[..., None]
        allowed |= ~real[..., None] & (cols == 0)  # padding reads one column, so its softmax stays finite
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model.hidden_states(input_ids=ids, position_ids=pos, attention_mask=mask[:, None],
                                       use_cache=True, draft_from=draft_from, **{self.cache_key: cache})
        return out.last_hidden_state

    def _compiled_forward(self) -> Any:
        if self._compiled is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled = torch.compile(self._forward, mode=mode, dynamic=False,
                                           backend=os.environ.get("FLUID_COMPILE_BACKEND", "inductor"))
        return self._compiled

    def _outputs(self, hidden: torch.Tensor, wm: int, feeds: list[_Feed | None]) -> list[_Out | None]:
        """Greedy choices, confidences (and entropies, K-head outputs where a policy needs them) of the rows the
        feeds ask for, computed on the device and copied to the host in one transfer."""
        sel_b, sel_q, head_b, head_q, spans = [], [], [], [], []
        for b, f in enumerate(feeds):
            if f is None:
                spans.append(None)
                continue
            m, d = len(f.main), len(f.draft)
            first = wm - m if f.verify else wm - 1 if m else wm
            n_main = wm - first
            cols = list(range(first, wm + d))
            spans.append((len(sel_b), n_main, d))
            sel_b += [b] * len(cols)
            sel_q += cols
            if f.head:
                head_b.append(b)
                head_q.append(wm - 1)
        device = hidden.device
        index = torch.tensor([sel_b, sel_q], device=device)
        logits = self.model.logits(hidden[index[0], index[1]]).float()
        # no number to decode from: NaN, +inf (inf - inf is NaN in the softmax), or -inf for every token; read with
        # the step's outputs below, so no extra synchronisation
        nan = (logits.isnan() | logits.isposinf() | logits.isneginf().all(-1, keepdim=True)).any()[None].double()
        mask_id = self.model.mask_token_id
        n_draft = sum(span[2] for span in spans if span is not None)
        if self.suppress_main:
            logits[:, mask_id] = -math.inf
        elif n_draft:  # drafting the mask token itself is never right
            logits[:, mask_id] = torch.where(index[1] >= wm, -math.inf, logits[:, mask_id])
        want_entropy = self.plan.policy == "entropy"
        if n_draft or want_entropy:
            logp = torch.log_softmax(logits, dim=-1)
            top, ids = logp.max(-1)
            conf = top.exp()
        else:  # plain steps and verification need the greedy choices only
            ids = logits.argmax(-1)
            conf = torch.zeros_like(ids, dtype=torch.float32)
        draft_q = self._sample(logits, ids, conf, feeds, spans)
        parts = [nan, ids.double(), conf.double()]
        if want_entropy:
            parts.append(-(logp.exp() * logp).sum(-1).double())
        if head_b:
            heads = self.model.khead(hidden[torch.tensor(head_b, device=device), torch.tensor(head_q, device=device)])
            parts.append(heads.double().flatten())
        nan_found, *flat = torch.cat(parts).tolist()  # the one device-to-host synchronisation of the step
        if nan_found:
            # argmax and sampling both pick a token from NaN scores without complaint: the text would be garbage
            raise FluidError("the model's logits are not numbers (NaN or infinite): its weights hold NaN, or its "
                             "dtype overflows (float16 often does: load it as bfloat16 or float32)")
        n = len(sel_b)
        out_ids, out_conf = flat[:n], flat[n: 2 * n]
        entropy = flat[2 * n: 3 * n] if want_entropy else [0.0] * n
        head_vals = flat[(3 if want_entropy else 2) * n:]
        k = self.model.max_k
        outs: list[_Out | None] = []
        h = 0
        for b, (f, span) in enumerate(zip(feeds, spans)):
            if span is None:
                outs.append(None)
                continue
            start, n_main, d = span
            main = [int(x) for x in out_ids[start: start + n_main]]
            draft = slice(start + n_main, start + n_main + d)
            head: list[float] = []
            if f.head:
                head = head_vals[h * k: (h + 1) * k]
                h += 1
            outs.append(_Out(main, [int(x) for x in out_ids[draft]], out_conf[draft], entropy[draft],
                             entropy[start + n_main - 1] if n_main else 0.0, head, draft_q.get(b)))
        return outs

    @staticmethod
    def _sample(logits: torch.Tensor, ids: torch.Tensor, conf: torch.Tensor, feeds: list[_Feed | None],
                spans: list[tuple[int, int, int] | None]) -> dict[int, torch.Tensor]:
        """The sampled rows' share of `_outputs`, written over their greedy `ids` (and their drafts' `conf`, the top
        probability of the warped `q`) in place: a verifying row's choice (`acceptance.choose`), a fresh sample of
        the last main row (the next slot 0), drafts drawn from the mask rows. Returns each sampled row's draft
        distributions, kept for the forward that verifies them. Each row draws its uniforms from its own generator,
        as many as its own feed needs, in a fixed order: so its draws do not depend on the rest of the batch."""
        rows: list[int] = []  # `logits` rows to warp, and each one's temperature, top-k, top-p
        params: list[tuple[float, int, float]] = []
        checks, check_q, check_ids, fresh, drafts = [], [], [], [], []  # positions in `rows`; verified drafts
        u_accept, u_residual, u_fresh, u_draft = [], [], [], []
        spans_q: dict[int, tuple[int, int]] = {}
        for b, (f, span) in enumerate(zip(feeds, spans)):
            if span is None or f.sampler is None:
                continue
            start, n_main, d = span
            n_check, s = len(f.checks), f.sampler.sampling
            at = len(rows)
            rows += range(start, start + n_main + d)
            params += [(s.temperature, s.top_k, s.top_p)] * (n_main + d)
            checks += range(at, at + n_check)
            fresh += range(at + n_check, at + n_main)
            drafts += range(at + n_main, at + n_main + d)
            if n_check:
                check_q.append(f.q)
                check_ids += f.checks
            spans_q[b] = (len(drafts) - d, d)  # where its rows sit among all drafted rows
            u = torch.rand(2 * n_check + n_main - n_check + d, generator=f.sampler.generator, dtype=torch.float64)
            u_accept.append(u[:n_check])
            u_residual.append(u[n_check: 2 * n_check])
            u_fresh.append(u[2 * n_check: n_check + n_main])
            u_draft.append(u[n_check + n_main:])
        if not rows:
            return {}
        device = logits.device
        at = torch.tensor(rows, device=device)
        temperatures, top_ks, top_ps = zip(*params)
        # float64, on the host: a temperature as small as 1e-300 must reach `warp` as itself, not as float32's 0;
        # top-k and top-p on the host too, where `warp` reads whether any row needs them
        temperature = torch.tensor(temperatures, dtype=torch.float64)
        top_k, top_p = torch.tensor(top_ks), torch.tensor(top_ps)
        probs = warp(logits[at], temperature, top_k, top_p)
        chosen = torch.empty(len(rows), dtype=ids.dtype, device=device)
        if checks:
            chosen[checks] = choose(probs[checks], torch.cat(check_q), torch.tensor(check_ids, device=device),
                                    torch.cat(u_accept), torch.cat(u_residual))
        if fresh:
            chosen[fresh] = sample(probs[fresh], torch.cat(u_fresh))
        q = None
        if drafts:
            chosen[drafts], q = draft(probs[drafts], torch.cat(u_draft))
            conf[at[drafts]] = q.max(-1).values.to(conf.dtype)
        ids[at] = chosen
        return {b: q[i: i + d] for b, (i, d) in spans_q.items() if d}

    # -- forward costs ----------------------------------------------------------------------------------------------
    def _probe_costs(self, prompt: list[int], batch: BatchStats) -> CostTable:
        """Time decode forwards of 1..2K-1 rows per batch row after a prefix (compiled: the two shapes there are),
        cached per model (and adapter), device, dtype, batch size, thread count and package versions; the probe's
        forwards are counted apart from the generations'."""
        model, n = self.model, min(self.batch_size, 64)
        config = model.lm.config.to_dict()
        key = {"model": {k: config.get(k) for k in sorted(config) if not k.startswith(("_", "transformers"))},
               # the adapter's size (its rank and target modules) changes what a drafting forward costs
               "parameters": sum(p.numel() for p in model.lm.parameters()),
               # a new release of the package, torch or transformers may run a forward differently
               "versions": [__version__, torch.__version__, transformers.__version__],
               "gated": model.gate is not None, "device": str(self.device),
               "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
               "dtype": str(model.dtype), "threads": torch.get_num_threads(), "batch": n, "rows": self.width,
               "compile": self.settings.compile,
               "probe": 2}  # how a table is measured: tables cached by an earlier way are measured again
        cached = load_cached_costs(key)
        if cached is not None:
            return cached
        # Compiled, every drafting step runs the one fixed shape of `width` rows (see `_step`): two sizes to time.
        fixed = self.settings.compile and self.width > 1
        sizes = [1, self.width] if fixed else [q for q in PROBE_ROWS if q < self.width] + [self.width]
        prefix = (prompt * (64 // len(prompt) + 1))[:64]
        context = context_length(model.lm.config)
        if context is not None:
            prefix = prefix[: max(1, context - self.width - 2)]
        cache = self._row_cache(n, len(prefix) + self.width + 1)  # decoding's own: a compiled step stays as it is
        self._step(cache, [_Feed(prefix, [], 0, False, False)] * n)
        times = {}
        for q in sizes:
            main = (q + 1) // 2
            feed = _Feed(prefix[-main:], [model.mask_token_id] * (q - main), len(prefix) - main, True, False)
            samples = []
            for i in range(5):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                feeds = [feed] * n
                self._outputs(*self._step(cache, feeds), feeds)  # with its outputs: the full cost of a step
                if i:  # the first is a warm-up (compiling a new shape, growing buffers)
                    samples.append(time.perf_counter() - t0)
            times[q] = sorted(samples)[1]  # the second fastest of four: robust to one slow outlier
        if fixed:
            times[2] = times[self.width]  # a step function: one mask row costs the whole fixed shape
        self.probe_forwards += 1 + 5 * len(sizes)
        batch.probe_forwards += 1 + 5 * len(sizes)
        table = CostTable(times)
        save_cached_costs(key, table)
        return table
