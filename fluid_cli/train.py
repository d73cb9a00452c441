"""Stage I training (METHOD 1): joint next-token and mask-block prediction, on accelerate.

    fluid train-stage1 recipes/tiny-stage1.toml [--set train.max_steps=50] [--resume]

`run` is three steps, `setup` (1-3), `loop` (4-5) and `save_final` (6), each reading top to bottom:

1. check the inputs (dataset folder, output folder, resume point) before anything heavy happens (`preflight`),
   then take the output folder's lock (one writer at a time) and tidy what a killed run left in it;
2. build the model: a pretrained causal LM (`[model] path`) or one grown from scratch (`[model.scratch]`), the
   mask token (reused or added), LoRA (`[lora]`) or full fine-tuning, and an untrained K-head;
3. cut the prepared dataset into steps: every epoch is a seeded permutation of the rows, each optimizer step
   takes `grad_accum` micro-batches of `batch_size` rows on every process;
4. for each micro-batch: `layout.pad_batch` -> `layout.build_expanded_batch` (anchors, blocks, reveal, noise,
   drawn from a seeded generator) -> `FluidModel.stage1_loss` -> backward; AdamW, warmup then the `lr_scheduler`
   schedule (cosine, linear or constant), gradient clipping;
5. every `log_steps` append the window's means to `metrics.jsonl`; every `save_steps` write a checkpoint
   (trainable weights, optimizer, scheduler, every RNG including the layout generator, data position). A loss
   that is not finite stops the run before anything else is written, keeping the last good checkpoint;
6. write the FLUID model folder (`folder.save_model`, which replaces a previous model in one journaled step),
   `train-summary.json` and `fluid-config.toml` into `[train] output_dir`.

Everything that decides a step (data order, layout draws, dropout) is a function of the seed and the step, and
all of it is in a checkpoint, so `--resume` reproduces the uninterrupted run's losses exactly (CPU, fp32). A checkpoint
also keeps its recipe and the dataset's identity: a resume that would change what a step does is refused, and a
finished run is not resumed (`fluid_cli.resume`).

A full disk while writing a checkpoint or the model is one line; the partial files are removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_tensorboard_available, set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from fluid_cli.backbone import NO_MODEL, model_reference, recipe_lm, recipe_tokenizer
from fluid_cli.config import FluidConfig, Recipe, path_source
from fluid_cli.data import arrow_column, check_prepared_tokenizer, load_prepared, prepared_tokenizer
from fluid_cli.errors import FluidError
from fluid_cli.folder import META_NAME, read_meta, save_model
from fluid_cli.hf import hidden_size_of, noise_token_ids, resolve_mask_token
from fluid_cli.io import (
    check_output_dir,
    disk_full_error,
    disk_full_is_an_error,
    is_disk_full,
    locked_by,
    output_lock,
    recover_files,
    write_json_atomic,
    write_text_atomic,
)
from fluid_cli.khead import KHead
from fluid_cli.layout import ExpandedBatch, PAD_SLOT, build_expanded_batch, pad_batch
from fluid_cli.lora import apply_lora
from fluid_cli.model import FluidMeta, FluidModel, Stage1Loss
from fluid_cli.resume import check as resume_check
from fluid_cli.resume import dataset_identity

CHECKPOINTS = "checkpoints"
METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "train-summary.json"
STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
OUTPUT_KEY = "[train] output_dir"
PLAIN_PROGRESS_S = 30.0  # without a terminal (a log file), a plain progress line at most this often
# [train] lr_scheduler -> transformers' schedule; each warms up linearly over warmup_ratio of the steps first
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}

console = Console(stderr=True)


# --------------------------------------------------------------------------------------------- inputs


def dataset_dir(cfg: Recipe) -> Path:
    return Path(cfg.train.dataset or cfg.data.output_dir)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (`checkpoints/step-N`; half-written ones are hidden `.step-N.tmp`)."""
    found = [(int(m.group(1)), p) for p in (output_dir / CHECKPOINTS).glob("step-*")
             if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def preflight(cfg: Recipe, resume: bool) -> list[str]:
    """Cheap checks of the inputs, run before launching processes so a mistake is one line, not a traceback per rank
    (the recipe's values were checked when it was loaded). Returns the recipe changes a resume may make and makes
    (`fluid_cli.resume`), to be said when the run starts."""
    data = dataset_dir(cfg)
    if not data.is_dir():
        raise FluidError(f"{data}: dataset folder not found ({path_source(cfg, 'train.dataset', 'data.output_dir')[1]}"
                         "); run `fluid prepare-data` with this recipe first")
    if cfg.model.scratch is None and cfg.model.path is None:
        raise FluidError(NO_MODEL)
    if cfg.model.scratch is not None and cfg.lora.enabled:  # only training minds: prepare-data uses the tokenizer
        raise FluidError("[lora] enabled: a model grown from scratch trains all its weights; "
                         "set [lora] enabled = false")
    out = Path(cfg.train.output_dir)
    check_output_dir(out, OUTPUT_KEY)
    holder = locked_by(out) if main_process() else None  # the other ranks would see their own run's lock
    if holder is not None:
        raise FluidError(f"{out}: another fluid process (pid {holder}) is training into this folder; wait for it to "
                         f"finish, or choose another {OUTPUT_KEY}")
    checkpoint = latest_checkpoint(out)
    summary = out / SUMMARY_NAME  # written last: the run is finished
    where = path_source(cfg, "train.output_dir")[1]
    if not resume:
        if summary.is_file():
            raise FluidError(f"{where}: {out} holds a finished run ({finished_run(out)}); remove it or choose "
                             f"another {OUTPUT_KEY}")
        if checkpoint is not None:
            raise FluidError(f"{where}: {out} holds an unfinished run (its newest checkpoint is after step "
                             f"{checkpoint_step(checkpoint)}); pass --resume to continue it, or remove it / choose "
                             f"another {OUTPUT_KEY}")
        if (out / META_NAME).exists():
            raise FluidError(f"{where}: {out} holds a model; remove it or choose another {OUTPUT_KEY}")
        return []
    allowed = resume_check(cfg, out, checkpoint, read_state(checkpoint) if checkpoint is not None else {}, data)
    if summary.is_file():
        raise FluidError(f"--resume: {out} holds a finished run ({finished_run(out)}): nothing is left to train, "
                         f"and nothing was changed; a longer run is a new run in another {OUTPUT_KEY}")
    if checkpoint is None:
        raise FluidError(f"--resume: no checkpoint in {out / CHECKPOINTS} to resume from")
    return allowed


def finished_run(out: Path) -> str:
    """What a finished run in `out` did, for a message: its steps, and whether its K-head was calibrated since."""
    steps = json.loads((out / SUMMARY_NAME).read_text()).get("steps")
    calibrated = (out / META_NAME).is_file() and read_meta(out).khead.calibrated
    return f"{steps} steps" + (", K-head calibrated" if calibrated else "")


# --------------------------------------------------------------------------------------------- model


def build_model(cfg: Recipe) -> FluidModel:
    """The model to train: backbone (pretrained or scratch), mask token, LoRA or full weights, untrained K-head."""
    data_tok = prepared_tokenizer(dataset_dir(cfg), cfg.model.trust_remote_code)
    if cfg.model.scratch is not None:
        tokenizer = data_tok if data_tok is not None else recipe_tokenizer(cfg.model)
        lm = recipe_lm(cfg.model, tokenizer)
        base_model = None
    else:
        tokenizer = recipe_tokenizer(cfg.model)
        lm = recipe_lm(cfg.model, tokenizer)
        if data_tok is not None:
            check_prepared_tokenizer(dataset_dir(cfg), data_tok, tokenizer,
                                     f"[model] {cfg.model.tokenizer or cfg.model.path}", ignore=(cfg.fluid.mask_token,))
            tokenizer = data_tok  # it carries the chat template the data was rendered with
        base_model = model_reference(cfg.model.path)
    mask_id, _ = resolve_mask_token(tokenizer, lm, cfg.fluid.mask_token, cfg.fluid.add_mask_token)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so frozen embeddings under LoRA are fine.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab_size = lm.get_input_embeddings().num_embeddings  # before LoRA wraps the embedding
    lora = cfg.lora
    backbone = lm
    if lora.enabled:
        backbone = apply_lora(lm, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                              target_modules=lora.target_modules, mask_token_id=mask_id)
    meta = FluidMeta(
        mask_token=cfg.fluid.mask_token,
        mask_token_id=mask_id,
        max_k=cfg.fluid.max_k,
        vocab_size=vocab_size,
        weights="adapter" if lora.enabled else "full",
        lora_scope=lora.scope if lora.enabled else None,
        base_model=base_model,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    # Stage II trains the K-head; it is saved untrained now so the folder is complete and loadable.
    khead = KHead(hidden_size_of(lm.config), cfg.fluid.max_k).requires_grad_(False)
    return FluidModel(backbone, khead, meta, tokenizer)


class Stage1Objective(nn.Module):
    """The module accelerate wraps (DDP, FSDP, DeepSpeed): its forward is the Stage I loss, so the wrapper's
    gradient synchronisation sees every backbone call."""

    def __init__(self, fluid: FluidModel, cfg: FluidConfig):
        super().__init__()
        self.fluid = fluid
        self.ar_weight, self.diff_weight = cfg.ar_weight, cfg.diff_weight
        # FSDP's transformer auto-wrap policy looks for the decoder layer class here.
        self._no_split_modules = getattr(fluid.lm, "_no_split_modules", None)

    def forward(self, ex: ExpandedBatch) -> Stage1Loss:
        return self.fluid.stage1_loss(ex, self.ar_weight, self.diff_weight)


def adamw(model: nn.Module, cfg: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on matrices (not norms, biases, token rows)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)


# --------------------------------------------------------------------------------------------- data order


@dataclass
class Schedule:
    """How the rows are cut into steps; every process computes the same one.

    A *global micro-batch* is `batch_size` rows on each of `world` processes; an epoch is `rows // (batch_size *
    world)` of them (the remainder is dropped so every process runs the same number of steps) and an optimizer
    step is `grad_accum` of them. The position in the data is therefore just the step number.

    >>> s = Schedule.of(rows=100, batch_size=4, grad_accum=2, world=2, max_steps=None, epochs=3.0, warmup_ratio=0.1)
    >>> s.micro_per_epoch, s.total_steps, s.warmup_steps
    (12, 18, 2)
    """

    micro_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, rows: int, batch_size: int, grad_accum: int, world: int, max_steps: int | None, epochs: float,
           warmup_ratio: float) -> Schedule:
        micro = rows // (batch_size * world)
        if micro == 0:
            raise FluidError(
                f"[train] batch_size: the dataset has {rows} rows, fewer than one batch "
                f"({batch_size} rows x {world} processes)"
            )
        total = max_steps if max_steps is not None else max(1, math.ceil(epochs * micro / grad_accum))
        if total < 1:
            raise FluidError(f"[train] max_steps: expected at least 1, got {total}")
        return cls(micro, total, math.ceil(warmup_ratio * total))


def micro_batches(train: Any, sched: Schedule, start: int, batch_size: int, rank: int, world: int,
                  seed: int) -> Iterator[list[dict]]:
    """This process's rows for global micro-batch `start`, `start + 1`, ... (epoch `e` is permutation `seed + e`)."""
    epoch, skip = divmod(start, sched.micro_per_epoch)
    while True:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for j in range(skip, sched.micro_per_epoch):
            first = (j * world + rank) * batch_size
            cols = train[order[first:first + batch_size]]
            yield [{"input_ids": i, "labels": l} for i, l in zip(cols["input_ids"], cols["labels"])]
        epoch, skip = epoch + 1, 0


def expand(rows: list[dict], cfg: Recipe, meta: FluidMeta, pad_id: int, noise_ids: torch.Tensor,
           generator: torch.Generator) -> ExpandedBatch:
    """One micro-batch in the Stage I layout (METHOD 1.1-1.3), built on the CPU from the seeded generator."""
    batch = pad_batch(rows, pad_id)
    top = int(batch["input_ids"].max())
    if top >= meta.vocab_size:
        raise FluidError(f"{dataset_dir(cfg)}: token id {top} is outside the model's vocabulary "
                         f"({meta.vocab_size}); prepare the data with this recipe's model")
    f = cfg.fluid
    return build_expanded_batch(
        batch["input_ids"], batch["labels"], batch["attention_mask"], mask_token_id=meta.mask_token_id,
        max_k=f.max_k, p_anchor=f.p_anchor, fixed_k=f.fixed_k, reveal=f.reveal, noise=f.noise, noise_ids=noise_ids,
        max_expanded_len=cfg.train.max_expanded_len, generator=generator,
    )


# --------------------------------------------------------------------------------------------- checkpoints


def keep_trainable(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
    """`save_state` hook: checkpoint only the trainable weights (a LoRA checkpoint of a 7B model is then
    megabytes, not the whole frozen base model). Loading therefore uses `strict=False`."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in trainable]:
            del state[name]


def save_checkpoint(acc: Accelerator, out: Path, step: int, layout_rng: torch.Generator, state: dict,
                    limit: int, cfg: Recipe) -> None:
    """Write `checkpoints/step-N` through a hidden temporary folder, then prune to the newest `limit`. On any
    error (a full disk, SIGINT) the temporary folder is removed; the older checkpoints stay. The checkpoint keeps
    the recipe it was written under, which a resume must keep (`fluid_cli.resume`)."""
    final = out / CHECKPOINTS / f"step-{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
        torch.save(layout_rng.get_state(), tmp / f"layout_rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            cfg.save(tmp)
            write_json_atomic(tmp / STATE_NAME, state)
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, tmp.parent)  # before the cleanup frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full_error(out, f"the partial checkpoint {tmp.name} was removed") from None
        raise
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted((int(_CHECKPOINT_RE.match(p.name).group(1)), p) for p in (out / CHECKPOINTS).glob("step-*")
                      if _CHECKPOINT_RE.match(p.name))
        for _, old in kept[:-limit] if limit > 0 else []:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `trainer_state.json`: its step, the run's shape, the dataset's identity."""
    return json.loads((path / STATE_NAME).read_text())


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was taken after."""
    return int(read_state(path)["step"])


def check_world_size(path: Path, world_size: int) -> None:
    """A checkpoint continues only with as many processes as wrote it (`preflight` compared its recipe and dataset
    with the run's; the number of processes only the launched run knows)."""
    written = read_state(path).get("world_size", world_size)
    if written != world_size:
        raise FluidError(f"--resume: {path} was written by {written} processes, the run now has {world_size}; "
                         "resuming would not continue the same run")


def load_checkpoint(acc: Accelerator, path: Path, layout_rng: torch.Generator) -> int:
    """Restore a checkpoint written by `save_checkpoint`; returns the step it was taken after."""
    state = read_state(path)
    whole_model_formats = (DistributedType.FSDP, DistributedType.DEEPSPEED)
    acc.load_state(str(path), **({} if acc.distributed_type in whole_model_formats else {"strict": False}))
    layout_rng.set_state(torch.load(path / f"layout_rng_{acc.process_index}.pt"))
    return int(state["step"])


# --------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """`metrics.jsonl`, one JSON object per logged step, written by the main process only.

    On resume the records after the checkpoint are dropped: the resumed run writes them again.
    """

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if record.get("step", math.inf) <= start_step:
                    kept.append(line + "\n")
        write_text_atomic(path, "".join(kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class Window:
    """Sums since the last log. Losses stay on the device (no synchronisation per micro-batch); everything is
    reduced over processes only when logging, in one collective."""

    def __init__(self, device: torch.device):
        self.losses = torch.zeros(3, dtype=torch.float64, device=device)  # loss, loss_ar, loss_diff
        self.micro = self.tokens = self.expanded = self.steps = 0
        self.started = time.perf_counter()

    def add(self, out: Stage1Loss, ex: ExpandedBatch) -> None:
        """`ex` is the batch still on the CPU, so counting its slots costs no device synchronisation."""
        self.losses += torch.stack([out.loss.detach(), out.loss_ar.detach(), out.loss_diff.detach()]).double()
        self.micro += 1
        real = ex.slot_type != PAD_SLOT
        self.expanded += int(real.sum())  # tokens + mask slots
        self.tokens += int(real[:, : ex.num_main].sum())  # the original sequences' real tokens

    def reduce(self, acc: Accelerator) -> dict[str, float]:
        counts = torch.tensor([self.micro, self.tokens, self.expanded], dtype=torch.float64, device=self.losses.device)
        loss, ar, diff, micro, tokens, expanded = acc.reduce(torch.cat([self.losses, counts]), "sum").tolist()
        seconds = time.perf_counter() - self.started
        return {"loss": loss / micro, "loss_ar": ar / micro, "loss_diff": diff / micro,
                "tokens": int(tokens), "expanded_tokens": int(expanded), "seconds": seconds,
                "steps_per_s": self.steps / seconds, "tokens_per_s": tokens / seconds,
                "expanded_tokens_per_s": expanded / seconds}


class PlainProgress:
    """Without a terminal (`fluid demo > log 2>&1`) rich shows no live bar: a plain line on each logged step at
    most every `PLAIN_PROGRESS_S` seconds (and on the last one), so a log shows the run advancing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self.last = time.perf_counter()

    def line(self, step: int, stats: dict[str, float], lr: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < PLAIN_PROGRESS_S and step != self.total):
            return
        self.last = now
        console.print(f"stage 1: step {step}/{self.total}, loss {stats['loss']:.3f} (ar {stats['loss_ar']:.3f}, "
                      f"diff {stats['loss_diff']:.3f}), lr {lr:.2e}, {stats['steps_per_s']:.2f} steps/s, "
                      f"{stats['tokens_per_s']:,.0f} tok/s", soft_wrap=True)


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]stage 1"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
        console=console, disable=not enabled,
    )


def weight_fingerprint(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Sum and sum of squares of the trainable weights: equal on every data-parallel rank when they agree."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.requires_grad:
            w = p.detach().to(device, torch.float64)
            total += torch.stack([w.sum(), w.square().sum()])
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------- the run


def make_accelerator(cfg: Recipe) -> Accelerator:
    """The accelerator for this process; precision comes from the recipe, not from accelerate's config."""
    mixed = cfg.launch.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    tensorboard = cfg.train.tensorboard
    if tensorboard and not is_tensorboard_available():
        raise FluidError("[train] tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    return Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.train.grad_accum,
        # Several processes without a GPU: run them on CPU with gloo instead of failing to find devices.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        log_with="tensorboard" if tensorboard else None,
        project_dir=str(Path(cfg.train.output_dir) / "tensorboard"),
    )


@dataclass
class Run:
    """Everything the loop needs, built by `setup`."""

    cfg: Recipe
    acc: Accelerator
    fluid: FluidModel
    objective: nn.Module  # the accelerate-prepared `Stage1Objective`
    optimizer: Any
    scheduler: Any
    sched: Schedule
    train: Any  # the prepared dataset's train split
    layout_rng: torch.Generator
    run_state: dict[str, Any]  # what a checkpoint records of the run besides its recipe (processes, dataset)
    start: int  # the step the run continues after (0: a new run)
    pad_id: int
    noise_ids: torch.Tensor
    use_cache: bool  # the model config's own setting, restored for the saved model
    metrics: MetricsLog

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)


def run(cfg: Recipe, resume: bool = False) -> Path:
    """Train Stage I as the recipe says and write the FLUID model folder; returns its path."""
    changed = preflight(cfg, resume)
    out = Path(cfg.train.output_dir)
    with writing(out), disk_full_is_an_error(out):
        state = setup(cfg, resume, changed)
        totals, last = loop(state)
        save_final(state, totals, last)
    if cfg.train.tensorboard:
        state.acc.end_training()
    return state.out


def main_process() -> bool:
    """Whether this is the process that writes the outputs: global rank 0 (`accelerate launch` sets RANK for every
    process it starts; a plain run is rank 0)."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """The main process holds the output folder's lock for the whole run and first tidies what a killed run left: a
    half-written checkpoint, an interrupted final save."""
    if not main_process():
        yield
        return
    with output_lock(out, OUTPUT_KEY):
        for tmp in (out / CHECKPOINTS).glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        recover_files(out, META_NAME)
        yield


def setup(cfg: Recipe, resume: bool, changed: list[str]) -> Run:
    """The accelerator, model, optimizer, schedule and data order; restored from the newest checkpoint when
    resuming (`changed`: the recipe changes the resume makes). The output folder gets the resolved recipe."""
    hf_logging.disable_progress_bar()  # the loop has its own progress display
    out = Path(cfg.train.output_dir)
    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed)  # identical initialisation (LoRA, scratch weights, new token rows) on every rank
    train = load_prepared(dataset_dir(cfg))
    fluid = build_model(cfg)
    tokenizer = fluid.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is never attended
    use_cache = fluid.lm.config.use_cache
    fluid.lm.config.use_cache = False  # no KV cache while training

    t = cfg.train
    sched = Schedule.of(len(train), t.batch_size, t.grad_accum, acc.num_processes, t.max_steps, t.epochs,
                        t.warmup_ratio)
    check_expanded_len(cfg, train)
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        check_world_size(checkpoint, acc.num_processes)
        if (done := checkpoint_step(checkpoint)) > sched.total_steps:  # a checkpoint of an older version's run
            raise FluidError(f"--resume: the newest checkpoint is after step {done}, beyond the run's "
                             f"{sched.total_steps} steps, so it is not this run's; start a new run in another "
                             f"{OUTPUT_KEY}")
    objective = Stage1Objective(fluid, cfg.fluid)
    optimizer = adamw(objective, cfg)
    scheduler = get_scheduler(SCHEDULERS[t.lr_scheduler], optimizer, sched.warmup_steps, sched.total_steps)
    objective, optimizer = acc.prepare(objective, optimizer)
    # Stepped once per optimizer step by the loop itself, so it is registered rather than prepared (a prepared
    # scheduler steps once per process).
    acc.register_for_checkpointing(scheduler)
    acc.register_save_state_pre_hook(keep_trainable)
    layout_rng = torch.Generator().manual_seed(t.seed + 10_000 * acc.process_index)  # each rank draws its own blocks
    run_state = {"world_size": acc.num_processes, "dataset": dataset_identity(dataset_dir(cfg))}
    start = load_checkpoint(acc, checkpoint, layout_rng) if checkpoint is not None else 0
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out)
        trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
        console.print(
            f"stage 1: {len(train)} rows, {sched.total_steps} steps of {t.batch_size} x {t.grad_accum} x "
            f"{acc.num_processes} rows, {trainable:,} trainable parameters, {acc.device}, "
            f"{'fp32' if acc.mixed_precision == 'no' else acc.mixed_precision}"
            + (f", lora scope {fluid.meta.lora_scope}" if fluid.meta.lora_scope else "")
            + (f", resuming after step {start}" if start else "")
        )
        if changed:
            console.print(f"resuming with changed {escape('; '.join(changed))} (where and how often the run "
                          "writes: the steps are the same)", soft_wrap=True)
    metrics = MetricsLog(out / METRICS_NAME, start, enabled=acc.is_main_process)
    if t.tensorboard:
        acc.init_trackers("stage1")
    return Run(cfg, acc, fluid, objective, optimizer, scheduler, sched, train, layout_rng, run_state, start, pad_id,
               noise_token_ids(tokenizer, fluid.meta.vocab_size), use_cache, metrics)


def check_expanded_len(cfg: Recipe, train: Any) -> None:
    """`[train] max_expanded_len` must leave the longest row room for one whole block, or some rows (all, when it
    is small) would train no blocks and loss_diff would say nothing."""
    import pyarrow.compute as pc

    cap, k = cfg.train.max_expanded_len, cfg.fluid.max_k
    if cap is None:
        return
    longest = int(pc.max(pc.list_value_length(arrow_column(train, "input_ids"))).as_py() or 0)
    if cap < longest + k:
        raise FluidError(f"{cfg.source or 'recipe'}: [train] max_expanded_len: {cap} leaves no room for a block of "
                         f"max_k = {k} after the longest row of {dataset_dir(cfg)} ({longest} tokens); set it to at "
                         f"least {longest + k}, or leave it unset")


class NonFinite:
    """The first step whose loss was not finite, tracked on the device (no synchronisation per step) and checked
    whenever the loop synchronises anyway: before logging, before a checkpoint and at the end."""

    def __init__(self, acc: Accelerator, total_steps: int):
        self.acc, self.total = acc, total_steps
        self.mark = torch.zeros((), dtype=torch.long, device=acc.device)  # total + 1 - first bad step; 0: none

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.mark = torch.maximum(self.mark, (~torch.isfinite(loss.detach())).long() * (self.total + 1 - step))

    def check(self, out: Path) -> None:
        mark = int(self.acc.gather(self.mark.unsqueeze(0)).max())
        if mark:
            kept = latest_checkpoint(out)
            raise FluidError(
                f"step {self.total + 1 - mark}: the training loss is not a finite number (nan or inf), so training "
                "stopped; " + (f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint was written")
                + f"; lower [train] lr or max_grad_norm and train again in another {OUTPUT_KEY} (or remove this "
                "one): --resume continues the same run, into the same step")


def loop(r: Run) -> tuple[dict[str, float], dict[str, Any]]:
    """The optimizer steps from `r.start + 1` to the end: returns the run's totals and the last logged record."""
    cfg, acc, t, sched = r.cfg, r.acc, r.cfg.train, r.sched
    r.objective.train()
    batches = micro_batches(r.train, sched, r.start * t.grad_accum, t.batch_size, acc.process_index,
                            acc.num_processes, t.seed)
    window, totals = Window(acc.device), {"tokens": 0, "expanded_tokens": 0, "seconds": 0.0}
    last: dict[str, Any] = {}
    grad_norm = None
    finite = NonFinite(acc, sched.total_steps)
    plain = PlainProgress(acc.is_main_process and not console.is_terminal, sched.total_steps)
    with progress_bar(acc.is_main_process and console.is_terminal) as progress:  # a log gets `plain`
        task = progress.add_task("stage 1", total=sched.total_steps, completed=r.start, rate="", stats="")
        for step in range(r.start + 1, sched.total_steps + 1):
            lr = r.optimizer.param_groups[0]["lr"]
            for _ in range(t.grad_accum):
                ex = expand(next(batches), cfg, r.fluid.meta, r.pad_id, r.noise_ids, r.layout_rng)
                with acc.accumulate(r.objective):
                    loss = r.objective(ex.to(acc.device))
                    finite.add(step, loss.loss)
                    acc.backward(loss.loss)
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(r.objective.parameters(), t.max_grad_norm)
                    r.optimizer.step()
                    r.optimizer.zero_grad()
                window.add(loss, ex)
            r.scheduler.step()
            window.steps += 1

            if step % t.log_steps == 0 or step == sched.total_steps:
                finite.check(r.out)
                stats = window.reduce(acc)
                for key in totals:
                    totals[key] += stats[key]
                last = {"step": step, "epoch": round(step * t.grad_accum / sched.micro_per_epoch, 4),
                        "loss": stats["loss"], "loss_ar": stats["loss_ar"], "loss_diff": stats["loss_diff"],
                        "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens_per_s": stats["tokens_per_s"], "expanded_tokens_per_s": stats["expanded_tokens_per_s"],
                        "steps_per_s": stats["steps_per_s"]}
                r.metrics.write(last)
                if t.tensorboard:
                    acc.log({k: v for k, v in last.items() if k != "step" and v is not None}, step=step)
                progress.update(task, rate=f"{stats['steps_per_s']:.2f} steps/s, {stats['tokens_per_s']:,.0f} tok/s "
                                           f"({stats['expanded_tokens_per_s']:,.0f} expanded)",
                                stats=f"loss {stats['loss']:.3f} (ar {stats['loss_ar']:.3f}, "
                                      f"diff {stats['loss_diff']:.3f}) lr {lr:.2e}")
                plain.line(step, stats, lr)
                window = Window(acc.device)
            progress.update(task, completed=step)
            if step % t.save_steps == 0:
                finite.check(r.out)
                save_checkpoint(acc, r.out, step, r.layout_rng, {**r.run_state, "step": step,
                                "micro_batches": step * t.grad_accum, "total_steps": sched.total_steps},
                                t.save_total_limit, cfg)
    finite.check(r.out)
    return totals, last


def save_final(r: Run, totals: dict, last: dict) -> None:
    """Write the FLUID model folder and `train-summary.json` (main process; every rank joins the gathers)."""
    acc, objective, fluid, out, sched = r.acc, r.objective, r.fluid, r.out, r.sched
    fingerprint = acc.gather(weight_fingerprint(objective, acc.device).unsqueeze(0)).tolist()
    # FSDP shards the weights: gather them into one state dict; the other setups hold them whole already.
    state = None
    if acc.distributed_type == DistributedType.FSDP:
        prefix = "fluid.backbone."
        state = {k[len(prefix):]: v for k, v in acc.get_state_dict(objective).items() if k.startswith(prefix)}
    peaks = acc.gather(torch.tensor([[peak_rss_mb(),
                                      torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0]],
                                    device=acc.device)).amax(0).tolist()
    if acc.is_main_process:
        fluid.lm.config.use_cache = r.use_cache
        save_model(fluid, out, state_dict=state)
        seconds = totals["seconds"]
        steps = sched.total_steps - r.start
        same = acc.distributed_type == DistributedType.FSDP or all(f == fingerprint[0] for f in fingerprint)
        summary = {
            "steps": sched.total_steps, "steps_this_run": steps, "world_size": acc.num_processes,
            "seconds": round(seconds, 3), "steps_per_s": steps / seconds if seconds else None,
            "tokens_per_s": totals["tokens"] / seconds if seconds else None,
            "expanded_tokens_per_s": totals["expanded_tokens"] / seconds if seconds else None,
            "tokens": totals["tokens"], "expanded_tokens": totals["expanded_tokens"],
            "peak_rss_mb": round(peaks[0], 1), "peak_gpu_memory_gib": round(peaks[1], 3) or None,
            "mixed_precision": acc.mixed_precision, "device": str(acc.device),
            "final": last, "rank_weight_fingerprints": fingerprint, "ranks_agree": same,
        }
        write_json_atomic(out / SUMMARY_NAME, summary)
        if not same:
            console.print(f"[bold red]warning:[/] the processes ended with different weights: {fingerprint}")
        console.print(f"stage 1: wrote {out} ({summary['steps_per_s'] or 0:.2f} steps/s, "
                      f"{summary['tokens_per_s'] or 0:,.0f} tok/s, peak RSS {summary['peak_rss_mb']:.0f} MB)")
    acc.wait_for_everyone()
