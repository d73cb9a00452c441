"""Version-sensitive calls into transformers and lm-eval, wrapped in one place.

transformers 5.x changes APIs between minor versions, and lm-eval's task index and YAML loader are private
modules; the tested ranges are pinned in pyproject.toml and every such call lives here.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.nn import Module


def lm_eval_task_index() -> tuple[Any, Any, Any, Any]:
    """lm-eval's task index (`Entry`, `Kind`, `TaskIndex`) and YAML loader (`load_yaml`): private modules of
    lm-eval 0.4.12 and later, used to resolve task names without indexing all of lm-eval's task files."""
    try:
        from lm_eval.tasks._index import Entry, Kind, TaskIndex
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as e:  # a release outside the tested range moved them
        from fluid_cli.errors import FluidError

        raise FluidError(f"this lm-eval release has no task index where fluid expects it ({e}); install the tested "
                         "range: pip install 'lm-eval>=0.4.12,<0.5'") from None
    return Entry, Kind, TaskIndex, load_yaml


def cache_kwarg(decoder: Module) -> str:
    """The keyword under which `decoder.forward` takes its KV cache.

    transformers renamed `past_key_values` to `cache` (the old name still works from 5.2x on, with a
    deprecation warning on every model class), so the name is read off the signature.
    """
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around peft's `PeftModel` construction: peft (0.21) reads `model.is_gradient_checkpointing`, which
    transformers 5.x deprecated with a FutureWarning printed on every load; nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
