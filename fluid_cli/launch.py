"""Re-executing a command under `accelerate launch`, so that `fluid train-stage1 recipe.toml` is all a user types.

A run with one process and no accelerate config file runs in the current process. With `[launch]
num_processes > 1`, or an accelerate config file (`[launch] accelerate_config` or `--accelerate-config FILE`), the
command re-executes itself as `python -m accelerate.commands.launch [launch args] -m fluid_cli <command> ...`;
the children see the `FLUID_LAUNCHED` marker (or the variables `accelerate launch`/torchrun set) and run the
work themselves. Running `accelerate launch -m fluid_cli train-stage1 recipe.toml` by hand works the same way.

    >>> from fluid_cli.config import LaunchConfig
    >>> cmd = launch_command(LaunchConfig(num_processes=2, main_process_port=29555), None, ["train-stage1", "r.toml"])
    >>> " ".join(cmd[1:])  # doctest: +NORMALIZE_WHITESPACE
    '-m accelerate.commands.launch --num_machines 1 --mixed_precision no --dynamo_backend no --multi_gpu
     --num_processes 2 --main_process_port 29555 -m fluid_cli train-stage1 r.toml'
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fluid_cli.config import LaunchConfig
from fluid_cli.errors import FluidError, first_line

MARKER = "FLUID_LAUNCHED"
# Set by `accelerate launch` (every launcher) or torchrun in the processes they start.
_LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "LOCAL_RANK")


def inside_launcher() -> bool:
    """True in a process started by `accelerate launch` (by `fluid` or by hand)."""
    return any(name in os.environ for name in (MARKER, *_LAUNCHER_VARIABLES))


def config_file(launch: LaunchConfig, override: Path | None) -> Path | None:
    """The accelerate config file to launch with: `--accelerate-config` wins over `[launch] accelerate_config`."""
    path = override if override is not None else launch.accelerate_config
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        where = "--accelerate-config" if override is not None else "[launch] accelerate_config"
        raise FluidError(f"{where}: {path} not found")
    return path


def check_fits_machine(path: Path) -> None:
    """An FSDP config needs GPUs. On a machine without one, accelerate (1.16) refuses `fsdp_sync_module_states`
    (the shipped config's) in every process, with a traceback each, and without it trains the processes as plain
    data parallelism (`MULTI_CPU`), never sharded, although torch's FSDP itself runs on CPUs: say so first."""
    import torch
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        kind = str(load_config_from_file(str(path)).distributed_type).split(".")[-1]
    except Exception as e:  # noqa: BLE001 - YAML, JSON and accelerate's own checks raise many types
        raise FluidError(f"{path}: not a readable accelerate config ({first_line(e)})") from None
    if kind == "FSDP" and not torch.cuda.is_available():
        raise FluidError(f"{path}: FSDP runs on GPUs only (accelerate does not shard on a CPU), and this machine has "
                         "none; for several CPU processes use recipes/accelerate/multi_gpu_ddp.yaml or [launch] "
                         "num_processes")


def needs_launch(launch: LaunchConfig, override: Path | None) -> bool:
    """Whether this invocation must re-execute under `accelerate launch`."""
    if inside_launcher():
        return False
    if launch.num_processes < 1:
        raise FluidError(f"[launch] num_processes: expected at least 1, got {launch.num_processes}")
    path = config_file(launch, override)
    if path is not None:
        check_fits_machine(path)
    return launch.num_processes > 1 or path is not None


def launch_command(launch: LaunchConfig, override: Path | None, fluid_args: list[str]) -> list[str]:
    """The `accelerate launch` command line that runs `fluid <fluid_args>` in every process.

    Without a config file, several processes mean torchrun-style data parallelism (accelerate's `--multi_gpu`,
    which on a machine without GPUs runs the processes on CPU with gloo).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    path = config_file(launch, override)
    if path is not None:
        cmd += ["--config_file", str(path)]
    else:
        # Spelled out so that accelerate does not warn about defaults; precision comes from the recipe itself.
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if launch.num_processes > 1:
            cmd += ["--multi_gpu"]
    if launch.num_processes > 1:
        cmd += ["--num_processes", str(launch.num_processes)]
    if launch.main_process_port is not None:
        cmd += ["--main_process_port", str(launch.main_process_port)]
    return cmd + ["-m", "fluid_cli", *fluid_args]


def relaunch(launch: LaunchConfig, override: Path | None, fluid_args: list[str]) -> int:
    """Run `fluid <fluid_args>` under `accelerate launch` and return its exit status."""
    cmd = launch_command(launch, override, fluid_args)
    return subprocess.run(cmd, env={**os.environ, MARKER: "1"}).returncode
