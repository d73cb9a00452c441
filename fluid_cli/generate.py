"""`fluid generate`: load a model, encode prompts, decode them with FLUID and stream the text block by block.

Each committed block is printed in the next of two alternating shades, so the horizon at work is visible; a
stats table follows (on stderr, so stdout holds only the generated text). `--json` prints the results as JSON
instead, and `--compare-ar` also decodes greedily, one token per forward, and reports the speed-up and whether
the outputs match (they must, with verification on, up to floating-point near-ties).

A plain Hugging Face model directory (no `fluid.json`) has no K-head; it can still be decoded with
`--horizon fixed` or `--horizon entropy`, drafting with `--mask-token` (default: its unk, then pad token).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers.utils import logging as hf_logging

from fluid_cli.config import FluidConfig, GenerateConfig, ModelConfig, Recipe
from fluid_cli.decode import DecodeResult, DecodeSettings, ar_decode, fluid_decode
from fluid_cli.errors import FluidError
from fluid_cli.khead import KHead
from fluid_cli.modeling import META_NAME, FluidMeta, FluidModel, hidden_size_of, load_pretrained

BLOCK_STYLES = ("black on cyan", "black on magenta")
PROMPT_FIELDS = ("prompt", "question", "input", "text")  # string fields a JSONL prompt file may use

Prompt = str | list[dict[str, str]]  # plain text, or chat messages


# --------------------------------------------------------------------------------------------- settings


def generate_config(recipe: Recipe) -> GenerateConfig:
    """The `[generate]` table; a recipe file's model defaults to the model its `[train]` table writes."""
    cfg = recipe.generate
    if cfg.model_dir is None and recipe.source is not None:
        cfg = replace(cfg, model_dir=recipe.train.output_dir)
    return cfg


def decode_settings(cfg: GenerateConfig, model: FluidModel) -> DecodeSettings:
    tok = model.tokenizer
    return DecodeSettings(
        horizon=cfg.horizon, tau=cfg.tau, threshold=cfg.threshold, max_k=cfg.max_k, min_k=cfg.min_k,
        verify=cfg.verify, max_new_tokens=cfg.max_new_tokens, eos_token_ids=eos_token_ids(model),
        stop=stop_on(tok, cfg.stop),
    )


def eos_token_ids(model: FluidModel) -> tuple[int, ...]:
    """The tokenizer's EOS plus the generation config's (chat models often end turns with another token)."""
    ids = {model.tokenizer.eos_token_id}
    configured = getattr(model.lm.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return tuple(sorted(i for i in ids if i is not None))


def stop_on(tokenizer: Any, stops: list[str]) -> Callable[[list[int]], int | None] | None:
    """A stop callback for the decoder: ends the generation once the text contains a stop string (kept).

    Only the last few tokens are decoded: a string of `n` characters spans at most `n` tokens, and one more token
    in front keeps tokenizers that drop a leading space at the start of a decode from hiding it."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    window = max(len(s) for s in stops) + 1

    def stop(ids: list[int]) -> int | None:
        text = tokenizer.decode(ids[-window:])
        return len(ids) if any(s in text for s in stops) else None

    return stop


# --------------------------------------------------------------------------------------------- the model


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(cfg: GenerateConfig, device: torch.device | None = None) -> FluidModel:
    """The model in `cfg.model_dir`: a FLUID directory (LoRA merged for speed), or a plain HF model wrapped for
    `fixed`/`entropy` decoding."""
    if cfg.model_dir is None:
        raise FluidError("no model: pass --model DIR (or set [generate] model_dir in the recipe)")
    folder = Path(cfg.model_dir)
    device = device or pick_device()
    dtype = pick_dtype(cfg.dtype, device)
    hf_logging.disable_progress_bar()  # the generated text is the output: no weight-loading bars around it
    if (folder / META_NAME).is_file():
        return FluidModel.load(folder, dtype=dtype, device=device, merge=True)
    if not (folder / "config.json").is_file():
        FluidMeta.read(folder)  # raises the standard "not found" / "not a FLUID model directory" error
    if cfg.horizon not in ("fixed", "entropy"):
        raise FluidError(
            f"{folder}: a plain model (no {META_NAME}, so no K-head): decode it with --horizon fixed "
            "(or --horizon entropy), or adapt it first with `fluid train-stage1`"
        )
    return wrap_plain_model(folder, mask_token=cfg.mask_token, max_k=cfg.max_k, dtype=dtype, device=device)


def wrap_plain_model(folder: Path, *, mask_token: str | None, max_k: int | None, dtype: torch.dtype,
                     device: torch.device) -> FluidModel:
    """A plain causal LM as a `FluidModel` with an unused, uncalibrated K-head: drafts come from a model never
    trained to fill masks, so they are poor, but verified output is still exactly greedy."""
    lm, tok = load_pretrained(ModelConfig(path=str(folder), dtype=str(dtype).removeprefix("torch.")))
    name = mask_token or tok.unk_token or tok.pad_token
    if name is None:
        raise FluidError(f"{folder}: the tokenizer has no unk or pad token to draft with: pass --mask-token")
    mask_id = tok.convert_tokens_to_ids(name)
    if mask_id is None or (mask_token and mask_id == tok.unk_token_id and name != tok.unk_token):
        raise FluidError(f"--mask-token {name!r}: not a token of {folder}'s tokenizer")
    k = max_k or FluidConfig().max_k
    meta = FluidMeta(mask_token=name, mask_token_id=int(mask_id), max_k=k, vocab_size=len(tok), weights="full",
                     base_model=str(folder))
    model = FluidModel(lm, KHead(hidden_size_of(lm.config), k), meta, tok)
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------------- prompts


def read_prompts(prompts: list[str] | None, prompt_file: Path | None) -> list[Prompt]:
    """Prompts from `--prompt` (repeatable), `--prompt-file` (one per line, or JSONL), else all of stdin."""
    out: list[Prompt] = list(prompts or [])
    if prompt_file is not None:
        out += read_prompt_file(prompt_file)
    if not out:
        if sys.stdin is None or sys.stdin.isatty():
            raise FluidError("no prompt: pass --prompt TEXT or --prompt-file FILE, or pipe the prompt on stdin")
        out.append(sys.stdin.read().rstrip("\n"))
    for n, prompt in enumerate(out, start=1):
        if isinstance(prompt, str) and not prompt.strip():
            raise FluidError(f"prompt {n} is empty")
    return out


def read_prompt_file(path: Path) -> list[Prompt]:
    """One prompt per non-empty line; or JSONL rows with `messages` or one of the `PROMPT_FIELDS`."""
    if not path.is_file():
        raise FluidError(f"{path}: prompt file not found")
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if line.strip()]
    if not lines:
        raise FluidError(f"{path}: no prompts in the file")
    if path.suffix != ".jsonl" and not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts: list[Prompt] = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FluidError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(row["messages"])
            continue
        field = next((f for f in PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), None)
        if field is None:
            raise FluidError(f"{path}:{n}: expected a 'messages' list or one of the string fields "
                             f"{', '.join(PROMPT_FIELDS)}")
        prompts.append(row[field])
    return prompts


def encode(tokenizer: Any, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids of a prompt: through the chat template (as a user turn) when it is on and the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not (chat_template and has_template):
        raise FluidError("chat messages need the tokenizer's chat template (and --chat-template)")
    if chat_template and has_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


# --------------------------------------------------------------------------------------------- output


class BlockStreamer:
    """Prints the generated text as blocks are committed, each block in the next of the alternating styles.

    The whole text is decoded each time and only the new characters are printed, so tokens that merge across
    a block boundary (multi-byte characters, leading spaces) print correctly; an unfinished character waits.
    Styles only apply on a terminal; piped output is the plain text, byte for byte."""

    def __init__(self, tokenizer: Any, console: Console):
        self.tokenizer, self.console = tokenizer, console
        self.ids: list[int] = []
        self.text = Text()
        self.blocks = 0

    def __call__(self, block: list[int]) -> None:
        self.ids += block
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        new = text[len(self.text.plain):]
        style = BLOCK_STYLES[self.blocks % len(BLOCK_STYLES)]
        self.blocks += 1
        self.text.append(new, style)
        self._write(new, style)

    def finish(self) -> None:
        """Print what is still held back (an incomplete character at the very end) and end the line."""
        rest = self.tokenizer.decode(self.ids, skip_special_tokens=True)[len(self.text.plain):]
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

    def to_dict(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens, "text": self.text,
               "tokens": self.fluid.tokens, "stats": self.fluid.stats.to_dict()}
        if self.ar is not None:
            out["ar"] = {"tokens": self.ar.tokens, "stats": self.ar.stats.to_dict()}
            out["match_ar"] = self.ar.tokens == self.fluid.tokens
            out["speedup"] = speedup(self.fluid, self.ar)
        return out


def speedup(fluid: DecodeResult, ar: DecodeResult) -> float:
    return fluid.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else 0.0


# --------------------------------------------------------------------------------------------- run


def run(recipe: Recipe, prompts: list[Prompt], *, json_output: bool = False, compare_ar: bool = False,
        out: Console | None = None, err: Console | None = None) -> list[Generation]:
    """Decode every prompt; stream (or, with `json_output`, print JSON) and show the stats table."""
    cfg = generate_config(recipe)
    out = out or Console(soft_wrap=True)
    err = err or Console(stderr=True, soft_wrap=True)
    model = load_model(cfg)
    if cfg.chat_template and not getattr(model.tokenizer, "chat_template", None):
        err.print("[dim]the tokenizer has no chat template: prompts are encoded as plain text[/]")
    settings = decode_settings(cfg, model)
    encoded = [encode(model.tokenizer, p, cfg.chat_template) for p in prompts]
    if compare_ar:  # one short untimed run first, so neither decoder pays the first call's setup in its time
        ar_decode(model, encoded[0], replace(settings, max_new_tokens=2, stop=None))
    results = []
    for n, (prompt, ids) in enumerate(zip(prompts, encoded), start=1):
        streamer = None
        if not json_output:
            if len(prompts) > 1:
                err.rule(f"prompt {n}")
            streamer = BlockStreamer(model.tokenizer, out)
        result = fluid_decode(model, ids, settings, on_block=streamer)
        if streamer is not None:
            streamer.finish()
        text = model.tokenizer.decode(result.tokens, skip_special_tokens=True)
        ar = ar_decode(model, ids, settings) if compare_ar else None
        results.append(Generation(prompt, len(ids), result, text, ar))
    if json_output:
        payload = {"model": str(cfg.model_dir), "settings": settings_dict(cfg),
                   "results": [g.to_dict() for g in results]}
        out.file.write(json.dumps(payload, indent=2) + "\n")  # raw: no markup, no wrapping
    else:
        err.print(stats_table(results))
        if compare_ar and cfg.verify and any(g.ar.tokens != g.fluid.tokens for g in results):
            err.print("[yellow]verified output differs from greedy decoding (floating-point near-ties can do "
                      "this, more often in low precision)[/]")
    return results


def settings_dict(cfg: GenerateConfig) -> dict[str, Any]:
    keys = ("horizon", "tau", "threshold", "max_k", "min_k", "verify", "max_new_tokens", "chat_template", "stop",
            "dtype")
    return {k: getattr(cfg, k) for k in keys}


def stats_table(results: list[Generation]) -> Table:
    compare = any(g.ar is not None for g in results)
    table = Table(title="FLUID decoding")
    columns = ["#", "tokens", "forwards", "tok/fwd", "mean K", "tok/block", "tok/s", "stop"]
    if compare:
        columns += ["AR tok/s", "speed-up", "same"]
    for col in columns:
        table.add_column(col, justify="left" if col == "stop" else "right")
    for n, g in enumerate(results, start=1):
        s = g.fluid.stats
        row = [str(n), str(s.new_tokens), str(s.forwards),
               f"{s.tokens_per_forward:.2f}", f"{s.mean_horizon:.1f}", f"{s.mean_committed:.2f}",
               f"{s.tokens_per_s:.1f}", s.stop_reason]
        if compare:
            row += [f"{g.ar.stats.tokens_per_s:.1f}", f"{speedup(g.fluid, g.ar):.2f}x",
                    "[green]yes[/]" if g.ar.tokens == g.fluid.tokens else "[red]no[/]"]
        table.add_row(*row)
    table.caption = "tok/block: tokens committed per block; same: the output equals AR's; --json has more"
    return table
