"""`fluid prepare-data`: every format, label masking checked token by token, mixtures, cutoffs, determinism, and
every bad input of the issue (through the CLI)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.render import GSM8K_PROMPT, GSM8K_RESPONSE
from fluid_cli.layout import IGNORE
from fluid_cli.synthetic import arithmetic_rows
from fluid_cli.tokenizer import build_char_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
GSM8K_TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"
STORIES = SHARED / "models" / "stories260K"

# A ChatML-like template: a newline after the role header and after the end-of-turn token, a default system turn.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|>be brief<|end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You add."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "4, since 2+2=4."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers and booleans are valid TOML as JSON


def write_recipe(folder: Path, sources: list[dict], model: str = "[model.scratch]", **data) -> Path:
    lines = [model, "[data]"] + [f"{k} = {toml_value(v)}" for k, v in ({"output_dir": "out"} | data).items()]
    for src in sources:
        lines.append("[[data.sources]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in src.items()]
    path = folder / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(recipe: Path, *args: str, ok: bool = True):
    result = CliRunner().invoke(app, ["prepare-data", str(recipe), *args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def load(folder: Path = Path("out")) -> tuple[datasets.DatasetDict, dict]:
    return datasets.load_from_disk(str(folder)), json.loads((folder / "stats.json").read_text())


def saved_tokenizer(folder: Path, chat_template: str | None) -> Path:
    tok = build_char_tokenizer()
    tok.chat_template = chat_template
    tok.save_pretrained(folder)
    return folder


def trained_text(tok, example: dict) -> str:
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE])


def expected_labels_by_chars(tok, ids: list[int], text: str, messages: list[dict]) -> list[int]:
    """Labels derived independently of prepare-data: find each assistant reply in the rendered text (its content
    and the end-of-turn token after it) and label the tokens whose characters fall inside (char tokenizer: one
    token per character or special token)."""
    spans, start = [], 0
    for m in messages:
        if m["role"] == "assistant":
            at = text.index(m["content"] + "<|end|>", start)
            spans.append((at, at + len(m["content"] + "<|end|>")))
            start = spans[-1][1]
    labels, pos = [], 0
    for token_id, piece in zip(ids, tok.convert_ids_to_tokens(ids)):
        labels.append(token_id if any(a <= pos < b for a, b in spans) else IGNORE)
        pos += len(piece)
    assert pos == len(text)
    return labels


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("template", [None, CHATML])
def test_messages_multi_turn_trains_exactly_the_assistant_turns(tmp_path, template):
    model = "[model.scratch]"
    if template:  # the built-in template has no newlines; CHATML has them around every turn boundary
        model = f'[model]\ntokenizer = "{saved_tokenizer(tmp_path / "tok", template)}"'
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    prepare(write_recipe(tmp_path, [{"path": "chat.jsonl"}], model=model))
    ds, stats = load()
    tok = AutoTokenizer.from_pretrained("out/tokenizer")
    assert len(ds["train"]) == 2 and set(ds["train"].column_names) == {"input_ids", "labels"}
    for example in ds["train"]:
        messages = CONVERSATION if len(example["input_ids"]) > 40 else CONVERSATION[1:3]
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert example["input_ids"] == ids  # exactly the template's tokens
        assert example["labels"] == expected_labels_by_chars(tok, ids, text, messages)
    assert stats["tokens"]["trainable"] == sum(sum(x != IGNORE for x in ex["labels"]) for ex in ds["train"])


def test_template_kwargs_reach_the_chat_template(tmp_path):
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['role'] == 'assistant' and not think %}"
                "{{ '<think></think>' }}{% endif %}{{ m['content'] + '<|end|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    model = f'[model]\ntokenizer = "{saved_tokenizer(tmp_path / "tok", template)}"'
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}])
    prepare(write_recipe(tmp_path, [{"path": "chat.jsonl"}], model=model, template_kwargs={"think": False}))
    example = load()[0]["train"][0]
    tok = build_char_tokenizer()
    assert tok.decode(example["input_ids"]) == "<|user|>1+1?<|end|><|assistant|><think></think>2<|end|>"
    assert trained_text(tok, example) == "<think></think>2<|end|>"  # what the model writes after the prompt


def test_sharegpt_equals_the_same_conversation_as_messages(tmp_path):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION}])
    write_jsonl(tmp_path / "b.jsonl", [{"dialog": sharegpt}])
    prepare(write_recipe(tmp_path, [{"path": "a.jsonl"}], output_dir="a"))
    prepare(write_recipe(tmp_path, [{"path": "b.jsonl", "format": "sharegpt", "columns": {"conversations": "dialog"}}],
                         output_dir="b"))
    assert load(Path("a"))[0]["train"][0] == load(Path("b"))[0]["train"][0]


def test_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    write_jsonl(tmp_path / "alpaca.jsonl", rows)
    prepare(write_recipe(tmp_path, [{"path": "alpaca.jsonl", "format": "alpaca",
                                     "prompt_format": "### {prompt}\n", "response_format": "> {output}"}],
                         template="none"))
    ds, _ = load()
    tok = build_char_tokenizer()
    texts = sorted(tok.decode(ex["input_ids"]) for ex in ds["train"])
    assert texts == ["### Add.\n\n2 3\n> 5<|end|>", "### Say hi.\n> hi<|end|>"]
    assert sorted(trained_text(tok, ex) for ex in ds["train"]) == ["> 5<|end|>", "> hi<|end|>"]


def test_prompt_response_column_map_and_gsm8k_layout(tmp_path):
    rows = [{"q": "What is 2+3?", "a": "2+3=5\n#### 5", "id": 7}]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    prepare(write_recipe(tmp_path, [{"path": "qa.jsonl", "format": "prompt_response",
                                     "columns": {"prompt": "q", "response": "a"},
                                     "prompt_format": "[{id}] Question: {q}\nAnswer:",
                                     "response_format": " {response}"}],
                         template="none"))
    example = load()[0]["train"][0]
    tok = build_char_tokenizer()
    prompt, response = "[7] Question: What is 2+3?\nAnswer:", " 2+3=5\n#### 5<|end|>"
    assert example["input_ids"] == tok(prompt + response)["input_ids"]
    n_prompt = len(tok(prompt)["input_ids"])
    assert example["labels"] == [IGNORE] * n_prompt + example["input_ids"][n_prompt:]
    assert example["labels"][-1] == tok.eos_token_id  # the model learns to stop


def test_system_column_becomes_the_system_turn(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"sys": "Be short.", "prompt": "p", "response": "r"}])
    prepare(write_recipe(tmp_path, [{"path": "s.jsonl", "format": "prompt_response", "columns": {"system": "sys"}}]))
    example = load()[0]["train"][0]
    tok = build_char_tokenizer()
    assert tok.decode(example["input_ids"]) == "<|system|>Be short.<|end|><|user|>p<|end|><|assistant|>r<|end|>"
    assert trained_text(tok, example) == "r<|end|>"


def test_text_trains_every_token_and_is_never_templated(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"body": "once upon a time"}])
    prepare(write_recipe(tmp_path, [{"path": "t.jsonl", "format": "text", "columns": {"text": "body"}}]))
    example = load()[0]["train"][0]
    assert example["input_ids"] == build_char_tokenizer()("once upon a time<|end|>")["input_ids"]
    assert example["labels"] == example["input_ids"]


def test_parquet_csv_glob_and_saved_dataset_sources(tmp_path):
    import pandas as pd

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    pd.DataFrame(rows[:2]).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(rows[2:4]).to_csv(tmp_path / "b.csv", index=False)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "x1.jsonl", rows[:1])
    write_jsonl(tmp_path / "parts" / "x2.jsonl", rows[1:2])
    (tmp_path / "array.json").write_text(json.dumps(rows[2:3], indent=1))
    paths = ("a.parquet", "b.csv", "saved", "parts/x*.jsonl", "array.json")
    prepare(write_recipe(tmp_path, [{"path": p, "format": "prompt_response"} for p in paths], template="none"))
    ds, stats = load()
    tok = build_char_tokenizer()
    assert sorted(tok.decode(ex["input_ids"]) for ex in ds["train"]) == sorted(
        f"p{i}r{i}<|end|>" for i in (0, 1, 2, 3, 4, 5, 0, 1, 2))
    assert [s["rows_read"] for s in stats["sources"]] == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("template", ["none", "auto"])
def test_synthetic_source_defaults(tmp_path, template):
    prepare(write_recipe(tmp_path, [{"path": "synthetic:arithmetic", "num_samples": 30}], template=template))
    ds, stats = load()
    tok = build_char_tokenizer()
    rows = arithmetic_rows(30, seed=0)
    if template == "none":  # lm-eval's gsm8k layout, EOS after the answer
        expected = {GSM8K_PROMPT.format(**r) + GSM8K_RESPONSE.format(**r) + "<|end|>" for r in rows}
        replies = {GSM8K_RESPONSE.format(**r) + "<|end|>" for r in rows}
    else:
        expected = {f"<|user|>{r['question']}<|end|><|assistant|>{r['answer']}<|end|>" for r in rows}
        replies = {f"{r['answer']}<|end|>" for r in rows}
    assert {tok.decode(ex["input_ids"]) for ex in ds["train"]} == expected
    assert {trained_text(tok, ex) for ex in ds["train"]} == replies
    assert stats["sources"][0]["format"] == "prompt_response"


@pytest.mark.shared
@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="needs ../shared/data/gsm8k/train.jsonl")
def test_real_gsm8k_train_file(tmp_path):
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()]
    prepare(write_recipe(tmp_path, [{"path": str(GSM8K_TRAIN), "format": "prompt_response",
                                     "columns": {"prompt": "question", "response": "answer"},
                                     "prompt_format": GSM8K_PROMPT, "response_format": GSM8K_RESPONSE}],
                         template="none", cutoff_len=4096, validation=500, num_proc=2))
    ds, stats = load()
    # Char tokenizer: one token per character, plus the EOS token.
    prompt_chars = sum(len(GSM8K_PROMPT.format(**r)) for r in rows)
    response_chars = sum(len(GSM8K_RESPONSE.format(**r)) + 1 for r in rows)
    assert len(rows) == 7473
    assert stats["examples_in"] == 7473 and stats["examples_out"] == {"train": 6973, "validation": 500}
    assert sum(stats["dropped"].values()) == 0 and stats["truncated"] == 0
    assert stats["tokens"] == {"total": prompt_chars + response_chars, "trainable": response_chars}
    tok = build_char_tokenizer()  # token by token: every example is one row of the file, its answer trained
    by_ids = {}
    for r in rows:
        prompt = tok(GSM8K_PROMPT.format(**r))["input_ids"]
        full = tok(GSM8K_PROMPT.format(**r) + GSM8K_RESPONSE.format(**r) + tok.eos_token)["input_ids"]
        by_ids[tuple(full)] = [IGNORE] * len(prompt) + full[len(prompt):]
    examples = [ex for split in ds.values() for ex in split]
    assert all(by_ids[tuple(ex["input_ids"])] == ex["labels"] for ex in examples)
    assert len({tuple(ex["input_ids"]) for ex in examples}) == len(by_ids)


@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_bpe_tokenizer_labels_follow_the_whole_text_tokenization(tmp_path):
    """With merges, tokens are those of the whole text (BOS included), and a token merging across the
    prompt/response boundary belongs to the response."""
    tok = AutoTokenizer.from_pretrained(STORIES)
    rows = [{"prompt": "Once upon a time", "response": " there was a cat."}, {"prompt": "The do", "response": "g ran."}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    prepare(write_recipe(tmp_path, [{"path": "r.jsonl", "format": "prompt_response"}],
                         model=f'[model]\npath = "{STORIES}"', template="none"))
    by_len = sorted(load()[0]["train"], key=lambda ex: len(ex["input_ids"]))
    for row, example in zip(sorted(rows, key=lambda r: len(tok(r["prompt"] + r["response"])["input_ids"])), by_len):
        full = tok(row["prompt"] + row["response"] + tok.eos_token)["input_ids"]
        prompt = tok(row["prompt"])["input_ids"]
        common = next(i for i, (a, b) in enumerate(zip(full, prompt + [None])) if a != b)
        assert example["input_ids"] == full and full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id
        assert example["labels"] == [IGNORE] * common + full[common:]


@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_bpe_tokenizer_with_a_chat_template_trains_each_assistant_turn(tmp_path):
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.chat_template = CHATML  # its turn markers are plain text to this tokenizer: BPE merges run across them
    tok.save_pretrained(tmp_path / "tok")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    prepare(write_recipe(tmp_path, [{"path": "chat.jsonl"}], model=f'[model]\ntokenizer = "{tmp_path / "tok"}"'))
    example = load()[0]["train"][0]
    assert example["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    runs, run = [], []
    for token_id, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE, token_id)
        if label != IGNORE:
            run.append(token_id)
        elif run:
            runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs + [run] if r] == [m["content"] + "<|end|>" for m in CONVERSATION
                                                          if m["role"] == "assistant"]


# --------------------------------------------------------------------------------------------- mixing, cutting, output


def test_num_samples_weights_and_stats_balance(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "response": "x"} for i in range(40)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "response": "y"} for i in range(10)])
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"c{i}", "response": "z"} for i in range(3)])
    sources = [{"path": "a.jsonl", "format": "prompt_response", "weight": 1.0},
               {"path": "b.jsonl", "format": "prompt_response", "weight": 0.5},
               {"path": "c.jsonl", "format": "prompt_response", "num_samples": 7}]
    prepare(write_recipe(tmp_path, sources, template="none", validation=0.25))
    ds, stats = load()
    assert [s["rows_used"] for s in stats["sources"]] == [20, 10, 7]  # b is used up at half of a's share
    tok = build_char_tokenizer()
    prompts = [re.match(r"[abc]\d+", tok.decode(ex["input_ids"])).group(0) for split in ds.values() for ex in split]
    assert len({p for p in prompts if p[0] in "ab"}) == 30  # weighted sources never repeat a row
    repeats = Counter(p for p in prompts if p[0] == "c")  # 7 rows of 3: every row twice, one a third time
    assert set(repeats) == {"c0", "c1", "c2"} and sorted(repeats.values()) == [2, 2, 3]
    assert stats["examples_out"] == {"train": 28, "validation": 9}
    assert stats["examples_in"] == sum(stats["examples_out"].values()) + sum(stats["dropped"].values())


def test_cutoff_truncates_and_drops_with_reasons(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 100}]},
        {"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "late"}]},
        {"messages": [{"role": "user", "content": "nobody answers"}]},
    ]
    write_jsonl(tmp_path / "c.jsonl", rows)
    prepare(write_recipe(tmp_path, [{"path": "c.jsonl"}], cutoff_len=40))
    ds, stats = load()
    assert stats["examples_out"] == {"train": 2}
    assert stats["dropped"] == {"bad_row": 0, "no_trainable_tokens": 1, "trainable_part_cut": 1}
    assert stats["truncated"] == 1
    full = build_char_tokenizer().apply_chat_template(rows[0]["messages"], tokenize=True)["input_ids"]
    assert sorted(len(ex["input_ids"]) for ex in ds["train"]) == [len(full), 40]
    assert stats["length"]["histogram"]["counts"][-1] == 1 and sum(stats["length"]["histogram"]["counts"]) == 2


def test_same_recipe_gives_byte_identical_output(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3)
    recipe = write_recipe(tmp_path, [{"path": "synthetic:arithmetic", "num_samples": 300},
                                     {"path": "chat.jsonl", "num_samples": 20}],
                          validation=0.1, num_proc=2, seed=5)

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to("out")): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path("out").rglob("*")) if p.is_file()}

    prepare(recipe)
    first = snapshot()
    prepare(recipe, "--overwrite")
    assert snapshot() == first
    assert "validation/data-00000-of-00001.arrow" in first and "tokenizer/tokenizer.json" in first
    prepare(recipe, "--overwrite", "--set", "data.seed=6")
    assert snapshot()["train/data-00000-of-00001.arrow"] != first["train/data-00000-of-00001.arrow"]


def test_output_folder_contents(tmp_path):
    prepare(write_recipe(tmp_path, [{"path": "synthetic:arithmetic", "num_samples": 10}], template="none"))
    assert (Path("out") / "fluid-config.toml").read_text().count("synthetic:arithmetic") == 1
    tok = AutoTokenizer.from_pretrained("out/tokenizer")
    assert tok.get_vocab() == build_char_tokenizer().get_vocab()
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".out")]  # no temporary folders left


def test_a_large_source_stays_in_arrow(tmp_path, monkeypatch):
    """20,000 JSONL rows are prepared without ever being a Python list: no whole-dataset conversion to or from
    Python runs, and rows reach Python only one `datasets` batch at a time (while they are tokenized)."""
    from datasets.formatting.formatting import PythonArrowExtractor

    n = 20_000
    write_jsonl(tmp_path / "big.jsonl", [{"id": i, "prompt": f"What is {i} + 1?", "response": f" {i + 1}"}
                                         for i in range(n)])

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"Dataset.{name} materialises a whole dataset in Python")
        return method

    rows_to_python = []  # the size of every Arrow table that datasets turns into Python objects

    def spy_on(name):
        original = getattr(PythonArrowExtractor, name)

        def spy(self, pa_table):
            rows_to_python.append(pa_table.num_rows)
            return original(self, pa_table)
        return spy

    with monkeypatch.context() as patch:
        for name in ("to_list", "to_dict", "to_pandas", "to_polars", "from_list", "from_dict", "from_pandas"):
            patch.setattr(datasets.Dataset, name, refuse(name))
        for name in ("extract_row", "extract_column", "extract_batch"):
            patch.setattr(PythonArrowExtractor, name, spy_on(name))
        prepare(write_recipe(tmp_path, [{"path": "big.jsonl", "format": "prompt_response"}], template="none",
                             validation=100))
    assert sum(rows_to_python) >= n  # every row was tokenized in Python ...
    assert max(rows_to_python) <= 1000  # ... a batch at a time
    ds, stats = load()
    assert stats["examples_in"] == n and stats["examples_out"] == {"train": n - 100, "validation": 100}
    tok = build_char_tokenizer()
    assert sorted(tok.decode(ex["input_ids"]) for split in ds.values() for ex in split) == sorted(
        f"What is {i} + 1? {i + 1}<|end|>" for i in range(n))


# --------------------------------------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "respo\n')
    result = prepare(write_recipe(tmp_path, [{"path": "bad.jsonl", "format": "prompt_response"}]), ok=False)
    assert "bad.jsonl:3: malformed JSON" in error_line(result)
    assert not Path("out").exists()
    (tmp_path / "bad.json").write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": }\n]\n')
    result = prepare(write_recipe(tmp_path, [{"path": "bad.json", "format": "prompt_response"}]), ok=False)
    assert "bad.json:3: malformed JSON" in error_line(result)


@pytest.mark.parametrize("lead", ["", "\n  "], ids=["at-start", "after-whitespace"])
def test_a_bad_row_of_a_json_array_is_named_by_its_index(tmp_path, lead):
    """Arrow reads the array; the bad row is named `file[k]`, however the file begins."""
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]
    (tmp_path / "arr.json").write_text(lead + json.dumps(rows, indent=1))
    result = prepare(write_recipe(tmp_path, [{"path": "arr.json", "format": "prompt_response"}]), ok=False)
    assert "arr.json[1]: " in error_line(result)


def test_missing_column_lists_the_columns(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    result = prepare(write_recipe(tmp_path, [{"path": "qa.jsonl", "format": "prompt_response"}]), ok=False)
    line = error_line(result)
    assert "qa.jsonl:1: column 'prompt' (prompt) not found" in line and "question, answer" in line


def test_unknown_format_names_the_accepted_ones(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "t"}])
    line = error_line(prepare(write_recipe(tmp_path, [{"path": "x.jsonl", "format": "chatml"}]), ok=False))
    assert "recipe.toml:" in line and "format" in line
    assert all(name in line for name in ("'messages'", "'sharegpt'", "'alpaca'", "'prompt_response'", "'text'"))


def test_tokenizer_without_chat_template_says_how_to_choose_none(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    model = f'[model]\ntokenizer = "{saved_tokenizer(tmp_path / "plain", None)}"'
    line = error_line(prepare(write_recipe(tmp_path, [{"path": "chat.jsonl"}], model=model), ok=False))
    assert "no chat template" in line and 'template = "none"' in line
    prepare(write_recipe(tmp_path, [{"path": "chat.jsonl"}], model=model, template="none"))  # the way out works


def test_skip_bad_rows_skips_and_counts(tmp_path):
    good = {"messages": CONVERSATION[1:3]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user"}]}), "[1, 2]",
             json.dumps({"chat": []}), json.dumps(good)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path, [{"path": "mixed.jsonl"}])
    assert "mixed.jsonl:2: malformed JSON" in error_line(prepare(recipe, ok=False))  # stops at the first bad row
    recipe = write_recipe(tmp_path, [{"path": "mixed.jsonl"}], skip_bad_rows=True)
    prepare(recipe)
    ds, stats = load()
    assert len(ds["train"]) == 2 and stats["dropped"]["bad_row"] == 4 and stats["sources"][0]["bad_rows"] == 4
    assert [m.split(":")[1] for m in stats["bad_row_examples"]] == ["2", "4", "3", "5"]  # read errors, then rows
    assert "needs 'role' and 'content'" in stats["bad_row_examples"][2]


def test_existing_output_is_refused_kept_or_replaced_atomically(tmp_path):
    write_jsonl(tmp_path / "v1.jsonl", [{"text": "first"}])
    recipe = write_recipe(tmp_path, [{"path": "v1.jsonl", "format": "text"}])
    prepare(recipe)
    before = (Path("out") / "train" / "data-00000-of-00001.arrow").read_bytes()

    assert "pass --overwrite" in error_line(prepare(recipe, ok=False))
    (tmp_path / "v1.jsonl").write_text('{"text": "second"}\n{"text": \n')  # a failing run must not touch "out"
    assert "v1.jsonl:2" in error_line(prepare(recipe, "--overwrite", ok=False))
    assert (Path("out") / "train" / "data-00000-of-00001.arrow").read_bytes() == before

    write_jsonl(tmp_path / "v1.jsonl", [{"text": "second"}])
    prepare(recipe, "--overwrite")
    assert build_char_tokenizer().decode(load()[0]["train"][0]["input_ids"]) == "second<|end|>"
    assert sorted(p.name for p in Path(".").iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("source, data, message", [
    ({"path": "missing.jsonl"}, {}, "missing.jsonl: file not found"),
    ({"path": "nothing/*.jsonl"}, {}, "no files match"),
    ({"path": "synthetic:algebra", "num_samples": 3}, {}, "unknown synthetic source"),
    ({"path": "synthetic:arithmetic"}, {}, "needs num_samples"),
    ({"path": "x.jsonl", "format": "alpaca", "columns": {"prompt": "q"}}, {}, "unknown role 'prompt'"),
    ({"path": "x.jsonl", "weight": 1.0, "num_samples": 3}, {}, "weight or num_samples, not both"),
    ({"path": "x.jsonl", "prompt_format": "{prompt}"}, {}, "single-turn formats"),
    ({"path": "x.jsonl", "format": "prompt_response", "prompt_format": "{}"}, {}, "named fields"),
    ({"path": "x.jsonl"}, {"template_kwargs": {"tokenize": True}}, "sets tokenize itself"),
    ({"path": "x.jsonl"}, {"validation": 5.0}, "leaves none to train on"),
    ({"path": "x.jsonl", "format": "prompt_response", "prompt_format": "{title}"}, {}, "use {title}, but the row has"),
    ({"path": "x.jsonl", "format": "prompt_response", "columns": {"system": "s"}}, {"template": "none"},
     "has no system turn"),
    ({"path": "x.jsonl", "format": "prompt_response", "weight": 1.0}, {"num_proc": 0}, "num_proc: must be"),
])
def test_other_bad_settings_are_one_line_errors(tmp_path, source, data, message):
    write_jsonl(tmp_path / "x.jsonl", [{"messages": CONVERSATION[1:3], "prompt": "p", "response": "r"}])
    assert message in error_line(prepare(write_recipe(tmp_path, [source], **data), ok=False))
