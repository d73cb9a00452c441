"""`train-stage1 --resume`: what a continued run must keep, what it may change, and when a run is finished.

Resuming continues *the same run*: its losses equal the uninterrupted run's (CPU, fp32). So every recipe key that
decides a step must be what the checkpoint was written under. Each checkpoint keeps its recipe
(`fluid-config.toml`) and the identity of the prepared dataset it trained on, and `check` compares them with the
run about to start, before any work:

- refused, in one line naming every changed key: the model (`[model]`), the layout (`[fluid]`), the adapter
  (`[lora]`), what decides the steps in `[train]` (seed, batch size, accumulation, the schedule, clipping, the
  expanded-length cap, gradient checkpointing), `[launch]` but its port, and the dataset's content (it may move:
  the data is compared, not its path; other paths, such as `[model] path`, are compared as written). The schedule
  is part of the run: a raised `max_steps` (or `epochs`) would re-plan the cosine schedule mid-run, the learning
  rate jumping back up from where it had decayed to, which is neither run; a longer run is a new run;
- allowed, and said when the run starts: where and how often the run writes (`CHANGEABLE`), and the tables
  Stage I never reads (`[data]`, whose prepared output is compared instead, `[khead]`, `[generate]`, `[eval]`,
  `[bench]`).

A run is *finished* once `train-summary.json` is written (after the model): there is nothing left to resume, and
`--resume` says so and changes nothing (a calibrated folder keeps its K-head).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fluid_cli.config import RESOLVED_CONFIG_NAME, Recipe, format_keypath, load_recipe
from fluid_cli.errors import FluidError
from fluid_cli.sources import digest

# Tables Stage I does not read (the prepared dataset, `[data]`'s output, is compared by its content instead).
UNREAD_TABLES = ("data", "khead", "generate", "eval", "bench")
# Keys that say only where and how often the run writes: a resume may change them.
CHANGEABLE = {("train", "output_dir"), ("train", "dataset"), ("train", "save_steps"), ("train", "save_total_limit"),
              ("train", "log_steps"), ("train", "tensorboard"), ("launch", "main_process_port")}


def dataset_identity(folder: Path) -> str:
    """The prepared dataset's identity: its splits' `state.json` (whose fingerprints prepare-data derives from the
    sources' bytes and every setting) and the sizes of their Arrow files. Cheap: no data is read."""
    parts = [f"{p.relative_to(folder)}:{p.read_text() if p.name == 'state.json' else p.stat().st_size}"
             for p in sorted(folder.rglob("*")) if p.is_file() and (p.name == "state.json" or p.suffix == ".arrow")]
    return digest("\n".join(parts))


def saved_recipe(out: Path, checkpoint: Path | None) -> Recipe | None:
    """The recipe the run in `out` was trained under: its newest checkpoint's, else the folder's own."""
    for folder in ([checkpoint] if checkpoint is not None else []) + [out]:
        if (folder / RESOLVED_CONFIG_NAME).is_file():
            return load_recipe(folder / RESOLVED_CONFIG_NAME)
    return None


def differences(saved: Recipe, now: Recipe) -> tuple[list[str], list[str]]:
    """The keys whose values differ, as `[table] key: old -> new`: (refused, allowed)."""
    old, new = _flat(saved), _flat(now)
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys(), key=str):
        if key[0] in UNREAD_TABLES or old.get(key) == new.get(key):
            continue
        change = f"{format_keypath(key)}: {_show(old.get(key))} -> {_show(new.get(key))}"
        (allowed if key in CHANGEABLE else refused).append(change)
    return refused, allowed


def check(cfg: Recipe, out: Path, checkpoint: Path | None, state: dict[str, Any], dataset: Path) -> list[str]:
    """Refuse a resume that would not continue the same run (`checkpoint`, whose trainer state is `state`, is the
    newest checkpoint in `out`, if any); returns the allowed changes, to be said."""
    saved = saved_recipe(out, checkpoint)
    refused, allowed = differences(saved, cfg) if saved is not None else ([], [])
    if refused:
        raise FluidError(f"--resume: {out} was trained with another recipe ({'; '.join(refused)}); resuming would "
                         "not continue the same run: put the value(s) back, or start a new run in another "
                         "[train] output_dir")
    if "dataset" in state and state["dataset"] != dataset_identity(dataset):
        raise FluidError(f"--resume: the prepared dataset {dataset} is not the one {checkpoint} was trained on (it "
                         "was prepared again, or is another one); resuming would continue on other data: restore "
                         "it, or start a new run in another [train] output_dir")
    return allowed


def _flat(recipe: Recipe) -> dict[tuple[str, ...], Any]:
    """Every key of the recipe (tables flattened, lists kept whole), unset ones left out."""
    flat: dict[tuple[str, ...], Any] = {}

    def walk(table: dict, path: tuple[str, ...]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, path + (key,))
            elif value is not None:
                flat[path + (key,)] = value

    walk({k: v for k, v in dataclasses.asdict(recipe).items() if k != "source"}, ())
    return flat


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)
