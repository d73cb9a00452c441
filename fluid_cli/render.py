"""How a source's rows become text segments and then `input_ids`/`labels` (the formats of `fluid prepare-data`).

Formats (the roles each reads; `columns` maps a role to the row's column when the names differ):

    messages         messages = [{role, content}, ...]       OpenAI style, any number of turns
    sharegpt         conversations = [{from, value}, ...]    from: human/user, gpt/assistant, system, ...
    alpaca           instruction, input (optional), output   user = instruction + "\\n\\n" + input
    prompt_response  prompt, response                        GSM8K: columns = {prompt = "question", response = "answer"}
    text             text                                    every token trained; never templated

A source `dataset = "NAME"` (LLaMA-Factory's registered datasets) is read as its `dataset_info.json` entry says:
`fluid_cli.dataset_info` turns each row into the conversation (and tools) that is rendered here.

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

import json
from dataclasses import dataclass
from itertools import accumulate
from string import Formatter
from typing import Any

import jinja2

from fluid_cli import dataset_info
from fluid_cli.config import DataConfig, DataSource, without_nulls
from fluid_cli.errors import BadRow, FluidError
from fluid_cli.layout import IGNORE, prompt_of
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
# apply_chat_template arguments that prepare-data sets itself.
RESERVED_TEMPLATE_KWARGS = {"tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
                            "return_assistant_tokens_mask", "conversation"}


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
    registered: dataset_info.Entry | None = None  # a dataset of dataset_info.json (its format, columns and tags)

    def fields(self) -> set[str]:
        """The named fields of `prompt_format`/`response_format` (columns they read, or prompt/response).

            >>> sorted(SourceSpec(0, "prompt_response", {}, "[{id}] {prompt}", "{response}", False).fields())
            ['id', 'prompt', 'response']
        """
        return {f for text in (self.prompt_format, self.response_format)
                for _, f, _, _ in Formatter().parse(text) if f}

    def literals(self) -> list[str]:
        """The literal text of `prompt_format`/`response_format` ("Question: ", "\\nAnswer:", ...)."""
        return [lit for text in (self.prompt_format, self.response_format)
                for lit, *_ in Formatter().parse(text) if lit]


def source_spec(src: DataSource, index: int, data: DataConfig, where: str) -> SourceSpec:
    """Check one `[[data.sources]]` entry and fill in its defaults.

        >>> from fluid_cli.config import DataSource
        >>> spec = source_spec(DataSource("synthetic:arithmetic", num_samples=8), 0, DataConfig(template="none"), "r")
        >>> spec.format, spec.columns, spec.prompt_format == GSM8K_PROMPT
        ('prompt_response', {'prompt': 'question', 'response': 'answer'}, True)
    """
    key = f"{where}: [data] sources[{index}]"
    if src.dataset is not None:
        given = [k for k in ("format", "columns", "prompt_format", "response_format") if getattr(src, k)]
        if given:
            raise FluidError(f"{key} {given[0]}: a registered dataset is read as its dataset_info.json entry says")
        e = dataset_info.entry(src.dataset, data, key)
        return SourceSpec(index, e.formatting, e.columns, "", "", chat=data.template == "auto", registered=e)
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


def check_tokenizer(tokenizer: Any, specs: list[SourceSpec], name: str) -> None:
    if any(s.chat and s.format != "text" for s in specs) and not getattr(tokenizer, "chat_template", None):
        raise FluidError(f"{name}: the tokenizer has no chat template; set [data] template = \"none\" to train on "
                         "the raw text (prompt_format/response_format shape it)")


# --------------------------------------------------------------------------------------------- rendering


def render(row: dict, spec: SourceSpec, tokenizer: Any, template_kwargs: dict, eos: str
           ) -> tuple[list[tuple[str, bool]], bool]:
    """The row as `(text, trained)` segments, and whether to let the tokenizer add its special tokens (BOS).

    Chat templates write their own special tokens, so those are added only to raw (`template = "none"`) text.
    """
    tools = None
    if spec.registered is not None:
        native = spec.chat and "tool_calls" in str(tokenizer.chat_template)  # the template writes tool calls
        messages, tools = dataset_info.conversation(row, spec.registered, native)
        if not spec.chat and (tools or messages[0]["role"] == "system"):
            raise BadRow("raw text (template = \"none\") has no place for the row's "
                         f"{'tools' if tools else 'system prompt'}; use the chat template (template = \"auto\")")
    elif spec.format == "text":
        return [(_text(row, spec, "text") + eos, True)], True
    else:
        messages = _conversation(row, spec) if spec.format in ("messages", "sharegpt") else _single_turn(row, spec)
    if spec.chat:
        return chat_segments(tokenizer, messages, template_kwargs, tools), False
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
        raise BadRow(f"column {column!r} must be a non-empty list of turns, got {json.dumps(turns, default=str)[:60]}")
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


def chat_segments(tokenizer: Any, messages: list[dict], template_kwargs: dict, tools: list[dict] | None = None
                  ) -> list[tuple[str, bool]]:
    """Split the chat-template rendering of `messages` (and `tools`, if any) into untrained text and trained
    assistant turns.

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
                                                 **{**template_kwargs, **({"tools": tools} if tools else {})})
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

# How a `datasets` batch of a source holds its rows (fluid_cli.sources says which each source uses):
#   "columns"       one column per row key, values as the source stores them (Parquet, CSV, hub, saved datasets);
#   "json-columns"  the same, read from JSON through Arrow: Arrow gives every row every key of the file (missing
#                   ones as null), so null-valued keys are dropped again to get the rows as written;
#   "json-text"     one column `row`, each row's JSON object as text (JSON files Arrow cannot type exactly).
TEXT_COLUMN = "row"


def batch_rows(batch: dict[str, list], layout: str) -> list[dict]:
    """The rows of one `datasets` batch (a dict of columns) as dicts.

        >>> batch_rows({"prompt": ["p"], "system": [None]}, "json-columns")
        [{'prompt': 'p'}]
        >>> batch_rows({"row": ['{"prompt": "p", "system": null}']}, "json-text")
        [{'prompt': 'p', 'system': None}]
    """
    if layout == "json-text":
        return [json.loads(text) for text in batch[TEXT_COLUMN]]
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return rows if layout == "columns" else [without_nulls(row) for row in rows]


# The columns `encode_batch` writes. `error` is the row's problem without its location (the source knows where
# a row is; that is looked up only for the errors reported); `drop` says why a row without error has no example.
ENCODED_FEATURES = {
    "input_ids": ("int64", True), "labels": ("int64", True), "error": ("string", False),
    "drop": ("string", False), "truncated": ("bool", False),
}


EMPTY_PROMPT = ("an empty prompt (no token before the trained part, and the tokenizer adds no BOS): nothing for "
                "[data.regenerate] to continue")


def encode_batch(batch: dict, tokenizer: Any, spec: SourceSpec, layout: str, template_kwargs: dict, cutoff_len: int,
                 need_prompt: bool = False) -> dict[str, list]:
    """`datasets.map` function: one source's rows -> input_ids/labels cut at `cutoff_len`, plus bookkeeping.
    `need_prompt` (self-distillation continues every row's prompt): a row with an empty prompt is a bad row.

        >>> from fluid_cli.tokenizer import build_char_tokenizer
        >>> spec = SourceSpec(0, "text", {"text": "text"}, "", "", chat=False)
        >>> tok = build_char_tokenizer()
        >>> out = encode_batch({"text": ["hi", None]}, tok, spec, "columns", {}, cutoff_len=2)  # "hi<|end|>", cut
        >>> [tok.decode(ids) for ids in out["input_ids"]], out["truncated"], out["error"]
        (['hi', ''], [True, False], ['', "column 'text' (text) is null"])
    """
    out: dict[str, list] = {name: [] for name in ENCODED_FEATURES}
    eos = tokenizer.eos_token or ""
    for row in batch_rows(batch, layout):
        ids, labels, error, drop = [], [], "", ""
        try:
            segments, add_special = render(row, spec, tokenizer, template_kwargs, eos)
            prefixes = list(accumulate(segment for segment, _ in segments))
            encodings = tokenizer(prefixes, add_special_tokens=add_special)["input_ids"]
            ids, labels = label_prefixes(encodings, [trained for _, trained in segments])
        except BadRow as e:
            error = str(e)
        truncated = len(ids) > cutoff_len
        trainable = labels.count(IGNORE) < len(labels)
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if not error and labels.count(IGNORE) == len(labels):
            drop = "trainable_part_cut" if trainable else "no_trainable_tokens"
        if need_prompt and not error and not drop and not prompt_of(ids, labels):
            error = EMPTY_PROMPT
        if drop or error:
            ids, labels = [], []
        for name, value in (("input_ids", ids), ("labels", labels), ("error", error), ("drop", drop),
                            ("truncated", truncated and not drop)):
            out[name].append(value)
    return out
