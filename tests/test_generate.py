"""`fluid generate` and `fluid bench decode`: end to end through the CLI, against HF greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_decode import sharp_model
from tiny import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from fluid_cli.cli import app
from fluid_cli.folder import load_model, save_model
from fluid_cli.generate import BLOCK_STYLES, BlockStreamer
from fluid_cli.hf import eos_token_ids
from fluid_cli.model import FluidModel
from fluid_cli.prompts import encode_prompt

runner = CliRunner()




@pytest.fixture(scope="module")
def fluid_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fluid")
    save_model(sharp_model("llama", max_k=8), folder)
    return folder


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain")
    tiny_model("llama", seed=3).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def fluid(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def greedy(model: FluidModel, ids: list[int], n: int) -> list[int]:
    return lm_greedy(model.lm, ids, n, list(eos_token_ids(model.tokenizer, model.lm)))


def lm_greedy(lm, ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def generate_json(*args: str, input: str | None = None) -> dict:
    result = fluid("generate", *args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_generate_equals_hf_greedy_and_ar(fluid_dir):
    out = generate_json("--model", fluid_dir, "-p", "hello", "-p", "2+3=", "--max-new-tokens", "30",
                        "--horizon", "khead", "--threshold", "0.5", "--compare-ar")
    model = load_model(fluid_dir)
    assert out["settings"]["horizon"] == "khead" and out["settings"]["threshold"] == 0.5
    for prompt, row in zip(["hello", "2+3="], out["results"]):
        ids = encode_prompt(model.tokenizer, prompt, chat_template=True)
        assert row["prompt_tokens"] == len(ids)
        assert row["tokens"] == greedy(model, ids, 30)
        assert row["text"] == model.tokenizer.decode(row["tokens"], skip_special_tokens=True)
        assert row["match_ar"] and row["ar"]["tokens"] == row["tokens"]
        assert row["stats"]["forwards"] >= row["stats"]["draft_forwards"] + row["stats"]["verify_forwards"]


def test_streamed_text_is_the_generated_text(fluid_dir):
    args = ("--model", fluid_dir, "-p", "hello", "--max-new-tokens", "30", "--threshold", "0.5")
    result = fluid("generate", *args)
    assert result.exit_code == 0, result.output
    text = generate_json(*args)["results"][0]["text"]
    assert result.stdout == text + "\n"
    assert "FLUID decoding" in result.stderr  # the stats table


def test_block_streamer_shades_blocks_alternately():
    tok = tiny_tokenizer()
    console = Console(record=True, width=200, force_terminal=True)
    stream = BlockStreamer(tok, console)
    blocks = [tok("Once ")["input_ids"], tok("upon a")["input_ids"], [tok.eos_token_id], tok(" time")["input_ids"]]
    for block in blocks:
        stream(block)
    assert stream.text.plain == "Once upon a time"  # the special EOS token is not shown
    spans = [(stream.text.plain[s.start:s.end], s.style) for s in stream.text.spans if s.end > s.start]
    assert spans == [("Once ", BLOCK_STYLES[0]), ("upon a", BLOCK_STYLES[1]), (" time", BLOCK_STYLES[1])]
    assert console.export_text() == "Once upon a time"


def test_recipe_table_with_flags_on_top(fluid_dir, tmp_path):
    recipe = tmp_path / "gen.toml"
    recipe.write_text(f'[generate]\nmodel_dir = "{fluid_dir}"\nhorizon = "fixed"\nmax_new_tokens = 5\n'
                      'threshold = 0.7\n')
    out = generate_json(recipe, "-p", "hi", "--max-new-tokens", "7", "--no-verify", "--max-k", "4")
    assert out["settings"] | {"stop": None} == {"horizon": "fixed", "tau": None, "threshold": 0.7, "max_k": 4,
                                                "min_k": 1, "verify": False, "max_new_tokens": 7,
                                                "batch_size": 1, "compile": False, "chat_template": True,
                                                "stop": None, "dtype": "auto", "temperature": None,
                                                "top_p": 1.0, "top_k": 0, "seed": None}
    assert out["results"][0]["stats"]["verify_forwards"] == 0


def test_prompt_sources_and_chat_template(fluid_dir, tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("hello\n\nabc\n")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"question": "hello"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "abc"}]}) + "\n")
    base = ("--model", fluid_dir, "--max-new-tokens", "6")
    from_lines = generate_json(*base, "--prompt-file", lines)["results"]
    from_jsonl = generate_json(*base, "--prompt-file", rows)["results"]
    from_stdin = generate_json(*base, input="hello\n")["results"]
    assert [r["tokens"] for r in from_lines] == [r["tokens"] for r in from_jsonl]
    assert from_stdin[0]["tokens"] == from_lines[0]["tokens"]
    raw = generate_json(*base, "-p", "hello", "--no-chat-template")["results"][0]
    assert raw["prompt_tokens"] == len(tiny_tokenizer()("hello")["input_ids"]) < from_lines[0]["prompt_tokens"]


def test_stop_string_ends_the_generation(fluid_dir):
    base = ("--model", fluid_dir, "-p", "hello", "--max-new-tokens", "40", "--threshold", "0.5")
    text = generate_json(*base)["results"][0]["text"]
    stop = text[len(text) // 2:][:2]
    row = generate_json(*base, "--stop", stop, "--stop", "never seen")["results"][0]
    assert row["text"] == text[: text.index(stop) + len(stop)]
    assert row["stats"]["stop_reason"] == "stop"


@pytest.mark.parametrize("horizon", ["cost", "fixed", "entropy"])
def test_plain_model_with_a_headless_horizon(plain_dir, horizon):
    out = generate_json("--model", plain_dir, "-p", "hello", "--horizon", horizon, "--max-k", "4",
                        "--max-new-tokens", "20", "--compare-base")
    tok = tiny_tokenizer()
    reference = lm_greedy(tiny_model("llama", seed=3), encode_prompt(tok, "hello", True), 20, [tok.eos_token_id])
    row = out["results"][0]
    assert row["tokens"] == reference == row["base"]["tokens"] and row["match_base"]
    assert out["exact_to"] == "base" and row["stats"]["policy"] == horizon


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{plain}", "-p", "hi", "--horizon", "khead"], "a plain transformers model has no K-head"),
        (["--model", "{fluid}", "-p", "hi", "--tau", "0"], "--tau 0: [generate] tau: must be greater than 0"),
        (["--model", "{fluid}", "-p", "hi", "--horizon", "fixed", "--tau", "2.8"], "does not use tau"),
        (["--model", "{fluid}", "-p", "hi", "--batch-size", "0"], "--batch-size 0: [generate] batch_size: must be at least 1"),
        (["--model", "{fluid}", "-p", "hi", "--compare-base"], "no original model to compare with"),
        (["--model", "{plain}", "-p", "hi", "--horizon", "fixed", "--mask-token", "<nope>"], "mask_token '<nope>': not a token"),
        (["--model", "{empty}", "-p", "hi"], "not a FLUID model folder"),
        (["--model", "{fluid}", "-p", " "], "prompt 1 is empty"),
        (["--model", "{fluid}", "-p", "hi", "--max-k", "9"], "max_k = 9: must be between 1 and the model's K = 8"),
        (["--model", "{fluid}", "-p", "x" * 300], "does not fit the model's context of 256 positions"),
        (["--model", "{fluid}", "--prompt-file", "{empty}/missing.txt"], "prompt file not found"),
        (["--model", "{fluid}", "-p", "hi", "--threshold", "2"], "--threshold 2: [generate] threshold: must be in [0, 1]"),
    ],
)
def test_bad_input_is_one_clear_line(fluid_dir, plain_dir, tmp_path, args, message):
    paths = {"fluid": fluid_dir, "plain": plain_dir, "empty": tmp_path}
    result = fluid("generate", *(a.format(**paths) for a in args))
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output


def test_bench_decode_reports_every_decoder_and_batch_size(fluid_dir, tmp_path):
    report_path = tmp_path / "bench.json"
    args = ("bench", "decode", "--model", fluid_dir, "-p", "hello", "-p", "2+3=", "-p", "abc", "--limit", "3",
            "--max-new-tokens", "16", "--batch-size", "1,2", "--decoders", "hf,hf-static,prompt-lookup,ar,fluid",
            "--output", report_path)
    result = fluid(*args)
    assert result.exit_code == 0, result.output
    assert "decoding benchmark" in result.stderr
    report = json.loads(report_path.read_text())
    assert report["prompts"] == 3 and report["device"] == "cpu" and report["exact_to"] == "adapted"
    runs = {(r["decoder"], r["batch_size"]): r for r in report["runs"]}
    assert set(runs) == {(d, 1) for d in ("hf", "hf-static", "prompt-lookup", "ar", "fluid")} | {
        (d, 2) for d in ("hf", "hf-static", "ar", "fluid")}  # prompt lookup runs at batch size 1 only
    hf, ar, fl = runs["hf", 1], runs["ar", 1], runs["fluid", 1]
    assert hf["tokens"] == ar["tokens"] == fl["tokens"] == 48
    assert hf["forwards"] == ar["forwards"] == hf["tokens"]  # greedy: one forward per token, counted alike
    for key in (("ar", 1), ("fluid", 1), ("ar", 2), ("fluid", 2), ("prompt-lookup", 1), ("hf-static", 1)):
        assert runs[key]["same_as_hf"] == 3, key
    assert runs["fluid", 2]["forwards"] < fl["forwards"]  # two rows share each forward
    assert fl["forwards_per_token"] == pytest.approx(fl["forwards"] / fl["tokens"])
    again = fluid(*args)
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.stderr
