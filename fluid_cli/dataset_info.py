"""LLaMA-Factory's registered datasets: `[data] dataset_dir`'s `dataset_info.json`, read as LLaMA-Factory reads it.

A source `[[data.sources]] dataset = "NAME"` picks the entry NAME of `<dataset_dir>/dataset_info.json`. The entry
says where the rows are and how to read them, with LLaMA-Factory's defaults (its `data/README.md`):

    file_name                 a file or a folder of json/jsonl/csv/parquet/arrow/txt files, under dataset_dir
    hf_hub_url, subset, folder, split (default "train")    a hub dataset instead
    formatting                "alpaca" (default), "sharegpt" or "openai"
    num_samples               rows to sample (fluid's [[data.sources]] num_samples)
    columns                   alpaca: prompt "instruction", query "input", response "output", history, system;
                              sharegpt/openai: messages "conversations", system; both: tools
    tags                      role_tag "from", content_tag "value", user_tag "human", assistant_tag "gpt",
                              observation_tag "observation", function_tag "function_call", system_tag "system"

As in LLaMA-Factory, the defaults of `columns` (and of `tags`) apply only when the entry has no `columns` (no
`tags`) at all: an entry that lists some columns reads only those.

How rows become a conversation (then rendered and labelled by `fluid_cli.render` like any other conversation; every
assistant turn is trained, nothing else):

- alpaca: the user turn is `prompt` and `query` joined by one newline (empty ones left out); each `history` pair
  [prompt, response] becomes an earlier user turn and a trained assistant turn; `system` is the system prompt.
- sharegpt and openai: a first turn with the system tag is the system prompt (else the `system` column). Turns
  alternate: user or observation, then assistant or function_call; a row that does not, or that does not end
  with an assistant (or function_call) turn, is a bad row named by its place (`skip_bad_rows` drops it).
  Observation turns become `tool` turns (not trained); function_call turns and openai `tool_calls` are assistant
  turns (trained). In openai rows several tool turns in a row answer one call.
- Tool calls: where the chat template renders `tool_calls`, a call becomes an assistant turn with `tool_calls`
  (the template writes it in its own format); otherwise the call's JSON text is the assistant turn's text.
- Tools: the `tools` column (JSON text or a list of function schemas) goes to the chat template's `tools`.

Entries that are not supervised chat data are refused, naming the entry: `ranking` (or `chosen`/`rejected`
columns: preference data for DPO or reward models), `kto_tag` (KTO data), and `images`, `videos` or `audios`
(multimodal data). So are entries that live on ModelScope, Modelers, a cloud file or a loading script.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fluid_cli.config import DataConfig, DataSource
from fluid_cli.errors import BadRow, FluidError
from fluid_cli.io import read_text

INFO_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt", "openai")
COLUMN_DEFAULTS = {"alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
                   "sharegpt": {"messages": "conversations"}, "openai": {"messages": "conversations"}}
COLUMN_NAMES = ("prompt", "query", "response", "history", "messages", "system", "tools")
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# Entries fluid does not train on, and why (a column of the entry's `columns`, or `ranking`).
NOT_SFT = {
    "ranking": "a ranking (preference) dataset, for DPO or reward-model training",
    "chosen": "a ranking (preference) dataset (chosen/rejected columns), for DPO or reward-model training",
    "rejected": "a ranking (preference) dataset (chosen/rejected columns), for DPO or reward-model training",
    "kto_tag": "a KTO dataset (kto_tag column), for KTO training",
    "images": "a multimodal dataset (images column)",
    "videos": "a multimodal dataset (videos column)",
    "audios": "a multimodal dataset (audios column)",
}
OTHER_HUBS = ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class Entry:
    """One registered dataset, with LLaMA-Factory's defaults filled in (what the worker processes need)."""

    name: str
    path: str  # the file or folder under dataset_dir, or the hub dataset's name
    hub: bool
    formatting: str
    columns: dict[str, str]  # role (prompt, query, ..., tools) -> column, for the roles the entry reads
    tags: dict[str, str]  # tag name (role_tag, ...) -> the value rows use; unset tags are left out
    subset: str | None = None
    folder: str | None = None
    split: str = "train"
    num_samples: int | None = None


def entry(name: str, data: DataConfig, key: str) -> Entry:
    """The entry `name` of `<data.dataset_dir>/dataset_info.json`, checked; `key` names the recipe's source."""
    info_path = Path(data.dataset_dir) / INFO_FILE
    if not info_path.is_file():
        raise FluidError(f"{key} dataset: {info_path} not found ([data] dataset_dir is the folder that holds it)")
    try:
        info = json.loads(read_text(info_path, "dataset list"))
    except json.JSONDecodeError as e:
        raise FluidError(f"{info_path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(info, dict):
        raise FluidError(f"{info_path}: expected an object of named datasets, got {json.dumps(info)[:40]}")
    if name not in info:
        raise FluidError(f"{key} dataset: {name!r} is not registered in {info_path} (it has: "
                         f"{', '.join(sorted(info)) or 'nothing'})")
    attr, where = info[name], f"{info_path}: {name}"
    if not isinstance(attr, dict):
        raise FluidError(f"{where}: expected an object, got {json.dumps(attr)[:40]}")
    columns, tags = attr.get("columns"), attr.get("tags")
    all_columns = COLUMN_NAMES + tuple(k for k in NOT_SFT if k != "ranking")  # ranking is an entry key
    for part, value, known in (("columns", columns, all_columns), ("tags", tags, tuple(TAG_DEFAULTS))):
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            raise FluidError(f"{where}: {part} must map names to text, got {json.dumps(value)[:60]}")
        # LLaMA-Factory reads only the names it knows: a misspelt one would silently drop its column (or tag)
        unknown = [k for k in value or {} if k not in known]
        if unknown:
            raise FluidError(f"{where}: {part}: {unknown[0]!r} is not a LLaMA-Factory {part[:-1]} name (known: "
                             f"{', '.join(known)})")
    refused = [k for k in NOT_SFT if k in (columns or {})] + (["ranking"] if attr.get("ranking") else [])
    if refused:
        raise FluidError(f"{where}: {NOT_SFT[refused[0]]}; fluid trains on supervised text conversations only")
    formatting = attr.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise FluidError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    if "hf_hub_url" in attr:
        path, hub = str(attr["hf_hub_url"]), True
    elif "file_name" in attr:
        if not isinstance(attr["file_name"], str):
            raise FluidError(f"{where}: file_name must be text (a file or folder under {data.dataset_dir}), got "
                             f"{json.dumps(attr['file_name'])[:40]}")
        local = Path(data.dataset_dir) / str(attr["file_name"])
        if not local.exists():
            raise FluidError(f"{where}: file_name {local} not found")
        path, hub = str(local), False
    else:
        other = next((k for k in OTHER_HUBS if k in attr), None)
        raise FluidError(f"{where}: " + (f"{other} datasets are not supported; fluid reads file_name or hf_hub_url"
                                         if other else "no file_name (or hf_hub_url) says where the rows are"))
    defaults = COLUMN_DEFAULTS[formatting]
    chosen = defaults if columns is None else {k: v for k, v in columns.items() if k in COLUMN_NAMES}
    needed = "response" if formatting == "alpaca" else "messages"
    if needed not in chosen:
        raise FluidError(f"{where}: columns name no {needed} column (LLaMA-Factory reads no defaults once an entry "
                         f"lists columns); add \"{needed}\": \"{defaults[needed]}\"")
    num_samples = attr.get("num_samples")
    if num_samples is not None and not (type(num_samples) is int and num_samples >= 1):  # true is no count
        raise FluidError(f"{where}: num_samples must be a whole number of at least 1, got {num_samples!r}")
    return Entry(
        name=name, path=path, hub=hub, formatting=formatting, columns=chosen,
        tags=TAG_DEFAULTS if tags is None else {k: v for k, v in tags.items() if k in TAG_DEFAULTS},
        subset=attr.get("subset"), folder=attr.get("folder"), split=attr.get("split", "train"),
        num_samples=num_samples,
    )


def as_source(src: DataSource, e: Entry) -> DataSource:
    """The recipe's source of a registered dataset with the entry's place, split and num_samples (the recipe's
    num_samples, if it sets one, wins)."""
    return replace(src, path=e.path, split=e.split,
                   num_samples=src.num_samples if src.num_samples is not None else e.num_samples)


# --------------------------------------------------------------------------------------------- rows


def conversation(row: dict, e: Entry, native_tool_calls: bool) -> tuple[list[dict], list[dict] | None]:
    """The row as chat messages (system first, if any) and its tools (None when it has none)."""
    messages = _alpaca(row, e) if e.formatting == "alpaca" else _turns(row, e, native_tool_calls)
    return messages, _tools(row, e)


def _alpaca(row: dict, e: Entry) -> list[dict]:
    c = e.columns
    messages = []
    history = row.get(c["history"]) if "history" in c else None
    if isinstance(history, list):  # LLaMA-Factory reads history only when it is a list
        for k, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise BadRow(f"{c['history']}[{k}] must be a [prompt, response] pair of texts")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [str(row[c[role]]) for role in ("prompt", "query") if role in c and row.get(c[role])]
    response = row.get(c["response"])
    if not isinstance(response, str):
        raise BadRow(f"column {c['response']!r} (response) must be text, got "
                     f"{'nothing' if response is None else type(response).__name__}")
    messages += [{"role": "user", "content": "\n".join(query)}, {"role": "assistant", "content": response}]
    return _with_system(messages, row.get(c["system"]) if "system" in c else None)


def _turns(row: dict, e: Entry, native_tool_calls: bool) -> list[dict]:
    """sharegpt and openai rows: check the alternation as LLaMA-Factory does and map its roles to chat roles."""
    column, t = e.columns["messages"], e.tags
    role_tag, content_tag = t.get("role_tag"), t.get("content_tag")
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"column {column!r} must be a non-empty list of turns, got {json.dumps(turns, default=str)[:60]}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_tag not in turn:
            raise BadRow(f"{column}[{k}] has no {role_tag!r} key")
    system, start = None, 0
    if t.get("system_tag") is not None and turns[0][role_tag] == t["system_tag"]:
        system, start = turns[0].get(content_tag), 1
    elif "system" in e.columns:
        system = row.get(e.columns["system"])
    roles = {t.get(name): role for name, role in (("user_tag", "user"), ("assistant_tag", "assistant"),
                                                   ("observation_tag", "tool"), ("function_tag", "function"))
             if t.get(name) is not None}
    messages: list[dict] = []
    slot = 0  # position in the alternation; in openai rows a run of tool turns takes one
    for k, turn in enumerate(turns[start:], start=start):  # k: the turn's place in the row, for messages
        tag, content = turn[role_tag], turn.get(content_tag)
        role = roles.get(tag)
        calls = turn.get("tool_calls") if e.formatting == "openai" and role in ("assistant", "function") else None
        if calls:
            role = "function"
        if not (e.formatting == "openai" and role == "tool" and messages and messages[-1]["role"] == "tool"):
            want = ("user", "tool") if slot % 2 == 0 else ("assistant", "function")
            if role not in want:
                names = " or ".join(repr(x) for x, r in roles.items() if r in want)
                raise BadRow(f"{column}[{k}]: {role_tag} = {tag!r} where {names} belongs (turns alternate user or "
                             "observation, then assistant or function call)")
            slot += 1
        if calls:
            messages.append(_openai_call(calls, content, native_tool_calls, column, k))
            continue
        if not isinstance(content, str):
            raise BadRow(f"{column}[{k}] {content_tag} must be text, got {type(content).__name__}")
        if role == "function":
            messages.append(_call(content, native_tool_calls, column, k))
        else:
            messages.append({"role": role, "content": content})
    if slot % 2:
        raise BadRow(f"column {column!r}: the conversation ends with a user or observation turn (it must end with "
                     "an assistant or function call turn, the trained reply)")
    return _with_system(messages, system)


def _call(content: str, native: bool, column: str, k: int) -> dict:
    """A sharegpt function_call turn (JSON text of one call {name, arguments}, or of a list of them)."""
    if not native:
        return {"role": "assistant", "content": content}
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as e:
        raise BadRow(f"{column}[{k}]: the function call is not JSON ({e.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise BadRow(f"{column}[{k}]: a function call is {{\"name\": ..., \"arguments\": ...}}, got {content[:60]}")
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": c["name"], "arguments": _arguments(c)}}
                           for c in calls]}


def _arguments(call: dict) -> Any:
    """A call's arguments as an object (OpenAI data writes them as JSON text; templates expect the object)."""
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _openai_call(calls: Any, content: Any, native: bool, column: str, k: int) -> dict:
    if not (isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                            for c in calls)):
        raise BadRow(f"{column}[{k}] tool_calls must be a list of {{\"function\": {{name, arguments}}}}")
    if not native:  # LLaMA-Factory's text for a call: the JSON list of the calls' functions
        return {"role": "assistant", "content": json.dumps([c["function"] for c in calls], ensure_ascii=False)}
    return {"role": "assistant", "content": content if isinstance(content, str) else "",
            "tool_calls": [{**c, "type": c.get("type", "function"),
                            "function": {**c["function"], "arguments": _arguments(c["function"])}} for c in calls]}


def _with_system(messages: list[dict], system: Any) -> list[dict]:
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise BadRow(f"the system prompt must be text, got {type(system).__name__}")
    return [{"role": "system", "content": system}, *messages]


def _tools(row: dict, e: Entry) -> list[dict] | None:
    """The row's tools as the chat template's `tools` argument: function schemas, each wrapped as
    {"type": "function", "function": schema} unless it says its type."""
    if "tools" not in e.columns:
        return None
    tools = row.get(e.columns["tools"])
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise BadRow(f"column {e.columns['tools']!r} (tools) is not JSON ({err.msg})") from None
    if not tools:
        return None
    tools = tools if isinstance(tools, list) else [tools]
    if not all(isinstance(tool, dict) for tool in tools):
        raise BadRow(f"column {e.columns['tools']!r} (tools) must hold function schemas (objects)")
    return [tool if "type" in tool else {"type": "function", "function": tool} for tool in tools]
