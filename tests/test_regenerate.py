"""Self-distillation in prepare-data: rows become the model's own greedy continuations, token ids kept; sampled
prompts from the model itself; an interrupted run resumes to the same bytes; bad input is one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pytest
import torch
from test_lora import sharp_base
from tiny import tiny_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from fluid_cli import data, regenerate
from fluid_cli.cli import app
from fluid_cli.config import load_recipe_text
from fluid_cli.hf import generate_batch

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
runner = CliRunner()


def recipe(root: Path, model: Path, *, sources: str, regen: str = "", extra: str = "") -> str:
    return f"""
[model]
path = "{model}"
{sources}
[data]
output_dir = "{root / 'out'}"
template = "none"
cutoff_len = 64
{extra}
[data.regenerate]
max_new_tokens = 24
batch_size = 4
{regen}
"""


def rows_file(root: Path, n: int = 10) -> str:
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}: abc=", "response": "4321."}) + "\n" for i in range(n)))
    return f'[[data.sources]]\npath = "{path}"\nformat = "prompt_response"\n'


def prepared(root: Path) -> list[dict]:
    ds = datasets.load_from_disk(str(root / "out"))["train"]
    return [dict(r) for r in ds]


def folder_digest(folder: Path) -> str:
    """Every file's bytes but the resolved recipe's (which names the output folder)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "fluid-config.toml"):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_rows_become_the_models_greedy_continuations(tmp_path):
    base = sharp_base(tmp_path / "base")
    text = recipe(tmp_path, base, sources=rows_file(tmp_path))
    stats = data.run(load_recipe_text(text))
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    eos = (tok.eos_token_id,)
    rows = prepared(tmp_path)
    assert len(rows) == 10 and stats["regenerate"]["examples"] == 10
    for row in rows:
        prompt = [t for t, label in zip(row["input_ids"], row["labels"]) if label == -100]
        continuation = row["input_ids"][len(prompt):]
        assert row["labels"][len(prompt):] == continuation  # only the continuation is trained
        assert tok.decode(prompt).startswith("q") and tok.decode(prompt).endswith(": abc=")
        # transformers' own generate(do_sample=False) of the base model, one prompt at a time
        assert continuation == generate_batch(lm, [prompt], 24, eos)[0][: 64 - len(prompt)]
    assert stats["regenerate"]["tokens"] == sum(len(r["input_ids"]) - r["labels"].count(-100) for r in rows)
    assert stats["regenerate"]["ended_at_eos"] + stats["regenerate"]["ended_at_limit"] == 10
    assert not list(tmp_path.glob(".out.regen-*"))  # the chunk cache is gone once the output is complete


def alternating_model(folder: Path) -> tuple[Path, list[int]]:
    """A model whose greedy text is "abab..." as the ids of "a" and "b", while its tokenizer would encode that text
    as "ab" tokens: decoding the continuation and encoding it again changes the ids."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "ab": 5, "=": 6, "q": 7}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tok("abab", add_special_tokens=False)["input_ids"] == [5, 5]
    lm = tiny_model("llama", tok, seed=0)
    with torch.no_grad():
        for name, p in lm.named_parameters():  # every layer adds nothing: the last hidden state is the input's
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = torch.eye(len(vocab), lm.config.hidden_size) * 8
        lm.get_input_embeddings().weight.copy_(emb)
        head = torch.zeros(len(vocab), lm.config.hidden_size)
        head[4, 3] = head[3, 4] = head[3, 6] = 10.0  # after "a" comes "b", after "b" or "=" comes "a"
        lm.config.tie_word_embeddings = False
        lm.set_output_embeddings(torch.nn.Linear(lm.config.hidden_size, len(vocab), bias=False))
        lm.lm_head.weight.copy_(head)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, [3, 4]


def test_generated_ids_are_kept_not_re_encoded(tmp_path):
    model, (a, b) = alternating_model(tmp_path / "ab")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "q=", "response": "ab"}) + "\n")
    data.run(load_recipe_text(recipe(tmp_path, model, extra="validation = 0",
                                     sources=f'[[data.sources]]\npath = "{path}"\nformat = "prompt_response"\n')))
    (row,) = prepared(tmp_path)
    tok = AutoTokenizer.from_pretrained(model)
    continuation = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert continuation[:6] == [a, b, a, b, a, b]  # the model's own tokens
    assert tok(tok.decode(continuation), add_special_tokens=False)["input_ids"] != continuation  # re-encoding differs


def test_self_source_samples_prompts_from_bos_and_continues_them_greedily(tmp_path):
    base = sharp_base(tmp_path / "base")
    text = recipe(tmp_path, base, sources='[[data.sources]]\npath = "self"\nnum_samples = 6\nprefix_tokens = [2, 5]\n'
                                          'prefix_temperature = 1.5\n')
    stats = data.run(load_recipe_text(text))
    rows = prepared(tmp_path)
    tok = AutoTokenizer.from_pretrained(base)
    assert len(rows) == 6 and stats["regenerate"]["self_prompts"] == 6
    assert stats["sources"] == [{"path": "self", "format": "sampled prompts", "rows_read": 0, "rows_used": 6,
                                 "bad_rows": 0}]
    prompts = [[t for t, label in zip(r["input_ids"], r["labels"]) if label == -100] for r in rows]
    assert all(p[0] == tok.bos_token_id and 2 <= len(p) - 1 <= 5 for p in prompts)
    assert len({tuple(p) for p in prompts}) > 1  # sampled: a diversity of prompts
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for row, prompt in zip(rows, prompts):  # the prompts are sampled, their continuations greedy
        assert row["input_ids"][len(prompt):] == generate_batch(lm, [prompt], 24, (tok.eos_token_id,))[0]


def test_hotter_prefixes_are_other_prompts(tmp_path):
    base = sharp_base(tmp_path / "base")
    prompts = {}
    for t in (1.0, 3.0):
        root = tmp_path / str(t)
        self_source = f'[[data.sources]]\npath = "self"\nnum_samples = 8\nprefix_temperature = {t}\n'
        data.run(load_recipe_text(recipe(root, base, sources=self_source)))
        prompts[t] = [tuple(t for t, label in zip(r["input_ids"], r["labels"]) if label == -100)
                      for r in prepared(root)]
    assert prompts[1.0] != prompts[3.0]


def test_chat_rows_continue_after_the_templates_generation_prompt(tmp_path):
    base = sharp_base(tmp_path / "base")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    text = recipe(tmp_path, base, sources=f'[[data.sources]]\npath = "{path}"\nformat = "messages"\n')
    data.run(load_recipe_text(text.replace('template = "none"', 'template = "auto"')))
    (row,) = prepared(tmp_path)
    tok = AutoTokenizer.from_pretrained(base)
    prompt = [t for t, label in zip(row["input_ids"], row["labels"]) if label == -100]
    assert tok.decode(prompt) == "<|user|>hi<|end|><|assistant|>"  # the template's own generation prompt
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert row["input_ids"][len(prompt):] == generate_batch(lm, [prompt], 24, (tok.eos_token_id,))[0]


def test_interrupted_regeneration_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    base = sharp_base(tmp_path / "base")
    text = recipe(tmp_path, base, sources=rows_file(tmp_path, 14))
    data.run(load_recipe_text(text))
    whole = folder_digest(tmp_path / "out")

    (tmp_path / "second").mkdir()
    second = text.replace(str(tmp_path / "out"), str(tmp_path / "second" / "out"))
    original, calls = regenerate._chunk, []

    def dies_after_two(n, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill after two chunks were written
        calls.append(n)
        return original(n, *args)

    monkeypatch.setattr(regenerate, "_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        data.run(load_recipe_text(second))
    assert not (tmp_path / "second" / "out").exists()
    assert len(list((tmp_path / "second").glob(".out.regen-*/chunk-*.json"))) == 2
    monkeypatch.setattr(regenerate, "_chunk", lambda n, *args: (calls.append(n), original(n, *args))[1])
    data.run(load_recipe_text(second))
    assert calls == [0, 1, 2, 3]  # 14 rows in chunks of 4: the two cached chunks were not generated again
    assert folder_digest(tmp_path / "second" / "out") == whole


@pytest.mark.slow
def test_processes_generate_the_same_rows(tmp_path):
    base = sharp_base(tmp_path / "base")
    data.run(load_recipe_text(recipe(tmp_path, base, sources=rows_file(tmp_path, 9), regen="num_proc = 2")))
    parallel = prepared(tmp_path)
    text = recipe(tmp_path / "one", base, sources=rows_file(tmp_path, 9))
    data.run(load_recipe_text(text))
    assert prepared(tmp_path / "one") == parallel


def test_sampling_is_seeded(tmp_path):
    base = sharp_base(tmp_path / "base")
    runs = []
    for n, seed in ((1, 0), (2, 0), (3, 1)):
        root = tmp_path / str(n)
        data.run(load_recipe_text(recipe(root, base, sources=rows_file(tmp_path, 6),
                                         regen=f'mode = "sample"\ntemperature = 1.5\nseed = {seed}')))
        runs.append(prepared(root))
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("case, message", [
    ("no weights", "no weights (model.safetensors or pytorch_model.bin)"),
    ("context", "cutoff_len = 512: longer than the context of the model that regenerates (256 positions)"),
    ("self without regenerate", "add a [data.regenerate] table"),
    ("self with weight", "a \"self\" source needs num_samples"),
    ("prefix", "prefix_tokens: expected [min, max]"),
    ("prefix on data", "prefix_temperature: applies to prompts sampled from the model"),
])
def test_bad_input_is_one_line(tmp_path, case, message):
    base = sharp_base(tmp_path / "base")
    sources, extra = rows_file(tmp_path), ""
    if case == "no weights":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text((base / "config.json").read_text())
        extra = f'[data.regenerate]\nmodel = "{tmp_path / "empty"}"\n'
    elif case == "context":
        long = tmp_path / "long.jsonl"
        long.write_text(json.dumps({"prompt": "x" * 300, "response": "y"}) + "\n")
        sources = f'[[data.sources]]\npath = "{long}"\nformat = "prompt_response"\n'
    elif case.startswith("self"):
        sources = '[[data.sources]]\npath = "self"\n' + ("num_samples = 3\n" if "without" in case else "weight = 1.0\n")
    elif case == "prefix on data":
        sources = rows_file(tmp_path) + "prefix_temperature = 1.5\n"
    else:
        sources = '[[data.sources]]\npath = "self"\nnum_samples = 3\nprefix_tokens = [5, 2]\n'
    text = recipe(tmp_path, base, sources=sources)
    if case == "context":
        text = text.replace("cutoff_len = 64", "cutoff_len = 512")
    if case == "self without regenerate":
        text = text[: text.index("[data.regenerate]")]
    if extra:
        text = text.replace("[data.regenerate]\n", extra, 1)
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    result = runner.invoke(app, ["prepare-data", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_stories260k_regenerated_rows_are_its_greedy_continuations(tmp_path):
    path = tmp_path / "rows.jsonl"
    starts = ["Once upon a time", "Tom saw a big dog", "Lily wanted to play", "The sun was hot and"]
    path.write_text("".join(json.dumps({"prompt": s, "response": " ..."}) + "\n" for s in starts))
    data.run(load_recipe_text(recipe(tmp_path, STORIES, sources=f'[[data.sources]]\npath = "{path}"\n'
                                                                 'format = "prompt_response"\n')))
    lm = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    for row in prepared(tmp_path):
        prompt = [t for t, label in zip(row["input_ids"], row["labels"]) if label == -100]
        continuation = row["input_ids"][len(prompt):]
        assert continuation == generate_batch(lm, [prompt], 24, (tok.eos_token_id,))[0]
