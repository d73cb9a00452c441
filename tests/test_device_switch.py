"""The device-dependent tests take their device from one switch: `--device`, else `$FLUID_TEST_DEVICE`, else the
CPU, resolved by the package's own device rule (`fluid_cli.hf.resolve_device`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE_VARIABLE, chosen_device

TESTS = Path(__file__).resolve().parent
NO_CUDA = not torch.cuda.is_available()


def test_the_option_wins_over_the_variable_and_the_cpu_is_the_default():
    assert chosen_device(None, {}) == torch.device("cpu")
    assert chosen_device(None, {DEVICE_VARIABLE: "cpu"}) == torch.device("cpu")
    assert chosen_device("cpu", {DEVICE_VARIABLE: "cuda"}) == torch.device("cpu")  # the variable is not even read


@pytest.mark.skipif(not NO_CUDA, reason="the refusal needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line():
    with pytest.raises(pytest.UsageError, match=r"test device 'cuda' \(--device or \$FLUID_TEST_DEVICE\): device "
                                                r"cuda: no CUDA device is available"):
        chosen_device(None, {DEVICE_VARIABLE: "cuda"})
    with pytest.raises(pytest.UsageError, match="test device 'cuda:1'"):
        chosen_device("cuda:1", {})


def pytest_run(*args: str, device: str) -> subprocess.CompletedProcess:
    env = {**os.environ, DEVICE_VARIABLE: device, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=TESTS.parent,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_the_variable_moves_the_device_dependent_tests(name):
    """The whole path from the environment: the suite reports the device, and a device-dependent test (the
    decoder stack against the model's own forward) runs on it, or the run stops with one line before any test."""
    done = pytest_run(str(TESTS / "test_modeling.py"), "-k", "own_logits and llama", device=name)
    if name == "cuda" and NO_CUDA:
        assert done.returncode == 4  # pytest's usage error
        assert "ERROR: test device 'cuda' (--device or $FLUID_TEST_DEVICE): device cuda: no CUDA device is " \
               "available" in done.stderr and "Traceback" not in done.stderr
        return
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"fluid test device: {name}" in done.stdout and "1 passed" in done.stdout
