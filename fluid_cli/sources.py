"""Reading `[[data.sources]]` into Arrow datasets, and picking the rows of the mixture.

Every source stays in Arrow from the first read: files go through `datasets.load_dataset("json" | "csv" |
"parquet" | "arrow" | "text")` (a `.txt` file's lines are rows of one `text` column), `save_to_disk` folders
through `load_from_disk` and hub names through `load_dataset(name)`, all memory-mapped; only the built-in
synthetic source, small and seeded, is built in memory. No source is ever turned into a Python list: rows reach
Python one `datasets` batch at a time, when they are tokenized.

Files are read one by one (each a few milliseconds) so that a row's place, file and line, is known without storing
it for every row; it is worked out only for the rows an error message names (`Source.locate`). A JSON file that
Arrow cannot read exactly (a malformed line, values whose type Arrow would change: dates, integers turned into
floats, keys of mixed types) is read line by line instead, keeping each object's JSON text, which is exactly what
was written: that is also how malformed lines are found, named by line number and, with `skip_bad_rows`, skipped.

Mixing (`select_rows`) picks row numbers per source; the picked rows are a `select` of the source (an indices
mapping, nothing copied).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fluid_cli.config import DataConfig, DataSource
from fluid_cli.errors import FluidError, first_line
from fluid_cli.render import SYNTHETIC, TEXT_COLUMN, SourceSpec, batch_rows

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
LOADERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}  # a .txt line is a `text` row
BAD_EXAMPLES = 20  # malformed rows whose message is kept (all are counted)
# Arrow types that hold exactly what a JSON file wrote. Others are Arrow's guesses: an ISO date string becomes a
# timestamp, an integer in a column with a float becomes a float; those files are read as JSON text instead.
EXACT_JSON_TYPES = {"string", "large_string", "bool", "null", "int8", "int16", "int32", "int64", "uint8", "uint16",
                    "uint32", "uint64"}
UTF8_BOM = b"\xef\xbb\xbf"
MAX_REPEATS = 1000  # num_samples may repeat a source's rows, up to this many times each


@dataclass
class Source:
    """One source's usable rows as a `datasets.Dataset`, and how to read them.

    `layout` says how a batch of `rows` holds the rows (the layouts are listed above `fluid_cli.render.batch_rows`);
    `locate` names where rows are (their file and line, or `file row N`), given their row numbers; `identity`
    changes whenever the content may have, and names the tokenized result (so that the output is byte-identical
    run to run).
    """

    path: str
    rows: Any
    layout: str
    locate: Callable[[list[int]], list[str]]
    identity: str
    bad: int = 0  # malformed rows skipped while reading (skip_bad_rows = true)
    bad_examples: list[str] = field(default_factory=list)  # the first BAD_EXAMPLES of their messages

    def __len__(self) -> int:
        return len(self.rows)


def read_source(src: DataSource, spec: SourceSpec, data: DataConfig, work: Path) -> Source:
    """Read one `[[data.sources]]` entry; `work` is a scratch folder for the Arrow files (removed after the run)."""
    import datasets

    if spec.registered is not None and spec.registered.hub:
        e = spec.registered
        return _from_hub(e.path, e.split, e.subset, e.folder)
    if src.path in SYNTHETIC:
        seed = data.seed + spec.index
        rows = datasets.Dataset.from_list(SYNTHETIC[src.path](src.num_samples, seed))
        return Source(src.path, rows, "columns", lambda ks: [f"{src.path}[{k}]" for k in ks],
                      f"{src.path}:{src.num_samples}:{seed}")
    path = Path(src.path)
    if glob.has_magic(src.path) and not path.exists():  # a file may have [ ] or * in its name
        files = sorted(Path(p) for p in glob.glob(src.path, recursive=True) if Path(p).is_file())
        if not files:
            raise FluidError(f"{src.path}: no files match")
    elif path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _from_disk(path, src.split)
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES)
        if not files:
            raise FluidError(f"{src.path}: folder holds no {'/'.join(FILE_SUFFIXES)} files and is not a saved dataset")
    elif path.is_file():
        files = [path]
    elif path.suffix or src.path.startswith((".", "/", "~")) or src.path.count("/") > 1:
        raise FluidError(f"{src.path}: file not found")
    else:
        return _from_hub(src.path, src.split)
    with _quiet_progress():
        parts = [_read_file(file, spec, data.skip_bad_rows, work) for file in files]
    return _combine(src.path, parts, work)


# --------------------------------------------------------------------------------------------- files


def _read_file(file: Path, spec: SourceSpec, skip_bad_rows: bool, work: Path) -> Source:
    suffix = file.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise FluidError(f"{file}: unsupported file type (supported: {', '.join(FILE_SUFFIXES)})")
    identity = f"{file}:{_file_digest(file)}"
    bad_line = _first_non_utf8_line(file) if suffix not in (".parquet", ".arrow") else None
    if suffix in (".jsonl", ".json"):
        # Arrow would take bytes that are not UTF-8 into its strings; the line reader names the line instead.
        rows = _try_load_json(file, work) if bad_line is None else None
        if rows is not None and _exact_json(rows.features, spec):
            return Source(str(file), rows, "json-columns", lambda ks: _json_places(file, ks), identity)
        return _read_json_text(file, skip_bad_rows, work, identity)
    kind = LOADERS[suffix]
    if bad_line is not None:
        raise FluidError(f"{file}:{bad_line}: not UTF-8 text; save the file as UTF-8")
    try:
        # CSV: every cell as the text it holds ("" stays "", not null), as pyarrow's reader did for text columns.
        rows = _load(kind, file, work, **({"na_filter": False} if kind == "csv" else {}))
    except Exception as e:  # pyarrow and pandas raise many types for an unreadable file
        raise FluidError(f"{file}: unreadable {kind} file ({_reason(e)})") from None
    first = 2 if kind == "csv" else 1  # CSV rows start after the header line; a text file's rows are its lines
    return Source(str(file), rows, "columns", lambda ks: [f"{file} row {k + first}" for k in ks], identity)


def _load(kind: str, file: Path, work: Path, **options: Any) -> Any:
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failure is logged as well as raised; we say it
    try:
        return datasets.load_dataset(kind, data_files=[str(file)], split="train", cache_dir=str(work / "load"),
                                     **options)
    finally:
        datasets.logging.set_verbosity(verbosity)


def _try_load_json(file: Path, work: Path) -> Any:
    """`file` through the `datasets` JSON loader (pyarrow), or None when it cannot read it."""
    # Newer `datasets` guess more: mixed-type keys become JSON text columns, and some files are taken for agent
    # traces and rewritten. Off: such files go through the exact line-by-line reader instead.
    try:
        known = importlib.import_module("datasets.packaged_modules.json.json").JsonConfig.__dataclass_fields__
    except (ImportError, AttributeError):
        known = {}
    options = {k: v for k, v in (("on_mixed_types", None), ("parse_agent_traces", False)) if k in known}
    try:
        return _load("json", file, work, **options)
    except Exception:  # malformed lines, type conflicts, an empty file: the line-by-line reader says which
        return None


def _exact_json(features: Any, spec: SourceSpec) -> bool:
    """Whether the columns that rendering reads hold exactly what the JSON file wrote (see EXACT_JSON_TYPES)."""
    read = set(spec.columns.values()) | spec.fields()
    return all(_exact_feature(feature) for name, feature in features.items() if name in read)


def _exact_feature(feature: Any) -> bool:
    if isinstance(feature, dict):
        return all(_exact_feature(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return all(_exact_feature(f) for f in feature)
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return _exact_feature(feature.feature)
    return type(feature).__name__ == "Value" and feature.dtype in EXACT_JSON_TYPES


def _read_json_text(file: Path, skip_bad_rows: bool, work: Path, identity: str) -> Source:
    """`file` line by line (or as one JSON array), each object kept as its JSON text; malformed rows raise, or
    with `skip_bad_rows` are counted and kept aside (their messages name file and line)."""
    import datasets
    import pyarrow.compute as pc

    features = datasets.Features({TEXT_COLUMN: datasets.Value("string"), "where": datasets.Value("string"),
                                  "error": datasets.Value("string")})
    try:
        rows = datasets.Dataset.from_generator(_json_text_rows, features=features, cache_dir=str(work / "text"),
                                               gen_kwargs={"file": str(file), "skip_bad_rows": skip_bad_rows})
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, FluidError):
            raise e.__cause__ from None
        raise
    except ValueError:  # no rows at all: `datasets` builds no dataset from an empty generator
        rows = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    bad = pc.not_equal(rows.data.column("error"), "").to_numpy(zero_copy_only=False)
    examples = []
    if bad.any():
        examples = rows.data.column("error").take(np.flatnonzero(bad)[:BAD_EXAMPLES]).to_pylist()
        rows = rows.select(np.flatnonzero(~bad), indices_cache_file_name=str(work / f"good-{digest(identity)}.arrow"))

    def locate(ks: list[int]) -> list[str]:
        return rows.with_format("arrow", columns=["where"])[list(ks)]["where"].to_pylist() if len(ks) else []

    return Source(str(file), rows.select_columns([TEXT_COLUMN]), "json-text", locate, identity, int(bad.sum()),
                  examples)


def _json_text_rows(file: str, skip_bad_rows: bool) -> Iterator[dict]:
    """`datasets.Dataset.from_generator` generator: one JSON object per row, as text, with where it is."""
    path = Path(file)
    if _is_json_array(path):
        try:
            items = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FluidError(f"{file}:{getattr(e, 'lineno', 1)}: malformed JSON ({getattr(e, 'msg', e)}"
                             f"{f', column {e.colno}' if hasattr(e, 'colno') else ''})") from None
        for k, item in enumerate(items):
            yield _object_row(item, None, f"{file}[{k}]", skip_bad_rows)
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = (raw.removeprefix(UTF8_BOM) if lineno == 1 else raw).decode("utf-8")
                if not line.strip():
                    continue
                item = json.loads(line)
            except json.JSONDecodeError as e:
                message = f"{where}: malformed JSON ({e.msg}, column {e.colno})"
            except UnicodeDecodeError as e:
                message = f"{where}: malformed JSON (not UTF-8 text: {e.reason} at byte {e.start})"
            else:
                yield _object_row(item, line.strip(), where, skip_bad_rows)
                continue
            if not skip_bad_rows:
                raise FluidError(message)
            yield {TEXT_COLUMN: "", "where": where, "error": message}


def _object_row(item: Any, text: str | None, where: str, skip_bad_rows: bool) -> dict:
    if isinstance(item, dict):
        return {TEXT_COLUMN: text if text is not None else json.dumps(item, ensure_ascii=False), "where": where,
                "error": ""}
    message = f"{where}: expected a JSON object per row, got {type(item).__name__}"
    if not skip_bad_rows:
        raise FluidError(message)
    return {TEXT_COLUMN: "", "where": where, "error": message}


def _is_json_array(file: Path) -> bool:
    """A JSON file holding one array of rows (not JSON Lines): its first character, after any BOM and
    whitespace, opens an array."""
    with file.open("rb") as f:
        return f.read(4096).removeprefix(UTF8_BOM).lstrip().startswith(b"[")


def _json_places(file: Path, ks: list[int]) -> list[str]:
    """Where rows `ks` of a JSON file read by Arrow are: `file:line` (blank lines hold no row), or `file[k]` for
    an array. One pass over the file, done only for the rows an error message names."""
    if _is_json_array(file):
        return [f"{file}[{k}]" for k in ks]
    wanted, found, row = set(ks), {}, -1
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                row += 1
                if row in wanted:
                    found[row] = f"{file}:{lineno}"
                    if len(found) == len(wanted):
                        break
    return [found.get(k, f"{file} row {k + 1}") for k in ks]


def _combine(path: str, parts: list[Source], work: Path) -> Source:
    """The files of one source as one dataset, file after file.

    Files whose rows share a layout and Arrow schema are concatenated as they are. Otherwise (a folder of JSONL and
    Parquet files, say, or JSON files with different keys) each is first mapped to one JSON text column, the one
    schema that holds any row; that costs a pass over the rows, so it is done only when the schemas differ.
    """
    import datasets

    if len(parts) == 1:
        return replace(parts[0], path=path)
    identity = "|".join(p.identity for p in parts)
    first = parts[0]
    if any(p.layout != first.layout or p.rows.features != first.rows.features for p in parts):
        parts = [_as_json_text(p, work) for p in parts]
    rows = datasets.concatenate_datasets([p.rows for p in parts])
    offsets = np.cumsum([0] + [len(p) for p in parts])

    def locate(ks: list[int]) -> list[str]:
        return locate_parts(offsets, ks, lambda j, local: parts[j].locate(local))

    return Source(path, rows, parts[0].layout, locate, identity, sum(p.bad for p in parts),
                  [m for p in parts for m in p.bad_examples][:BAD_EXAMPLES])


def _as_json_text(part: Source, work: Path) -> Source:
    import datasets

    if part.layout == "json-text":
        return part
    rows = part.rows.map(
        _json_text_batch,
        batched=True,
        fn_kwargs={"layout": part.layout},
        remove_columns=part.rows.column_names,
        features=datasets.Features({TEXT_COLUMN: datasets.Value("string")}),
        cache_file_name=str(work / f"text-{digest(part.identity)}.arrow"),
        load_from_cache_file=False,
        new_fingerprint=digest(f"text|{part.identity}"),
    )
    return replace(part, rows=rows, layout="json-text")


def _json_text_batch(batch: dict, layout: str) -> dict[str, list]:
    return {TEXT_COLUMN: [json.dumps(row, ensure_ascii=False, default=str) for row in batch_rows(batch, layout)]}


# --------------------------------------------------------------------------------------------- datasets


def _from_disk(path: Path, split: str) -> Source:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FluidError(f"{path}: no split {split!r} (splits: {', '.join(loaded)}); set the source's split")
        loaded = loaded[split]
    return Source(str(path), loaded.with_format(None), "columns", lambda ks: [f"{path} row {k + 1}" for k in ks],
                  f"disk:{path}:{loaded._fingerprint}")


def _from_hub(name: str, split: str, subset: str | None = None, folder: str | None = None) -> Source:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, data_dir=folder, split=split)
    except Exception as e:  # the hub client raises many types (connection, missing repo, gated, bad split)
        raise FluidError(f"{name}: not a local file or folder, and loading it from the dataset hub failed "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return Source(name, ds.with_format(None), "columns", lambda ks: [f"{name}[{split}] row {k + 1}" for k in ks],
                  f"hub:{name}:{subset}:{folder}:{split}:{ds._fingerprint}")


# --------------------------------------------------------------------------------------------- mixing


def select_rows(sizes: list[int], sources: list[DataSource], seed: int) -> list[np.ndarray]:
    """Which rows of each source enter the mixture, in order.

    - `num_samples = N`: N rows from a seeded permutation (the permutation repeats only when N exceeds the source);
    - `weight = w`: the weighted sources are mixed in proportion to their weights, as many rows as possible
      without repeating any;
    - neither: every row once, in file order.

        >>> from fluid_cli.config import DataSource as S
        >>> [len(i) for i in select_rows([100, 10, 7], [S("a", weight=2.0), S("b", weight=1.0), S("c")], 0)]
        [20, 10, 7]
    """
    for size, src in zip(sizes, sources):
        if src.num_samples is not None and size and src.num_samples > MAX_REPEATS * size:
            raise FluidError(f"{src.path}: num_samples = {src.num_samples:,} would repeat each of its {size:,} rows "
                             f"{src.num_samples // size:,} times (at most {MAX_REPEATS:,}); ask for fewer samples")
    weighted = [(i, s.weight) for i, s in enumerate(sources) if s.weight is not None]
    total_weight = sum(w for _, w in weighted)
    mixture_size = min((sizes[i] * total_weight / w for i, w in weighted), default=0.0)
    picked = []
    for i, (size, src) in enumerate(zip(sizes, sources)):
        if src.num_samples is None and src.weight is None:
            picked.append(np.arange(size))
            continue
        if src.num_samples is not None:
            want = src.num_samples
        else:
            want = min(size, round(mixture_size * src.weight / total_weight))
        rng = np.random.default_rng([seed, i])
        repeats = max(1, -(-want // size))
        picked.append(np.concatenate([rng.permutation(size) for _ in range(repeats)])[:want])
    return picked


def picked_rows(source: Source, idx: np.ndarray, work: Path, name: str) -> Any:
    """The rows `idx` of `source`, in that order: an indices mapping over the source (its rows are not copied).

        >>> import datasets, tempfile
        >>> src = Source("s", datasets.Dataset.from_dict({"t": ["a", "b", "c"]}), "columns", list, "s")
        >>> picked_rows(src, np.array([2, 0, 2]), Path(tempfile.mkdtemp()), "s")["t"][:]
        ['c', 'a', 'c']
    """
    return source.rows.select(idx, indices_cache_file_name=str(work / f"{name}.indices.arrow"),
                              new_fingerprint=digest(f"{source.identity}|{digest(np.asarray(idx).tobytes())}"))


def iter_picked(source: Source, idx: np.ndarray, work: Path, name: str, batch_size: int = 1000) -> Iterator[dict]:
    """The rows `idx` of `source` as dicts, one batch in memory at a time."""
    for batch in picked_rows(source, idx, work, name).iter(batch_size=batch_size):
        yield from batch_rows(batch, source.layout)


# --------------------------------------------------------------------------------------------- helpers


def _file_digest(file: Path) -> str:
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _first_non_utf8_line(file: Path) -> int | None:
    """The first line of a text file that is not UTF-8, if any (the file is read in blocks, not held whole)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return line + block[: e.start].count(b"\n")
            line += block.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return line
    return None


def locate_parts(offsets: np.ndarray, ks: Any, locate_part: Callable[[int, list[int]], list[str]]) -> list[str]:
    """Where rows `ks` of parts laid end to end are (`offsets[j]`: part `j`'s first row): each part is asked once,
    `locate_part(j, its rows)`.

    >>> locate_parts(np.array([0, 2, 5]), [3, 0, 4], lambda j, rows: [f"part {j} row {r}" for r in rows])
    ['part 1 row 1', 'part 0 row 0', 'part 1 row 2']
    """
    ks = np.asarray(ks, dtype=np.int64)
    which = np.searchsorted(offsets, ks, side="right") - 1
    places: dict[int, str] = {}
    for j in sorted(set(which.tolist())):
        mine = ks[which == j]
        places.update(zip(mine.tolist(), locate_part(j, (mine - int(offsets[j])).tolist())))
    return [places[k] for k in ks.tolist()]


def digest(value: str | bytes) -> str:
    """A 16-hex-digit name (a valid `datasets` fingerprint) for `value`."""
    return hashlib.sha256(value if isinstance(value, bytes) else value.encode()).hexdigest()[:16]


def _reason(e: BaseException) -> str:
    """The first line of the innermost cause of `e` (`datasets` wraps the reader's own error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    return first_line(e)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No per-file "Generating train split" bars while reading files (a folder may hold hundreds)."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
