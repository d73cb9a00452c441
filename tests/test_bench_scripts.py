"""The benchmark scripts run end to end on tiny shapes (CI has no GPU; the numbers they print are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(*args: str) -> str:
    # PYTHONPATH kept: a checkout run with its own code first on the path benches that code, not an installed one
    keep = {name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, check=False,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", **keep})
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


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_check(tmp_path):
    """The GPU acceptance script's smoke run (what a CPU runs): every check has its rows, float32 decoding is
    identical to HF greedy everywhere, and each bf16 difference starts at a near-tie of the reference's logits."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs the full checks (minutes); CI runs the smoke on a CPU")
    out = tmp_path / "gpu-check.json"
    text = run(str(BENCH / "gpu_check.py"), "--smoke", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["smoke"] and not any(r.get("failed") for r in rows) and "GPU check on cpu" in text
    exact = [r for r in rows if r["check"] == "exactness"]
    assert {(r["dtype"], r["batch"], r["compiled"], r["adapter"]) for r in exact} >= {
        ("fp32", 1, False, False), ("fp32", 8, False, True), ("bf16", 8, True, False), ("bf16", 8, True, True)}
    assert all(r["identical"] == r["prompts"] == 8 for r in exact if r["dtype"] == "fp32")
    for r in exact:
        assert len(r["margins"]) == r["prompts"] - r["identical"] and all(0 <= m < 0.5 for m in r["margins"])
    stage1 = [r for r in rows if r["check"] == "stage1"]
    assert stage1[0]["summary"]["steps"] == 3 and stage1[0]["summary"]["steps_per_s"] > 0
    assert stage1[1]["skipped"] and "not implemented" in stage1[1]["notes"]
    assert [(r["batch"], r["k"]) for r in rows if r["check"] == "decode"] == [(1, 4), (8, 4)]
    assert [r["result"] for r in rows if r["check"] == "ddp"] == ["skipped"]


@pytest.mark.slow
def test_gpu_check_two_process_branch_runs_on_cpu(tmp_path, monkeypatch):
    """The DDP check, which runs only where there are two GPUs, through its own code on two CPU processes (the
    launcher trains on CPU with gloo where there is no GPU)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    [row] = gpu_check.check_ddp(gpu_check.SMOKE, torch.device("cpu"), tmp_path, lambda line: None)
    assert not row.get("failed"), row["notes"]
    assert row["summary"]["world_size"] == 2 and row["summary"]["ranks_agree"] and "steps/s" in row["result"]
