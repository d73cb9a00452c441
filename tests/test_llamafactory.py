"""Coming from LLaMA-Factory: its registered datasets (dataset_info.json) and its YAML training configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluid_cli.config import DataConfig, DataSource
from fluid_cli.errors import FluidError
from fluid_cli.layout import IGNORE
from fluid_cli.render import encode_batch, source_spec
from fluid_cli.tokenizer import build_char_tokenizer

# A chat template that writes tools and tool calls in its own format (as Qwen's or Llama 3's do).
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|system|>tools:' + (tools | tojson) + '<|end|>' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.tool_calls %}{{ '<|assistant|>' }}"
    "{% for c in m.tool_calls %}{{ 'call ' + c.function.name + (c.function.arguments | tojson) }}{% endfor %}"
    "{{ '<|end|>' }}"
    "{% else %}{{ '<|' + m.role + '|>' + m.content + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tokenizer(template: str | None = TOOL_TEMPLATE):
    tok = build_char_tokenizer()
    if template is not None:
        tok.chat_template = template
    return tok


def register(folder: Path, name: str, entry: dict, rows: list[dict] | None = None) -> Path:
    """Write `rows` as `<name>.json` and register it as `entry` in `folder/dataset_info.json` (which keeps the
    entries of earlier calls)."""
    folder.mkdir(parents=True, exist_ok=True)
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    (folder / f"{name}.json").write_text(json.dumps(rows or []))
    entry = {"file_name": f"{name}.json", **entry}
    info[name] = entry
    info_path.write_text(json.dumps(info))
    return folder


def encoded(folder: Path, name: str, row: dict, tok, template: str = "auto") -> tuple[str, list[str]]:
    """The row of registered dataset `name` rendered and tokenized: its text, and its trained spans (the runs of
    tokens whose label is not -100, decoded)."""
    data = DataConfig(dataset_dir=str(folder), template=template)
    spec = source_spec(DataSource(dataset=name), 0, data, "recipe")
    out = encode_batch({"row": [json.dumps(row)]}, tok, spec, "json-text", {}, cutoff_len=4096)
    if out["error"][0]:
        raise ValueError(out["error"][0])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert [label for label in labels if label != IGNORE] == [i for i, label in zip(ids, labels) if label != IGNORE]
    spans, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            run.append(i)
        elif run:
            spans, run = spans + [tok.decode(run)], []
    return tok.decode(ids), spans + ([tok.decode(run)] if run else [])


# --------------------------------------------------------------------------------------------- alpaca


ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}


def test_alpaca_history_system_and_query_joined_by_one_newline(tmp_path):
    register(tmp_path, "a", {"columns": ALPACA_COLUMNS})
    row = {"instruction": "Add", "input": "1 2", "output": "3", "system": "Be brief.",
           "history": [["Hi", "Hello"], ["Sub 3 1", "2"]]}
    text, trained = encoded(tmp_path, "a", row, tokenizer())
    assert text == ("<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|>"
                    "<|user|>Sub 3 1<|end|><|assistant|>2<|end|><|user|>Add\n1 2<|end|><|assistant|>3<|end|>")
    assert trained == ["Hello<|end|>", "2<|end|>", "3<|end|>"]  # the history's answers are trained too


def test_alpaca_defaults_and_an_empty_input(tmp_path):
    register(tmp_path, "a", {})  # no columns: instruction, input, output; no system, no history
    text, trained = encoded(tmp_path, "a", {"instruction": "Say hi", "input": "", "output": "hi",
                                            "system": "ignored: not a column of this entry"}, tokenizer())
    assert text == "<|user|>Say hi<|end|><|assistant|>hi<|end|>"
    assert trained == ["hi<|end|>"]
    # Raw text (template = "none"): the EOS closes the trained reply.
    text, trained = encoded(tmp_path, "a", {"instruction": "Say hi", "input": "now", "output": "hi"},
                            tokenizer(), template="none")
    assert text == "Say hi\nnow" + "hi<|end|>"
    assert trained == ["hi<|end|>"]


# --------------------------------------------------------------------------------------------- sharegpt

TOOLS = [{"name": "add", "description": "Add two numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}]
SHAREGPT_ROW = {
    "conversations": [
        {"from": "system", "value": "You add."},
        {"from": "human", "value": "1+2?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})},
        {"from": "observation", "value": "3"},
        {"from": "gpt", "value": "It is 3."},
    ],
    "tools": json.dumps(TOOLS),
}


def test_sharegpt_system_function_call_observation_and_tools(tmp_path):
    register(tmp_path, "s", {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}})
    text, trained = encoded(tmp_path, "s", SHAREGPT_ROW, tokenizer())
    tools = json.dumps([{"type": "function", "function": TOOLS[0]}])
    assert text == (f"<|system|>tools:{tools}<|end|><|system|>You add.<|end|><|user|>1+2?<|end|>"
                    '<|assistant|>call add{"a": 1, "b": 2}<|end|><|tool|>3<|end|><|assistant|>It is 3.<|end|>')
    # The call (in the template's format) and the answer are trained; the observation is not.
    assert trained == ['call add{"a": 1, "b": 2}<|end|>', "It is 3.<|end|>"]


def test_sharegpt_call_is_json_text_where_the_template_has_no_tool_calls(tmp_path):
    register(tmp_path, "s", {"formatting": "sharegpt", "columns": {"messages": "conversations"}})
    row = {"conversations": SHAREGPT_ROW["conversations"][1:]}
    template = TOOL_TEMPLATE.replace("m.tool_calls", "m.nothing").replace("c.function", "c")
    text, trained = encoded(tmp_path, "s", row, tokenizer(template))
    call = SHAREGPT_ROW["conversations"][2]["value"]
    assert text == f"<|user|>1+2?<|end|><|assistant|>{call}<|end|><|tool|>3<|end|><|assistant|>It is 3.<|end|>"
    assert trained == [f"{call}<|end|>", "It is 3.<|end|>"]


def test_sharegpt_custom_tags_and_bad_alternation(tmp_path):
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "u", "assistant_tag": "a"}
    register(tmp_path, "s", {"formatting": "sharegpt", "columns": {"messages": "m"}, "tags": tags})
    text, trained = encoded(tmp_path, "s", {"m": [{"role": "u", "content": "x"}, {"role": "a", "content": "y"}]},
                            tokenizer())
    assert (text, trained) == ("<|user|>x<|end|><|assistant|>y<|end|>", ["y<|end|>"])
    with pytest.raises(ValueError, match=r"m\[1\]: role = 'u' where 'a' belongs"):
        encoded(tmp_path, "s", {"m": [{"role": "u", "content": "x"}, {"role": "u", "content": "y"}]}, tokenizer())
    with pytest.raises(ValueError, match="ends with a user or observation turn"):
        encoded(tmp_path, "s", {"m": [{"role": "u", "content": "x"}]}, tokenizer())


# --------------------------------------------------------------------------------------------- openai

OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "system_tag": "system"}
OPENAI_ROW = {"messages": [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "2*3 and 1+1?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "mul", "arguments": '{"a": 2, "b": 3}'}},
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}]},
    {"role": "tool", "content": "6"},
    {"role": "tool", "content": "2"},
    {"role": "assistant", "content": "6 and 2."},
]}


def test_openai_tool_calls(tmp_path):
    register(tmp_path, "o", {"formatting": "openai", "columns": {"messages": "messages"}, "tags": OPENAI_TAGS})
    text, trained = encoded(tmp_path, "o", OPENAI_ROW, tokenizer())
    assert text == ('<|system|>Use tools.<|end|><|user|>2*3 and 1+1?<|end|>'
                    '<|assistant|>call mul{"a": 2, "b": 3}call add{"a": 1, "b": 1}<|end|>'
                    "<|tool|>6<|end|><|tool|>2<|end|><|assistant|>6 and 2.<|end|>")
    assert trained == ['call mul{"a": 2, "b": 3}call add{"a": 1, "b": 1}<|end|>', "6 and 2.<|end|>"]
    # Without a tool-call format in the template: the calls' JSON text, as LLaMA-Factory writes it.
    text, trained = encoded(tmp_path, "o", OPENAI_ROW, tokenizer(TOOL_TEMPLATE.replace("m.tool_calls", "m.x")))
    calls = json.dumps([c["function"] for c in OPENAI_ROW["messages"][2]["tool_calls"]])
    assert trained == [f"{calls}<|end|>", "6 and 2.<|end|>"]


# --------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("entry", "why"), [
    ({"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}},
     "a ranking \\(preference\\) dataset"),
    ({"columns": {"prompt": "instruction", "response": "output", "kto_tag": "kto_tag"}}, "a KTO dataset"),
    ({"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"}},
     "a multimodal dataset \\(images column\\)"),
    ({"formatting": "sharegpt", "columns": {"messages": "messages", "videos": "videos"}},
     "a multimodal dataset \\(videos column\\)"),
    ({"formatting": "sharegpt", "columns": {"messages": "messages", "audios": "audios"}},
     "a multimodal dataset \\(audios column\\)"),
])
def test_not_sft_data_is_refused_naming_the_entry(tmp_path, entry, why):
    register(tmp_path, "pairs", entry, rows=[{"instruction": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(FluidError, match=rf"dataset_info.json: pairs: {why}.*supervised text conversations only"):
        source_spec(DataSource(dataset="pairs"), 0, DataConfig(dataset_dir=str(tmp_path)), "recipe")


def test_unknown_entry_and_missing_file_are_named(tmp_path):
    register(tmp_path, "a", {"file_name": "missing.json"})  # the entry's own file_name wins
    data = DataConfig(dataset_dir=str(tmp_path))
    with pytest.raises(FluidError, match=r"recipe: \[data\] sources\[0\] dataset: 'b' is not registered .*has: a"):
        source_spec(DataSource(dataset="b"), 0, data, "recipe")
    with pytest.raises(FluidError, match="dataset_info.json: a: file_name .*missing.json not found"):
        source_spec(DataSource(dataset="a"), 0, data, "recipe")
