"""`fluid demo`: the whole FLUID pipeline from nothing, on a laptop CPU, driven by `recipes/demo.toml`.

No pretrained model can be shipped, so the demo grows one: it prepares synthetic grade-school arithmetic
problems, trains a small Llama-shaped model from random initialisation with the Stage I objective (which holds
the AR loss, so one stage yields both an AR model and its mask-block drafting), calibrates the K-head, streams a
few generations, and scores held-out problems through lm-eval with AR and FLUID decoding side by side. Every step
is the `run` of the real command, on the same recipe.

Outputs under `--out`: `data/`, `stage1/` (the FLUID model), `heldout/arithmetic/test.jsonl`, `eval/`,
`report.md`, `fluid-demo.png` and `demo.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fluid_cli.config import Recipe, load_recipe
from fluid_cli.errors import FluidError
from fluid_cli.io import (
    check_output_dir,
    disk_full_is_an_error,
    write_file_atomic,
    write_json_atomic,
    write_text_atomic,
)

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"
STEPS = ("prepare-data", "train-stage1", "calibrate-khead", "generate", "eval")
TAUS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # the tau sweep of the tokens-per-forward plot (loss-curve head)


def demo_recipe(out: Path, fast: bool, recipe: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """The demo recipe with every output under `out`; `fast` shrinks data, model and steps for CI."""
    path = recipe or DEMO_RECIPE
    if not path.is_file():
        raise FluidError(f"{path}: demo recipe not found (run from a source checkout, or pass --recipe)")
    fast_overrides = [
        "model.scratch.hidden_size=64", "model.scratch.intermediate_size=128", "model.scratch.num_hidden_layers=2",
        "train.max_steps=30", "train.batch_size=8", "data.validation=20", "khead.steps=200", "eval.limit=4", "eval.max_gen_toks=48",
        "generate.max_new_tokens=48",
    ] if fast else []
    cfg = load_recipe(path, fast_overrides + list(overrides or []))
    if fast:
        for source in cfg.data.sources:
            source.num_samples = min(source.num_samples or 300, 300)
    cfg.data.output_dir = str(out / "data")
    cfg.train.output_dir = str(out / "stage1")
    cfg.khead.model_dir = cfg.generate.model_dir = cfg.eval.model_dir = None  # all default to the Stage I output
    cfg.khead.dataset = cfg.train.dataset = None
    cfg.eval.output_dir = str(out / "eval")
    cfg.eval.data_dir = str(out / "heldout")
    cfg.eval.tasks = ["arithmetic"]
    cfg.eval.decoder = "both"
    return cfg


MARKER = ".fluid-demo"


def fresh_output(out: Path) -> None:
    """Start from nothing: clear a previous demo's folder; refuse any other non-empty folder (or a file)."""
    check_output_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FluidError(f"{out}: folder exists and is not a fluid demo output; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def write_heldout(cfg: Recipe, out: Path, n: int) -> list[dict[str, str]]:
    """Held-out problems for `eval`: fresh synthetic rows (another seed) minus any question seen in training."""
    from fluid_cli.synthetic import arithmetic_rows

    train_n = sum(s.num_samples or 0 for s in cfg.data.sources if s.path == "synthetic:arithmetic")
    seen = {r["question"] for r in arithmetic_rows(train_n, seed=cfg.data.seed)}
    rows = [r for r in arithmetic_rows(2 * n + 50, seed=cfg.data.seed + 10_007) if r["question"] not in seen][:n]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_text_atomic(out / "heldout" / "arithmetic" / "test.jsonl", text)
    return rows


def prompt_of(row: dict[str, str]) -> str:
    """lm-eval's GSM8K prompt layout, which the demo's data was rendered in."""
    return f"Question: {row['question']}\nAnswer:"


def tau_sweep(model: Any, gen: Any, rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """Tokens per forward against decode-time tau (the loss-curve K-head chooses the horizon for any tau)."""
    from fluid_cli.decode import fluid_decode
    from fluid_cli.inference import decode_settings

    prompts = [model.tokenizer(prompt_of(r))["input_ids"] for r in rows]
    points = []
    for tau in TAUS:
        settings = decode_settings(replace(gen, horizon="khead", tau=tau), model)
        tokens = forwards = 0
        for ids in prompts:
            stats = fluid_decode(model, ids, settings).stats
            tokens, forwards = tokens + stats.new_tokens, forwards + stats.forwards
        points.append({"tau": tau, "tokens_per_forward": tokens / max(forwards, 1)})
    return points


def horizon_trace(model: Any, gen: Any, row: dict[str, str]) -> dict[str, Any]:
    """One generated answer with the horizon chosen and the tokens committed at every block."""
    from fluid_cli.decode import fluid_decode
    from fluid_cli.inference import decode_settings

    ids = model.tokenizer(prompt_of(row))["input_ids"]
    blocks: list[list[int]] = []
    result = fluid_decode(model, ids, decode_settings(gen, model), on_block=blocks.append)
    return {
        "question": row["question"],
        "blocks": [model.tokenizer.decode(b) for b in blocks],
        "horizons": result.stats.horizons,
        "committed": result.stats.committed,
    }


def plot(trace: dict[str, Any], sweep: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    starts = [sum(trace["committed"][:i]) for i in range(len(trace["committed"]))]
    left.bar(starts, trace["horizons"], width=[max(c, 1) for c in trace["committed"]], align="edge",
             color="#cfe0f5", edgecolor="#5b8bd0", label="horizon K_t chosen by the K-head")
    left.step([s + c for s, c in zip(starts, trace["committed"])], trace["committed"], where="pre",
              color="#d0582b", label="tokens committed by the block")
    for s, text in zip(starts, trace["blocks"]):
        left.annotate(text.replace("\n", "⏎"), (s, 0.2), fontsize=6, rotation=90, va="bottom")
    left.set_xlabel("position in the generated answer (tokens)")
    left.set_ylabel("tokens")
    left.set_title("Elastic horizons along one answer")
    left.legend(loc="upper right", fontsize=8)
    right.plot([p["tau"] for p in sweep], [p["tokens_per_forward"] for p in sweep], marker="o", color="#5b8bd0")
    right.set_xlabel("tau (nats)")
    right.set_ylabel("tokens per forward (verified)")
    right.set_title("Speed against the calibration threshold")
    right.grid(alpha=0.3)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def summary_rows(results: dict[str, Any]) -> dict[str, Any]:
    task = results["tasks"]["arithmetic"]

    def accuracy(decoder: str) -> float:
        metrics = task[decoder]["metrics"]
        return next(v for k, v in metrics.items() if k.startswith("exact_match") and "strict" in k)

    return {
        "samples": task["fluid"]["n_samples"],
        "accuracy": {"ar": accuracy("ar"), "fluid": accuracy("fluid")},
        "tokens_per_forward": {d: task[d]["speed"]["tokens_per_forward"] for d in ("ar", "fluid")},
        "tokens_per_s": {d: task[d]["speed"]["tokens_per_s"] for d in ("ar", "fluid")},
        "speedup": task["speedup"],
        "identical": task["identical"],
    }


def summary_table(s: dict[str, Any], total_s: float) -> Table:
    table = Table(title=f"FLUID demo: {s['samples']} held-out problems ({total_s / 60:.1f} min in all)")
    for col in ("decoder", "accuracy", "tokens / forward", "tokens / s"):
        table.add_column(col, justify="right")
    for d, name in (("ar", "AR greedy"), ("fluid", "FLUID (verified)")):
        table.add_row(name, f"{100 * s['accuracy'][d]:.1f}%", f"{s['tokens_per_forward'][d]:.2f}",
                      f"{s['tokens_per_s'][d]:.1f}")
    table.caption = f"speed-up {s['speedup']:.2f}x, identical outputs {100 * s['identical']:.0f}%"
    return table


def report_markdown(s: dict[str, Any], trace: dict[str, Any], sweep: list[dict[str, float]], timings: dict,
                    fast: bool) -> str:
    lines = [
        "# FLUID demo report", "",
        f"A Llama-shaped model grown from scratch on synthetic arithmetic{' (fast mode)' if fast else ''}, "
        f"scored on {s['samples']} held-out problems through lm-eval.", "",
        "| decoder | accuracy | tokens / forward | tokens / s |", "|---|---|---|---|",
        f"| AR greedy | {100 * s['accuracy']['ar']:.1f}% | {s['tokens_per_forward']['ar']:.2f} | "
        f"{s['tokens_per_s']['ar']:.1f} |",
        f"| FLUID (verified) | {100 * s['accuracy']['fluid']:.1f}% | {s['tokens_per_forward']['fluid']:.2f} | "
        f"{s['tokens_per_s']['fluid']:.1f} |", "",
        f"Wall-clock speed-up {s['speedup']:.2f}x; identical outputs {100 * s['identical']:.0f}%.", "",
        "![horizons and tau](fluid-demo.png)", "",
        "## Horizons along one answer", "",
        f"Question: {trace['question']}", "",
        "| block | horizon | committed | text |", "|---|---|---|---|",
        *[f"| {i + 1} | {h} | {c} | `{t.replace(chr(10), '⏎')}` |"
          for i, (h, c, t) in enumerate(zip(trace["horizons"], trace["committed"], trace["blocks"]))], "",
        "## Tokens per forward against tau", "",
        "| tau | tokens / forward |", "|---|---|",
        *[f"| {p['tau']:g} | {p['tokens_per_forward']:.2f} |" for p in sweep], "",
        "## Time per step (s)", "",
        "| step | seconds |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()], "",
    ]
    return "\n".join(lines)


def run(out: Path, fast: bool = False, recipe: Path | None = None, overrides: list[str] | None = None,
        console: Console | None = None) -> dict[str, Any]:
    import torch

    # A model this small gains nothing from intra-op threads, and on a busy laptop they slow it down many times.
    torch.set_num_threads(1)
    console = console or Console(stderr=True)
    out = Path(out)
    cfg = demo_recipe(out, fast, recipe, overrides)
    fresh_output(out)
    with disk_full_is_an_error(out):
        return _run(cfg, out, fast, console)


def _run(cfg: Recipe, out: Path, fast: bool, console: Console) -> dict[str, Any]:
    from fluid_cli import calibrate, data, evaluate, generate, train
    from fluid_cli.inference import generate_config, load_decoding_model

    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def step(n: int, name: str) -> None:
        timings[name] = time.perf_counter()
        console.rule(f"[bold]step {n}/{len(STEPS)}: {name}")

    step(1, "prepare-data")
    data.run(cfg, overwrite=True)
    heldout = write_heldout(cfg, out, n=cfg.eval.limit or 100)
    step(2, "train-stage1")
    train.run(cfg)
    step(3, "calibrate-khead")
    calibrate.run(cfg)
    step(4, "generate")
    prompts = [prompt_of(r) for r in heldout[:3]]
    generate.run(cfg, prompts, compare_ar=True)
    step(5, "eval")
    results = evaluate.run(cfg)
    timings["report"] = time.perf_counter()

    gen = generate_config(cfg)
    model = load_decoding_model(gen)
    trace = horizon_trace(model, gen, heldout[0])
    sweep = tau_sweep(model, gen, heldout[: 4 if fast else 12])
    plot(trace, sweep, out / "fluid-demo.png")
    names = list(timings)
    ends = [timings[n] for n in names[1:]] + [time.perf_counter()]
    timings = {n: end - timings[n] for n, end in zip(names, ends)}
    total = time.perf_counter() - t_start
    s = summary_rows(results)
    write_text_atomic(out / "report.md", report_markdown(s, trace, sweep, timings, fast))
    payload = {"summary": s, "horizon_trace": trace, "tau_sweep": sweep, "seconds": timings, "total_s": total,
               "fast": fast}
    write_json_atomic(out / "demo.json", payload)
    console.print(summary_table(s, total))
    console.print(f"report: {out / 'report.md'}  plot: {out / 'fluid-demo.png'}")
    return payload
