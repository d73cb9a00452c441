"""Elastic-horizon parallel decoding with exact-greedy verification (METHOD 3), on token ids only.

State between blocks: the KV cache of the committed prefix `x_0..x_{n-1}`, the prefix's logits `p0` for `x_n`
and its last hidden state `h`. One block:

1. **horizon** `K_t`: the K-head on `h` (`khead`), `max_k` (`fixed`), or the largest `k` whose mean predictive
   entropy over slots `0..k-1` (`p0`, then the first draft forward's outputs) is under `tau` (`entropy`);
   clamped to `[min_k, max_k]` and to the tokens left.
2. **draft**: the first draft forward feeds every slot as `[M]`; with `p0` it predicts every slot (`p0` slot 0,
   output `j` slot `j+1`). After each draft forward the left-most open slot takes its argmax and every later open
   slot whose top probability exceeds `threshold` takes its argmax; the next draft forward feeds the decided slots
   as tokens and the open ones as `[M]`. Draft forwards are never kept in the cache.
3. **verify**: one causal forward over the block. Slot `j` is accepted while it equals the AR argmax given slots
   `< j`; the first mismatch is replaced by that argmax and ends the block. So every committed token is the
   greedy choice given its prefix, and the output equals greedy AR decoding (up to floating-point near-ties).
4. **commit** the accepted tokens (their KV stays cached); stop at EOS, a stop sequence, `max_new_tokens` or the
   end of the model's context.

No forward is run whose result is already known, and forwards that can share a pass do:
- the verify forward of block `t` also carries block `t+1`'s first draft forward: `[block t, [M] x (K-1)]`.
  Attention is causal, so the appended masks change nothing for the block; if the block is accepted whole, its
  last output is the next `p0`, its hidden state the next `h`, and the mask outputs are the next block's first
  draft. (If the block is cut, the mask outputs were conditioned on a wrong token and are dropped.)
- a cut block keeps its accepted tokens' KV; the correction token is committed and fed, uncached, at the head of
  the next forward, `[correction, [M] x (K-1)]`, which caches it, gives `p0` and `h` and drafts the next block.
  The prompt is fed the same way, so the prefill is also the first block's first draft forward.
- a one-token block needs no verification (slot 0 is `argmax p0`, the greedy token): it is committed at once.
- the last block is verified without its last token, whose output would only predict past the end.

Forwards per block of `K >= 2` slots, counting the forward that starts it (which verified the previous block):
best 1, when every slot passes the threshold after that first forward and verification accepts them all;
worst `K` (each forward decides only the left-most open slot; every slot is then greedy, so nothing is cut).
A block commits at least 2 tokens (slot 0, then an accepted token or the correction). At `threshold = 1.0`
nothing is filled early, drafting is greedy decoding and the cost is one forward per token, plus one to verify
the last block. With `verify=False` a block costs the same draft forwards and is committed as drafted.

Usage (token ids in, token ids out)::

    model = FluidModel.load("runs/stage1", merge=True)
    result = fluid_decode(model, prompt_ids, DecodeSettings(max_k=8, eos_token_ids=(tok.eos_token_id,)))
    result.tokens, result.stats.tokens_per_forward
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from fluid_cli.compat import cache_kwarg, cache_length, crop_cache
from fluid_cli.config import KHeadConfig
from fluid_cli.errors import FluidError
from fluid_cli.khead import horizon_from_curve, predict_horizon
from fluid_cli.modeling import FluidModel

# "auto" is `khead` for a model whose head was calibrated, `fixed` otherwise.
HORIZONS = ("auto", "khead", "fixed", "entropy")
# The entropy policy's tau when neither the caller nor the model's calibration gives one (the paper's value).
DEFAULT_TAU = KHeadConfig().tau

BlockCallback = Callable[[list[int]], None]


@dataclass
class DecodeSettings:
    horizon: str = "khead"  # "khead" | "fixed" | "entropy" | "auto"
    tau: float | None = None  # None -> the model's calibrated tau (fluid.json khead.tau)
    threshold: float = 0.9  # fill an open slot early when its top probability exceeds this (1.0: never)
    max_k: int | None = None  # None -> model K
    min_k: int = 1
    verify: bool = True
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()
    # Given the generated ids, return how many to keep if a stop sequence just completed, else None. It must be a
    # pure function of the ids: drafted (not yet verified) tokens are checked with it to end a block early.
    stop: Callable[[list[int]], int | None] | None = None


@dataclass
class DecodeStats:
    new_tokens: int = 0
    forwards: int = 0  # model calls, all kinds
    verify_forwards: int = 0  # calls that check drafted tokens (and, in the same pass, draft the next block)
    draft_forwards: int = 0  # other calls that feed mask slots (draft steps; caching a prompt or a correction)
    horizons: list[int] = field(default_factory=list)  # K_t per block
    accepted: list[int] = field(default_factory=list)  # tokens per block that verification accepted (slot 0 too)
    committed: list[int] = field(default_factory=list)  # tokens per block appended to the output
    wall_s: float = 0.0
    stop_reason: str = ""  # eos | stop | length (max_new_tokens) | context (the model's positions ran out)

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
        derived = ("tokens_per_forward", "forwards_per_token", "tokens_per_s", "mean_horizon",
                   "mean_committed")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids (prompt excluded; EOS kept, as HF generate does; stop trimming applied)
    stats: DecodeStats


def fluid_decode(
    model: FluidModel, prompt_ids: list[int], settings: DecodeSettings, on_block: BlockCallback | None = None
) -> DecodeResult:
    """Decode with elastic horizons; `on_block` receives each block's committed tokens as they are committed."""
    plan = _plan(model, prompt_ids, settings)
    stats = DecodeStats()
    out = _Output(settings, plan.budget, plan.limit_reason)
    run = _Runner(model, stats)
    mask = model.mask_token_id

    def commit(k: int, accepted: int, tokens: list[int]) -> None:
        new = out.commit(tokens)
        stats.horizons.append(k)
        stats.accepted.append(accepted)
        stats.committed.append(len(new))
        if on_block is not None and new:
            on_block(new)

    uncached = list(prompt_ids)  # committed tokens whose KV is not cached yet
    block: list[int] = []  # the drafted block awaiting verification (slot 0 is greedy already)
    k, final = 0, False  # its horizon; whether it ends the generation if accepted
    start = time.perf_counter()
    with torch.inference_mode():
        while not out.done:
            # One forward: cache `uncached`, verify `block`, draft the next block with every slot masked.
            base = cache_length(run.cache)
            feed = uncached + (block[:-1] if final else block)
            cap = 0 if final else min(plan.max_k, out.remaining - len(block))  # the next block, if this one holds
            kind = "verify" if block else "draft" if cap > 1 else "plain"
            logits, hidden = run.forward(feed + [mask] * max(cap - 1, 0), keep=len(feed), kind=kind,
                                         logits_from=len(uncached) - (0 if block else 1))
            if block:  # row j predicts block[j + 1]; row len(block) - 1 is the next p0
                greedy = logits[: len(block) - 1].argmax(-1).tolist()
                n_ok = 1 + next((j for j, g in enumerate(greedy) if block[j + 1] != g), len(block) - 1)
                if n_ok < len(block):  # cut: keep the accepted tokens' KV, commit the correction uncached
                    crop_cache(run.cache, base + len(uncached) + n_ok)
                    commit(k, n_ok, block[:n_ok] + [greedy[n_ok - 1]])
                    uncached, block, final = [greedy[n_ok - 1]], [], False
                    continue
                commit(k, n_ok, block)
                if out.done:
                    break
                logits, hidden = logits[len(block) - 1:], hidden[len(block) - 1:]
            p0, h, preview = logits[0], hidden[0], logits[1:]  # preview: the first draft of slots 1..cap-1
            uncached, block = [], []
            cap = min(plan.max_k, out.remaining)
            k = _horizon(model, plan, h, p0, preview, cap)
            block = _draft(run, mask, k, p0, preview, settings.threshold)
            length, final = out.end_in(block)
            block = block[:length]
            if len(block) == 1 or not settings.verify:  # commit as drafted; the next forward caches it
                commit(k, len(block), block)
                uncached, block, final = block, [], False
    return _finish(out, stats, start)


def ar_decode(
    model: FluidModel, prompt_ids: list[int], settings: DecodeSettings, on_block: BlockCallback | None = None
) -> DecodeResult:
    """Plain greedy decoding with a KV cache, one token per forward: the reference, with the same statistics."""
    budget, limit_reason = generation_budget(model, prompt_ids, settings)
    stats = DecodeStats()
    out = _Output(settings, budget, limit_reason)
    run = _Runner(model, stats)
    pending = list(prompt_ids)
    start = time.perf_counter()
    with torch.inference_mode():
        while not out.done:
            logits, _ = run.forward(pending, keep=len(pending), logits_from=len(pending) - 1, kind="plain")
            pending = [int(logits[-1].argmax())]
            new = out.commit(pending)
            stats.horizons.append(1)
            stats.accepted.append(1)
            stats.committed.append(len(new))
            if on_block is not None and new:
                on_block(new)
    return _finish(out, stats, start)


# --------------------------------------------------------------------------------------------- the steps


def _horizon(model: FluidModel, plan: _Plan, h: torch.Tensor, p0: torch.Tensor, preview: torch.Tensor, cap: int
             ) -> int:
    if plan.horizon == "fixed" or cap == 1:
        k = cap
    elif plan.horizon == "khead":
        k = int(predict_horizon(model.khead(h), objective=plan.objective, tau=plan.tau, min_k=plan.min_k,
                                max_k=plan.max_k))
    else:  # entropy of the predictions for slots 0..cap-1 (p0, then the first draft forward's outputs)
        logp = torch.log_softmax(torch.cat([p0[None], preview]), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        k = int(horizon_from_curve(entropy, plan.tau))
    return min(max(k, plan.min_k), cap)


def _draft(run: _Runner, mask: int, k: int, p0: torch.Tensor, preview: torch.Tensor, threshold: float
           ) -> list[int]:
    """Fill a block of `k` slots (METHOD 3.2). `preview` is the first draft forward's output (every slot masked):
    its row `j` predicts slot `j+1`, and slot 0, the left-most, takes `argmax p0`."""
    slots: list[int | None] = [int(p0.argmax())] + [None] * (k - 1)
    _fill(slots, preview[: k - 1], threshold, leftmost=False)
    while None in slots:
        last = max(j for j, s in enumerate(slots) if s is None)
        logits, _ = run.forward([mask if s is None else s for s in slots[:last]], keep=0, kind="draft")
        _fill(slots, logits, threshold, leftmost=True)
    return slots  # type: ignore[return-value]


def _fill(slots: list[int | None], logits: torch.Tensor, threshold: float, leftmost: bool) -> None:
    """Row `j` of `logits` predicts slot `j+1`: the left-most open slot takes its argmax (when `leftmost`), every
    later open slot takes its argmax when its top probability exceeds `threshold`."""
    conf, arg = torch.softmax(logits, dim=-1).max(-1)
    first_open = True
    for j, (c, a) in enumerate(zip(conf.tolist(), arg.tolist()), start=1):
        if slots[j] is not None:
            continue
        if (leftmost and first_open) or c > threshold:
            slots[j] = a
        first_open = False


# --------------------------------------------------------------------------------------------- plumbing


class _Runner:
    """The model and its KV cache: runs one forward after the cached prefix, crops the cache, counts forwards."""

    def __init__(self, model: FluidModel, stats: DecodeStats):
        self.model, self.stats = model, stats
        self.cache = DynamicCache(config=model.lm.config)
        self.cache_key = cache_kwarg(model.lm.get_decoder())
        self.device = next(model.lm.parameters()).device

    def forward(self, ids: list[int], *, keep: int, kind: str, logits_from: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `ids` at the positions after the cache and keep the first `keep` of them cached.

        Returns float32 logits and the last hidden states from input `logits_from` on (a prompt's other positions
        need no logits, which for a large vocabulary would be most of the work)."""
        start = cache_length(self.cache)
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        out = self.model.hidden_states(input_ids=input_ids, position_ids=positions, use_cache=True,
                                       **{self.cache_key: self.cache})
        crop_cache(self.cache, start + keep)
        self.stats.forwards += 1
        if kind == "verify":
            self.stats.verify_forwards += 1
        elif kind == "draft":
            self.stats.draft_forwards += 1
        hidden = out.last_hidden_state[0, logits_from:]
        return self.model.logits(hidden).float(), hidden


class _Output:
    """The generated ids and the stopping rules: EOS, the stop callback, the token budget."""

    def __init__(self, settings: DecodeSettings, budget: int, limit_reason: str):
        self.ids: list[int] = []
        self.eos = set(settings.eos_token_ids)
        self.stop = settings.stop
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
class _Plan:
    horizon: str
    tau: float | None
    objective: str
    max_k: int
    min_k: int
    budget: int
    limit_reason: str


def generation_budget(model: FluidModel, prompt_ids: list[int], settings: DecodeSettings) -> tuple[int, str]:
    """How many tokens may be generated (`max_new_tokens`, cut at the end of the model's context) and why."""
    if not prompt_ids:
        raise FluidError("empty prompt: decoding needs at least one prompt token to condition on")
    if settings.max_new_tokens < 0:
        raise FluidError(f"max_new_tokens = {settings.max_new_tokens}: must be 0 or more")
    config = model.lm.config
    context = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                      "max_position_embeddings", None)
    if context is not None and len(prompt_ids) >= context:
        raise FluidError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of {context} "
                         "positions (max_position_embeddings): shorten it")
    if context is not None and len(prompt_ids) + settings.max_new_tokens > context:
        return context - len(prompt_ids), "context"
    return settings.max_new_tokens, "length"


def _plan(model: FluidModel, prompt_ids: list[int], s: DecodeSettings) -> _Plan:
    """Check the settings against the model and resolve the defaults they leave to it."""
    budget, limit_reason = generation_budget(model, prompt_ids, s)
    if s.horizon not in HORIZONS:
        raise FluidError(f"horizon = {s.horizon!r}: expected one of {', '.join(HORIZONS)}")
    horizon = s.horizon
    if horizon == "auto":
        horizon = "khead" if model.meta.khead.get("calibrated") else "fixed"
    max_k = model.max_k if s.max_k is None else s.max_k
    if not 1 <= max_k <= model.max_k:
        raise FluidError(f"max_k = {max_k}: must be between 1 and the model's K = {model.max_k} "
                         "(the K-head and the training blocks stop there)")
    if not 1 <= s.min_k <= max_k:
        raise FluidError(f"min_k = {s.min_k}: must be between 1 and max_k = {max_k}")
    if not 0.0 <= s.threshold <= 1.0:
        raise FluidError(f"threshold = {s.threshold}: must be a probability between 0 and 1")
    objective = model.meta.khead.get("objective", "gaussian")
    tau = s.tau if s.tau is not None else model.meta.khead.get("tau")
    if horizon == "entropy" and tau is None:
        tau = DEFAULT_TAU
    if horizon == "khead" and objective == "loss-curve" and tau is None:
        raise FluidError("the model's K-head predicts loss curves and has no calibrated tau: pass --tau")
    return _Plan(horizon, tau, objective, max_k, s.min_k, budget, limit_reason)


def _finish(out: _Output, stats: DecodeStats, start: float) -> DecodeResult:
    stats.wall_s = time.perf_counter() - start
    stats.new_tokens = len(out.ids)
    stats.stop_reason = out.reason or ""
    return DecodeResult(out.ids, stats)
