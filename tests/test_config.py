"""Recipes: typed loading, one-line errors through the CLI, overrides, and every shipped recipe."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fluid_cli import __version__
from fluid_cli.cli import app
from fluid_cli.config import RESOLVED_CONFIG_NAME, Recipe, load_recipe, load_recipe_text
from fluid_cli.errors import FluidError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
runner = CliRunner()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    assert isinstance(load_recipe(path), Recipe)


def test_types_defaults_and_overrides():
    cfg = load_recipe_text(
        "[fluid]\nmax_k = 8\n[train]\nlr = 1\n[[data.sources]]\npath = 'a.jsonl'\nformat = 'alpaca'\n",
        overrides=["train.lr=3e-4", "lora.target_modules=['q_proj','v_proj']", "model.path=some/model",
                   'generate.stop=["\\n\\n"]'],
    )
    assert cfg.fluid.max_k == 8 and cfg.fluid.p_anchor == 0.5
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.path == "some/model"  # not TOML -> taken as a string
    assert cfg.generate.stop == ["\n\n"]
    assert cfg.data.sources[0].format == "alpaca"


def test_resolved_recipe_round_trips(tmp_path):
    cfg = load_recipe_text("[train]\nmax_steps = 7\n[model.scratch]\nhidden_size = 64\n")
    path = cfg.save(tmp_path)
    assert path.name == RESOLVED_CONFIG_NAME
    again = load_recipe(path)
    assert again.train.max_steps == 7 and again.model.scratch.hidden_size == 64
    assert again.source == str(path) and cfg.source is None
    assert dataclasses.replace(again, source=None) == cfg  # every value survives the round trip


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[train]\nlr = 1e-4\nlrr = 2\n", "bad.toml:3: [train] lrr: unknown key"),
        ("[train]\nlr = 'fast'\n", "bad.toml:2: [train] lr: expected a float, got 'fast'"),
        ("[lora]\nenabled = 1\n", "bad.toml:2: [lora] enabled: expected true or false, got 1"),
        ("[generate]\nhorizon = 'widest'\n", "[generate] horizon: expected one of 'auto', 'cost', 'khead', 'fixed', 'entropy', got 'widest'"),
        ("[[data.sources]]\nformat = 'text'\n", "bad.toml:1: [data] sources[0]: set path (a file, folder or hub "
                                                 "dataset) or dataset (a registered name)"),
        ("[[data.sources]]\ndataset = 'alpaca'\n", "bad.toml:2: [data] sources[0] dataset: needs [data] dataset_dir"),
        ("[nope]\nx = 1\n", "bad.toml:1: [nope]: unknown key"),
        ("[train\n", "bad.toml: invalid TOML"),
    ],
)
def test_bad_recipes_give_one_line_errors(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = runner.invoke(app, ["recipe", str(path)])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert expected.replace("bad.toml", str(path)) in message


def test_missing_recipe_and_bad_override(tmp_path):
    result = runner.invoke(app, ["recipe", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2 and "recipe file not found" in result.stderr
    path = tmp_path / "ok.toml"
    path.write_text("")
    result = runner.invoke(app, ["recipe", str(path), "--set", "train.lr"])
    assert result.exit_code == 2 and "expected KEY.PATH=VALUE" in result.stderr
    result = runner.invoke(app, ["recipe", str(path), "--set", "train.nope=1"])
    assert result.exit_code == 2 and "[train] nope: unknown key" in result.stderr


def test_recipe_command_prints_resolved_toml(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nmax_steps = 3\n")
    result = runner.invoke(app, ["recipe", str(path), "--set", "fluid.max_k=4"])
    assert result.exit_code == 0
    cfg = load_recipe_text(result.stdout)
    assert cfg.train.max_steps == 3 and cfg.fluid.max_k == 4


def test_version_and_module_entry():
    assert runner.invoke(app, ["--version"]).stdout.startswith("fluid ")
    module = subprocess.run([sys.executable, "-m", "fluid_cli", "--version"], capture_output=True, text=True,
                            check=False)
    assert module.returncode == 0 and module.stdout == f"fluid {__version__}\n"
    with pytest.raises(FluidError):
        load_recipe_text("[fluid]\nmax_k = 'x'\n")
