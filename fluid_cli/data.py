"""`fluid prepare-data`: instruction and chat datasets -> tokenized, prompt-masked training sets.

The recipe's `[data]` table lists sources. Each is read (JSONL/JSON/Parquet/CSV/Arrow/text file or glob, a
`save_to_disk` folder, a hub dataset, a dataset registered in LLaMA-Factory's `dataset_info.json`, or the built-in
`synthetic:arithmetic`), mixed by sample count or weight (then cut to `max_samples` each), rendered to text
segments that are either trained (assistant replies) or not (everything else), tokenized, cut at `cutoff_len`,
split, and saved as a `datasets.DatasetDict` with two columns:

- `input_ids`: the tokens of the rendered example;
- `labels`: `input_ids[t]` where token t belongs to a trained segment, -100 elsewhere (unshifted, HF convention).

The work is split by concern: `fluid_cli.sources` reads the sources into Arrow datasets and picks the mixture's
rows, `fluid_cli.render` turns a row into text segments and tokens (the formats, `template`, `prompt_format`), and
this module runs the command: tokenizing with `datasets.map`, the bookkeeping, the split and the output folder.
The data stays in Arrow files, memory-mapped, from the sources to the output: rows are in Python only one
`datasets.map` batch at a time, and the bookkeeping reads its small columns with Arrow compute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fluid_cli import dataset_info, regenerate
from fluid_cli.config import DataConfig, DataSource, Recipe
from fluid_cli.errors import FluidError
from fluid_cli.io import (
    atomic_dir,
    check_output_dir,
    disk_full_is_an_error,
    output_lock,
    recover_dir,
    staging_dir,
    write_json_atomic,
)
from fluid_cli.layout import IGNORE
from fluid_cli.render import (
    ENCODED_FEATURES,
    RESERVED_TEMPLATE_KWARGS,
    SourceSpec,
    check_tokenizer,
    encode_batch,
    source_spec,
)
from fluid_cli.sources import (
    BAD_EXAMPLES,
    Source,
    digest,
    iter_picked,
    locate_parts,
    picked_rows,
    read_source,
    select_rows,
)

OUTPUT_KEY = "[data] output_dir"
HISTOGRAM_BINS = 8
TOKENIZE_BATCH = 256

console = Console(soft_wrap=True)


def check_settings(data: DataConfig, where: str) -> None:
    """What prepare-data needs beyond the recipe's own ranges (checked when it was loaded), before any work: sources,
    and an output folder that can be written."""
    if not data.sources:
        raise FluidError(f"{where}: [data] sources: no sources (add a [[data.sources]] table with a path)")
    check_output_dir(data.output_dir, OUTPUT_KEY)
    reserved = RESERVED_TEMPLATE_KWARGS & set(data.template_kwargs)
    if reserved:
        raise FluidError(f"{where}: [data] template_kwargs: prepare-data sets {', '.join(sorted(reserved))} itself")


def validation_size(validation: float, n: int, where: str) -> int:
    """Rows held out: a fraction (< 1) of `n`, at least one, or a whole count (>= 1).

        >>> validation_size(0.1, 50, "recipe"), validation_size(0.001, 50, "recipe"), validation_size(3, 50, "recipe")
        (5, 1, 3)
    """
    if validation == 0:
        return 0
    if validation >= 1:
        if validation != int(validation):
            raise FluidError(f"{where}: [data] validation: a count (>= 1) must be whole, got {validation}")
        size = int(validation)
    else:
        size = max(1, round(validation * n))
    if size >= n:
        raise FluidError(f"{where}: [data] validation: holding out {size} of {n} examples leaves none to train on")
    return size


# --------------------------------------------------------------------------------------------- the command


def load_prepared(path: str | Path, split: str = "train", hint: str = "run `fluid prepare-data` first") -> Any:
    """The `split` of a dataset written by `prepare-data` (columns `input_ids`, `labels`), memory-mapped: what
    training, calibration and self-distillation read. `hint` says how to get one."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FluidError(f"{path}: prepared dataset not found ({hint})")
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise FluidError(f"{path}: not a dataset written by `fluid prepare-data` ({e})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise FluidError(f"{path}: the dataset has no {split!r} split (splits: {', '.join(data)})")
        data = data[split]
    missing = {"input_ids", "labels"} - set(data.column_names)
    if missing:
        raise FluidError(f"{path}: the {split} split lacks column(s) {', '.join(sorted(missing))}")
    if len(data) == 0:
        raise FluidError(f"{path}: the {split} split is empty")
    return data.select_columns(["input_ids", "labels"])


def prepared_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any | None:
    """The tokenizer `prepare-data` saved next to the data (`<dataset>/tokenizer/`), if any."""
    from fluid_cli.hf import load_tokenizer

    path = Path(folder) / "tokenizer"
    return load_tokenizer(str(path), trust_remote_code=trust_remote_code) if path.is_dir() else None


def check_prepared_tokenizer(folder: str | Path, data_tok: Any, model_tok: Any, model_name: str,
                             ignore: tuple[str, ...] = ()) -> None:
    """The token ids of the prepared dataset in `folder` (written with `data_tok`) must mean what the model's
    tokenizer says they mean (`ignore`: the mask token, which the model may have added). What training and
    calibration both check before any work."""
    from fluid_cli.hf import vocab_differences

    differ = vocab_differences(data_tok, model_tok, ignore=ignore)
    if differ:
        raise FluidError(
            f"{Path(folder) / 'tokenizer'}: the dataset was tokenized with a different tokenizer than {model_name} "
            f"({len(differ)} tokens differ, e.g. {differ[0]!r}); run `fluid prepare-data` with this recipe's model"
        )


def run(cfg: Recipe, overwrite: bool = False) -> dict:
    """Prepare the recipe's `[data]` into `[data] output_dir`; returns the statistics saved as `stats.json`."""
    from fluid_cli.backbone import recipe_tokenizer

    data, where = cfg.data, cfg.source or "recipe"
    check_settings(data, where)
    regenerate.check(data.regenerate, regeneration_model(cfg), data.sources, data.cutoff_len, where,
                     cfg.model.trust_remote_code)
    text = [src for src in data.sources if src.path != regenerate.SELF]  # sources with rows to read
    specs = [source_spec(src, i, data, where) for i, src in enumerate(data.sources) if src.path != regenerate.SELF]
    text = [src if spec.registered is None else dataset_info.as_source(src, spec.registered)
            for src, spec in zip(text, specs)]
    out = Path(data.output_dir)
    if out.exists() and not overwrite:
        raise FluidError(f"{out}: output folder exists; pass --overwrite to replace it")
    started = time.perf_counter()
    kept = "the partial output was removed (the previous one is kept)"
    with output_lock(out, OUTPUT_KEY, beside=True), disk_full_is_an_error(out, kept), scratch_dir(out) as work:
        sources = [read_source(src, spec, data, work) for src, spec in zip(text, specs)]
        for src, source in zip(text, sources):
            if not len(source):
                raise FluidError(f"{src.path}: no usable rows ({source.bad} malformed rows skipped)")
        picked = [idx[:data.max_samples] for idx in select_rows([len(s) for s in sources], text, data.seed)]
        tokenizer = recipe_tokenizer(cfg.model, corpus=lambda: corpus(sources, picked, specs, work))
        scratch = cfg.model.scratch
        tokenizer_name = cfg.model.tokenizer or cfg.model.path or f"{scratch.tokenizer} (built in)"
        check_tokenizer(tokenizer, specs, tokenizer_name)
        if not data.skip_bad_rows:
            probe_first_rows(sources, picked, tokenizer, specs, data, work)
        tokenize_started = time.perf_counter()
        encoded = encode(sources, picked, tokenizer, specs, data, tokenizer_name, work)
        tokenize_seconds = time.perf_counter() - tokenize_started

        book = bookkeeping(encoded, sources, picked, data, where, allow_empty=len(text) < len(data.sources))
        examples, regenerated = encoded_stages(kept_rows(encoded, book.keep, work), cfg, tokenizer, work)
        if not len(examples):
            raise FluidError(f"{where}: [data]: no examples left after regeneration (every prompt filled "
                             "cutoff_len; raise [data] cutoff_len)")
        dataset = split(examples, data, where, work)
        stats = summarize(cfg, text, specs, tokenizer_name, sources, picked, book, examples,
                          {name: len(ds) for name, ds in dataset.items()}, regenerated)
        try:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                dataset.save_to_disk(str(tmp))
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
                write_json_atomic(tmp / "stats.json", stats)
                cfg.save(tmp)
        except FileExistsError:
            raise FluidError(f"{out}: output folder appeared while preparing; pass --overwrite to replace it") from None
        regenerate.remove_cache(out)  # the output is complete: an interrupted regeneration needs no resuming
    print_summary(stats, out, total_seconds=time.perf_counter() - started, tokenize_seconds=tokenize_seconds,
                  regenerated=regenerated)
    return stats


def regeneration_model(cfg: Recipe) -> str | None:
    """The model that regenerates: `[data.regenerate] model`, else the recipe's `[model] path`."""
    return None if cfg.data.regenerate is None else cfg.data.regenerate.model or cfg.model.path


def encoded_stages(examples: Any, cfg: Recipe, tokenizer: Any, work: Path) -> tuple[Any, dict | None]:
    """The stages between the encoded examples and the split/save; returns the examples and what the stages
    report for `stats.json`.

    `examples` is a `datasets.Dataset` of the kept examples in mixture order: `input_ids` and `labels`. A stage that
    rewrites examples takes such a dataset and returns one with `input_ids` and `labels`; `work` is the run's
    scratch folder for its Arrow files. What it returns must carry a fixed fingerprint so that the output stays
    byte-identical run to run. The token counts and lengths in `stats.json` are read from what this returns.

    The one stage: self-distillation (`[data.regenerate]`, `fluid_cli.regenerate`), which replaces every
    example's trained part with the model's own continuation and adds the prompts of `self` sources.
    """
    data = cfg.data
    if data.regenerate is None:
        return examples, None
    model = regeneration_model(cfg)
    if model != (cfg.model.tokenizer or cfg.model.path):
        check_same_tokens(tokenizer, model, cfg.model.trust_remote_code)
    regenerated, counts = regenerate.regenerate(
        examples, data.sources, data.regenerate, model, data.seed, data.cutoff_len, Path(data.output_dir), work,
        trust_remote_code=cfg.model.trust_remote_code)
    return regenerated, asdict(counts)


def check_same_tokens(tokenizer: Any, model: str, trust_remote_code: bool) -> None:
    """The regenerating model must read the data's token ids as the data's tokenizer wrote them."""
    from fluid_cli.hf import load_tokenizer, vocab_differences

    if vocab_differences(load_tokenizer(model, trust_remote_code=trust_remote_code), tokenizer):
        raise FluidError(f"[data.regenerate] model: {model} has another tokenizer than [model] (the data's token ids "
                         "would mean other tokens); regenerate with a model of the same family")


@contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """A scratch folder next to `out` for the run's Arrow files (on the same disk, not in memory); removed after,
    also on an error or SIGINT. What killed runs left next to `out` is tidied first."""
    recover_dir(out)
    with staging_dir(out.parent, f".{out.name}.work-") as work:
        yield work


def corpus(sources: list[Source], picked: list[np.ndarray], specs: list[SourceSpec], work: Path) -> Iterator[str]:
    """The text a run-time BPE tokenizer is trained on: every string in the picked rows, plus the literal parts
    of each source's prompt/response formats once per row (so "Question:" becomes a token like the data's words)."""

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for i, (source, idx) in enumerate(zip(sources, picked)):
        literals = specs[i].literals()
        for row in iter_picked(source, idx, work, f"corpus-{i}"):
            yield from strings(row)
            yield from literals


def probe_first_rows(sources: list[Source], picked: list[np.ndarray], tokenizer: Any, specs: list[SourceSpec],
                     data: DataConfig, work: Path) -> None:
    """Fail fast on a misconfigured source (a wrong column map, say), not after tokenizing everything."""
    for i, (source, idx) in enumerate(zip(sources, picked)):
        if not len(idx):
            continue
        batch = picked_rows(source, idx[:1], work, f"probe-{i}")[:1]
        error = encode_batch(batch, tokenizer, specs[i], source.layout, data.template_kwargs,
                             data.cutoff_len, data.regenerate is not None)["error"][0]
        if error:
            place = source.locate([int(idx[0])])[0]
            raise FluidError(f"{place}: {error} ([data] skip_bad_rows = true skips bad rows)")


def encode(sources: list[Source], picked: list[np.ndarray], tokenizer: Any, specs: list[SourceSpec],
           data: DataConfig, tokenizer_name: str, work: Path) -> Any:
    """Tokenize the picked rows of every source with `datasets.map` over `num_proc` processes (progress bars).

    Each source is tokenized on its own columns and its results are concatenated, source after source: the
    encoded columns are the same for every source, while the sources' own schemas differ, so this is where they
    meet without first converting every row to a common form. The results are Arrow files in `work`.
    """
    import datasets

    features = datasets.Features({
        name: datasets.List(datasets.Value(dtype)) if is_list else datasets.Value(dtype)
        for name, (dtype, is_list) in ENCODED_FEATURES.items()
    })
    parts = []
    for i, (source, idx, spec) in enumerate(zip(sources, picked, specs)):
        if not len(idx):
            continue
        rows = picked_rows(source, idx, work, f"pick-{i}")
        # Name the result ourselves: datasets would hash the tokenizer object, which need not hash the same way in
        # every process, and the fingerprint lands in state.json, which must be byte-identical run to run.
        settings = json.dumps([source.identity, digest(np.asarray(idx).tobytes()), source.layout, asdict(spec),
                               data.template_kwargs, data.cutoff_len, tokenizer_name, len(tokenizer),
                               data.regenerate is not None],
                              sort_keys=True, default=str)
        num_proc = min(data.num_proc, len(rows))
        parts.append(rows.map(
            encode_batch,
            batched=True,
            batch_size=TOKENIZE_BATCH,
            remove_columns=rows.column_names,
            features=features,
            fn_kwargs={"tokenizer": tokenizer, "spec": spec, "layout": source.layout,
                       "template_kwargs": data.template_kwargs, "cutoff_len": data.cutoff_len,
                       "need_prompt": data.regenerate is not None},
            num_proc=num_proc if num_proc > 1 else None,
            cache_file_name=str(work / f"encoded-{i}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=digest(settings),
            desc="Tokenizing" if len(sources) == 1 else f"Tokenizing {source.path}",
        ))
    if not parts:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    # (concatenate_datasets lists the columns in the format; None, as in any new dataset, keeps state.json plain)
    return datasets.concatenate_datasets(parts, info=datasets.DatasetInfo(features=features)).with_format(None)


# --------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Book:
    """What tokenizing left, as counts and index arrays (never one Python object per row)."""

    rows_in: int  # rows tokenized (the mixture)
    keep: np.ndarray  # positions of the rows that became examples
    row_errors: np.ndarray  # per source: rows that could not be rendered
    error_examples: list[str]  # the first BAD_EXAMPLES of those, with where each row is
    no_trainable_tokens: int
    trainable_part_cut: int
    truncated: int  # kept examples cut at cutoff_len


def arrow_column(ds: Any, name: str) -> Any:
    """One column of `ds` as a pyarrow array (through its indices mapping, if any); no Python objects per row."""
    return ds.with_format("arrow", columns=[name])[:][name]


def bookkeeping(encoded: Any, sources: list[Source], picked: list[np.ndarray], data: DataConfig, where: str,
                allow_empty: bool = False) -> Book:
    """Count errors and drops of the encoded rows with Arrow compute; stop at the first bad row unless
    `skip_bad_rows`, naming where it is. `allow_empty`: no examples is fine (prompts sampled from the model
    follow)."""
    import pyarrow.compute as pc

    offsets = np.cumsum([0] + [len(idx) for idx in picked])
    errors = arrow_column(encoded, "error")
    bad = np.flatnonzero(pc.not_equal(errors, "").to_numpy(zero_copy_only=False))

    def located(positions: np.ndarray) -> list[str]:
        """`where: message` for mixture rows `positions`."""
        messages = errors.take(positions).to_pylist()
        places = locate_parts(offsets, positions,
                              lambda s, local: sources[s].locate([int(picked[s][m]) for m in local]))
        return [f"{place}: {message}" for place, message in zip(places, messages)]

    if len(bad) and not data.skip_bad_rows:
        raise FluidError(f"{located(bad[:1])[0]} ({len(bad)} bad row(s) in all; "
                         "[data] skip_bad_rows = true skips them)")
    drops = arrow_column(encoded, "drop")
    dropped = pc.not_equal(drops, "").to_numpy(zero_copy_only=False)
    is_bad = np.zeros(len(encoded), dtype=bool)
    is_bad[bad] = True
    keep = np.flatnonzero(~is_bad & ~dropped)
    if not len(keep) and not allow_empty:
        example = ""
        if dropped.any():
            first = np.flatnonzero(dropped)[:1]
            place = located(first)[0].removesuffix(": ")
            example = f"; e.g. {place}: {_drop_reason(drops.take(first)[0].as_py(), data.cutoff_len)}"
        raise FluidError(f"{where}: [data]: no examples left ({len(bad)} bad rows, "
                         f"{int(dropped.sum())} without trainable tokens within cutoff_len){example}")
    truncated = arrow_column(encoded, "truncated").to_numpy(zero_copy_only=False)
    return Book(
        rows_in=len(encoded),
        keep=keep,
        row_errors=np.bincount(np.searchsorted(offsets, bad, side="right") - 1, minlength=len(sources)),
        error_examples=located(bad[:BAD_EXAMPLES]),
        no_trainable_tokens=int(pc.sum(pc.equal(drops, "no_trainable_tokens")).as_py() or 0),
        trainable_part_cut=int(pc.sum(pc.equal(drops, "trainable_part_cut")).as_py() or 0),
        truncated=int(truncated[keep].sum()),
    )


def _drop_reason(reason: str, cutoff_len: int) -> str:
    if reason == "trainable_part_cut":
        return f"its trained part starts beyond cutoff_len = {cutoff_len}"
    return ("nothing in it is trained: only assistant turns are (role \"assistant\"; in sharegpt, from \"gpt\"), "
            "so a row whose roles are named otherwise trains nothing")


def kept_rows(encoded: Any, keep: np.ndarray, work: Path) -> Any:
    """The rows that became examples, in mixture order (an indices mapping over `encoded`)."""
    columns = ["input_ids", "labels"]
    return encoded.select_columns(columns, new_fingerprint=digest(f"{encoded._fingerprint}|columns")).select(
        keep, indices_cache_file_name=str(work / "kept.indices.arrow"),
        new_fingerprint=digest(f"{encoded._fingerprint}|keep|{digest(keep.tobytes())}"))


def token_counts(examples: Any, batch_size: int = 4096) -> tuple[np.ndarray, int]:
    """Each example's length and the number of trained tokens in all, read batch by batch with Arrow compute."""
    import pyarrow.compute as pc

    lengths, trained = [], 0
    for table in examples.with_format("arrow", columns=["input_ids", "labels"]).iter(batch_size=batch_size):
        lengths.append(pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False))
        trained += int(pc.sum(pc.not_equal(pc.list_flatten(table["labels"]), IGNORE)).as_py() or 0)
    return (np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)), trained


def split(examples: Any, data: DataConfig, where: str, work: Path) -> Any:
    """Shuffle the examples (seeded) and hold out `[data] validation` of them."""
    import datasets

    n = len(examples)
    n_val = validation_size(data.validation, n, where)
    base = examples._fingerprint
    shuffled = examples.select_columns(["input_ids", "labels"], new_fingerprint=digest(f"{base}|ids")).shuffle(
        seed=data.seed, indices_cache_file_name=str(work / "shuffle.indices.arrow"),
        new_fingerprint=digest(f"{base}|shuffle|{data.seed}"))
    splits = {"train": shuffled.select(range(n_val, n), new_fingerprint=digest(f"{base}|train|{data.seed}|{n_val}"))}
    if n_val:
        splits["validation"] = shuffled.select(range(n_val),
                                               new_fingerprint=digest(f"{base}|validation|{data.seed}|{n_val}"))
    return datasets.DatasetDict(splits)


def summarize(cfg: Recipe, text: list[DataSource], specs: list[SourceSpec], tokenizer_name: str,
              sources: list[Source], picked: list[np.ndarray], book: Book, examples: Any,
              split_sizes: dict[str, int], regenerated: dict | None) -> dict:
    """The content of `stats.json` (no timings, so that the output folder is byte-identical run to run)."""
    data = cfg.data
    lengths, trainable = token_counts(examples)
    edges = np.linspace(0, data.cutoff_len, HISTOGRAM_BINS + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    read_bad = sum(s.bad for s in sources)
    bad_messages = [m for s in sources for m in s.bad_examples] + book.error_examples
    return {
        "examples_in": book.rows_in + read_bad,
        "examples_out": split_sizes,
        "dropped": {"bad_row": read_bad + int(book.row_errors.sum()), "no_trainable_tokens": book.no_trainable_tokens,
                    "trainable_part_cut": book.trainable_part_cut},
        "truncated": book.truncated,
        "tokens": {"total": int(lengths.sum()), "trainable": trainable},
        "length": {"mean": round(float(lengths.mean()), 2), "max": int(lengths.max()),
                   "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}},
        "sources": [
            {"path": src.path, "format": spec.format, "rows_read": len(s) + s.bad, "rows_used": len(idx),
             "bad_rows": s.bad + int(book.row_errors[i])}
            for i, (src, spec, s, idx) in enumerate(zip(text, specs, sources, picked))
        ] + [{"path": src.path, "format": "sampled prompts", "rows_read": 0, "rows_used": src.num_samples,
              "bad_rows": 0} for src in data.sources if src.path == regenerate.SELF],
        "bad_row_examples": bad_messages[:BAD_EXAMPLES],
        "tokenizer": tokenizer_name,
        "template": data.template,
        "cutoff_len": data.cutoff_len,
        "seed": data.seed,
        # (not how long it took, nor what an interrupted run had cached: the same output either way)
        **({"regenerate": {k: v for k, v in regenerated.items() if k not in ("seconds", "cached_chunks")}}
           if regenerated else {}),
    }


def print_summary(stats: dict, out: Path, total_seconds: float, tokenize_seconds: float,
                  regenerated: dict | None = None) -> None:
    sources = Table(title="Sources", title_justify="left")
    for name in ("path", "format", "rows read", "rows used", "bad rows"):
        sources.add_column(name, justify="left" if name in ("path", "format") else "right")
    for s in stats["sources"]:
        sources.add_row(s["path"], s["format"], f"{s['rows_read']:,}", f"{s['rows_used']:,}", f"{s['bad_rows']:,}")

    tokens = stats["tokens"]
    result = Table(title=f"Prepared {out}", title_justify="left", show_header=False)
    result.add_column(justify="left")
    result.add_column(justify="right")
    rows_in = stats["examples_in"]
    result.add_row("examples in", f"{rows_in:,}")
    for split, n in stats["examples_out"].items():
        result.add_row(f"examples out ({split})", f"{n:,}")
    for reason, n in stats["dropped"].items():
        result.add_row(f"dropped: {reason.replace('_', ' ')}", f"{n:,}")
    result.add_row(f"truncated at {stats['cutoff_len']} tokens (kept)", f"{stats['truncated']:,}")
    result.add_row("tokens", f"{tokens['total']:,}")
    result.add_row("trainable tokens", f"{tokens['trainable']:,} ({100 * tokens['trainable'] / tokens['total']:.1f}%)")
    result.add_row("length mean / max", f"{stats['length']['mean']:.1f} / {stats['length']['max']:,}")
    result.add_row("rows/s (tokenizing / overall)",
                   f"{rows_in / tokenize_seconds:,.0f} / {rows_in / total_seconds:,.0f}" if rows_in else "-")
    if regenerated:
        r = regenerated
        result.add_row(f"regenerated ({r['settings']['mode']}, {r['settings']['model']})",
                       f"{r['examples']:,} ({r['self_prompts']:,} from sampled prompts)")
        result.add_row("generated tokens (ended at EOS / at the limit)",
                       f"{r['tokens']:,} ({r['ended_at_eos']:,} / {r['ended_at_limit']:,})")
        result.add_row("generation tokens/s" + (f" ({r['cached_chunks']} chunks from the cache)"
                                                if r["cached_chunks"] else ""),
                       f"{r['tokens'] / r['seconds']:,.0f}" if r["seconds"] else "-")

    histogram = Table(title="Lengths (tokens)", title_justify="left")
    histogram.add_column("range", justify="right")
    histogram.add_column("examples", justify="right")
    histogram.add_column("")
    edges, counts = stats["length"]["histogram"]["edges"], stats["length"]["histogram"]["counts"]
    peak = max(counts) or 1
    for lo, hi, n in zip(edges, edges[1:], counts):
        histogram.add_row(f"{lo}-{hi}", f"{n:,}", "█" * round(30 * n / peak))
    for table in (sources, result, histogram):
        console.print(table)
