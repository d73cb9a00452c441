"""One GPU acceptance run: every check that needs a GPU, by one command, in one table and one JSON file.

    python bench/gpu_check.py [--out gpu-check.json]        # on a GPU: the full checks
    python bench/gpu_check.py --smoke                        # tiny shapes, few steps (implied without a GPU; CI)
    python bench/gpu_check.py --checks exactness,stage1      # some of the checks: exactness, stage1, decode, ddp

No network: random-weight models built from configs, the character tokenizer built in-process. The checks:

1. **exactness**: verified FLUID decoding (`fluid_cli.decode.Decoder`) against transformers' greedy `generate` of
   the same weights, one prompt at a time (`fluid_cli.hf.greedy_generate`), in float32 and bfloat16, at batch 1
   and 8, eager and compiled (CUDA graphs on a GPU), without and with a draft-only LoRA adapter. It reports the
   share of identical outputs and, for each output that differs, the margin between the reference's top two
   logits at the first differing token: a near-tie, which rounding in another kernel may decide the other way.
2. **stage1**: `fluid train-stage1`'s own run (`fluid_cli.train.run`) on a random Llama of bench/decode_step.py's
   1b shape, bf16, gradient checkpointing, a draft-only LoRA: steps/s, tokens/s, peak memory. Attention is SDPA
   with the dense 4D mask of the expanded layout; a FlexAttention block mask is not implemented (a table row says
   so).
3. **decode**: bench/decode_step.py's 1b and 7b shapes, compiled: FLUID steps at K = 4, 8, 16 against a compiled
   one-token step, at batch 1 and 8, with the peak GPU memory.
4. **ddp**: two-process Stage I through recipes/accelerate/multi_gpu_ddp.yaml, where the machine has two GPUs.

On a CPU the same code runs on tiny shapes with few steps; compilation there uses dynamo's `eager` backend (the
fixed-shape capture without C++ code generation, which takes minutes on a small CPU) unless
FLUID_COMPILE_BACKEND says otherwise. The JSON is rewritten after each check, so a run cut short keeps the checks
it finished; a check that fails is a row of the table (and the exit status is 1), and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from decode_step import build, llama_config, measure
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from fluid_cli import train
from fluid_cli.config import load_recipe_text
from fluid_cli.decode import Decoder, DecodeSettings
from fluid_cli.errors import first_line
from fluid_cli.hf import greedy_generate
from fluid_cli.io import write_json_atomic
from fluid_cli.lora import apply_lora
from fluid_cli.model import FluidModel
from fluid_cli.tokenizer import SPECIAL_TOKENS, build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("exactness", "stage1", "decode", "ddp")
BATCHES = (1, 8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the full run on a GPU, or the smoke run."""

    exact_shape: str  # bench/decode_step.py's SHAPES
    prompts: int
    new_tokens: int
    max_k: int
    # Where exactness also runs compiled: every dtype and batch size on a GPU; in the smoke run only bf16 at batch
    # 8 (the same code path; each capture costs seconds of a small CPU's time)
    compiled_dtypes: tuple[str, ...]
    compiled_batches: tuple[int, ...]
    train_shape: str
    train_steps: int
    train_row_tokens: int
    train_batch: int
    train_k: int
    decode_shapes: tuple[str, ...]
    decode_ks: tuple[int, ...]
    decode_context: int
    decode_steps: int


FULL = Sizes("small", 8, 64, 8, ("fp32", "bf16"), BATCHES, "1b", 30, 512, 4, 16, ("1b", "7b"), (4, 8, 16), 512, 64)
SMOKE = Sizes("tiny", 8, 16, 4, ("bf16",), (8,), "tiny", 3, 24, 2, 4, ("tiny",), (4,), 32, 8)


def row(check: str, config: str, result: str, notes: str = "", **data: Any) -> dict[str, Any]:
    return {"check": check, "config": config, "result": result, "notes": notes, **data}


def skipped(check: str, config: str, why: str) -> dict[str, Any]:
    return row(check, config, "skipped", why, skipped=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- 1. exactness


FAVOURED = 4  # tokens the exactness model's head prefers, so that some drafts are right


def exactness_model(sizes: Sizes, device: torch.device, dtype: torch.dtype, adapter: bool) -> FluidModel:
    """A random Llama with a head of logits of standard deviation about 4 (a default-initialised head gives
    near-uniform logits, where every token is a near-tie) and a bias that makes it write mostly `FAVOURED` tokens,
    chosen among them by its input: random drafts are then right often enough to accept whole blocks (with no
    bias they are almost always cut at their first slot). With `adapter`, a random draft-only LoRA on top."""
    torch.manual_seed(0)
    model = build(sizes.exact_shape, device, dtype, sizes.max_k)
    hidden, vocab = model.lm.config.hidden_size, model.lm.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.normal_(0, 4 / hidden**0.5)
        head.bias.zero_()
        head.bias[3: 3 + FAVOURED] = 20.0  # above the largest of the other logits, mostly
    model.lm.set_output_embeddings(head)
    if not adapter:
        return model
    backbone = apply_lora(model.lm, r=8, alpha=16, dropout=0.0, target_modules="all-linear",
                          mask_token_id=model.mask_token_id)
    with torch.no_grad():  # LoRA B starts at zero, which would leave the drafts the base model's
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapted = FluidModel(backbone, model.khead, replace(model.meta, weights="adapter", lora_scope="draft")).eval()
    # Decoding's setup (`load_model(merge=True)`), keeping the low-rank path that models of a useful size take
    # (a tiny one would otherwise run stacked weights, a path no GPU-sized model runs).
    adapted.gate.freeze_for_decoding(stack_limit=0)
    return adapted


def top2_margin(model: FluidModel, ids: list[int], suppress: tuple[int, ...]) -> float:
    """The gap between the two largest next-token logits after `ids`, of the reference (the base model)."""
    with torch.inference_mode():
        logits = model.lm(torch.tensor([ids], device=model.device)).logits[0, -1].float()
        logits[list(suppress)] = -torch.inf
        top = logits.topk(2).values
        return float(top[0] - top[1])


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_exactness(sizes: Sizes, device: torch.device, log: Any) -> list[dict[str, Any]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for dtype_name, dtype in DTYPES.items():
        for adapter in (False, True):
            model = exactness_model(sizes, device, dtype, adapter)
            vocab = model.meta.vocab_size
            lengths = torch.randint(4, 40, (sizes.prompts,), generator=generator).tolist()
            prompts = [torch.randint(3, vocab - 1, (n,), generator=generator).tolist() for n in lengths]
            eos = (int(model.lm.config.eos_token_id),)
            suppress = (model.mask_token_id,) if adapter else ()  # the base model never writes the mask token
            reference = [greedy_generate(model.lm, p, sizes.new_tokens, eos, 0, suppress) for p in prompts]
            for batch in BATCHES:
                compiled_too = dtype_name in sizes.compiled_dtypes and batch in sizes.compiled_batches
                for compiled in (False, True) if compiled_too else (False,):
                    if compiled:
                        torch._dynamo.reset()  # a fresh recompile budget per model and batch (see decode_step)
                    config = (f"{dtype_name} batch {batch} {'compiled' if compiled else 'eager'}"
                              + (" draft-only LoRA" if adapter else ""))
                    log(f"exactness: {config}")
                    settings = DecodeSettings(horizon="fixed", max_k=sizes.max_k, threshold=0.0, compile=compiled,
                                              max_new_tokens=sizes.new_tokens, eos_token_ids=eos)
                    results, stats = Decoder(model, settings, batch_size=batch).run(prompts)
                    outputs = [r.tokens for r in results]
                    same = sum(o == r for o, r in zip(outputs, reference))
                    margins = sorted(top2_margin(model, p + r[: first_difference(o, r)], suppress)
                                     for p, o, r in zip(prompts, outputs, reference) if o != r)
                    per_forward = stats.new_tokens / stats.row_forwards  # each row's own, as at batch 1
                    notes = f"{per_forward:.2f} tokens/forward"
                    if margins:
                        notes += ("; top-2 logit margins at the first differences: "
                                  + ", ".join(f"{m:.3g}" for m in margins))
                    rows.append(row("exactness", config, f"{same}/{len(prompts)} identical", notes,
                                    dtype=dtype_name, batch=batch, compiled=compiled, adapter=adapter,
                                    identical=same, prompts=len(prompts), margins=margins,
                                    tokens_per_forward=per_forward))
            del model
            free_memory()
    return rows


# --------------------------------------------------------------------------------------------- 2. Stage I


def stage1_recipe(sizes: Sizes, device: torch.device, work: Path) -> tuple[Path, int]:
    """A random Llama of `sizes.train_shape` saved in bf16 with the character tokenizer, random token rows, and
    the Stage I recipe that trains a draft-only LoRA on them: the recipe file and the model's parameter count."""
    base, data = work / "base", work / "data"
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(llama_config(sizes.train_shape), dtype=torch.bfloat16)
    params = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(base)
    tok.save_pretrained(base)
    del lm
    free_memory()
    g = torch.Generator().manual_seed(1)
    n = sizes.train_steps * sizes.train_batch * 2  # enough rows for two processes (ddp)
    ids = torch.randint(len(SPECIAL_TOKENS), len(tok), (n, sizes.train_row_tokens), generator=g).tolist()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})}).save_to_disk(
        str(data))
    recipe = work / "stage1.toml"
    recipe.write_text(f"""
[model]
path = "{base}"
[fluid]
max_k = {sizes.train_k}
[lora]
scope = "draft"
[train]
dataset = "{data}"
output_dir = "{work / 'stage1'}"
batch_size = {sizes.train_batch}
max_steps = {sizes.train_steps}
gradient_checkpointing = true
log_steps = {sizes.train_steps}
save_steps = 1000000
[launch]
mixed_precision = "bf16"
""")
    return recipe, params


def stage1_row(config: str, summary: dict[str, Any], params: int, **data: Any) -> dict[str, Any]:
    gpu = summary["peak_gpu_memory_gib"]
    peak = f"peak {gpu:.2f} GiB GPU memory" if gpu else f"peak RSS {summary['peak_rss_mb']:.0f} MB"
    return row("stage1", config, f"{summary['steps_per_s']:.2f} steps/s, {summary['tokens_per_s']:,.0f} tokens/s",
               f"{peak}; {summary['steps']} steps, {params / 1e6:,.1f}M parameters, "
               f"{summary['expanded_tokens_per_s']:,.0f} expanded tokens/s", summary=summary, **data)


def check_stage1(sizes: Sizes, device: torch.device, work: Path, log: Any) -> list[dict[str, Any]]:
    recipe, params = stage1_recipe(sizes, device, work)
    log(f"stage1: {sizes.train_steps} steps, {sizes.train_shape} shape")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = train.run(load_recipe_text(recipe.read_text()))
    summary = json.loads((out / train.SUMMARY_NAME).read_text())
    free_memory()
    shape = f"{sizes.train_shape}, bf16, gradient checkpointing, draft-only LoRA"
    return [stage1_row(f"sdpa, dense mask; {shape}", summary, params, attention="sdpa"),
            skipped("stage1", f"flex_attention, block mask; {shape}",
                    "not implemented: Stage I feeds the expanded layout's dense 4D mask (fluid_cli.layout)")]


# --------------------------------------------------------------------------------------------- 3. decode step


def check_decode(sizes: Sizes, device: torch.device, log: Any) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    found = measure(list(sizes.decode_shapes), list(BATCHES), list(sizes.decode_ks), sizes.decode_context,
                    sizes.decode_steps, True, device, dtype, lambda line: log(f"decode: {line}"))
    free_memory()
    return [row("decode", f"{r['shape']} batch {r['batch']} K={r['k']} compiled", f"{r['ratio']:.2f}x a greedy step",
                f"{r['fluid_ms']:.2f} ms against {r['greedy_ms']:.2f} ms"
                + (f"; peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""), **r)
            for r in found]


# --------------------------------------------------------------------------------------------- 4. two-process DDP


def check_ddp(sizes: Sizes, device: torch.device, work: Path, log: Any) -> list[dict[str, Any]]:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return [skipped("ddp", "2 processes, multi_gpu_ddp.yaml",
                        f"needs two GPUs, this machine has {gpus or 'none'}"
                        + ("" if gpus else " (two CPU processes train in the suite: tests/test_train.py)"))]
    recipe = work / "stage1.toml"  # the stage1 check's model and data, when it ran
    if not recipe.is_file():
        recipe, _ = stage1_recipe(sizes, device, work)
    out = work / "ddp"
    log("ddp: two processes")
    cmd = [sys.executable, "-m", "fluid_cli", "train-stage1", str(recipe), "--set", "launch.num_processes=2",
           "--set", f"train.output_dir={out}",
           "--accelerate-config", str(REPO / "recipes" / "accelerate" / "multi_gpu_ddp.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        return [row("ddp", "2 processes, multi_gpu_ddp.yaml", "failed", lines[-1], failed=True)]
    summary = json.loads((out / train.SUMMARY_NAME).read_text())
    return [row("ddp", "2 processes, multi_gpu_ddp.yaml",
                f"{summary['steps_per_s']:.2f} steps/s, {summary['tokens_per_s']:,.0f} tokens/s",
                f"ranks agree: {summary['ranks_agree']}; peak {summary['peak_gpu_memory_gib']} GiB per GPU",
                summary=summary)]


# --------------------------------------------------------------------------------------------- the run


def report_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"GPU check on {report['device']}{' (smoke)' if report['smoke'] else ''}: torch "
                        f"{report['torch']}, transformers {report['transformers']}")
    for col in ("check", "configuration", "result", "notes"):
        table.add_column(col, overflow="fold")
    for r in report["rows"]:
        style = "red" if r.get("failed") else "dim" if r.get("skipped") else None
        table.add_row(r["check"], r["config"], r["result"], r["notes"], style=style)
    table.caption = (f"{report['elapsed_s']:.0f} s in all; compile backend {report['compile_backend']}; "
                     "exactness: against HF generate(do_sample=False) of the same weights, one prompt at a time")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check.json", help="the JSON report (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few steps (always so without a GPU)")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of %(default)s")
    args = parser.parse_args()
    checks = args.checks.split(",")
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)} (choose from {', '.join(CHECKS)})")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    smoke = args.smoke or not cuda
    sizes = SMOKE if smoke else FULL
    if not cuda:
        os.environ.setdefault("FLUID_COMPILE_BACKEND", "eager")
    transformers.logging.set_verbosity_error()
    console, results = Console(stderr=True), Console()  # progress lines on stderr, the table on stdout
    if not results.is_terminal:  # a log file or a pipe: the table at the width of a wide terminal
        results.width = 150
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "smoke": smoke,
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "compile_backend": os.environ.get("FLUID_COMPILE_BACKEND", "inductor"), "sizes": vars(sizes),
        "rows": [], "elapsed_s": 0.0, "check_seconds": {},
    }

    def log(line: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f}s[/] {line}", highlight=False)

    failed = False
    with tempfile.TemporaryDirectory(prefix="fluid-gpu-check-") as tmp:
        work = Path(tmp)
        runs = {"exactness": lambda: check_exactness(sizes, device, log),
                "stage1": lambda: check_stage1(sizes, device, work, log),
                "decode": lambda: check_decode(sizes, device, log),
                "ddp": lambda: check_ddp(sizes, device, work, log)}
        for name in CHECKS:
            if name not in checks:
                continue
            began = time.perf_counter()
            try:
                report["rows"] += runs[name]()
            except Exception as e:  # noqa: BLE001 - one check's failure is its row; the others still run
                traceback.print_exc()
                report["rows"].append(row(name, "", "failed", f"{type(e).__name__}: {first_line(e)}", failed=True))
                failed = True
                free_memory()
            report["check_seconds"][name] = time.perf_counter() - began
            report["elapsed_s"] = time.perf_counter() - started
            write_json_atomic(args.out, report)
    results.print(report_table(report))
    results.print(f"report: {args.out}")
    return 1 if failed or any(r.get("failed") for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
