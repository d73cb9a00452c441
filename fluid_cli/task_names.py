"""The task names of `fluid eval`: fluid's own, and a quick check of any other before lm-eval is loaded.

Resolving a name that is not one of fluid's (`FLUID_TASKS`) takes an index of all of lm-eval's ~15,000 task
files, about 20 seconds after lm-eval's own import. A name that appears nowhere in the text of those files
cannot be a task, group or tag, and that takes half a second to see (`check_task_names`), before anything heavy
is imported. A name that does appear is resolved exactly by `fluid_cli.evaluate`.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from pathlib import Path

from fluid_cli.errors import FluidError

PACKAGE_TASKS = Path(__file__).parent / "tasks"
# lm-eval's task folder, found without importing lm-eval (which imports torch, datasets and more)
LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"

# fluid's task names -> (the task it runs, the folder whose YAMLs define it). Only that folder is indexed for a
# known name.
FLUID_TASKS: dict[str, tuple[str, Path]] = {
    "gsm8k": ("gsm8k", LM_EVAL_TASKS / "gsm8k"),
    "gsm8k_cot": ("gsm8k_cot", LM_EVAL_TASKS / "gsm8k"),
    # hendrycks_math500, not minerva_math500: minerva's scorer needs math_verify and antlr4 4.11 (lm-eval[math]).
    "math500": ("hendrycks_math500", LM_EVAL_TASKS / "hendrycks_math"),
    "mmlu": ("mmlu", LM_EVAL_TASKS / "mmlu" / "default"),
    "humaneval": ("humaneval", PACKAGE_TASKS),
    "arithmetic": ("arithmetic", PACKAGE_TASKS),
}

# A name a task file declares (`task: x`, `group: x`, `tag: x`): for suggestions only.
DECLARED = re.compile(rb"\b(?:task|group|tag):[ \t]*[\"']?([\w.\-]+)")


def unknown_task(name: str, known: list[str]) -> FluidError:
    """The one-line error for a task name that is not one, with the closest of `known`."""
    close = difflib.get_close_matches(name, list(dict.fromkeys([*FLUID_TASKS, *known])), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return FluidError(f"unknown task {name!r}: fluid knows {', '.join(FLUID_TASKS)}, and any lm-eval task, group or "
                      f"tag (list them with `lm_eval ls tasks`){hint}")


def check_task_names(names: list[str]) -> None:
    """Refuse a name found in no task file's text (the files lm-eval indexes: every file but code and docs).

    >>> check_task_names(["gsm8k", "hellaswag"])
    >>> check_task_names(["gsm8kk"])
    Traceback (most recent call last):
    fluid_cli.errors.FluidError: unknown task 'gsm8kk': fluid knows gsm8k, gsm8k_cot, math500, mmlu, humaneval, \
arithmetic, and any lm-eval task, group or tag (list them with `lm_eval ls tasks`); did you mean gsm8k, gsm8k_cot?
    """
    for name in names:
        if name not in FLUID_TASKS and name.encode() not in _task_text():
            raise unknown_task(name, sorted({m.decode() for m in DECLARED.findall(_task_text())}))


@functools.cache
def _task_text() -> bytes:
    files = (p for root in (LM_EVAL_TASKS, PACKAGE_TASKS) for p in sorted(root.rglob("*"))
             if p.is_file() and p.suffix not in (".py", ".pyc", ".md"))
    return b"\n".join(p.read_bytes() for p in files)
