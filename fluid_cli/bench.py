"""`fluid bench decode`: FLUID against the decoders a user could pick instead, on the same model and prompts.

Decoders (each on every prompt, at every `--batch-size`):
- `hf`: transformers' `generate(do_sample=False)`, the reference everything is compared with (left-padded
  batches); `hf-static`: the same with a static cache (transformers compiles it on a GPU); with `--temperature`
  every HF decoder samples (`do_sample=True` with the same temperature, top-k and top-p, torch seeded with `--seed`);
- `prompt-lookup`: transformers' prompt-lookup decoding (`prompt_lookup_num_tokens`), which needs no training
  (batch 1 only, as in transformers); `assisted`: assisted generation with `--draft-model` (batch 1 only);
- `ar`: this package's greedy loop, one token per forward (it separates the method's gain from loop overheads);
- `fluid`: the FLUID decoder with the `[generate]` settings.

Forwards of the model under test are counted with one hook on its decoder stack, for every decoder alike (an
assistant model's own forwards are not counted). Each decoder first decodes the first batch of prompts untimed, at full
length, so none pays the first call's setup (nor FLUID its one-time forward-cost probe, nor a compiled decoder its
compilation). The GPU is used when there is one.

Reading the output: `tok/fwd` is what a method buys, per row (1.0 for greedy decoding at every batch size: a
forward of a batch of 4 writes up to 4 tokens, one per row); `vs hf` is what it delivers in wall-clock time (— where
`hf` did not run). `same` counts outputs identical to `hf` at batch size 1.

Every prompt gets the whole `max_new_tokens`, so that every decoder does the same work: a prompt that leaves less
room in the model's context is refused before any work, naming the budget that would fit.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fluid_cli.config import Recipe
from fluid_cli.decode import Decoder, DecodeSettings, ar_settings, generation_budget
from fluid_cli.errors import FluidError
from fluid_cli.hf import generate_batch, load_causal_lm, load_tokenizer, vocab_differences
from fluid_cli.inference import decode_settings, generate_config, load_decoding_model, requests
from fluid_cli.io import check_output_file, write_json_atomic
from fluid_cli.model import FluidModel
from fluid_cli.prompts import Prompt, encode_prompt

BATCH_ONE_ONLY = ("prompt-lookup", "assisted")


@dataclass
class Tally:
    """Totals of one decoder at one batch size over the prompt set."""

    tokens: int = 0
    forwards: int = 0  # calls of the model
    row_forwards: int = 0  # forwards counted once per row they advanced (batch size 1: the same as `forwards`)
    wall_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def summary(self, reference: list[list[int]] | None, ref_tokens_per_s: float | None) -> dict[str, Any]:
        """The run's numbers; `reference`: HF greedy outputs at batch size 1 (None when sampling: samples are
        compared in distribution, not token by token); `ref_tokens_per_s` is hf's at the same batch size (None where
        hf did not run: no speed-up)."""
        tokens_per_s = self.tokens_per_s
        return {
            "tokens": self.tokens,
            "forwards": self.forwards,
            "row_forwards": self.row_forwards,
            "wall_s": self.wall_s,
            "tokens_per_s": tokens_per_s,
            "tokens_per_forward": self.tokens / self.row_forwards if self.row_forwards else 0.0,
            "forwards_per_token": self.row_forwards / self.tokens if self.tokens else 0.0,
            "speedup_vs_hf": tokens_per_s / ref_tokens_per_s if ref_tokens_per_s else None,
            "same_as_hf": None if reference is None else sum(a == b for a, b in zip(self.outputs, reference)),
        }


class ForwardCounter:
    """Counts calls of a model's decoder stack: every forward, whoever runs it."""

    def __init__(self, model: FluidModel):
        self.calls = 0
        self.handle = model.lm.get_decoder().register_forward_hook(self._count)

    @torch.compiler.disable  # runs as is inside a compiled step (a traced counter would be recompiled per value)
    def _count(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


def timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    """`fn()` and its wall time, with the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


class _Runners:
    """Each decoder as `run(prompts, batch_size, max_new) -> outputs`, on one model."""

    def __init__(self, model: FluidModel, settings: DecodeSettings, lookup_tokens: int, draft: Any):
        self.model, self.settings = model, settings
        self.eos, self.pad = settings.eos_token_ids, model.tokenizer.pad_token_id
        # A draft-only model's base never emits its (added) mask token; HF must not either, to be the base model.
        self.suppress = (model.mask_token_id,) if model.meta.lora_scope == "draft" and not model.mask_in_base else ()
        self.lookup_tokens, self.draft = lookup_tokens, draft
        self.decoders: dict[int, tuple[Decoder, Decoder]] = {}
        self.row_forwards = 0  # of the last call: the forwards each row took part in, summed over the rows

    def hf(self, prompts: list[list[int]], max_new: int, **kwargs: Any) -> list[list[int]]:
        s = self.settings.sampling
        if not s.greedy:
            kwargs |= {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
        return generate_batch(self.model.lm, prompts, max_new, self.eos, self.pad, self.suppress, **kwargs)

    def __call__(self, name: str, prompts: list[list[int]], batch_size: int, max_new: int) -> list[list[int]]:
        if name in ("ar", "fluid"):
            if batch_size not in self.decoders:  # kept across calls: FLUID probes its forward costs once
                self.decoders[batch_size] = (Decoder(self.model, ar_settings(self.settings), batch_size=batch_size),
                                             Decoder(self.model, self.settings, batch_size=batch_size))
            ar, fluid = self.decoders[batch_size]
            reqs = [replace(r, max_new_tokens=max_new) for r in requests(prompts, self.settings.sampling)]
            results, _ = (ar if name == "ar" else fluid).run(reqs)
            self.row_forwards = sum(r.stats.forwards for r in results)
            return [r.tokens for r in results]
        extra: dict[str, Any] = {}
        if name == "hf-static":
            extra["cache_implementation"] = "static"
        elif name == "prompt-lookup":
            extra["prompt_lookup_num_tokens"] = self.lookup_tokens
        elif name == "assisted":
            extra["assistant_model"] = self.draft
        outputs = []
        if self.settings.sampling.seed is not None:
            torch.manual_seed(self.settings.sampling.seed)
        for s in range(0, len(prompts), batch_size):
            outputs += self.hf(prompts[s: s + batch_size], max_new, **extra)
        # generate's every forward writes one token in each row not finished yet (the batched ones are greedy or
        # static-cache greedy; prompt lookup and assisted decoding run one prompt at a time, counted by the hook)
        self.row_forwards = sum(map(len, outputs))
        return outputs


def run(recipe: Recipe, prompts: list[Prompt], *, json_output: bool = False, overwrite: bool = False,
        console: Console | None = None) -> dict[str, Any]:
    """Run the prompt set through the `[bench]` decoders at every batch size, decoding as `[generate]` says; print
    the table (or, with `json_output`, the JSON report on stdout) and write the JSON report to `[bench] output`."""
    console = console or Console(stderr=True)
    bench = recipe.bench
    names = list(dict.fromkeys(bench.decoders + (["assisted"] if bench.draft_model else [])))
    if "assisted" in names and not bench.draft_model:
        raise FluidError("[bench] decoders: assisted needs a draft model (--draft-model DIR, a small model with the "
                         "same tokenizer)")
    output = Path(bench.output) if bench.output else None
    if output is not None:  # before any work: a report that cannot be written would waste the whole run
        check_output_file(output, "--output", overwrite)
    draft_model, lookup_tokens, batch_sizes = bench.draft_model, bench.lookup_tokens, bench.batch_sizes
    cfg = generate_config(recipe)
    model = load_decoding_model(cfg)
    device = model.device
    draft = load_draft(draft_model, model) if draft_model else None
    settings = replace(decode_settings(cfg, model), stop=None)  # HF gets no stop strings either
    encoded = [encode_prompt(model.tokenizer, p, cfg.chat_template, model.meta.mask_token, f"prompt {n}")
               for n, p in enumerate(prompts[: bench.limit], start=1)]
    max_new = settings.max_new_tokens
    check_budgets(model, encoded, max_new)
    runners = _Runners(model, settings, lookup_tokens, draft)
    counter = ForwardCounter(model)
    tallies: dict[tuple[str, int], Tally] = {}
    try:
        with console.status("decoding") as status:
            for batch_size in batch_sizes:
                for name in names:
                    if batch_size > 1 and name in BATCH_ONE_ONLY:
                        continue
                    status.update(f"{name}, batch size {batch_size}")
                    # Warm-up at full length: FLUID's cost probe, and with --compile every step shape compiled
                    runners(name, encoded[:batch_size], batch_size, max_new)
                    before = counter.calls
                    outputs, wall = timed(device, lambda: runners(name, encoded, batch_size, max_new))
                    forwards = counter.calls - before
                    tallies[name, batch_size] = Tally(sum(map(len, outputs)), forwards,
                                                      forwards if batch_size == 1 else runners.row_forwards, wall,
                                                      outputs)
            reference = None if not settings.sampling.greedy else \
                tallies.get(("hf", 1)) or Tally(outputs=runners("hf", encoded, 1, max_new))
    finally:
        counter.close()
    report = {
        "model": str(cfg.model_dir),
        "exact_to": model.meta.exact_to,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(encoded),
        "max_new_tokens": max_new,
        "settings": {"horizon": settings.horizon, "tau": settings.tau, "threshold": settings.threshold,
                     "max_k": settings.max_k, "min_k": settings.min_k, "verify": settings.verify,
                     "compile": settings.compile, "chat_template": cfg.chat_template,
                     "sampling": None if settings.sampling.greedy else settings.sampling.to_dict(),
                     "prompt_lookup_num_tokens": lookup_tokens, "draft_model": draft_model},
        "runs": [
            {"decoder": name, "batch_size": b,
             **t.summary(reference and reference.outputs,
                         tallies["hf", b].tokens_per_s if ("hf", b) in tallies else None)}
            for (name, b), t in tallies.items()
        ],
    }
    if output is not None:
        write_json_atomic(output, report)
    if json_output:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        console.print(report_table(report))
    if output is not None:
        console.print(f"report: {output}")
    return report


def check_budgets(model: FluidModel, prompts: list[list[int]], max_new: int) -> None:
    """Every prompt must leave `max_new` tokens in the model's context: a long one would otherwise be decoded
    shorter than the others (or shorten them all)."""
    budgets = [generation_budget(model, ids, max_new)[0] for ids in prompts]
    if min(budgets) < max_new:
        n = budgets.index(min(budgets))
        raise FluidError(f"prompt {n + 1} ({len(prompts[n])} tokens) leaves room for {budgets[n]} of the {max_new} "
                         f"new tokens in the model's context: lower --max-new-tokens to {min(budgets)}, or leave the "
                         "prompt out")


def load_draft(path: str, model: FluidModel) -> Any:
    """The draft model of assisted decoding, which must share the model's tokenizer: a FLUID model's added mask
    token aside, which the draft is given an embedding row for (transformers compares the vocabulary sizes; the
    model never accepts that token, see `_Runners.suppress`). Any other difference is refused."""
    where = f"--draft-model {path}"
    draft_tokenizer = load_tokenizer(path)
    mask = model.meta.mask_token
    ignore = (mask,) if mask not in draft_tokenizer.get_vocab() else ()
    differ = vocab_differences(model.tokenizer, draft_tokenizer, ignore)
    if differ:
        raise FluidError(f"{where}: its tokenizer is not the model's ({len(differ)} tokens differ, e.g. "
                         f"{', '.join(map(repr, differ[:3]))}); assisted decoding needs the same tokenizer")
    draft = load_causal_lm(path, dtype=model.dtype)
    rows = model.lm.config.get_text_config().vocab_size
    if draft.config.get_text_config().vocab_size != rows:
        draft.resize_token_embeddings(rows, mean_resizing=False)
    return draft.to(model.device).eval()


def report_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"decoding benchmark: {report['prompts']} prompts x {report['max_new_tokens']} new tokens on "
                        f"{report['device']} ({report['dtype']})")
    for col in ("decoder", "batch", "tokens", "forwards", "s", "tok/s", "tok/fwd", "vs hf", "same"):
        table.add_column(col, justify="left" if col == "decoder" else "right")
    for r in report["runs"]:
        table.add_row(r["decoder"], str(r["batch_size"]), str(r["tokens"]), str(r["forwards"]), f"{r['wall_s']:.2f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_forward']:.2f}",
                      "—" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.2f}x",
                      "n/a" if r["same_as_hf"] is None else f"{r['same_as_hf']}/{report['prompts']}")
    table.caption = ("tok/fwd: tokens per forward of each row; vs hf: tokens/s over HF generate's at the same batch "
                     "size; same: outputs identical to HF generate's at batch size 1")
    return table
