"""`recipes/stories260k.toml`, cut down (few rows, few steps), through every step of the command line: on the real
stories260K when ../shared has it, and unchanged on another model of its size given only `--set model.path` and
`--set data.cutoff_len` (a random one here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_lora import sharp_base
from typer.testing import CliRunner

from fluid_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "stories260k.toml"
STORIES = REPO.parent / "shared" / "models" / "stories260K"
runner = CliRunner()


def steps(tmp_path: Path, *model: str) -> dict:
    """Every step of the recipe with small overrides; returns the bench report."""
    out = tmp_path / "runs"
    small = [*model, "--set", f"data.output_dir={out / 'data'}", "--set", "data.sources[0].num_samples=24",
             "--set", "data.regenerate.max_new_tokens=24", "--set", "data.regenerate.batch_size=8",
             "--set", f"train.output_dir={out / 'stage1'}", "--set", "train.max_steps=6", "--set", "train.batch_size=4",
             "--set", "khead.steps=20", "--set", "khead.max_examples=16", "--set", f"bench.output={out / 'bench.json'}"]

    def fluid(*args: str) -> str:
        result = runner.invoke(app, [*args, str(RECIPE), *small])
        assert result.exit_code == 0, result.output
        return result.stdout

    fluid("prepare-data")
    fluid("train-stage1")
    fluid("calibrate-khead")
    generated = json.loads(fluid("generate", "-p", "Once upon a time", "--max-new-tokens", "12", "--compare-base",
                                 "--json"))
    assert generated["exact_to"] == "base" and generated["results"][0]["match_base"]
    fluid("bench", "decode", "--limit", "2", "--max-new-tokens", "12")
    return json.loads((out / "bench.json").read_text())


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs the real model at {STORIES}")
def test_the_recipe_runs_end_to_end_on_stories260k(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names its model and prompt file relative to the checkout
    report = steps(tmp_path)
    runs = {r["decoder"]: r for r in report["runs"]}
    assert set(runs) == {"hf", "prompt-lookup", "ar", "fluid"} and runs["fluid"]["same_as_hf"] == 2


@pytest.mark.slow
def test_the_recipe_runs_unchanged_on_another_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    other = sharp_base(tmp_path / "other")  # random weights, 256 positions
    report = steps(tmp_path, "--set", f"model.path={other}", "--set", "data.cutoff_len=128")
    assert all(r["same_as_hf"] == 2 for r in report["runs"])
