"""Stage II: calibrate the Diffusion K-Head on the frozen Stage I model (METHOD 2), `fluid calibrate-khead`.

The backbone is frozen, so the expensive part, one forward over the calibration data with a block of exactly `K`
masks at each anchor, is done once. Each block yields one *pair*: the anchor's last hidden state and the per-slot
cross-entropy `l_1..l_K` of its masks, with a flag for the slots that exist. The head is then fitted on the stored
pairs alone. The raw losses are kept (not the targets), so any `tau` can be refitted without the backbone::

    one backbone pass -> pairs (h, l_1..l_K, valid) -> K* = horizon_from_curve(l, tau) -> fit KHead(h) ~ soft(K*)

Worked example (K = 4, tau = 2.8): a block whose losses are `[1.0, 2.0, 9.0, 0.5]` has running means
`[1.0, 1.5, 4.0, 3.1]`, so `K* = 2`; its soft label is a Gaussian over horizons 1..4 centred on 2.

With `objective = "loss-curve"` the head regresses `l_1..l_K` itself and the horizon rule is applied to its
prediction at decode time, so one fitted head serves every `tau`.
"""

from __future__ import annotations

import json
import math
from collections import deque
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fluid_cli.config import KHeadConfig, Recipe, dump_recipe, path_source
from fluid_cli.data import check_prepared_tokenizer, load_prepared, prepared_tokenizer
from fluid_cli.errors import FluidError
from fluid_cli.io import check_output_dir, disk_full_is_an_error, output_lock, staging_dir
from fluid_cli.folder import KHEAD_NAME, load_model, read_meta, save_khead
from fluid_cli.hf import hidden_size_of, resolve_dtype
from fluid_cli.khead import (
    KHead,
    KHeadMeta,
    gaussian_soft_labels,
    horizon_from_curve,
    predict_horizon,
    soft_cross_entropy,
)
from fluid_cli.layout import IGNORE, MASK_SLOT, ExpandedBatch, build_expanded_batch, pad_batch
from fluid_cli.model import FluidMeta, FluidModel

REPORT_NAME = "calibration.json"
CONFIG_NAME = "calibration-config.toml"
SPILL_PREFIX = ".calibrate."
MODEL_KEY = "[khead] model_dir"
LOGIT_CHUNK = 4096  # slots per LM-head call: bounds the [slots, vocab] logits for large vocabularies


# --------------------------------------------------------------------------------------------- pairs


@dataclass
class Pairs:
    """(anchor hidden state, per-slot losses) pairs, in memory or memory-mapped from a temporary file."""

    hidden: torch.Tensor  # [P, H] float16: last hidden state of the anchor (the main token at its column)
    losses: torch.Tensor  # [P, K] float32: cross-entropy of mask slot o (predicting x_{i+o+1}); 0 where invalid
    valid: torch.Tensor  # [P, K] bool: the slot's target exists and is a response token

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def k_star(self, tau: float) -> torch.Tensor:
        return horizon_from_curve(self.losses, tau, self.valid)

    def slot_loss(self) -> list[float]:
        """Mean loss of each slot over the pairs where it exists (nats): the scale `tau` is chosen on."""
        total = (self.losses.double() * self.valid).sum(0)
        count = self.valid.sum(0).clamp(min=1)
        return [round(float(x), 4) for x in total / count]

    def batch(self, idx: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = idx.sort().values  # sequential reads when memory-mapped
        return self.hidden[idx].to(device), self.losses[idx].to(device), self.valid[idx].to(device)


class PairStore:
    """Appends pairs batch by batch: in memory up to `max_bytes`, then in raw files under `folder`.

    The files are read back with `np.memmap`, so a calibration set larger than RAM still trains the head (the
    fit reads only its mini-batches).
    """

    def __init__(self, hidden_size: int, max_k: int, max_bytes: int, folder: str | Path):
        self.layout = {"hidden": (hidden_size, np.float16), "losses": (max_k, np.float32), "valid": (max_k, np.bool_)}
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.layout}
        self.max_bytes, self.folder = max_bytes, Path(folder)
        self.files: dict[str, Any] | None = None
        self.count = self.nbytes = 0

    @property
    def spilled(self) -> bool:
        return self.files is not None

    def append(self, hidden: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor) -> None:
        if len(hidden) == 0:
            return
        fp16_max = torch.finfo(torch.float16).max  # saturate instead of overflowing to inf
        arrays = {
            "hidden": hidden.float().clamp(-fp16_max, fp16_max).to(torch.float16).cpu().numpy(),
            "losses": losses.float().cpu().numpy(),
            "valid": valid.cpu().numpy(),
        }
        size = sum(a.nbytes for a in arrays.values())
        if self.files is None and self.nbytes + size > self.max_bytes:
            self._spill()
        for name, array in arrays.items():
            if self.files is not None:
                array.tofile(self.files[name])
            else:
                self.chunks[name].append(array)
        self.count += len(hidden)
        self.nbytes += size

    def _spill(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files = {name: open(self.folder / f"{name}.bin", "wb") for name in self.layout}  # noqa: SIM115
        for name, chunks in self.chunks.items():
            for array in chunks:
                array.tofile(self.files[name])
        self.chunks = {name: [] for name in self.layout}

    def finish(self) -> Pairs:
        out = {}
        for name, (width, dtype) in self.layout.items():
            if self.files is not None:
                self.files[name].close()
                array = np.memmap(self.folder / f"{name}.bin", dtype=dtype, mode="r+", shape=(self.count, width))
            elif self.chunks[name]:
                array = np.concatenate(self.chunks[name])
            else:
                array = np.zeros((0, width), dtype=dtype)
            out[name] = torch.from_numpy(array)
        return Pairs(**out)


def block_losses(model: FluidModel, ex: ExpandedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frozen forward over a batch whose blocks all have exactly `K` slots (Stage II layout).

    Returns, one row per block: the anchor's last hidden state `[P, H]`, the per-slot cross-entropy `[P, K]`
    (slot `o` predicts `x_{i+o+1}`; 0 where invalid) and the validity mask `[P, K]` (label != -100: slots whose
    target is past the end or not a response token do not count).
    """
    K = model.max_k
    dtype = model.dtype
    # Main rows (whose hidden states feed the K-head) run the base path, block rows the draft path.
    hidden = model.hidden_states(draft_from=ex.num_main,
                                 **ex.model_inputs(dtype if dtype.is_floating_point else torch.float32))
    hidden = hidden.last_hidden_state
    # expand_batch lays blocks out row-major in anchor order, slots 1..K in order, so a boolean selection of the
    # mask slots reshapes to [blocks, K].
    slots = ex.slot_type == MASK_SLOT
    n_slots = int(slots.sum())
    if n_slots % K:
        raise ValueError(f"calibration blocks must have exactly K={K} slots (got {n_slots} slots)")
    rows = slots.nonzero()[:, 0].view(-1, K)[:, 0]
    anchors = ex.anchor[slots].view(-1, K)[:, 0]
    labels = ex.labels[slots].view(-1, K)
    valid = labels != IGNORE
    slot_hidden = hidden[slots].view(-1, K, hidden.shape[-1])[valid]
    targets = labels[valid]
    ce = [
        F.cross_entropy(model.logits(slot_hidden[s : s + LOGIT_CHUNK]).float(), targets[s : s + LOGIT_CHUNK],
                        reduction="none")
        for s in range(0, len(targets), LOGIT_CHUNK)
    ]
    losses = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    if ce:
        losses[valid] = torch.cat(ce)
    return hidden[rows, anchors], losses, valid


def collect_pairs(
    model: FluidModel,
    batches: Iterable[list[dict]],
    store: PairStore,
    *,
    p_anchor: float,
    generator: torch.Generator,
    pad_token_id: int = 0,
    advance: Callable[[int], None] | None = None,
) -> Pairs:
    """The collection pass: for each batch of rows (`input_ids`/`labels` lists), blocks of exactly `K` masks at
    anchors drawn with `p_anchor`, no reveal, no noise; every block's pair goes into `store`."""
    device = next(model.lm.parameters()).device
    for rows in batches:
        batch = pad_batch(rows, pad_token_id)
        ex = build_expanded_batch(
            batch["input_ids"], batch["labels"], batch["attention_mask"], mask_token_id=model.mask_token_id,
            max_k=model.max_k, p_anchor=p_anchor, fixed_k=True, reveal=False, noise=0.0, generator=generator,
        )
        with torch.inference_mode():
            store.append(*block_losses(model, ex.to(device)))
        if advance is not None:
            advance(len(rows))
    return store.finish()


# --------------------------------------------------------------------------------------------- the head


def head_loss(
    out: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor, *, objective: str, tau: float, sigma: float
) -> torch.Tensor:
    """gaussian: soft cross-entropy against the Gaussian around `K*`; loss-curve: Huber on the slots that exist."""
    if objective == "gaussian":
        target = gaussian_soft_labels(horizon_from_curve(losses, tau, valid), out.shape[-1], sigma)
        return soft_cross_entropy(out, target)
    err = F.huber_loss(out.float(), losses, reduction="none")
    return (err * valid).sum() / valid.sum().clamp(min=1)


@dataclass
class HeadFit:
    head: KHead
    train_loss: float  # mean loss over the last tenth of the steps
    seconds: float


def fit_head(
    pairs: Pairs,
    *,
    objective: str,
    tau: float,
    sigma: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    advance: Callable[[int], None] | None = None,
) -> HeadFit:
    """Fit a fresh `KHead` on stored pairs with AdamW: `steps` mini-batches drawn epoch by epoch."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    head = KHead(pairs.hidden.shape[1], pairs.losses.shape[1]).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(pairs), generator=gen), 0
    recent: deque[float] = deque(maxlen=max(1, steps // 10))
    for _ in range(steps):
        if pos >= len(pairs):
            order, pos = torch.randperm(len(pairs), generator=gen), 0
        hidden, losses, valid = pairs.batch(order[pos : pos + batch_size], device)
        pos += batch_size
        loss = head_loss(head(hidden.float()), losses, valid, objective=objective, tau=tau, sigma=sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(loss.item())
        if advance is not None:
            advance(1)
    return HeadFit(head.eval(), sum(recent) / len(recent), time.perf_counter() - start)


@torch.no_grad()
def evaluate_head(
    head: KHead, train: Pairs, holdout: Pairs, *, objective: str, tau: float, sigma: float
) -> dict[str, Any]:
    """Score the head on held-out pairs against `K*`, next to the majority class of the training pairs."""
    device = next(head.parameters()).device
    K = head.max_k
    outs, n = [], 65536
    for s in range(0, len(holdout), n):
        outs.append(head(holdout.hidden[s : s + n].to(device).float()).cpu())
    out = torch.cat(outs) if outs else torch.zeros(0, K)
    k_star = holdout.k_star(tau)
    pred = predict_horizon(out, objective=objective, tau=tau)
    majority = int(torch.bincount(train.k_star(tau), minlength=K + 1).argmax())

    def mean(x: torch.Tensor) -> float:
        return float(x.float().mean()) if len(x) else float("nan")

    return {
        "tau": tau,
        "head_loss": float(head_loss(out, holdout.losses, holdout.valid, objective=objective, tau=tau, sigma=sigma)),
        "exact": mean(pred == k_star),
        "within1": mean((pred - k_star).abs() <= 1),
        "majority_k": majority,
        "majority_exact": mean(k_star == majority),
        "majority_within1": mean((k_star - majority).abs() <= 1),
        "mean_k_star": mean(k_star),
        "mean_pred": mean(pred),
        "hist_k_star": torch.bincount(k_star, minlength=K + 1)[1:].tolist(),
        "hist_pred": torch.bincount(pred, minlength=K + 1)[1:].tolist(),
    }


# --------------------------------------------------------------------------------------------- the command


def parse_taus(text: str) -> list[float]:
    """`--tau 2.8` or `--tau 2.0,2.8,3.5` -> a list of thresholds (checked by `run`).

    >>> parse_taus("2.0, 2.8,3.5")
    [2.0, 2.8, 3.5]
    """
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise FluidError(f"--tau {text}: expected a number or a list, e.g. 2.8 or 2.0,2.8,3.5") from None


def split_examples(n: int, holdout: float, seed: int, max_examples: int | None) -> tuple[list[int], list[int]]:
    """Shuffle example indices, keep at most `max_examples`, and hold out a `holdout` fraction of them.

    The split is by example, not by pair, so held-out pairs never share a sequence with training pairs.

    >>> train, held = split_examples(10, 0.2, seed=0, max_examples=None)
    >>> len(train), len(held), sorted(train + held) == list(range(10))
    (8, 2, True)
    """
    order = np.random.default_rng(seed).permutation(n)[: max_examples or n].tolist()
    n_hold = max(1, round(holdout * len(order)))
    if len(order) - n_hold < 1:
        raise FluidError(f"[khead] holdout = {holdout}: {len(order)} example(s) leave none to fit the head on")
    return order[n_hold:], order[:n_hold]


def _row_batches(data: Any, indices: list[int], batch_size: int, cutoff_len: int) -> Iterator[list[dict]]:
    for s in range(0, len(indices), batch_size):
        part = data[indices[s : s + batch_size]]
        rows = [
            {"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len]}
            for ids, labels in zip(part["input_ids"], part["labels"])
            if len(ids) >= 2  # a row needs a next token to have an anchor
        ]
        if rows:
            yield rows


def _check(cfg: Recipe, meta: FluidMeta, model_dir: Path) -> None:
    """What the recipe must agree on with the model (its own values were checked when it was loaded)."""
    where = cfg.source or "recipe"
    if cfg.fluid.max_k != meta.max_k:
        raise FluidError(
            f"{where}: [fluid] max_k = {cfg.fluid.max_k} but the model in {model_dir} has K = {meta.max_k} "
            f"(set fluid.max_k={meta.max_k})"
        )


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), console=console)


def run(cfg: Recipe, taus: list[float] | None = None) -> dict[str, Any]:
    """Calibrate the K-head of `[khead] model_dir` (default `[train] output_dir`) and save it there.

    `taus=None` fits the recipe's `tau`; a single value replaces it (also in the saved recipe); several fit one
    head each (the loss-curve objective fits once and scores every `tau`), and the head for the recipe's `tau`
    is the one saved (that `tau` joins the sweep if it is not in it). Returns the report, which is also
    written to `calibration.json` in the model directory.
    """
    kc = cfg.khead
    for tau in taus or []:
        if not 0 < tau < math.inf:
            raise FluidError(f"--tau {tau:g}: tau must be a positive number of nats (e.g. 2.8)")
    if taus is not None and len(taus) == 1:
        kc.tau = taus[0]
    folder, how = path_source(cfg, "khead.model_dir", "train.output_dir")
    model_dir = Path(folder)
    if not model_dir.exists():
        raise FluidError(f"{model_dir}: model folder not found ({how})")
    meta = read_meta(model_dir)
    _check(cfg, meta, model_dir)
    check_output_dir(model_dir, MODEL_KEY)
    with output_lock(model_dir, MODEL_KEY), disk_full_is_an_error(model_dir):
        return _calibrate(cfg, taus, model_dir, meta)


def _calibrate(cfg: Recipe, taus: list[float] | None, model_dir: Path, meta: FluidMeta) -> dict[str, Any]:
    kc = cfg.khead
    data_path, how = path_source(cfg, "khead.dataset", "data.output_dir")
    data = load_prepared(data_path, hint=f"{how}; run `fluid prepare-data`, or set [khead] dataset")
    splits = dict(zip(("train", "holdout"), split_examples(len(data), kc.holdout, kc.seed, kc.max_examples)))

    from accelerate import Accelerator
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this command shows its own progress
    accelerator = Accelerator()
    if accelerator.num_processes > 1:
        raise FluidError("calibrate-khead runs in one process (the head is tiny); start it without `accelerate launch`")
    # The collection pass feeds a dense 4D mask, which sdpa and eager attention take (not flex_attention).
    attn = "eager" if cfg.model.attn_implementation == "eager" else "sdpa"
    model = load_model(model_dir, dtype=resolve_dtype(cfg.model.dtype, accelerator.device),
                       device=accelerator.device, merge=True, attn_implementation=attn)
    model.requires_grad_(False).eval()
    data_tok = prepared_tokenizer(data_path, meta.trust_remote_code)
    if data_tok is not None and model.tokenizer is not None:
        check_prepared_tokenizer(data_path, data_tok, model.tokenizer, f"the model in {model_dir}",
                                 ignore=(meta.mask_token,))
    report: dict[str, Any] = {
        "model_dir": str(model_dir), "dataset": str(data_path), "objective": kc.objective, "K": meta.max_k,
        "sigma": kc.sigma, "steps": kc.steps, "lr": kc.lr, "batch_size": kc.batch_size, "saved_tau": kc.tau,
        "examples": {name: len(idx) for name, idx in splits.items()}, "storage": {},
    }
    # The pairs that spill past max_memory_mb go to a hidden folder in the model folder (removed afterwards, on
    # SIGINT too, and by the next calibration after a kill).
    with staging_dir(model_dir, SPILL_PREFIX) as tmp, _progress(Console(stderr=True)) as progress:
        start = time.perf_counter()
        pairs = _collect_splits(cfg, model, data, splits, tmp, progress, report["storage"])
        report["collect_s"] = time.perf_counter() - start
        report["pairs"] = {name: len(p) for name, p in pairs.items()}
        report["slot_loss"] = pairs["holdout"].slot_loss()
        fits = _fit_sweep(kc, pairs, sorted(set(taus or []) | {kc.tau}), accelerator.device, progress)
        report["results"] = [
            {**evaluate_head(fit.head, pairs["train"], pairs["holdout"], objective=kc.objective, tau=tau,
                             sigma=kc.sigma),
             "train_loss": fit.train_loss, "fit_s": fit.seconds, "saved": tau == kc.tau}
            for tau, fit in fits.items()
        ]
    report["fit_s"] = sum({id(fit): fit.seconds for fit in fits.values()}.values())  # a shared fit counts once

    model.khead = fits[kc.tau].head.cpu()
    model.meta.khead = KHeadMeta(
        objective=kc.objective, calibrated=True, tau=kc.tau, sigma=kc.sigma, slot_loss=report["slot_loss"],
        steps=kc.steps, lr=kc.lr,
        data={"path": str(data_path), "pairs": report["pairs"]["train"], "holdout_pairs": report["pairs"]["holdout"]},
    )
    # The K-head, fluid.json, the report and the recipe replace the old ones together (the Stage I recipe stays).
    save_khead(model, model_dir, {REPORT_NAME: json.dumps(report, indent=2) + "\n",
                                  CONFIG_NAME: dump_recipe(cfg)})
    _print_report(Console(), report)
    return report


def _collect_splits(cfg: Recipe, model: FluidModel, data: Any, splits: dict[str, list[int]], tmp: Path,
                    progress: Progress, storage: dict[str, str]) -> dict[str, Pairs]:
    """The one backbone pass, over the training examples and then the held-out ones."""
    kc = cfg.khead
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None else None
    gen = torch.Generator().manual_seed(kc.seed)
    pairs = {}
    for name, idx in splits.items():
        task = progress.add_task(f"collect {name}", total=len(idx), unit="ex")
        store = PairStore(hidden_size_of(model.lm.config), model.max_k, kc.max_memory_mb << 20, tmp / name)
        pairs[name] = collect_pairs(
            model, _row_batches(data, idx, kc.collect_batch_size, kc.cutoff_len), store,
            p_anchor=cfg.fluid.p_anchor, generator=gen, pad_token_id=pad_id if pad_id is not None else 0,
            advance=lambda n, task=task: progress.advance(task, n),
        )
        storage[name] = "memmap" if store.spilled else "memory"
        if len(pairs[name]) == 0:
            raise FluidError(f"{kc.dataset or cfg.data.output_dir}: no anchors in the {name} examples "
                             "(no response tokens to calibrate on)")
    return pairs


def _fit_sweep(kc: KHeadConfig, pairs: dict[str, Pairs], taus: list[float], device: torch.device,
               progress: Progress) -> dict[float, HeadFit]:
    """One head per `tau` (gaussian), or one head shared by every `tau` (loss-curve: it does not see tau)."""
    fits: dict[float, HeadFit] = {}
    for tau in taus:
        if kc.objective == "loss-curve" and fits:
            fits[tau] = next(iter(fits.values()))
            continue
        task = progress.add_task(f"fit head (tau={tau:g})", total=kc.steps, unit="step")
        fits[tau] = fit_head(pairs["train"], objective=kc.objective, tau=tau, sigma=kc.sigma, steps=kc.steps,
                             lr=kc.lr, batch_size=kc.batch_size, seed=kc.seed, device=device,
                             advance=lambda n, task=task: progress.advance(task, n))
    return fits


def _print_report(console: Console, report: dict[str, Any]) -> None:
    table = Table(
        title=f"K-head calibration: {report['objective']}, K={report['K']}, "
              f"{report['pairs']['train']} train / {report['pairs']['holdout']} held-out pairs",
        caption="exact, ±1: predicted horizon vs K* on held-out pairs; majority (k): always the most common "
                "training K*; K*, pred: mean horizons; *: the head saved",
        box=box.SIMPLE_HEAD,
    )
    for col in ("tau", "loss", "exact", "±1", "majority", "maj. ±1", "K*", "pred"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["results"]:
        table.add_row(f"{r['tau']:g}{' *' if r['saved'] else ''}", f"{r['head_loss']:.3f}", f"{r['exact']:.1%}",
                      f"{r['within1']:.1%}", f"{r['majority_exact']:.1%} ({r['majority_k']})",
                      f"{r['majority_within1']:.1%}", f"{r['mean_k_star']:.2f}", f"{r['mean_pred']:.2f}",
                      style="bold" if r["saved"] else None)
    console.print(table)
    saved = next(r for r in report["results"] if r["saved"])
    hist = Table(title=f"held-out horizons at tau={saved['tau']:g}: target K* and predicted", box=box.SIMPLE_HEAD)
    for col in ("k", "K*", "", "predicted", ""):
        hist.add_column(col, justify="right" if col else "left", no_wrap=True)
    top = max(saved["hist_k_star"] + saved["hist_pred"]) or 1
    for k, (a, b) in enumerate(zip(saved["hist_k_star"], saved["hist_pred"]), start=1):
        hist.add_row(str(k), str(a), "█" * round(16 * a / top), str(b), "[cyan]" + "█" * round(16 * b / top))
    console.print(hist)
    console.print("held-out loss per slot (nats), the scale --tau is chosen on: "
                  + "  ".join(f"{k}: {x:.2f}" for k, x in enumerate(report["slot_loss"], start=1)))
    console.print(f"collection pass {report['collect_s']:.1f} s, head fits {report['fit_s']:.1f} s. Saved the head for "
                  f"tau={saved['tau']:g} ({report['objective']}) to {Path(report['model_dir']) / KHEAD_NAME}; "
                  f"report: {Path(report['model_dir']) / REPORT_NAME}")
