"""Self-distillation in `prepare-data` (`[data.regenerate]`): drafts learn to predict what *this* model says.

Every prepared example's trained part is replaced by a model's own continuation of the example's prompt:

    example   = prompt ids + trained ids (labels = -100 on the prompt)
    becomes     prompt ids + the model's continuation, up to its EOS or the limit, token ids as generated

The prompt is everything before the example's last trained span (a chat row's last assistant turn: the prompt
ends with the template's generation prompt). The continuation's ids are kept exactly as the model produced them:
decoding them to text and tokenizing again can split tokens differently, and the drafts must learn the model's own
token sequence. Greedy by default (`mode = "greedy"`); `mode = "sample"` samples at `temperature`.

A `path = "self"` source needs no data: its prompts are prefixes *sampled* from the model itself, starting at BOS
(`prefix_tokens = [min, max]` tokens each, at `prefix_temperature`, a seeded diversity), then continued by the
regeneration above. So a base model with no instruction data can be adapted on its own text.

Generation runs in chunks of `batch_size` prompts (left-padded, with the KV cache; `num_proc` processes on a
CPU, never more than there are chunks to generate). Each finished chunk is written (atomically, and synced to
disk) to a cache folder next to the output (`.<output>.regen-<key>`, the key a digest of the model's weights, not
its path, and of every setting and example), so a killed run continues where it stopped and ends with the same
bytes as an uninterrupted one. `prepare-data` holds the output's lock meanwhile (one run per output). A damaged
chunk is generated again; the folder is removed when `prepare-data` succeeds, and when a run fails on a mistake
(or before any chunk was written), since nothing could resume it. The backend is a small class
(`TransformersBackend`, transformers' `generate`); an offline vLLM backend would be another implementation of
`generate`.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from fluid_cli.config import SELF_SOURCE, DataSource, RegenerateConfig
from fluid_cli.errors import FluidError, first_line
from fluid_cli.hf import (
    check_model_folder,
    context_length,
    eos_token_ids,
    generate_batch,
    load_causal_lm,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from fluid_cli.io import write_json_atomic
from fluid_cli.layout import IGNORE, prompt_of
from fluid_cli.sources import digest

SELF = SELF_SOURCE  # the source path of prompts sampled from the model
DEFAULT_PREFIX = (4, 16)  # prefix_tokens of a "self" source
PROMPT, SAMPLE = "prompt", "sample"  # job kinds: continue a given prompt, or sample a prompt first


@dataclass(frozen=True)
class Job:
    """One example to produce: continue `prompt`, or (a `self` source) sample a prefix of `length` tokens first."""

    kind: str
    prompt: tuple[int, ...] = ()
    length: int = 0
    temperature: float = 1.0  # of the sampled prefix


@dataclass
class Counts:
    """What regeneration did, for `stats.json`."""

    examples: int = 0  # examples regenerated (from data rows and from `self` prompts)
    self_prompts: int = 0
    tokens: int = 0  # generated (trained) tokens
    ended_at_eos: int = 0
    ended_at_limit: int = 0
    dropped_no_room: int = 0  # prompts that left no room for a continuation within cutoff_len
    cached_chunks: int = 0  # chunks taken from an interrupted run's cache
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


class TransformersBackend:
    """`generate` of transformers on the model that regenerates, in this process."""

    def __init__(self, model: str, cfg: RegenerateConfig, trust_remote_code: bool = False):
        device = resolve_device(cfg.device)
        hf_logging.disable_progress_bar()  # the regeneration shows its own progress
        self.lm = load_causal_lm(model, dtype=resolve_dtype(cfg.dtype, device),
                                 trust_remote_code=trust_remote_code).to(device).eval()
        self.tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.eos = eos_token_ids(self.tokenizer, self.lm)
        self.bos = self.tokenizer.bos_token_id
        self.context = context_length(self.lm.config)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float | None, seed: int
                 ) -> list[list[int]]:
        """Continuations of `prompts` (each ends at EOS, inclusive, or at `max_new_tokens`); greedy when
        `temperature` is None, else sampled with a generator seeded by `seed`."""
        if temperature is not None:
            torch.manual_seed(seed)
        return generate_batch(self.lm, prompts, max_new_tokens, self.eos, self.tokenizer.pad_token_id,
                              temperature=temperature)


def check(cfg: RegenerateConfig | None, model: str | None, sources: list[DataSource], cutoff_len: int, where: str,
          trust_remote_code: bool = False) -> None:
    """One-line errors, before any work, for a regeneration that cannot work (and for `self` sources without
    one): no model, a folder without weights, prompts that could outgrow the model's context."""
    selfs = [i for i, s in enumerate(sources) if s.path == SELF]
    if cfg is None:
        if selfs:
            raise FluidError(f"{where}: [data] sources[{selfs[0]}]: path = \"self\" samples prompts that "
                             "[data.regenerate] continues; add a [data.regenerate] table")
        return
    for i in selfs:
        src, key = sources[i], f"{where}: [data] sources[{i}]"
        if src.num_samples is None or src.weight is not None:
            raise FluidError(f"{key}: a \"self\" source needs num_samples (the prompts to sample), not weight")
    if model is None:
        raise FluidError(f"{where}: [data.regenerate] model: no model to regenerate with (set it, or [model] path)")
    check_model_folder(model)
    try:
        context = context_length(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as e:
        raise FluidError(f"{model}: cannot read the model's config ({first_line(e)})") from None
    if context is not None and cutoff_len > context:
        raise FluidError(f"{where}: [data] cutoff_len = {cutoff_len}: longer than the context of the model that "
                         f"regenerates ({context} positions), so a prompt could not be continued; lower cutoff_len")


# --------------------------------------------------------------------------------------------- the stage


def regenerate(examples: Any, sources: list[DataSource], cfg: RegenerateConfig, model: str, data_seed: int,
               cutoff_len: int, cache: Path, work: Path, trust_remote_code: bool = False,
               console: Console | None = None) -> tuple[Any, Counts]:
    """The regenerated examples (a `datasets.Dataset` with `input_ids`, `labels`, in `work`) and the counts.

    `examples` are the prepared examples (their prompts are continued, in order); every `self` source of
    `sources` adds `num_samples` sampled prompts after them. Chunks already in the cache of an interrupted run of
    the same regeneration (same model, settings and examples) are not generated again."""
    import datasets

    console = console or Console(stderr=True)
    started = time.perf_counter()
    selfs = [(i, s.num_samples, s.prefix_tokens or DEFAULT_PREFIX, s.prefix_temperature or 1.0)
             for i, s in enumerate(sources) if s.path == SELF]
    settings = {"model": model, **{k: v for k, v in asdict(cfg).items() if k not in ("model", "num_proc")}}
    # The weights' identity, not their path: a model replaced at the same path must not continue another's cache.
    key = digest(json.dumps([settings, model_identity(model), cutoff_len, data_seed, examples._fingerprint,
                             len(examples), selfs]))
    folder = cache.parent / f".{cache.name}.regen-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    total = len(examples) + sum(s[1] for s in selfs)
    n_chunks = math.ceil(total / cfg.batch_size)
    cached = _cached_chunks(folder, n_chunks, [min(cfg.batch_size, total - n * cfg.batch_size)
                                               for n in range(n_chunks)], console)
    todo = ((n, jobs) for n, jobs in enumerate(_chunks(examples, sources, data_seed, cfg.batch_size))
            if n not in cached)
    try:
        with _progress(console) as progress:
            done = sum(min(cfg.batch_size, total - n * cfg.batch_size) for n in cached)
            task = progress.add_task("regenerating", total=total, completed=done, rate="")
            generated = 0
            for rows, tokens in _run_chunks(todo, n_chunks - len(cached), folder, model, cfg, cutoff_len,
                                            trust_remote_code):
                generated += tokens
                elapsed = progress.tasks[0].elapsed or 0.0
                progress.update(task, advance=rows, rate=f"{generated / elapsed:,.0f} tok/s" if elapsed else "")
    except BaseException as e:
        # Kept only for a run that can resume it: a user mistake stops these settings the same way every time.
        if isinstance(e, FluidError) or not any(folder.glob("chunk-*.json")):
            shutil.rmtree(folder, ignore_errors=True)
        raise

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                                  "labels": datasets.List(datasets.Value("int64"))})
    files = [str(folder / _chunk_name(n)) for n in range(n_chunks)]
    try:
        out = datasets.Dataset.from_generator(_examples, features=features, cache_dir=str(work / "regenerated"),
                                              gen_kwargs={"files": files})
    except ValueError:  # `datasets` builds nothing from an empty generator
        out = datasets.Dataset.from_dict({"input_ids": [], "labels": []}, features=features)
    # A fixed fingerprint (it lands in the output's state.json, which is byte-identical run to run).
    out = out.select_columns(["input_ids", "labels"], new_fingerprint=key)
    counts = _count(out, files, total)
    counts.self_prompts = sum(s[1] for s in selfs)
    counts.cached_chunks = len(cached)
    counts.settings = settings
    counts.seconds = round(time.perf_counter() - started, 3)
    return out, counts


def _cached_chunks(folder: Path, n_chunks: int, sizes: list[int], console: Console) -> set[int]:
    """The chunks an interrupted run left whole in `folder`. Chunks are written atomically and durably, so a
    damaged one (empty, cut short, edited) came from outside: it is named, removed and generated again (a chunk
    is a function of the settings, so the output stays the same)."""
    for tmp in folder.glob(".chunk-*.tmp"):  # a write a kill cut short
        tmp.unlink(missing_ok=True)
    whole = set()
    for n in range(n_chunks):
        path = folder / _chunk_name(n)
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_bytes())
            ok = len(record["prompts"]) == len(record["continuations"]) == sizes[n] and isinstance(record["eos"], list)
        except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not the chunk's layout
            ok = False
        if ok:
            whole.add(n)
        else:
            console.print(f"{path}: a damaged cached chunk; generating it again", soft_wrap=True)
            path.unlink()
    return whole


def remove_cache(cache: Path) -> None:
    """Remove the chunk caches of regenerations into `cache` (after the output is complete)."""
    for folder in cache.parent.glob(f".{cache.name}.regen-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _chunks(examples: Any, sources: list[DataSource], seed: int, size: int) -> Iterator[list[Job]]:
    """The jobs, `size` at a time: the examples' prompts in order, then each `self` source's sampled prompts."""
    chunk: list[Job] = []
    for job in _jobs(examples, sources, seed):
        chunk.append(job)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _jobs(examples: Any, sources: list[DataSource], seed: int) -> Iterator[Job]:
    for batch in examples.with_format(None).select_columns(["input_ids", "labels"]).iter(batch_size=1024):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            yield Job(PROMPT, tuple(prompt_of(ids, labels)))
    for i, src in enumerate(sources):
        if src.path == SELF:
            lo, hi = src.prefix_tokens or DEFAULT_PREFIX
            g = torch.Generator().manual_seed(seed + i)
            temperature = src.prefix_temperature or 1.0
            yield from (Job(SAMPLE, length=int(n), temperature=temperature)
                        for n in torch.randint(lo, hi + 1, (src.num_samples,), generator=g))


def _count(out: Any, files: list[str], total: int) -> Counts:
    """The counts of `stats.json`, read from the regenerated examples with Arrow compute."""
    import numpy as np

    eos = np.array(json.loads(Path(files[0]).read_text())["eos"] if files else [], dtype=np.int64)
    counts = Counts(examples=len(out), dropped_no_room=total - len(out))
    for table in out.with_format("arrow", columns=["labels"]).iter(batch_size=4096):
        labels = table["labels"].combine_chunks()
        values = labels.values.to_numpy()
        counts.tokens += int((values != IGNORE).sum())
        last = values[labels.offsets.to_numpy()[1:] - 1]  # every example ends with a generated token
        counts.ended_at_eos += int(np.isin(last, eos).sum())
    counts.ended_at_limit = counts.examples - counts.ended_at_eos
    return counts


def _chunk_name(n: int) -> str:
    return f"chunk-{n:07d}.json"


# --------------------------------------------------------------------------------------------- generation


_backend: TransformersBackend | None = None  # one per process


def _init_worker(model: str, cfg: RegenerateConfig, trust_remote_code: bool, threads: int,
                 parent: int | None = None) -> None:
    """Load the model in this process; `parent`: the pid of the process that started this worker."""
    global _backend
    if parent is not None:
        # SIGINT reaches the whole process group: the parent alone handles it (and ends the pool); a worker whose
        # parent was killed exits instead of finishing its chunk and failing to hand it back (BrokenPipeError).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _exit_with(parent)
    torch.set_num_threads(threads)
    _backend = TransformersBackend(model, cfg, trust_remote_code)


def _exit_with(parent: int) -> None:
    """Exit this process once `parent` is no longer its parent (it may be gone already: a worker takes seconds
    to start)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _run_chunks(todo: Iterator[tuple[int, list[Job]]], count: int, folder: Path, model: str, cfg: RegenerateConfig,
                cutoff_len: int, trust_remote_code: bool) -> Iterator[tuple[int, int]]:
    """Generate the `count` chunks not in the cache, here or in up to `num_proc` processes (no more than there are
    chunks); yields (rows, tokens) per chunk."""
    procs = min(cfg.num_proc, count)
    if procs == 0:
        return
    if procs == 1:
        _init_worker(model, cfg, trust_remote_code, torch.get_num_threads())
        for n, jobs in todo:
            yield _chunk(n, jobs, folder, cfg, cutoff_len)
        return
    threads = max(1, (os.cpu_count() or 1) // procs)
    context = multiprocessing.get_context("spawn")  # fork would copy a process that may hold OpenMP threads
    with context.Pool(procs, initializer=_init_worker,
                      initargs=(model, cfg, trust_remote_code, threads, os.getpid())) as pool:
        pending: list[Any] = []
        for n, jobs in todo:  # at most two chunks per process in flight: the jobs are never all in memory
            pending.append(pool.apply_async(_chunk, (n, jobs, folder, cfg, cutoff_len)))
            if len(pending) >= 2 * procs:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()


def _chunk(n: int, jobs: list[Job], folder: Path, cfg: RegenerateConfig, cutoff_len: int) -> tuple[int, int]:
    """Generate one chunk and write it (atomically) to the cache; returns (rows, generated tokens)."""
    backend = _backend
    temperature = cfg.temperature if cfg.mode == "sample" else None
    limit = min(cutoff_len, backend.context or cutoff_len)
    prompts = [list(j.prompt) for j in jobs]
    for prefix_temperature in sorted({j.temperature for j in jobs if j.kind == SAMPLE}):
        sampled = [i for i, j in enumerate(jobs) if j.kind == SAMPLE and j.temperature == prefix_temperature]
        if backend.bos is None:
            raise FluidError("a \"self\" source samples prompts from BOS, and the model's tokenizer has no BOS token")
        longest = max(jobs[i].length for i in sampled)
        prefixes = backend.generate([[backend.bos]] * len(sampled), longest, prefix_temperature,
                                    seed=cfg.seed + 7919 * n)
        for i, prefix in zip(sampled, prefixes):
            prompts[i] = [backend.bos] + [t for t in prefix[: jobs[i].length] if t not in backend.eos]
    if backend.context is not None and (long := next((i for i, p in enumerate(prompts)
                                                       if len(p) >= backend.context), None)) is not None:
        raise FluidError(f"example {n * cfg.batch_size + long}: a prompt of {len(prompts[long])} tokens does not fit "
                         f"the model's context of {backend.context} positions; lower [data] cutoff_len")
    room = [min(cfg.max_new_tokens, limit - len(p)) for p in prompts]
    rows: list[list[int] | None] = [None] * len(jobs)
    # Longest prompts first, then by position: a fixed order, so a chunk's result does not depend on the run.
    order = sorted((i for i, r in enumerate(room) if r > 0), key=lambda i: (-len(prompts[i]), i))
    if order:
        outs = backend.generate([prompts[i] for i in order], max(room[i] for i in order), temperature,
                                seed=cfg.seed + n)
        for i, out in zip(order, outs):
            rows[i] = out[: room[i]]
    write_json_atomic(folder / _chunk_name(n), {"prompts": prompts, "continuations": rows,
                                                "eos": list(backend.eos)}, durable=True)
    return len(jobs), sum(len(r) for r in rows if r is not None)


def _examples(files: list[str]) -> Iterator[dict]:
    """`Dataset.from_generator` generator over the cached chunks: prompt + continuation, the prompt untrained."""
    for file in files:
        record = json.loads(Path(file).read_text())
        for prompt, continuation in zip(record["prompts"], record["continuations"]):
            if continuation is not None:
                yield {"input_ids": prompt + continuation, "labels": [IGNORE] * len(prompt) + continuation}


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


