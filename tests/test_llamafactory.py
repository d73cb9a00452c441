"""Coming from LLaMA-Factory: its registered datasets (dataset_info.json) and its YAML training configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fluid_cli.cli import app
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


@pytest.mark.parametrize(("info", "message"), [
    ([1, 2], r"dataset_info.json: expected an object of named datasets, got \[1, 2\]"),
    ({"a": {"file_name": 5}}, r"dataset_info.json: a: file_name must be text .*got 5"),
    ({"a": {"file_name": "a.json", "columns": {"prompt": "instruction", "response": "output", "sytem": "s"}}},
     r"dataset_info.json: a: columns: 'sytem' is not a LLaMA-Factory column name \(known: prompt, query"),
    ({"a": {"file_name": "a.json", "formatting": "sharegpt", "tags": {"role": "from"}}},
     r"dataset_info.json: a: tags: 'role' is not a LLaMA-Factory tag name \(known: role_tag"),
    ({"a": {"file_name": "a.json", "num_samples": True}}, r"dataset_info.json: a: num_samples must be a whole number"),
])
def test_malformed_entries_are_named_not_misread(tmp_path, info, message):
    """A misspelt column or tag was dropped silently (its column never read); a list for the whole file was reported
    as the dataset not being registered; `true` was read as 1 sample."""
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(FluidError, match=message):
        source_spec(DataSource(dataset="a"), 0, DataConfig(dataset_dir=str(tmp_path)), "recipe")


# --------------------------------------------------------------------------------------------- prepare-data


def prepare(tmp_path: Path, sources: str, **data: str) -> dict:
    """`fluid prepare-data` on `sources` (TOML) with the tool-call tokenizer; returns stats.json plus the trained
    spans of every example (decoded), sorted."""
    from fluid_cli import data as prepare_data
    from fluid_cli.config import load_recipe_text

    tokenizer().save_pretrained(tmp_path / "tok")
    settings = "".join(f"{k} = {v}\n" for k, v in data.items())
    cfg = load_recipe_text(f'[model]\npath = "{tmp_path / "tok"}"\n[data]\noutput_dir = "{tmp_path / "out"}"\n'
                           f'dataset_dir = "{tmp_path / "data"}"\n{settings}{sources}')
    stats = prepare_data.run(cfg, overwrite=True)
    tok = tokenizer()
    stats["trained"] = sorted(tok.decode([t for t in labels if t != IGNORE])
                              for labels in prepare_data.load_prepared(tmp_path / "out")["labels"])
    return stats


def test_a_bad_sharegpt_row_is_named_by_file_and_line_and_can_be_skipped(tmp_path):
    register(tmp_path / "data", "chat", {"formatting": "sharegpt", "file_name": "chat.jsonl"})
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    (tmp_path / "data" / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    with pytest.raises(FluidError, match=r"chat.jsonl:2: conversations\[1\]: from = 'human' where 'gpt' or "
                                         r"'function_call' belongs .*skip_bad_rows = true skips"):
        prepare(tmp_path, '[[data.sources]]\ndataset = "chat"\n')
    stats = prepare(tmp_path, '[[data.sources]]\ndataset = "chat"\n', skip_bad_rows="true")
    assert stats["dropped"]["bad_row"] == 1 and stats["trained"] == ["b<|end|>", "b<|end|>"]


def test_arrow_and_txt_files_and_hub_entries(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa

    folder = tmp_path / "data" / "parts"
    folder.mkdir(parents=True)
    table = pa.table({"instruction": ["Hi"], "input": [""], "output": ["yo"]})
    with pa.OSFile(str(folder / "part.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    register(tmp_path / "data", "parts", {"file_name": "parts"})  # a folder, as LLaMA-Factory allows
    (tmp_path / "data" / "notes.txt").write_text("one\ntwo\n")
    asked, read_file = [], datasets.load_dataset

    def load_dataset(name, *args, **kwargs):  # the hub (offline here): one row; files are read as ever
        if name != "org/set":
            return read_file(name, *args, **kwargs)
        asked.append((name, *args, kwargs))
        return datasets.Dataset.from_list([{"instruction": "Q", "output": "A"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    register(tmp_path / "data", "hub", {"hf_hub_url": "org/set", "subset": "en", "folder": "v1", "split": "dev"})
    stats = prepare(tmp_path, '[[data.sources]]\ndataset = "parts"\n[[data.sources]]\ndataset = "hub"\n'
                              f'[[data.sources]]\npath = "{tmp_path / "data" / "notes.txt"}"\nformat = "text"\n')
    assert asked == [("org/set", "en", {"data_dir": "v1", "split": "dev"})]
    assert stats["trained"] == ["A<|end|>", "one<|end|>", "two<|end|>", "yo<|end|>"]


def test_num_samples_of_the_entry_then_max_samples(tmp_path):
    rows = [{"instruction": str(i), "output": str(i)} for i in range(3)]
    register(tmp_path / "data", "a", {"num_samples": 5}, rows=rows)  # 5 of 3 rows: each once, then two again
    stats = prepare(tmp_path, '[[data.sources]]\ndataset = "a"\n')
    assert stats["sources"][0]["rows_used"] == 5 and sorted(set(stats["trained"])) == ["0<|end|>", "1<|end|>",
                                                                                       "2<|end|>"]
    assert prepare(tmp_path, '[[data.sources]]\ndataset = "a"\n', max_samples="4")["sources"][0]["rows_used"] == 4


# --------------------------------------------------------------------------------------------- YAML configs

LF_CONFIG = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: q_proj,v_proj

### dataset
dataset: identity, alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_config_translates_by_the_table(tmp_path, capsys):
    from fluid_cli.config import dump_recipe, load_recipe, load_recipe_text

    cfg = load_recipe(write(tmp_path, LF_CONFIG))
    assert (cfg.model.path, cfg.model.trust_remote_code) == ("meta-llama/Meta-Llama-3-8B-Instruct", True)
    assert [s.dataset for s in cfg.data.sources] == ["identity", "alpaca_en_demo"]
    assert (cfg.data.dataset_dir, cfg.data.template, cfg.data.cutoff_len, cfg.data.max_samples, cfg.data.num_proc,
            cfg.data.output_dir, cfg.data.seed) == ("data", "auto", 2048, 1000, 16, "saves/llama3-8b/lora/sft-data", 42)
    assert (cfg.lora.enabled, cfg.lora.scope, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
            cfg.lora.target_modules) == (True, "draft", 8, 16, 0.0, ["q_proj", "v_proj"])
    t = cfg.train
    assert (t.output_dir, t.lr, t.epochs, t.max_steps, t.batch_size, t.grad_accum, t.warmup_ratio, t.lr_scheduler,
            t.save_steps, t.log_steps, t.seed, t.gradient_checkpointing) == (
        "saves/llama3-8b/lora/sft", 1e-4, 3.0, None, 1, 8, 0.1, "cosine", 500, 10, 42, True)
    assert cfg.launch.mixed_precision == "bf16"
    assert (cfg.fluid.max_k, cfg.khead.tau) == (16, 2.8)  # FLUID's own settings: fluid's defaults
    err = capsys.readouterr().err
    assert "train.yaml:14: template 'llama3': fluid renders through the tokenizer's own chat template" in err
    assert ("ignored (they change nothing in what fluid trains): overwrite_cache, plot_loss, report_to, "
            "ddp_timeout") in " ".join(err.split())
    # `fluid recipe` prints it as TOML (the notices go to stderr), which loads as the same recipe.
    result = CliRunner().invoke(app, ["recipe", str(tmp_path / "train.yaml")])
    assert result.exit_code == 0 and "ignored" in result.stderr
    assert dump_recipe(load_recipe_text(result.stdout)) == dump_recipe(cfg)
    # A refused key through the command: one line, exit status 2.
    write(tmp_path, LF_CONFIG + "packing: true\n")
    result = CliRunner().invoke(app, ["recipe", str(tmp_path / "train.yaml")])
    assert result.exit_code == 2 and result.stderr.strip().endswith(
        f"train.yaml:{LF_CONFIG.count(chr(10)) + 1}: packing: True is not supported (fluid trains one example per row)")


def test_yaml_absent_keys_take_llamafactory_defaults_and_set_overrides_work(tmp_path):
    from fluid_cli.config import load_recipe

    cfg = load_recipe(write(tmp_path, "model_name_or_path: m\nfinetuning_type: full\nlr_scheduler_type: constant\n"
                                      "warmup_ratio: 0.2\ndisable_gradient_checkpointing: true\nmax_steps: 7\n"
                                      "template: qwen3_nothink\n"),
                      ["train.lr=3e-4", "data.cutoff_len=64"])
    assert (cfg.lora.enabled, cfg.train.lr, cfg.data.cutoff_len, cfg.train.batch_size, cfg.train.epochs,
            cfg.train.max_steps, cfg.train.log_steps, cfg.train.gradient_checkpointing) == (
        False, 3e-4, 64, 8, 3.0, 7, 500, False)
    # transformers' constant schedule has no warmup; fp32 without bf16/fp16
    assert (cfg.train.lr_scheduler, cfg.train.warmup_ratio, cfg.launch.mixed_precision) == ("constant", 0.0, "no")
    assert cfg.data.sources == [] and cfg.data.output_dir == "trainer_output-data"
    assert (cfg.data.template, cfg.data.template_kwargs) == ("auto", {"enable_thinking": False})


@pytest.mark.parametrize(("line", "message"), [
    ("stage: dpo", r"train.yaml:2: stage: 'dpo' is not supported \(fluid's Stage I is supervised fine-tuning"),
    ("finetuning_type: freeze", r"train.yaml:2: finetuning_type: 'freeze' is not supported \(lora or full\)"),
    ("packing: true", r"train.yaml:2: packing: True is not supported \(fluid trains one example per row\)"),
    ("train_on_prompt: true", r"train.yaml:2: train_on_prompt: True is not supported \(fluid trains the assistant"),
    ("mask_history: true", r"train.yaml:2: mask_history: True is not supported"),
    ("use_dora: true", r"train.yaml:2: use_dora: True is not supported \(fluid's adapter is plain LoRA\)"),
    ("lr_scheduler_type: polynomial", r"train.yaml:2: lr_scheduler_type: 'polynomial' is not supported"),
    ("lora_rnak: 8", r"train.yaml:2: lora_rnak: not a LLaMA-Factory key that fluid knows"),
    ("learning_rate: -1.0e-4", r"train.yaml:2: learning_rate: \[train\] lr: must be greater than 0, got -0.0001"),
    ("cutoff_len: long", r"train.yaml:2: cutoff_len: \[data\] cutoff_len: expected an integer, got 'long'"),
    ("dataset: [a, 3]", r"train.yaml:2: dataset: \[data\] sources\[1\] dataset: expected a string, got 3"),
    ("output_dir: [a]", r"train.yaml:2: output_dir: expected a folder name, got \['a'\]"),
    ("enable_thinking: maybe", r"train.yaml:2: enable_thinking: expected true or false, got 'maybe'"),
    ("dataset: 5", r"train.yaml:2: dataset: expected names \(a, b or a list\), got 5"),
    ("dataset: {a: 1}", r"train.yaml:2: dataset: expected names \(a, b or a list\), got \{'a': 1\}"),
    ("lr_scheduler_type: [", r"train.yaml:\d: invalid YAML"),
    ("lr_scheduler_type: [cosine]", r"train.yaml:2: lr_scheduler_type: \['cosine'\] is not supported"),
    ("3: 4", r"train.yaml: 3: expected a key name"),
    ("model_name_or_path: n", r"train.yaml:2: model_name_or_path: given twice \(first on line 1\); keep one"),
    ("deepspeed: /", r"train.yaml:2: deepspeed: / is a folder, not a DeepSpeed JSON file"),
])
def test_yaml_refused_and_bad_keys_are_one_line_errors_naming_the_line(tmp_path, line, message):
    from fluid_cli.config import load_recipe

    with pytest.raises(FluidError, match=message):
        load_recipe(write(tmp_path, f"model_name_or_path: m\n{line}\nneat_packing: false\n"))  # false: fine


def test_yaml_deepspeed_becomes_an_accelerate_deepspeed_config(tmp_path, monkeypatch):
    import yaml

    from fluid_cli.config import load_recipe

    monkeypatch.chdir(tmp_path)
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 2}}
    write(tmp_path, json.dumps(ds), "ds_z2.json")
    config = write(tmp_path, "model_name_or_path: m\nper_device_train_batch_size: 2\ndeepspeed: ds_z2.json\n")
    with pytest.raises(FluidError, match=r'train.yaml:3: deepspeed: ds_z2.json has train_micro_batch_size_per_gpu = '
                                         r'"auto"; write 2 \(per_device_train_batch_size\) there'):
        load_recipe(config)
    write(tmp_path, "[2]", "ds_z2.json")
    with pytest.raises(FluidError, match=r"deepspeed: ds_z2.json is not a DeepSpeed config \(a JSON object\), got"):
        load_recipe(config)
    write(tmp_path, json.dumps({**ds, "train_micro_batch_size_per_gpu": 2}), "ds_z2.json")
    cfg = load_recipe(config)
    assert cfg.launch.accelerate_config == str(tmp_path / "train.accelerate.yaml")
    accelerate = yaml.safe_load(Path(cfg.launch.accelerate_config).read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED"
    assert accelerate["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "ds_z2.json")


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_yaml_config_runs_prepare_data_and_train_stage1(tmp_path, monkeypatch):
    from fluid_cli.data import load_prepared
    from tiny import tiny_model

    monkeypatch.chdir(tmp_path)
    tok = tokenizer()
    tiny_model(tokenizer=tok).save_pretrained("model")
    tok.save_pretrained("model")
    register(tmp_path / "data", "alpaca_demo", {"columns": ALPACA_COLUMNS}, rows=[
        {"instruction": "Add", "input": f"{i} 1", "output": str(i + 1), "system": "", "history": []}
        for i in range(3)])
    register(tmp_path / "data", "tools_demo", {"formatting": "sharegpt",
                                               "columns": {"messages": "conversations", "tools": "tools"}},
             rows=[{**SHAREGPT_ROW, "tools": json.dumps([{"name": "add"}])}] * 2)
    write(tmp_path, """\
model_name_or_path: model
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
dataset: alpaca_demo,tools_demo
template: qwen
cutoff_len: 200
max_samples: 2
overwrite_cache: true
output_dir: saves/tiny/lora/sft
logging_steps: 1
save_steps: 100
plot_loss: true
per_device_train_batch_size: 2
learning_rate: 1.0e-3
max_steps: 4
lr_scheduler_type: linear
warmup_ratio: 0.25
report_to: none
""")
    run = CliRunner().invoke
    result = run(app, ["prepare-data", "train.yaml"])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "saves/tiny/lora/sft-data/stats.json").read_text())
    assert [s["rows_used"] for s in stats["sources"]] == [2, 2]  # max_samples: the first 2 rows of each
    tok = tokenizer()
    trained = sorted(tok.decode([t for t in labels if t != IGNORE])
                     for labels in load_prepared("saves/tiny/lora/sft-data")["labels"])
    assert trained == ['1<|end|>', '2<|end|>'] + ['call add{"a": 1, "b": 2}<|end|>It is 3.<|end|>'] * 2

    for scheduler, lrs in [("linear", [0.0, 1e-3, 2e-3 / 3, 1e-3 / 3]), ("constant", [0.0, 1e-3, 1e-3, 1e-3])]:
        out = f"saves/tiny/lora/{scheduler}"
        result = run(app, ["train-stage1", "train.yaml", "--set", f"train.lr_scheduler={scheduler}",
                           "--set", f"train.output_dir={out}", "--set", "train.dataset=saves/tiny/lora/sft-data"])
        assert result.exit_code == 0, result.output
        log = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in log] == pytest.approx(lrs)
