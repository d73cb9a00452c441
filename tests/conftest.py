"""Suite-wide settings, and the one place that decides the device of the device-dependent tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import pytest
import torch

from fluid_cli.errors import FluidError
from fluid_cli.hf import resolve_device

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine extra threads slow them badly.
torch.set_num_threads(1)

# The decoder caches measured forward costs under FLUID_CACHE_DIR; tests keep theirs out of the home folder.
os.environ.setdefault("FLUID_CACHE_DIR", tempfile.mkdtemp(prefix="fluid-test-cache-"))

DEVICE_VARIABLE = "FLUID_TEST_DEVICE"


def chosen_device(option: str | None, environ: Mapping[str, str] = os.environ) -> torch.device:
    """The test device: `--device`, else `$FLUID_TEST_DEVICE`, else the CPU; through the package's own device rule
    (`fluid_cli.hf.resolve_device`), so a device the machine lacks is refused the way `--device` refuses it."""
    name = option or environ.get(DEVICE_VARIABLE) or "cpu"
    try:
        return resolve_device(name)
    except (FluidError, RuntimeError) as e:  # RuntimeError: torch's own, for a name it cannot parse
        raise pytest.UsageError(f"test device {name!r} (--device or ${DEVICE_VARIABLE}): {e}") from None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=None,
                     help=f"device of the device-dependent tests (decode exactness, batching, compilation, the "
                          f"draft-only gate, Stage I logits against decoding): cpu (default), cuda, cuda:1; "
                          f"overrides ${DEVICE_VARIABLE}")


def pytest_configure(config: pytest.Config) -> None:
    config.fluid_device = chosen_device(config.getoption("--device"))


def pytest_report_header(config: pytest.Config) -> str:
    device = config.fluid_device
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"fluid test device: {device}{name}"


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """Where the device-dependent tests put their models and inputs."""
    return pytestconfig.fluid_device
