"""Functions the task YAMLs in this folder (and `fluid eval`'s local-data overrides) refer to with `!function`.

lm-eval loads this file by path from the YAMLs next to it, and by module name (`fluid_cli.tasks.utils`) from the
override YAMLs `fluid eval` writes, so it keeps no state.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets

# Seconds one HumanEval program may run (its own tests included) before it counts as failed.
EXEC_TIMEOUT_S = 10.0


def load_subject(data_files: dict[str, str], subject: str, **_metadata: Any) -> datasets.DatasetDict:
    """`custom_dataset` for a task reading one subject of a multi-subject JSONL file (MMLU's `subject` column).

    lm-eval calls it with the task's metadata and `dataset_kwargs` as keyword arguments; only the files and the
    subject matter here. Every split is filtered the same way, so few-shot examples (MMLU's `dev` split) come
    from the same subject, as with the per-subject hub configs.
    """
    data = datasets.load_dataset("json", data_files=data_files)
    return data.filter(lambda row: row["subject"] == subject)


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The full program per sample: the prompt (signature and docstring) followed by the completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1) -> dict[str, float]:
    """pass@k of `predictions[i]` (candidate programs) against the test code `references[i]`, like HF `code_eval`.

    Uses the unbiased estimator `1 - C(n-c, k) / C(n, k)` for n candidates of which c pass. Each program runs
    in a fresh `python -I` subprocess in a temporary folder with a timeout; it only runs when
    HF_ALLOW_CODE_EVAL=1 (the variable HF `code_eval` checks too).
    """
    if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        raise PermissionError(
            "HumanEval runs model-written code: allow it with `fluid eval --allow-code-execution` "
            "(or set HF_ALLOW_CODE_EVAL=1 with `lm_eval --confirm_run_unsafe_code`)"
        )
    ks = [k] if isinstance(k, int) else list(k)
    scores = {f"pass@{kk}": 0.0 for kk in ks}
    for test, candidates in zip(references, predictions):
        n = len(candidates)
        c = sum(run_program(program + "\n" + test + "\n") for program in candidates)
        for kk in ks:
            if n >= kk:
                scores[f"pass@{kk}"] += 1.0 - math.comb(n - c, kk) / math.comb(n, kk)
    return {name: total / max(len(references), 1) for name, total in scores.items()}


def run_program(source: str, timeout_s: float = EXEC_TIMEOUT_S) -> bool:
    """True when `source` runs to completion (exit status 0) within `timeout_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="fluid-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        try:
            done = subprocess.run(
                [sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, timeout=timeout_s, check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0
