"""`fluid bench decode`: HF `generate` (greedy) against the FLUID decoder, on the same model and prompts.

Three decoders run every prompt: `hf` (`model.generate(do_sample=False)`, the reference users know), `ar` (this
package's greedy loop, one token per forward: it separates the method's gain from loop overheads) and `fluid`.
Forwards are counted with a hook on the decoder stack, for every decoder alike. Each decoder first runs one short
untimed generation, so none pays the first call's setup. The GPU is used when there is one.

Reading the output: `tokens/forward` is what the method buys (1.0 for both greedy decoders); `speed-up vs hf`
is what it delivers in wall-clock time, less than tokens/forward where a forward over a block costs more than
over one token (CPU) or where the loop's own overhead shows (tiny models).
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
from transformers import GenerationConfig

from fluid_cli.config import Recipe
from fluid_cli.decode import DecodeSettings, ar_decode, fluid_decode, generation_budget
from fluid_cli.generate import Prompt, decode_settings, encode, generate_config, load_model
from fluid_cli.io import write_json_atomic
from fluid_cli.modeling import FluidModel

DECODERS = ("hf", "ar", "fluid")


@dataclass
class Tally:
    """Totals of one decoder over the prompt set."""

    tokens: int = 0
    forwards: int = 0
    wall_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, tokens: list[int], forwards: int, wall_s: float) -> None:
        self.tokens += len(tokens)
        self.forwards += forwards
        self.wall_s += wall_s
        self.outputs.append(tokens)

    def summary(self, reference: Tally) -> dict[str, Any]:
        tokens_per_s = self.tokens / self.wall_s if self.wall_s else 0.0
        ref_tokens_per_s = reference.tokens / reference.wall_s if reference.wall_s else 0.0
        return {
            "tokens": self.tokens,
            "forwards": self.forwards,
            "wall_s": self.wall_s,
            "tokens_per_s": tokens_per_s,
            "tokens_per_forward": self.tokens / self.forwards if self.forwards else 0.0,
            "forwards_per_token": self.forwards / self.tokens if self.tokens else 0.0,
            "speedup_vs_hf": tokens_per_s / ref_tokens_per_s if ref_tokens_per_s else 0.0,
            "same_as_hf": sum(a == b for a, b in zip(self.outputs, reference.outputs)),
        }


class _ForwardCounter:
    def __init__(self, model: FluidModel):
        self.calls = 0
        self.handle = model.lm.get_decoder().register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


def hf_greedy(model: FluidModel, ids: list[int], settings: DecodeSettings, max_new_tokens: int) -> list[int]:
    """`model.generate` with a config of its own, so that sampling or penalties in the model's
    generation_config.json cannot turn it into something other than greedy decoding."""
    device = next(model.lm.parameters()).device
    eos = list(settings.eos_token_ids) or None
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (eos or [0])[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    input_ids = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = model.lm.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return out[0, len(ids):].tolist()


def _timed(device: torch.device, fn: Any, *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and its wall time, with the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def run(recipe: Recipe, prompts: list[Prompt], *, output: Path | None = None, limit: int | None = None,
        json_output: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run the prompt set through every decoder; print the table (or, with `json_output`, the JSON report on
    stdout) and write the JSON report to `output`."""
    console = console or Console(stderr=True)
    cfg = generate_config(recipe)
    model = load_model(cfg)
    device = next(model.lm.parameters()).device
    settings = replace(decode_settings(cfg, model), stop=None)  # HF gets no stop strings either
    encoded = [encode(model.tokenizer, p, cfg.chat_template) for p in prompts[:limit]]
    counter = _ForwardCounter(model)
    decoders = {
        "hf": lambda ids, s: hf_greedy(model, ids, s, generation_budget(model, ids, s)[0]),
        "ar": lambda ids, s: ar_decode(model, ids, s).tokens,
        "fluid": lambda ids, s: fluid_decode(model, ids, s).tokens,
    }
    for decode in decoders.values():  # warm-up
        decode(encoded[0], replace(settings, max_new_tokens=2))
    tallies = {name: Tally() for name in DECODERS}
    per_prompt = []
    with console.status("decoding") as status:
        for n, ids in enumerate(encoded, start=1):
            status.update(f"prompt {n}/{len(encoded)}")
            row: dict[str, Any] = {"prompt_tokens": len(ids)}
            for name, decode in decoders.items():
                before = counter.calls
                tokens, wall_s = _timed(device, decode, ids, settings)
                tallies[name].add(tokens, counter.calls - before, wall_s)
                row[name] = {"tokens": len(tokens), "forwards": counter.calls - before, "wall_s": wall_s}
            row["fluid_same_as_hf"] = tallies["fluid"].outputs[-1] == tallies["hf"].outputs[-1]
            per_prompt.append(row)
    counter.handle.remove()
    report = {
        "model": str(cfg.model_dir),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.lm.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(encoded),
        "settings": {"horizon": settings.horizon, "tau": settings.tau, "threshold": settings.threshold,
                     "max_k": settings.max_k, "min_k": settings.min_k, "verify": settings.verify,
                     "max_new_tokens": settings.max_new_tokens, "chat_template": cfg.chat_template},
        "decoders": {name: tallies[name].summary(tallies["hf"]) for name in DECODERS},
        "per_prompt": per_prompt,
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


def report_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"decoding benchmark: {report['prompts']} prompts on {report['device']} "
                        f"({report['dtype']})")
    for col in ("decoder", "tokens", "forwards", "s", "tok/s", "tok/fwd", "fwd/tok", "vs hf", "same"):
        table.add_column(col, justify="left" if col == "decoder" else "right")
    for name, d in report["decoders"].items():
        table.add_row(name, str(d["tokens"]), str(d["forwards"]), f"{d['wall_s']:.2f}", f"{d['tokens_per_s']:.1f}",
                      f"{d['tokens_per_forward']:.2f}", f"{d['forwards_per_token']:.2f}",
                      f"{d['speedup_vs_hf']:.2f}x", f"{d['same_as_hf']}/{report['prompts']}")
    table.caption = "vs hf: tokens/s over HF generate's; same: outputs identical to HF generate's"
    return table
