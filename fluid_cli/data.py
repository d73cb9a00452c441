"""`fluid prepare-data`: instruction and chat datasets -> tokenized, prompt-masked training sets.

The recipe's `[data]` table lists sources. Each is read (JSONL/JSON/Parquet/CSV file or glob, a `save_to_disk`
folder, a hub dataset, or the built-in `synthetic:arithmetic`), mixed by sample count or weight, rendered to text
segments that are either trained (assistant replies) or not (everything else), tokenized, cut at `cutoff_len`,
split, and saved as a `datasets.DatasetDict` with two columns:

- `input_ids`: the tokens of the rendered example;
- `labels`: `input_ids[t]` where token t belongs to a trained segment, -100 elsewhere (unshifted, HF convention).

Formats (the roles each reads; `columns` maps a role to the row's column when the names differ):

    messages         messages = [{role, content}, ...]       OpenAI style, any number of turns
    sharegpt         conversations = [{from, value}, ...]    from: human/user, gpt/assistant, system, ...
    alpaca           instruction, input (optional), output   user = instruction + "\\n\\n" + input
    prompt_response  prompt, response                        GSM8K: columns = {prompt = "question", response = "answer"}
    text             text                                    every token trained; never templated

Rendering: `template = "auto"` renders through the tokenizer's chat template (`template_kwargs` are passed to it,
e.g. `{enable_thinking = false}`), and trains each assistant turn's content and its end-of-turn text. `template =
"none"` concatenates the texts as they are (the tokenizer adds its BOS as usual) and appends the EOS token to every
trained reply so that the model learns to stop. Single-turn formats shape their text with `prompt_format` and
`response_format`, Python format strings over the row's columns plus `{prompt}` and `{response}`:

    >>> spec = SourceSpec(0, "prompt_response", {"prompt": "question", "response": "answer"},
    ...                   "Question: {question}\\nAnswer:", " {answer}", chat=False)
    >>> render({"question": "1+1?", "answer": "2"}, spec, tokenizer=None, template_kwargs={}, eos="</s>")
    ([('Question: 1+1?\\nAnswer:', False), (' 2</s>', True)], True)

Labels come from the tokenization of the whole text, never of the pieces on their own: the text is tokenized prefix
by prefix (through the end of each segment) and each segment owns the tokens its prefix adds. So `input_ids` is
exactly the tokenization of the rendered text, and a token that straddles a boundary belongs to the later segment.
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from string import Formatter
from typing import Any

import jinja2
import numpy as np
from rich.console import Console
from rich.table import Table

from fluid_cli.config import DataConfig, DataSource, Recipe
from fluid_cli.errors import FluidError
from fluid_cli.io import atomic_dir, write_json_atomic
from fluid_cli.layout import IGNORE
from fluid_cli.synthetic import arithmetic_rows

# Roles each format reads. All are required in every row but alpaca's `input` (may be absent or empty) and
# `system` (read only when `columns` maps it, and only with a chat template: raw text has no system turn).
FORMAT_ROLES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output", "input", "system"),
    "prompt_response": ("prompt", "response", "system"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "tool": "tool", "function": "tool",
    "observation": "tool",
}
SYNTHETIC = {"synthetic:arithmetic": arithmetic_rows}
SYNTHETIC_COLUMNS = {"prompt": "question", "response": "answer"}
GSM8K_PROMPT, GSM8K_RESPONSE = "Question: {question}\nAnswer:", " {answer}"  # lm-eval's gsm8k layout
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# apply_chat_template arguments that prepare-data sets itself.
RESERVED_TEMPLATE_KWARGS = {"tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
                            "return_assistant_tokens_mask", "conversation"}
HISTOGRAM_BINS = 8

console = Console(soft_wrap=True)


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SourceSpec:
    """How one source's rows become text segments (everything the worker processes need; picklable)."""

    index: int
    format: str
    columns: dict[str, str]  # role -> column name, for every role the format reads
    prompt_format: str
    response_format: str
    chat: bool  # render through the tokenizer's chat template


def source_spec(src: DataSource, index: int, data: DataConfig, where: str) -> SourceSpec:
    """Check one `[[data.sources]]` entry and fill in its defaults."""
    key = f"{where}: [data] sources[{index}]"
    synthetic = src.path.startswith("synthetic:")
    if synthetic and src.path not in SYNTHETIC:
        raise FluidError(f"{key} path: unknown synthetic source {src.path!r} (known: {', '.join(SYNTHETIC)})")
    if synthetic and src.num_samples is None:
        raise FluidError(f"{key}: {src.path} needs num_samples, the number of rows to generate")
    if synthetic and src.format not in (None, "prompt_response"):
        raise FluidError(f"{key} format: {src.path} rows are prompt_response (question, answer), not {src.format!r}")
    fmt = src.format or ("prompt_response" if synthetic else "messages")
    roles = FORMAT_ROLES[fmt]
    for role in src.columns:
        if role not in roles:
            raise FluidError(f"{key} columns: unknown role {role!r} for format {fmt!r} (roles: {', '.join(roles)})")
    defaults = SYNTHETIC_COLUMNS if synthetic else {}
    columns = {role: src.columns.get(role, defaults.get(role, role)) for role in roles
               if role != "system" or "system" in src.columns}
    if src.weight is not None and src.num_samples is not None:
        raise FluidError(f"{key}: set weight or num_samples, not both")
    if src.weight is not None and src.weight <= 0:
        raise FluidError(f"{key} weight: must be positive, got {src.weight}")
    if src.num_samples is not None and src.num_samples <= 0:
        raise FluidError(f"{key} num_samples: must be positive, got {src.num_samples}")
    if "system" in src.columns and data.template == "none":
        raise FluidError(f"{key} columns: raw text (template = \"none\") has no system turn; "
                         f"write {{{src.columns['system']}}} into prompt_format instead")
    if fmt in ("messages", "sharegpt", "text") and (src.prompt_format or src.response_format):
        raise FluidError(f"{key}: prompt_format/response_format apply to single-turn formats "
                         f"(alpaca, prompt_response), not {fmt!r}")
    gsm8k = synthetic and data.template == "none"
    prompt_format = src.prompt_format or (GSM8K_PROMPT if gsm8k else "{prompt}")
    response_format = src.response_format or (GSM8K_RESPONSE if gsm8k else "{response}")
    for name, text in (("prompt_format", prompt_format), ("response_format", response_format)):
        try:
            fields = [f for _, f, _, _ in Formatter().parse(text) if f is not None]
        except ValueError as e:
            raise FluidError(f"{key} {name}: invalid format string {text!r} ({e})") from None
        if any(f == "" or f.isdigit() for f in fields):
            raise FluidError(f"{key} {name}: use named fields such as {{prompt}} or {{question}}, got {text!r}")
    return SourceSpec(index, fmt, columns, prompt_format, response_format, chat=data.template == "auto")


def check_settings(data: DataConfig, where: str) -> None:
    if not data.sources:
        raise FluidError(f"{where}: [data] sources: no sources (add a [[data.sources]] table with a path)")
    if data.cutoff_len < 1:
        raise FluidError(f"{where}: [data] cutoff_len: must be at least 1, got {data.cutoff_len}")
    if data.validation < 0:
        raise FluidError(f"{where}: [data] validation: must be a fraction (< 1) or a count (>= 1), "
                         f"got {data.validation}")
    if data.num_proc < 1:
        raise FluidError(f"{where}: [data] num_proc: must be at least 1, got {data.num_proc}")
    reserved = RESERVED_TEMPLATE_KWARGS & set(data.template_kwargs)
    if reserved:
        raise FluidError(f"{where}: [data] template_kwargs: prepare-data sets {', '.join(sorted(reserved))} itself")


def check_tokenizer(tokenizer: Any, specs: list[SourceSpec], name: str) -> None:
    if any(s.chat and s.format != "text" for s in specs) and not getattr(tokenizer, "chat_template", None):
        raise FluidError(f"{name}: the tokenizer has no chat template; set [data] template = \"none\" to train on "
                         "the raw text (prompt_format/response_format shape it)")


# --------------------------------------------------------------------------------------------- reading


class BadRow(Exception):
    """A row that cannot be used; its message names the problem (the caller adds where the row is)."""


@dataclass
class Rows:
    """One source's rows, each as a JSON object text, with where it came from (for error messages)."""

    rows: list[str]
    where: list[str]
    bad: list[str]  # malformed rows skipped while reading (skip_bad_rows = true)


def read_source(src: DataSource, index: int, data: DataConfig) -> Rows:
    if src.path in SYNTHETIC:
        rows = SYNTHETIC[src.path](src.num_samples, data.seed + index)
        return Rows([json.dumps(r) for r in rows], [f"{src.path}[{k}]" for k in range(len(rows))], [])
    path = Path(src.path)
    if glob.has_magic(src.path):
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
    out = Rows([], [], [])
    for file in files:
        part = _read_file(file, data.skip_bad_rows)
        out.rows += part.rows
        out.where += part.where
        out.bad += part.bad
    return out


def _read_file(file: Path, skip_bad_rows: bool) -> Rows:
    suffix = file.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise FluidError(f"{file}: unsupported file type (supported: {', '.join(FILE_SUFFIXES)})")
    if suffix in (".jsonl", ".json"):
        return _read_json(file, skip_bad_rows)
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(file) if suffix == ".parquet" else pyarrow.csv.read_csv(file)
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise FluidError(f"{file}: unreadable {suffix[1:]} file ({str(e).strip().splitlines()[0]})") from None
    first_row_line = 2 if suffix == ".csv" else 1  # CSV rows start after the header line
    return Rows([_to_json(r) for r in table.to_pylist()],
                [f"{file} row {k + first_row_line}" for k in range(table.num_rows)], [])


def _read_json(file: Path, skip_bad_rows: bool) -> Rows:
    """A JSON Lines file (or a .json file holding one array of objects); bad lines name their line number."""
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise FluidError(f"{file}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        out = Rows([], [], [])
        for k, item in enumerate(items):
            _keep_object(out, item, f"{file}[{k}]", skip_bad_rows)
        return out
    out = Rows([], [], [])
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            message = f"{file}:{lineno}: malformed JSON ({e.msg}, column {e.colno})"
            if not skip_bad_rows:
                raise FluidError(message) from None
            out.bad.append(message)
            continue
        _keep_object(out, item, f"{file}:{lineno}", skip_bad_rows)
    return out


def _keep_object(out: Rows, item: Any, where: str, skip_bad_rows: bool) -> None:
    if isinstance(item, dict):
        out.rows.append(_to_json(item))
        out.where.append(where)
        return
    message = f"{where}: expected a JSON object per row, got {type(item).__name__}"
    if not skip_bad_rows:
        raise FluidError(message)
    out.bad.append(message)


def _to_json(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)  # default=str: dates and the like from Parquet


def _from_disk(path: Path, split: str) -> Rows:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FluidError(f"{path}: no split {split!r} (splits: {', '.join(loaded)}); set the source's split")
        loaded = loaded[split]
    return Rows([_to_json(r) for r in loaded.to_list()], [f"{path} row {k + 1}" for k in range(len(loaded))], [])


def _from_hub(name: str, split: str) -> Rows:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types (connection, missing repo, gated, bad split)
        raise FluidError(f"{name}: not a local file or folder, and loading it from the dataset hub failed "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    return Rows([_to_json(r) for r in ds.to_list()], [f"{name}[{split}] row {k + 1}" for k in range(len(ds))], [])


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


# --------------------------------------------------------------------------------------------- rendering


def render(row: dict, spec: SourceSpec, tokenizer: Any, template_kwargs: dict, eos: str
           ) -> tuple[list[tuple[str, bool]], bool]:
    """The row as `(text, trained)` segments, and whether to let the tokenizer add its special tokens (BOS).

    Chat templates write their own special tokens, so those are added only to raw (`template = "none"`) text.
    """
    if spec.format == "text":
        return [(_text(row, spec, "text") + eos, True)], True
    messages = _conversation(row, spec) if spec.format in ("messages", "sharegpt") else _single_turn(row, spec)
    if spec.chat:
        return chat_segments(tokenizer, messages, template_kwargs), False
    return [(m["content"] + eos, True) if m["role"] == "assistant" else (m["content"], False)
            for m in messages], True


def _column(row: dict, spec: SourceSpec, role: str) -> Any:
    column = spec.columns[role]
    if column not in row:
        raise BadRow(f"column {column!r} ({role}) not found; the row has: {', '.join(row) or 'nothing'} "
                     f"(map it with [data] sources[{spec.index}] columns = {{{role} = \"...\"}})")
    if row[column] is None:
        raise BadRow(f"column {column!r} ({role}) is null")
    return row[column]


def _text(row: dict, spec: SourceSpec, role: str) -> str:
    value = _column(row, spec, role)
    if isinstance(value, (dict, list)):
        raise BadRow(f"column {spec.columns[role]!r} ({role}) must be text, got {type(value).__name__}")
    return str(value)


def _single_turn(row: dict, spec: SourceSpec) -> list[dict]:
    if spec.format == "alpaca":
        prompt = _text(row, spec, "instruction")
        extra = row.get(spec.columns["input"])
        if extra:
            prompt += "\n\n" + str(extra)
        response = _text(row, spec, "output")
    else:
        prompt, response = _text(row, spec, "prompt"), _text(row, spec, "response")
    fields = {**row, "prompt": prompt, "response": response}
    try:
        user = spec.prompt_format.format_map(fields)
        assistant = spec.response_format.format_map(fields)
    except KeyError as e:
        raise BadRow(f"prompt_format/response_format use {{{e.args[0]}}}, but the row has: {', '.join(row)}") from None
    except (IndexError, AttributeError, ValueError, TypeError) as e:
        raise BadRow(f"prompt_format/response_format failed on this row ({e})") from None
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if "system" in spec.columns:
        messages.insert(0, {"role": "system", "content": _text(row, spec, "system")})
    return messages


def _conversation(row: dict, spec: SourceSpec) -> list[dict]:
    role_key, content_key = ("role", "content") if spec.format == "messages" else ("from", "value")
    column = spec.columns["messages" if spec.format == "messages" else "conversations"]
    turns = _column(row, spec, "messages" if spec.format == "messages" else "conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"column {column!r} must be a non-empty list of turns, got {json.dumps(turns)[:60]}")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            keys = ", ".join(turn) if isinstance(turn, dict) else type(turn).__name__
            raise BadRow(f"{column}[{k}] needs {role_key!r} and {content_key!r} (it has: {keys})")
        role, content = turn[role_key], turn[content_key]
        if not isinstance(content, str):
            raise BadRow(f"{column}[{k}] {content_key} must be text, got {type(content).__name__}")
        if spec.format == "sharegpt":
            if role not in SHAREGPT_ROLES:
                raise BadRow(f"{column}[{k}] from={role!r} is not one of: {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[role], "content": content})
        elif not isinstance(role, str):
            raise BadRow(f"{column}[{k}] role must be text, got {type(role).__name__}")
        else:
            # Keep the turn's other keys (tool calls, names, reasoning) for templates that render them.
            extra = {key: value for key, value in turn.items() if key not in ("role", "content")}
            messages.append({**extra, "role": role, "content": content})
    return messages


def chat_segments(tokenizer: Any, messages: list[dict], template_kwargs: dict) -> list[tuple[str, bool]]:
    """Split the chat-template rendering of `messages` into untrained text and trained assistant turns.

    Assistant turn i is trained from the end of the generation prompt for `messages[:i]` to the end of the
    rendering of `messages[:i+1]`: its content and whatever the template closes the turn with (the end-of-turn
    token), less trailing whitespace.

        >>> from fluid_cli.tokenizer import build_char_tokenizer
        >>> chat_segments(build_char_tokenizer(), [{"role": "user", "content": "hi"},
        ...                                        {"role": "assistant", "content": "yo"}], {})
        [('<|user|>hi<|end|><|assistant|>', False), ('yo<|end|>', True)]
    """

    def rendered(upto: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt,
                                                 **template_kwargs)
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise BadRow(f"the chat template failed on this conversation ({e})") from None

    full = rendered(len(messages), False)
    segments, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, turn = rendered(i, True), rendered(i + 1, False)
        if not (len(head) >= pos and full.startswith(head) and full.startswith(turn) and len(turn) >= len(head)):
            raise BadRow(f"the chat template renders turn {i} differently once later turns follow (for example it "
                         "drops earlier reasoning), so its labels are ambiguous; use template = \"none\"")
        # Whitespace the template writes after the end-of-turn token separates turns; decoding stops before it.
        end = len(head) + len(full[len(head):len(turn)].rstrip())
        segments += [(full[pos:len(head)], False), (full[len(head):end], True)]
        pos = end
    segments.append((full[pos:], False))
    return [(text, trained) for text, trained in segments if text]


def label_prefixes(prefix_ids: list[list[int]], trained: list[bool]) -> tuple[list[int], list[int]]:
    """`input_ids` and `labels` from the tokenizations of growing prefixes of the text, one per segment.

    Each segment owns the tokens its prefix adds to the previous prefix's; where a token merges across the
    boundary (the prefixes disagree from position c on), everything from c belongs to the later segment.

        >>> label_prefixes([[1, 5, 6], [1, 5, 7, 8, 2]], [False, True])
        ([1, 5, 7, 8, 2], [-100, -100, 7, 8, 2])
    """
    ids: list[int] = []
    labels: list[int] = []
    for enc, train in zip(prefix_ids, trained):
        common = 0
        for a, b in zip(ids, enc):
            if a != b:
                break
            common += 1
        labels = labels[:common] + (list(enc[common:]) if train else [IGNORE] * (len(enc) - common))
        ids = list(enc)
    return ids, labels


# --------------------------------------------------------------------------------------------- encoding

ENCODED_FEATURES = {
    "input_ids": ("int64", True), "labels": ("int64", True), "error": ("string", False),
    "drop": ("string", False), "truncated": ("bool", False), "n_tokens": ("int64", False),
    "n_trained": ("int64", False),
}


def encode_batch(batch: dict, tokenizer: Any, specs: list[SourceSpec], template_kwargs: dict, cutoff_len: int
                 ) -> dict[str, list]:
    """`datasets.map` function: JSON rows -> input_ids/labels cut at `cutoff_len`, plus per-row bookkeeping."""
    out: dict[str, list] = {name: [] for name in ENCODED_FEATURES}
    eos = tokenizer.eos_token or ""
    for src, text, where in zip(batch["src"], batch["row"], batch["where"]):
        ids, labels, error, drop = [], [], "", ""
        try:
            segments, add_special = render(json.loads(text), specs[src], tokenizer, template_kwargs, eos)
            prefixes = list(accumulate(segment for segment, _ in segments))
            encodings = tokenizer(prefixes, add_special_tokens=add_special)["input_ids"]
            ids, labels = label_prefixes(encodings, [trained for _, trained in segments])
        except BadRow as e:
            error = f"{where}: {e}"
        truncated = len(ids) > cutoff_len
        trainable = labels.count(IGNORE) < len(labels)
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        n_trained = len(labels) - labels.count(IGNORE)
        if not error and n_trained == 0:
            drop = "trainable_part_cut" if trainable else "no_trainable_tokens"
        if drop or error:
            ids, labels = [], []
        for name, value in (("input_ids", ids), ("labels", labels), ("error", error), ("drop", drop),
                            ("truncated", truncated and not drop), ("n_tokens", len(ids)), ("n_trained", n_trained)):
            out[name].append(value)
    return out


def encode(mixture: Any, tokenizer: Any, specs: list[SourceSpec], data: DataConfig, tokenizer_name: str) -> Any:
    """Tokenize every row of `mixture` with `datasets.map` over `num_proc` processes (with a progress bar)."""
    import datasets

    features = datasets.Features({
        name: datasets.List(datasets.Value(dtype)) if is_list else datasets.Value(dtype)
        for name, (dtype, is_list) in ENCODED_FEATURES.items()
    } | {"src": datasets.Value("int64")})
    # Name the result ourselves: datasets would hash the tokenizer object, which need not hash the same way in
    # every process, and the fingerprint lands in state.json, which must be byte-identical run to run.
    settings = json.dumps([[asdict(s) for s in specs], data.template_kwargs, data.cutoff_len, tokenizer_name,
                           len(tokenizer)], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(f"{mixture._fingerprint}|{settings}".encode()).hexdigest()[:16]
    num_proc = min(data.num_proc, len(mixture))
    return mixture.map(
        encode_batch,
        batched=True,
        batch_size=256,
        remove_columns=["row", "where"],
        features=features,
        fn_kwargs={"tokenizer": tokenizer, "specs": specs, "template_kwargs": data.template_kwargs,
                   "cutoff_len": data.cutoff_len},
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )


def validation_size(validation: float, n: int, where: str) -> int:
    """Rows held out: a fraction (< 1) of `n`, at least one, or a whole count (>= 1)."""
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


def run(cfg: Recipe, overwrite: bool = False) -> dict:
    """Prepare the recipe's `[data]` into `[data] output_dir`; returns the statistics saved as `stats.json`."""
    from fluid_cli.modeling import load_tokenizer

    data, where = cfg.data, cfg.source or "recipe"
    check_settings(data, where)
    specs = [source_spec(src, i, data, where) for i, src in enumerate(data.sources)]
    out = Path(data.output_dir)
    if out.exists() and not overwrite:
        raise FluidError(f"{out}: output folder exists; pass --overwrite to replace it")
    started = time.perf_counter()
    read = [read_source(src, i, data) for i, src in enumerate(data.sources)]
    for src, rows in zip(data.sources, read):
        if not rows.rows:
            raise FluidError(f"{src.path}: no usable rows ({len(rows.bad)} malformed rows skipped)")
    picked = select_rows([len(r.rows) for r in read], data.sources, data.seed)
    tokenizer = load_tokenizer(cfg.model, corpus=lambda: corpus(read, picked, specs))
    scratch = cfg.model.scratch
    tokenizer_name = cfg.model.tokenizer or cfg.model.path or f"{scratch.tokenizer} (built in)"
    check_tokenizer(tokenizer, specs, tokenizer_name)
    if not data.skip_bad_rows:
        probe_first_rows(read, picked, tokenizer, specs, data)
    tokenize_started = time.perf_counter()
    encoded = encode(mixture(read, picked), tokenizer, specs, data, tokenizer_name)
    tokenize_seconds = time.perf_counter() - tokenize_started

    book = encoded.select_columns(["src", "error", "drop", "truncated", "n_tokens", "n_trained"]).to_dict()
    errors = [e for e in book["error"] if e]
    if errors and not data.skip_bad_rows:
        raise FluidError(f"{errors[0]} ({len(errors)} bad row(s) in all; [data] skip_bad_rows = true skips them)")
    keep = [k for k, (e, d) in enumerate(zip(book["error"], book["drop"])) if not e and not d]
    if not keep:
        raise FluidError(f"{where}: [data]: no examples left ({len(errors)} bad rows, "
                         f"{sum(1 for d in book['drop'] if d)} without trainable tokens within cutoff_len)")
    dataset = split(encoded.select(keep), data, where)
    stats = summarize(cfg, specs, tokenizer_name, read, picked, book, keep,
                      {name: len(ds) for name, ds in dataset.items()})
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            dataset.save_to_disk(str(tmp))
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
            write_json_atomic(tmp / "stats.json", stats)
            cfg.save(tmp)
    except FileExistsError:
        raise FluidError(f"{out}: output folder appeared while preparing; pass --overwrite to replace it") from None
    print_summary(stats, out, total_seconds=time.perf_counter() - started, tokenize_seconds=tokenize_seconds)
    return stats


def corpus(read: list[Rows], picked: list[np.ndarray], specs: list[SourceSpec]) -> Iterator[str]:
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

    for i, idx in enumerate(picked):
        literals = [lit for fmt in (specs[i].prompt_format, specs[i].response_format)
                    for lit, *_ in Formatter().parse(fmt) if lit]
        for k in idx:
            yield from strings(json.loads(read[i].rows[k]))
            yield from literals


def mixture(read: list[Rows], picked: list[np.ndarray]) -> Any:
    """The picked rows of every source, source after source, as a `datasets.Dataset` of JSON texts."""
    import datasets

    return datasets.Dataset.from_dict({
        "src": [i for i, idx in enumerate(picked) for _ in idx],
        "row": [read[i].rows[k] for i, idx in enumerate(picked) for k in idx],
        "where": [read[i].where[k] for i, idx in enumerate(picked) for k in idx],
    })


def probe_first_rows(read: list[Rows], picked: list[np.ndarray], tokenizer: Any, specs: list[SourceSpec],
                     data: DataConfig) -> None:
    """Fail fast on a misconfigured source (a wrong column map, say), not after tokenizing everything."""
    firsts = [(i, read[i].rows[idx[0]], read[i].where[idx[0]]) for i, idx in enumerate(picked) if len(idx)]
    batch = {"src": [i for i, _, _ in firsts], "row": [r for _, r, _ in firsts], "where": [w for _, _, w in firsts]}
    errors = [e for e in encode_batch(batch, tokenizer, specs, data.template_kwargs, data.cutoff_len)["error"] if e]
    if errors:
        raise FluidError(f"{errors[0]} ([data] skip_bad_rows = true skips bad rows)")


def split(kept: Any, data: DataConfig, where: str) -> Any:
    """Shuffle the kept examples (seeded) and hold out `[data] validation` of them."""
    import datasets

    n_val = validation_size(data.validation, len(kept), where)
    shuffled = kept.select_columns(["input_ids", "labels"]).shuffle(seed=data.seed)
    splits = {"train": shuffled.select(range(n_val, len(kept)))}
    if n_val:
        splits["validation"] = shuffled.select(range(n_val))
    return datasets.DatasetDict(splits)


def summarize(cfg: Recipe, specs: list[SourceSpec], tokenizer_name: str, read: list[Rows], picked: list[np.ndarray],
              book: dict, keep: list[int], split_sizes: dict[str, int]) -> dict:
    """The content of `stats.json` (no timings, so that the output folder is byte-identical run to run)."""
    data = cfg.data
    row_errors = Counter(src for src, e in zip(book["src"], book["error"]) if e)
    drops = Counter(d for d in book["drop"] if d)
    lengths = np.array([book["n_tokens"][k] for k in keep])
    edges = np.linspace(0, data.cutoff_len, HISTOGRAM_BINS + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    bad_messages = [m for r in read for m in r.bad] + [e for e in book["error"] if e]
    return {
        "examples_in": len(book["src"]) + sum(len(r.bad) for r in read),
        "examples_out": split_sizes,
        "dropped": {"bad_row": len(bad_messages), "no_trainable_tokens": drops["no_trainable_tokens"],
                    "trainable_part_cut": drops["trainable_part_cut"]},
        "truncated": sum(1 for k in keep if book["truncated"][k]),
        "tokens": {"total": int(lengths.sum()), "trainable": int(sum(book["n_trained"][k] for k in keep))},
        "length": {"mean": round(float(lengths.mean()), 2), "max": int(lengths.max()),
                   "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}},
        "sources": [
            {"path": src.path, "format": spec.format, "rows_read": len(r.rows) + len(r.bad),
             "rows_used": len(idx), "bad_rows": len(r.bad) + row_errors[i]}
            for i, (src, spec, r, idx) in enumerate(zip(data.sources, specs, read, picked))
        ],
        "bad_row_examples": bad_messages[:20],
        "tokenizer": tokenizer_name,
        "template": data.template,
        "cutoff_len": data.cutoff_len,
        "seed": data.seed,
    }


def print_summary(stats: dict, out: Path, total_seconds: float, tokenize_seconds: float) -> None:
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
                   f"{rows_in / tokenize_seconds:,.0f} / {rows_in / total_seconds:,.0f}")

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
