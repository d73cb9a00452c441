"""The benchmark scripts run end to end on tiny shapes (CI has no GPU; the numbers they print are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_decode_step_bench_runs_on_a_tiny_shape(tmp_path):
    out = tmp_path / "steps.json"
    text = run(str(BENCH / "decode_step.py"), "--shapes", "tiny", "--batch", "1,2", "--k", "4", "--context", "32",
               "--steps", "8", "--no-compile", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["k"]) for r in rows] == [(1, 4), (2, 4)]
    assert all(r["greedy_ms"] > 0 and r["fluid_ms"] > 0 for r in rows) and "ratio" in text


@pytest.mark.slow
def test_lora_gate_bench_runs():
    text = run(str(BENCH / "lora_gate.py"), "--reps", "3", "--prefix", "16")
    assert "gated/merged" in text and "verify+draft" in text
