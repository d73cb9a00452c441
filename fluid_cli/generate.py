"""`fluid generate`: decode prompts with FLUID and stream the text block by block.

Each committed block is printed in the next of two alternating shades, so the horizon at work is visible; a
stats table follows (on stderr, so stdout holds only the generated text). With `--batch-size N` the prompts are
decoded N at a time and each text is printed when it is complete. `--json` prints the results as JSON instead;
`--compare-ar` also decodes greedily on the same weights, one token per forward, and reports the speed-up and
whether the outputs match; `--compare-base` runs the original model (`base_model`, plain transformers) and reports
whether FLUID's output equals its greedy decoding (it must, for a draft-only adapter).

A plain transformers model folder (no `fluid.json`) has no trained drafts; it is decoded with an existing token
as the mask (`--mask-token`, default: its unk, then pad token): verified output is still its greedy decoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fluid_cli.config import Recipe
from fluid_cli.decode import Decoder, DecodeResult, Request, ar_settings
from fluid_cli.errors import FluidError
from fluid_cli.hf import greedy_generate, load_causal_lm
from fluid_cli.inference import decode_settings, generate_config, load_decoding_model, requests
from fluid_cli.model import FluidModel
from fluid_cli.prompts import IncrementalText, Prompt, cut_at_stop, encode_prompt

BLOCK_STYLES = ("black on cyan", "black on magenta")


class BlockStreamer:
    """Prints the generated text as blocks are committed, each block in the next of the alternating styles
    (`IncrementalText`: an unfinished character waits). Styles only apply on a terminal; piped output is the
    plain text, byte for byte."""

    def __init__(self, tokenizer: Any, console: Console):
        self.console = console
        self.decoded = IncrementalText(tokenizer)
        self.text = Text()
        self.blocks = 0

    def __call__(self, block: list[int]) -> None:
        new = self.decoded.add(block)
        if new is None:  # a multi-byte character is not complete yet
            return
        style = BLOCK_STYLES[self.blocks % len(BLOCK_STYLES)]
        self.blocks += 1
        self.text.append(new, style)
        self._write(new, style)

    def finish(self) -> None:
        """Print what is still held back (an incomplete character at the very end) and end the line."""
        rest = self.decoded.rest()
        if rest:
            style = BLOCK_STYLES[self.blocks % len(BLOCK_STYLES)]
            self.text.append(rest, style)
            self._write(rest, style)
        self._write("\n", "")

    def _write(self, text: str, style: str) -> None:
        if self.console.is_terminal:
            self.console.print(Text(text, style=style), end="", soft_wrap=True)
        else:  # piped: the exact text (rich would expand tabs and drop control characters)
            self.console.file.write(text)
            self.console.file.flush()


@dataclass
class Generation:
    prompt: Prompt
    prompt_tokens: int
    fluid: DecodeResult
    text: str
    ar: DecodeResult | None = None
    base: list[int] | None = None  # the original model's greedy tokens (--compare-base)

    def to_dict(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens, "text": self.text,
               "tokens": self.fluid.tokens, "stats": self.fluid.stats.to_dict()}
        if self.ar is not None:
            out["ar"] = {"tokens": self.ar.tokens, "stats": self.ar.stats.to_dict()}
            out["match_ar"] = self.ar.tokens == self.fluid.tokens
            out["speedup"] = speedup(self.fluid, self.ar)
        if self.base is not None:
            out["base"] = {"tokens": self.base}
            out["match_base"] = self.base == self.fluid.tokens
        return out


def speedup(fluid: DecodeResult, ar: DecodeResult) -> float:
    return fluid.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else 0.0


def run(recipe: Recipe, prompts: list[Prompt], *, json_output: bool = False, compare_ar: bool = False,
        compare_base: bool = False, out: Console | None = None, err: Console | None = None) -> list[Generation]:
    """Decode every prompt; stream (or, with `json_output`, print JSON) and show the stats table."""
    cfg = generate_config(recipe)
    out = out or Console(soft_wrap=True)
    err = err or Console(stderr=True, soft_wrap=True)
    if compare_base and cfg.temperature:
        raise FluidError(f"--compare-base checks greedy output token for token; with --temperature "
                         f"{cfg.temperature:g} the original model's samples differ by chance (sampling is exact in "
                         "distribution, not in tokens); drop one of the two")
    model = load_decoding_model(cfg)
    base = load_base(model) if compare_base else None
    if cfg.chat_template and not getattr(model.tokenizer, "chat_template", None):
        err.print("[dim]the tokenizer has no chat template: prompts are encoded as plain text[/]")
    settings = decode_settings(cfg, model)
    encoded = [encode_prompt(model.tokenizer, p, cfg.chat_template, model.meta.mask_token, f"prompt {n}")
               for n, p in enumerate(prompts, start=1)]
    reqs = requests(encoded, settings.sampling)
    decoder = Decoder(model, settings, batch_size=cfg.batch_size)
    ar = Decoder(model, ar_settings(settings)) if compare_ar else None
    if ar is not None:  # a short untimed run of each first, so neither pays its setup (a cost probe) in its time
        for warm in (decoder, ar):
            warm.run([Request(encoded[0], max_new_tokens=2)])
    if cfg.batch_size == 1:
        results = [_stream(decoder, model, req, n, len(prompts), json_output, out, err)
                   for n, req in enumerate(reqs, start=1)]
    else:
        results, _ = decoder.run(reqs)
    texts = [model.tokenizer.decode(result.tokens, skip_special_tokens=True) for result in results]
    if cfg.batch_size > 1 and not json_output:
        for n, text in enumerate(texts, start=1):
            if len(prompts) > 1:
                err.rule(f"prompt {n}")
            out.file.write(text + "\n")
    generations = []
    for prompt, ids, req, result, text in zip(prompts, encoded, reqs, results, texts):
        reference = ar.decode(req) if ar is not None else None
        base_tokens = None
        if base is not None:
            # transformers knows no stop callback: the base's output is cut by the same stop strings as FLUID's
            base_tokens = cut_at_stop(settings.stop, greedy_generate(
                base, ids, len(result.tokens) if result.stats.stop_reason in ("length", "context", "stop")
                else settings.max_new_tokens, settings.eos_token_ids, model.tokenizer.pad_token_id))
        generations.append(Generation(prompt, len(ids), result, text, reference, base_tokens))
    if json_output:
        payload = {"model": str(cfg.model_dir), "exact_to": model.meta.exact_to, "base_model": model.meta.base_model,
                   "settings": settings_dict(cfg), "results": [g.to_dict() for g in generations]}
        out.file.write(json.dumps(payload, indent=2) + "\n")  # raw: no markup, no wrapping
    else:
        err.print(stats_table(generations, model))
        if compare_ar and cfg.verify and not cfg.temperature and \
                any(g.ar.tokens != g.fluid.tokens for g in generations):
            err.print("[yellow]verified output differs from greedy decoding (floating-point near-ties can do "
                      "this, more often in low precision)[/]")
    return generations


def _stream(decoder: Decoder, model: FluidModel, req: Request, n: int, total: int, json_output: bool,
            out: Console, err: Console) -> DecodeResult:
    if json_output:
        return decoder.decode(req)
    if total > 1:
        err.rule(f"prompt {n}")
    streamer = BlockStreamer(model.tokenizer, out)
    result = decoder.decode(req, on_block=streamer)
    streamer.finish()
    return result


def load_base(model: FluidModel) -> Any:
    """The original model of `--compare-base`: `base_model` loaded by plain transformers, nothing of FLUID's."""
    if model.meta.weights == "full" or not model.meta.base_model:
        raise FluidError("--compare-base: this model has full weights of its own (fine-tuned or grown from "
                         "scratch), so there is no original model to compare with; use --compare-ar")
    return load_causal_lm(model.meta.base_model, dtype=model.dtype,
                          trust_remote_code=model.meta.trust_remote_code).to(model.device).eval()


def settings_dict(cfg: Any) -> dict[str, Any]:
    keys = ("horizon", "tau", "threshold", "max_k", "min_k", "verify", "max_new_tokens", "batch_size", "compile",
            "chat_template", "stop", "dtype", "temperature", "top_p", "top_k", "seed")
    return {k: getattr(cfg, k) for k in keys}


def stats_table(results: list[Generation], model: FluidModel) -> Table:
    compare = any(g.ar is not None for g in results)
    base = any(g.base is not None for g in results)
    first = results[0].fluid.stats
    tau = "—" if first.tau is None else f"{first.tau:g} ({first.tau_source})"
    sampled = first.sampling
    how = "greedy" if sampled is None else \
        f"sampling: temperature {sampled['temperature']:g}, top-p {sampled['top_p']:g}, top-k {sampled['top_k']}"
    table = Table(title=f"FLUID decoding ({how}): horizon {first.policy}, tau {tau}, threshold {first.threshold:g}")
    columns = ["#", "tokens", "forwards", "tok/fwd", "mean K", "tok/block", "tok/s", "stop"]
    if compare:
        columns += ["AR tok/s", "speed-up", "same"]
    if base:
        columns += ["= base"]
    for col in columns:
        table.add_column(col, justify="left" if col == "stop" else "right")
    for n, g in enumerate(results, start=1):
        s = g.fluid.stats
        row = [str(n), str(s.new_tokens), str(s.forwards), f"{s.tokens_per_forward:.2f}", f"{s.mean_horizon:.1f}",
               f"{s.mean_committed:.2f}", f"{s.tokens_per_s:.1f}", s.stop_reason]
        if compare:
            same = "n/a" if sampled else "[green]yes[/]" if g.ar.tokens == g.fluid.tokens else "[red]no[/]"
            row += [f"{g.ar.stats.tokens_per_s:.1f}", f"{speedup(g.fluid, g.ar):.2f}x", same]
        if base:
            row += ["[green]yes[/]" if g.base == g.fluid.tokens else "[red]no[/]"]
        table.add_row(*row)
    exact = "the original model's" if model.meta.exact_to == "base" else "these weights'"
    promise = f"verified output equals {exact} greedy decoding" if sampled is None else \
        f"every sampled token follows {exact} distribution exactly (speculative sampling)"
    table.caption = f"{promise}; tok/block: tokens committed per block; same: equals AR's; --json has more"
    return table
