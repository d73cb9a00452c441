"""`fluid eval`: benchmark a FLUID model through lm-evaluation-harness, with its speed and the AR baseline.

    fluid eval gsm8k math500 --model runs/stage1 --data-dir ../shared/data --decoder both --limit 50

Tasks are fluid's names (`FLUID_TASKS`: gsm8k, gsm8k_cot, math500, mmlu, humaneval, arithmetic) or any lm-eval
task, group or tag. Every task runs from lm-eval's own YAML (prompt, few-shot examples, stop sequences, answer
filters, metrics), included unchanged by a small override YAML written for the run. With a data folder
(`--data-dir` or `FLUID_DATA_DIR`, laid out like `../shared/data`) the override points each task whose hub
dataset has an offline copy (`LOCAL_DATA`) at the local JSONL files instead (`dataset_path: json`,
`dataset_kwargs: {data_files: ...}`); MMLU's per-subject hub configs become a `subject` filter.

`--decoder both` runs every task twice on the same weights, plain greedy (AR) then FLUID, and reports them side
by side with the speed-up and the fraction of generations that are identical (with verification on they should
all be). Writes `results.json` and one `samples_<task>.jsonl` per task to `[eval] output_dir`, atomically; the
folder is checked before any work, and results already there are replaced only with `--overwrite`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable
from rich.console import Console
from rich.table import Table

from fluid_cli.compat import lm_eval_task_index
from fluid_cli.config import EvalConfig, Recipe
from fluid_cli.errors import FluidError
from fluid_cli.hf import resolve_device
from fluid_cli.io import check_output_dir, check_output_file, disk_full_is_an_error, write_json_atomic, write_text_atomic
from fluid_cli.lm_eval_adapter import FluidLM
from fluid_cli.task_names import FLUID_TASKS, LM_EVAL_TASKS, PACKAGE_TASKS, unknown_task

Entry, Kind, TaskIndex, load_yaml = lm_eval_task_index()
# Hub datasets with an offline copy in the data folder (the layout of ../shared/data), by split.
LOCAL_DATA: dict[str, dict[str, str]] = {
    "openai/gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "HuggingFaceH4/MATH-500": {"test": "math500/test.jsonl"},
    "openai/openai_humaneval": {"test": "humaneval/test.jsonl"},
    "cais/mmlu": {"test": "mmlu/test.jsonl", "dev": "mmlu/dev.jsonl"},
}
# Hub datasets with one config per subject, whose local copy holds every subject in a `subject` column.
BY_SUBJECT = {"cais/mmlu"}
LOAD_SUBJECT = "fluid_cli.tasks.utils.load_subject"
DATA_DIR_ENV = "FLUID_DATA_DIR"
RESULTS_NAME = "results.json"

console = Console()
err_console = Console(stderr=True)


# --------------------------------------------------------------------------------------------- tasks


@dataclass
class TaskPlan:
    """What lm-eval is asked to run: the names, and the folders its TaskManager indexes to find them."""

    names: list[str]  # as requested; a task asked for by a fluid alias (math500) is reported under the alias
    folders: list[Path]  # lm-eval folders defining the requested groups, then the run's override folder last
    leaves: dict[str, list[str]] = field(default_factory=dict)  # requested name -> its leaf tasks
    generative: set[str] = field(default_factory=set)  # leaf tasks that generate text
    unsafe: list[str] = field(default_factory=list)  # leaf tasks that execute model-written code


def plan_tasks(names: list[str], data_dir: Path | None, render_dir: Path) -> TaskPlan:
    """Resolve task names and write one override YAML per leaf task into `render_dir` (see the module doc).

    Raises a one-line FluidError for an unknown name (with the known ones) and for a missing data file (with the
    expected path). Nothing is downloaded or loaded here.
    """
    plan = TaskPlan(names=list(dict.fromkeys(names)), folders=[])
    owner: dict[str, str] = {}  # leaf task -> the requested name it belongs to
    for name in plan.names:
        lm_name, index = _lookup(name)
        entry = index[lm_name]
        leaves = _leaves(entry, index)
        if entry.kind is Kind.GROUP:
            plan.folders.append(entry.yaml_path.parent)  # the group's own YAMLs (it names its members)
        plan.leaves[name] = []
        for leaf in leaves:
            # A single task requested under an alias (math500) is run and reported under that alias.
            task_name = name if leaf is entry else leaf.name
            if task_name in owner:  # lm-eval runs a task once per evaluation
                raise FluidError(f"task {task_name!r} is part of both {owner[task_name]!r} and {name!r}: ask for one")
            owner[task_name] = name
            cfg = load_yaml(leaf.yaml_path, resolve_func=False)
            text = _override_yaml(task_name, leaf.yaml_path, cfg, data_dir)
            write_text_atomic(render_dir / f"{task_name}.yaml", text)
            plan.leaves[name].append(task_name)
            if cfg.get("output_type") == "generate_until":
                plan.generative.add(task_name)
            if cfg.get("unsafe_code"):
                plan.unsafe.append(task_name)
    plan.folders = list(dict.fromkeys(plan.folders)) + [render_dir]
    return plan


def _lookup(name: str) -> tuple[str, dict[str, Entry]]:
    """The lm-eval name that `name` stands for, and an index that defines it (and its group members)."""
    if name in FLUID_TASKS:
        lm_name, folder = FLUID_TASKS[name]
        return lm_name, _index((folder,))
    index = _index((LM_EVAL_TASKS, PACKAGE_TASKS))  # later folders win: fluid's humaneval replaces lm-eval's
    if name not in index:
        raise unknown_task(name, list(index))
    return name, index


@functools.cache
def _index(folders: tuple[Path, ...]) -> dict[str, Entry]:
    with _quiet_overrides():
        return TaskIndex.build(list(folders))


@contextmanager
def _quiet_overrides() -> Iterator[None]:
    """lm-eval warns for every indexed task that replaces one of the same name; here that is the intent."""
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        index_log.setLevel(level)


def _leaves(entry: Entry, index: dict[str, Entry]) -> list[Entry]:
    """The tasks a name stands for: itself, the members of a tag, or (recursively) the members of a group."""
    if entry.kind in (Kind.TASK, Kind.PY_TASK):
        return [entry]
    if entry.kind is Kind.TAG:
        return [index[name] for name in sorted(entry.tags)]
    members = entry.cfg.get("task", [])
    members = members if isinstance(members, list) else [members]
    out = []
    for member in members:
        name = member if isinstance(member, str) else member.get("task") or member.get("group")
        if name not in index:
            raise FluidError(f"{entry.yaml_path}: group {entry.name!r} defines member {name!r} inline; "
                             "fluid runs groups whose members are named tasks")
        out += _leaves(index[name], index)
    return out


def _relative_data_files(cfg: dict[str, Any]) -> dict[str, str]:
    """`{split: path}` of a `json` task whose data files are all relative paths (not URLs like `hf://...`)."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") if cfg.get("dataset_path") == "json" else None
    relative = isinstance(files, dict) and all(
        isinstance(f, str) and "://" not in f and not Path(f).is_absolute() for f in files.values())
    return dict(files) if relative else {}


def _override_yaml(task: str, source: Path, cfg: dict[str, Any], data_dir: Path | None) -> str:
    """A task YAML that includes `source` unchanged and, with a data folder, points it at local files."""
    doc: dict[str, Any] = {"include": str(source), "task": task}
    subject = None
    path = cfg.get("dataset_path")
    if path in LOCAL_DATA and data_dir is not None:
        files = {split: data_dir / rel for split, rel in LOCAL_DATA[path].items()}
        if path in BY_SUBJECT and cfg.get("dataset_name") not in (None, "all"):
            subject = cfg["dataset_name"]
    elif relative := _relative_data_files(cfg):  # fluid's own tasks: data files relative to the data folder
        if data_dir is None:
            raise FluidError(f"task {task!r} reads {', '.join(relative.values())} from a data folder: pass "
                             f"--data-dir (or set {DATA_DIR_ENV})")
        files = {split: data_dir / rel for split, rel in relative.items()}
    else:
        return yaml.safe_dump(doc, sort_keys=False)  # from the hub (or URLs), as the task defines it
    for file in files.values():
        if not file.is_file():
            raise FluidError(f"task {task!r}: data file {file} not found (the data folder should be laid out like "
                             "../shared/data: gsm8k/test.jsonl, math500/test.jsonl, ...)")
    kwargs: dict[str, Any] = {"data_files": {split: str(f) for split, f in files.items()}}
    if subject is not None:
        kwargs["subject"] = subject
    doc |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": kwargs}
    text = yaml.safe_dump(doc, sort_keys=False)
    # A tagged value is the one thing safe_dump cannot write; lm-eval resolves it by importing the module.
    return text + (f"custom_dataset: !function {LOAD_SUBJECT}\n" if subject is not None else "")


# --------------------------------------------------------------------------------------------- the run


def run(cfg: Recipe, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate `[eval] model_dir` on `[eval] tasks` with the decoder(s) of `[eval] decoder`; returns the summary
    written to `results.json` (an existing one is replaced only with `overwrite`). Decoding settings (horizon, tau,
    threshold, max_k, min_k, verify) come from `[generate]`."""
    ev, gen = cfg.eval, cfg.generate
    if not ev.tasks:
        raise FluidError("no tasks: name them (e.g. `fluid eval gsm8k --model DIR`) or set [eval] tasks")
    check_output_dir(ev.output_dir, "--output-dir / [eval] output_dir")
    check_output_file(Path(ev.output_dir) / RESULTS_NAME, "--output-dir / [eval] output_dir", overwrite)
    data_dir = ev.data_dir or os.environ.get(DATA_DIR_ENV)
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise FluidError(f"data folder {data_dir} not found (--data-dir / [eval] data_dir / {DATA_DIR_ENV})")
    decoders = ["ar", "fluid"] if ev.decoder == "both" else [ev.decoder]
    out_dir = Path(ev.output_dir)
    with tempfile.TemporaryDirectory(prefix="fluid-tasks-") as render_dir:
        plan = plan_tasks(ev.tasks, data_dir, Path(render_dir))
        if plan.unsafe and not ev.allow_code_execution:
            raise FluidError(f"{', '.join(plan.unsafe)} is scored by running model-written code: pass "
                             "--allow-code-execution to allow it")
        lm = FluidLM(
            ev.model_dir or cfg.train.output_dir, decoder="ar" if ev.decoder == "ar" else "fluid",
            horizon=gen.horizon, tau=gen.tau, threshold=gen.threshold, max_k=gen.max_k, min_k=gen.min_k,
            verify=gen.verify, compile=gen.compile, batch_size=ev.batch_size,
            # resolved here: the adapter's own fallback (lm-eval's default cuda:0 on a machine without one) is
            # not for a device the recipe asked for
            device=str(resolve_device(ev.device)), dtype=ev.dtype, mask_token=gen.mask_token,
            temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, seed=1234 if gen.seed is None else gen.seed,
        )
        if ev.apply_chat_template:
            lm.check_chat_template()
        manager = task_manager(plan)
        if plan.generative:
            lm.warm_up(decoders)
        runs = {}
        for decoder in decoders:
            lm.decoder, lm.samples, lm.batches, lm.requests = decoder, [], [], 0  # the same seeds for each decoder
            runs[decoder] = (evaluate_plan(lm, plan, manager, ev), lm.samples, lm.batches)
    summary = summarise(plan, runs)
    # With verification on, FLUID's generations equal greedy decoding of the original model (a draft-only adapter,
    # or a plain model) or of these weights (LoRA on every row, full weights).
    summary["exact_to"] = lm.model.meta.exact_to
    summary["batch_size"] = ev.batch_size
    summary["decode_runs"] = {d: batches for d, (_, _, batches) in runs.items()}
    for name in plan.names:
        console.print(task_table(name, summary["tasks"][name]))
    with disk_full_is_an_error(out_dir):
        write_outputs(out_dir, cfg, plan, summary, runs)
    err_console.print(f"results: {out_dir / RESULTS_NAME}")
    return summary


def task_manager(plan: TaskPlan) -> TaskManager:
    """An lm-eval TaskManager that indexes only the plan's folders (not lm-eval's ~15,000 task files)."""
    with _quiet_overrides():
        return TaskManager(include_defaults=False, include_path=[str(f) for f in plan.folders])


def evaluate_plan(lm: Any, plan: TaskPlan, manager: TaskManager, ev: EvalConfig) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` (any lm-eval `LM`) on the plan's tasks, with the `[eval]` settings."""
    with _code_execution(ev.allow_code_execution), _quiet_custom_dataset(), _offline_hint(), _quiet_lm_eval():
        return simple_evaluate(
            model=lm, tasks=plan.names, task_manager=manager, limit=ev.limit, num_fewshot=ev.num_fewshot,
            apply_chat_template=ev.apply_chat_template, fewshot_as_multiturn=ev.apply_chat_template,
            gen_kwargs={"max_gen_toks": ev.max_gen_toks} if ev.max_gen_toks else None,
            confirm_run_unsafe_code=ev.allow_code_execution, log_samples=True,
        )


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's noise around fluid's own display: its request-building tqdm bar, `datasets`' bars while it loads
    the task data, and the "fatal: not a git repository" that `git describe` prints (lm-eval records the commit of
    the working folder) outside a git checkout."""
    import datasets
    import lm_eval.api.task
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path
    from tqdm import tqdm

    def git_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    bars_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True)), \
                mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", git_hash):
            yield
    finally:
        if bars_on:
            datasets.enable_progress_bars()


@contextmanager
def _offline_hint() -> Iterator[None]:
    try:
        yield
    except ConnectionError as e:  # what `datasets` raises for an unreachable hub
        raise FluidError(f"{e}; without the hub, pass --data-dir (or set {DATA_DIR_ENV}) with local copies laid "
                         "out like ../shared/data") from None


@contextmanager
def _code_execution(allowed: bool) -> Iterator[None]:
    """HF_ALLOW_CODE_EVAL=1 for the run when code execution is allowed (the variable HumanEval's scorer checks)."""
    old = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = old


class _DropCustomDatasetAdvice(logging.Filter):
    # lm-eval advises `--metadata` for every task loaded through `custom_dataset` (MMLU's 57 local subjects);
    # the subject filter needs no metadata.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def _quiet_custom_dataset() -> Iterator[None]:
    task_log, drop = logging.getLogger("lm_eval.api.task"), _DropCustomDatasetAdvice()
    task_log.addFilter(drop)
    try:
        yield
    finally:
        task_log.removeFilter(drop)


# --------------------------------------------------------------------------------------------- reporting


def summarise(plan: TaskPlan, runs: dict[str, tuple[dict, list[dict], list[dict]]]) -> dict[str, Any]:
    """Per requested task: each decoder's metrics and decode speed; with two decoders the speed-up (AR wall time
    over FLUID wall time, on the same samples) and the fraction of identical generations."""
    tasks: dict[str, Any] = {}
    for name in plan.names:
        leaves = set(plan.leaves[name])
        entry: dict[str, Any] = {}
        for decoder, (results, samples, batches) in runs.items():
            mine = [s for s in samples if s["task"] in leaves]
            entry[decoder] = {"metrics": _metrics(results, name), "n_samples": _n_samples(results, leaves)}
            if mine:
                entry[decoder]["speed"] = _speed(mine, batches)
                entry[decoder]["decoding"] = _decoding(mine)
        if len(runs) == 2 and "speed" in entry.get("fluid", {}):
            ar, fluid = entry["ar"]["speed"], entry["fluid"]["speed"]
            entry["speedup"] = ar["wall_s"] / fluid["wall_s"] if fluid["wall_s"] > 0 else None
            # sampled generations agree in distribution, not token by token
            sampled = entry["fluid"]["decoding"] != "greedy"
            entry["identical"] = None if sampled else _identical(runs["ar"][1], runs["fluid"][1], leaves)
        tasks[name] = entry
    return {"tasks": tasks}


def _metrics(results: dict, name: str) -> dict[str, float]:
    """`{"exact_match,strict-match": 0.4, ...}` for a task or group, without standard errors and aliases."""
    row = results["results"].get(name) or results.get("groups", {}).get(name, {})
    return {k: v for k, v in row.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}


def _n_samples(results: dict, leaves: set[str]) -> int:
    return sum(results["n-samples"][t]["effective"] for t in leaves if t in results.get("n-samples", {}))


def _speed(samples: list[dict], batches: list[dict]) -> dict[str, float]:
    """Tokens per forward of the task's generations (each generation's own forwards); wall time from the batched
    decoding runs, each shared among tasks in proportion to the tokens it generated for them."""
    stats = [s["stats"] for s in samples]
    tokens, forwards = sum(s["new_tokens"] for s in stats), sum(s["forwards"] for s in stats)
    mine: Counter = Counter()
    for sample in samples:
        mine[sample["batch"]] += sample["stats"]["new_tokens"]
    wall = sum(batches[b]["wall_s"] * n / max(batches[b]["new_tokens"], 1) for b, n in mine.items())
    horizons = [h for s in stats for h in s["horizons"]]
    return {
        "samples": len(stats), "new_tokens": tokens, "forwards": forwards, "wall_s": wall,
        "wall_s_per_sample": wall / len(stats),
        "tokens_per_forward": tokens / forwards if forwards else 0.0,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "mean_horizon": sum(horizons) / len(horizons) if horizons else 0.0,
    }


def _decoding(samples: list[dict]) -> str | dict[str, Any]:
    """Which decoding ran: "greedy", or the sampling settings (from the flags, or the task's generation kwargs)
    with how many generations sampled and their first and last seeds."""
    sampled = [s["stats"]["sampling"] for s in samples if s["stats"]["sampling"]]
    if not sampled:
        return "greedy"
    settings = {k: v for k, v in sampled[0].items() if k != "seed"}
    return {**settings, "sampled": len(sampled), "of": len(samples), "seeds": [sampled[0]["seed"], sampled[-1]["seed"]]}


def _keyed(samples: list[dict], leaves: set[str]) -> dict[tuple[str, int, int], str]:
    """Generations by (task, doc, n-th request of that doc): tasks with `repeats` ask several per document."""
    seen: Counter = Counter()
    out = {}
    for s in samples:
        if s["task"] in leaves:
            key = (s["task"], s["doc_id"])
            out[(*key, seen[key])] = s["output"]
            seen[key] += 1
    return out


def _identical(ar: list[dict], fluid: list[dict], leaves: set[str]) -> float:
    a, f = _keyed(ar, leaves), _keyed(fluid, leaves)
    return sum(a[k] == f.get(k) for k in a) / len(a) if a else 0.0


def task_table(name: str, entry: dict[str, Any]) -> Table:
    """Metrics and speed of one task; with two decoders AR and FLUID side by side."""
    decoders = [d for d in ("ar", "fluid") if d in entry]
    first = entry[decoders[0]]
    decoding = first.get("decoding", "greedy")
    how = decoding if decoding == "greedy" else \
        f"sampled: temperature {decoding['temperature']:g}, top-p {decoding['top_p']:g}, top-k {decoding['top_k']}"
    table = Table(title=f"{name} ({first['n_samples']} samples, {how})", title_justify="left")
    table.add_column("metric")
    for d in decoders:
        table.add_column(d.upper(), justify="right")
    for metric in first["metrics"]:
        table.add_row(metric, *(f"{entry[d]['metrics'].get(metric, float('nan')):.4f}" for d in decoders))
    if "speed" in first:
        for label, key, fmt in (("tokens / forward", "tokens_per_forward", "{:.2f}"),
                                ("tokens / s", "tokens_per_s", "{:.1f}"),
                                ("mean horizon", "mean_horizon", "{:.2f}"),
                                ("wall s / sample", "wall_s_per_sample", "{:.3f}")):
            table.add_row(label, *(fmt.format(entry[d]["speed"][key]) for d in decoders))
    if "speedup" in entry:
        speedup = entry["speedup"]
        table.add_row("speed-up (AR time / FLUID time)", "", f"{speedup:.2f}x" if speedup else "n/a")
        identical = entry["identical"]
        table.add_row("identical outputs", "", "n/a (sampled)" if identical is None else f"{identical:.1%}")
    return table


def write_outputs(out_dir: Path, cfg: Recipe, plan: TaskPlan, summary: dict[str, Any],
                  runs: dict[str, tuple[dict, list[dict], list[dict]]]) -> None:
    """`results.json` (settings, summary, lm-eval's results per decoder), `samples_<task>.jsonl` per leaf task and
    the resolved recipe, each written atomically; the sample files of the results replaced (other tasks) go."""
    def plain(obj: Any) -> Any:  # lm-eval's results hold numpy scalars and callables
        return json.loads(json.dumps(obj, default=handle_non_serializable))

    lm_eval_results = {d: plain({k: v for k, v in results.items() if k != "samples"})
                       for d, (results, _, _) in runs.items()}
    ev = cfg.eval
    write_json_atomic(out_dir / RESULTS_NAME, {
        "model": ev.model_dir or cfg.train.output_dir, "tasks": plan.names, "decoders": list(runs),
        "limit": ev.limit, "num_fewshot": ev.num_fewshot, "data_dir": ev.data_dir or os.environ.get(DATA_DIR_ENV),
        **summary, "lm_eval": lm_eval_results,
    })
    written = set()
    for task in sorted({t for leaves in plan.leaves.values() for t in leaves}):
        rows = _sample_rows(task, runs)
        written.add(out_dir / f"samples_{task}.jsonl")
        write_text_atomic(out_dir / f"samples_{task}.jsonl", "".join(
            json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
    for stale in set(out_dir.glob("samples_*.jsonl")) - written:  # an overwritten run's other tasks
        stale.unlink()
    cfg.save(out_dir)


def _sample_rows(task: str, runs: dict[str, tuple[dict, list[dict], list[dict]]]) -> list[dict[str, Any]]:
    """One line per document: prompt and target, then per decoder the generation (or the log-likelihoods), each
    filter's extracted answer and metrics, and the decode statistics; `identical` with two decoders."""
    rows: dict[int, dict[str, Any]] = {}
    for decoder, (results, samples, _) in runs.items():
        stats = defaultdict(list)
        for s in samples:
            if s["task"] == task:
                stats[s["doc_id"]].append(s["stats"])
        for sample in results.get("samples", {}).get(task, []):
            doc_id = sample["doc_id"]
            row = rows.setdefault(doc_id, {"doc_id": doc_id, "prompt": sample["arguments"][0][0],
                                           "target": sample["target"]})
            mine = row.setdefault(decoder, {"output": [r[0] if len(r) == 1 else r for r in sample["resps"]],
                                            "filters": {}})
            mine["filters"][sample["filter"]] = {"answer": sample["filtered_resps"],
                                                 **{m: sample[m] for m in sample["metrics"]}}
            if stats.get(doc_id):
                mine["decode"] = stats[doc_id]
    if len(runs) == 2:
        for row in rows.values():
            if "decode" in row["ar"]:  # a generation (log-likelihoods are the same forwards for both)
                row["identical"] = row["ar"]["output"] == row["fluid"]["output"]
    return [rows[k] for k in sorted(rows)]
