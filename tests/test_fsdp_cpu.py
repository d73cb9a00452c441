"""Accelerate configs the launcher cannot use are one line before any process starts: the shipped FSDP config on
a machine without a GPU (accelerate shards only on GPUs; on CPUs it refuses the config's sync_module_states, and
without it trains unsharded data parallelism), and a file accelerate cannot read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fluid_cli import launch
from fluid_cli.cli import app
from fluid_cli.errors import FluidError
from tiny import TINY_SCRATCH_RECIPE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs FSDP")
def test_fsdp_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    for name in (launch.MARKER, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "data").mkdir()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TINY_SCRATCH_RECIPE + f'[train]\ndataset = "{tmp_path / "data"}"\n'
                                            f'output_dir = "{tmp_path / "out"}"\n')
    fsdp = REPO / "recipes" / "accelerate" / "fsdp.yaml"
    result = CliRunner().invoke(app, ["train-stage1", str(recipe), "--accelerate-config", str(fsdp)])
    assert result.exit_code == 2
    assert f"{fsdp}: FSDP runs on GPUs only" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    # the DDP config is not refused: it runs as CPU processes (tests/test_train.py)
    launch.check_fits_machine(REPO / "recipes" / "accelerate" / "multi_gpu_ddp.yaml")


def test_an_unreadable_accelerate_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: [unclosed\n")
    with pytest.raises(FluidError, match=f"{bad}: not a readable accelerate config"):
        launch.check_fits_machine(bad)
