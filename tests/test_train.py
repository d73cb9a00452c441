"""`fluid train-stage1`: end-to-end training, resume equivalence, two processes, bad input, a real model."""

from __future__ import annotations

import doctest
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from typer.testing import CliRunner

from fluid_cli import launch, train
from fluid_cli.cli import app
from fluid_cli.config import load_recipe, load_recipe_text
from fluid_cli.folder import META_NAME, load_model
from fluid_cli.synthetic import arithmetic_rows
from fluid_cli.tokenizer import build_char_tokenizer
from tiny import TINY_SCRATCH_RECIPE, tiny_model, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
REPO = Path(__file__).resolve().parents[1]


def recipe(tmp_path: Path, body: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def write_dataset(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """A prepared dataset as `prepare-data` writes it (char tokenizer; prompt masked, answer trained)."""
    tok = tiny_tokenizer()
    rows = {"input_ids": [], "labels": []}
    for r in arithmetic_rows(n, seed=seed):
        prompt = tok(r["question"] + "\n")["input_ids"][:60]
        answer = tok(r["answer"].splitlines()[-1])["input_ids"] + [tok.eos_token_id]
        rows["input_ids"].append(prompt + answer)
        rows["labels"].append([-100] * len(prompt) + answer)
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(folder))
    return folder


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / train.METRICS_NAME).read_text().splitlines()]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("module", [train, launch], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_each_process_reads_its_own_rows_and_epochs_reshuffle():
    data = Dataset.from_dict({"input_ids": [[i] for i in range(10)], "labels": [[i] for i in range(10)]})
    sched = train.Schedule.of(10, batch_size=2, grad_accum=1, world=2, max_steps=None, epochs=2, warmup_ratio=0)
    assert sched.micro_per_epoch == 2 and sched.total_steps == 4  # 10 rows // (2 x 2): 2 rows dropped per epoch

    def ids(rank: int, start: int = 0, n: int = 4) -> list[list[int]]:
        stream = train.micro_batches(data, sched, start, 2, rank, 2, seed=0)
        return [[r["input_ids"][0] for r in next(stream)] for _ in range(n)]

    r0, r1 = ids(0), ids(1)
    for epoch in (0, 1):  # within an epoch, the ranks' rows are disjoint
        seen = sum(r0[2 * epoch:2 * epoch + 2] + r1[2 * epoch:2 * epoch + 2], [])
        assert len(set(seen)) == 8
    assert r0[:2] != r0[2:]  # a new permutation per epoch
    assert ids(0, start=3, n=1) == r0[3:]  # resuming mid-stream reads the same rows


def test_launcher_runs_only_when_asked(monkeypatch):
    for name in (launch.MARKER, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_recipe_text("")
    assert not launch.needs_launch(cfg.launch, None)
    cfg.launch.num_processes = 2
    assert launch.needs_launch(cfg.launch, None)
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside `accelerate launch`: never again
    assert not launch.needs_launch(cfg.launch, None)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    cfg = load_recipe(path)
    assert cfg.fluid.mask_token and (cfg.model.path or cfg.model.scratch)


def test_shipped_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type).split(".")[-1]
             for p in (REPO / "recipes" / "accelerate").glob("*.yaml")}
    assert kinds == {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(tmp_path):
    no_data = recipe(tmp_path, TINY_SCRATCH_RECIPE + f'[train]\ndataset = "{tmp_path / "absent"}"\n', "a.toml")
    data = write_dataset(tmp_path / "data", n=8)
    weightless = tmp_path / "weightless"
    tiny_model("llama").config.save_pretrained(weightless)  # config.json, no weights
    tiny_tokenizer().save_pretrained(weightless)
    no_weights = recipe(tmp_path, f'[model]\npath = "{weightless}"\n[train]\ndataset = "{data}"\n'
                                  f'output_dir = "{tmp_path / "o1"}"\n', "b.toml")
    no_mask = recipe(tmp_path, TINY_SCRATCH_RECIPE + f'[fluid]\nmask_token = "<|nope|>"\nadd_mask_token = false\n'
                               f'[train]\ndataset = "{data}"\noutput_dir = "{tmp_path / "o2"}"\n', "c.toml")
    pretrained = tmp_path / "pretrained"
    tiny_model("llama").save_pretrained(pretrained)
    tiny_tokenizer().save_pretrained(pretrained)
    other_data = write_dataset(tmp_path / "other", n=8)
    build_char_tokenizer("0123456789+-=").save_pretrained(other_data / "tokenizer")  # not the model's tokenizer
    wrong_tokenizer = recipe(tmp_path, f'[model]\npath = "{pretrained}"\n[train]\ndataset = "{other_data}"\n'
                                       f'output_dir = "{tmp_path / "o3"}"\n', "d.toml")
    expected = {
        no_data: "dataset folder",
        wrong_tokenizer: "tokenized with a different tokenizer",
        no_weights: "no weights (model.safetensors or pytorch_model.bin)",
        no_mask: "'<|nope|>' is not in the tokenizer's vocabulary",
    }
    for path, message in expected.items():
        result = invoke("train-stage1", str(path))
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not any((tmp_path / o / META_NAME).exists() for o in ("o1", "o2", "o3"))


# --------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_end_to_end_tiny_training_lowers_loss_diff_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path, TINY_SCRATCH_RECIPE + """
[[data.sources]]
path = "synthetic:arithmetic"
num_samples = 96
[data]
output_dir = "data"
cutoff_len = 320
[fluid]
max_k = 4
[train]
output_dir = "out"
lr = 5e-3
batch_size = 4
max_steps = 24
save_steps = 8
save_total_limit = 2
log_steps = 4
""")
    assert invoke("prepare-data", str(path)).exit_code == 0
    result = invoke("train-stage1", str(path))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    log = metrics(out)
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    assert log[-1]["loss_diff"] < log[0]["loss_diff"] - 0.5
    assert all(r["tokens_per_s"] > 0 and r["expanded_tokens_per_s"] > r["tokens_per_s"] for r in log)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000016", "step-00000024"]
    summary = json.loads((out / train.SUMMARY_NAME).read_text())
    assert summary["steps"] == 24 and summary["ranks_agree"] and summary["peak_rss_mb"] > 0

    model = load_model(out)
    assert model.meta.weights == "full" and model.max_k == 4 and model.meta.base_model is None
    assert model.tokenizer.convert_ids_to_tokens(model.mask_token_id) == "<|mask|>"
    saved = load_file(out / "model.safetensors")
    for name, tensor in model.lm.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name])
    # The directory is complete: a second run into it must be asked for explicitly.
    again = invoke("train-stage1", str(path))
    assert again.exit_code == 2 and "holds a finished run" in again.output


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_the_uninterrupted_run(tmp_path):
    base = tmp_path / "base"
    tok = tiny_tokenizer()
    tiny_model("llama", tok, hidden=32).save_pretrained(base)
    tok.save_pretrained(base)
    data = write_dataset(tmp_path / "data", n=40)
    out = tmp_path / "out"
    path = recipe(tmp_path, f"""
[model]
path = "{base}"
[fluid]
mask_token = "<|new_mask|>"  # not in the vocabulary: added, embeddings resized, its row trained
max_k = 3
[lora]
r = 4
alpha = 8
dropout = 0.1  # dropout masks come from the torch RNG, which the checkpoint must restore
[train]
dataset = "{data}"
output_dir = "{out}"
lr = 1e-2
batch_size = 4
grad_accum = 2
max_steps = 6
save_steps = 3
save_total_limit = 2
log_steps = 1
""")
    train.run(load_recipe(path))
    straight = metrics(out)
    adapter = load_file(out / "adapter_model.safetensors")
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]

    # Interrupt after the step-3 checkpoint: everything written later is gone.
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    for name in (META_NAME, "adapter_model.safetensors", train.SUMMARY_NAME):
        (out / name).unlink()
    with (out / train.METRICS_NAME).open("a") as f:
        f.write('{"step": 7, "loss": 0.')  # a line cut short by the crash
    result = invoke("train-stage1", str(path), "--resume")
    assert result.exit_code == 0, result.output
    exact = ("step", "loss", "loss_ar", "loss_diff", "lr", "grad_norm")  # everything but the timings
    assert [{k: r[k] for k in exact} for r in metrics(out)] == [{k: r[k] for k in exact} for r in straight]
    again = load_file(out / "adapter_model.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)

    model = load_model(out)
    assert model.meta.weights == "adapter" and model.meta.base_model == str(base.resolve())
    assert model.tokenizer.convert_ids_to_tokens(model.mask_token_id) == "<|new_mask|>"
    assert model.mask_token_id == len(tok)


@pytest.mark.slow
def test_two_cpu_processes_through_the_accelerate_launcher_agree(tmp_path):
    data = write_dataset(tmp_path / "data", n=32)
    out = tmp_path / "out"
    path = recipe(tmp_path, TINY_SCRATCH_RECIPE + f"""
[fluid]
max_k = 3
[train]
dataset = "{data}"
output_dir = "{out}"
batch_size = 2
max_steps = 4
log_steps = 2
save_steps = 2
[launch]
num_processes = 2
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in (launch.MARKER, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        env.pop(name, None)
    # The shipped DDP config on a machine without GPUs: torchrun starts the processes, they train on CPU (gloo).
    cmd = [sys.executable, "-m", "fluid_cli", "train-stage1", str(path),
           "--set", f"launch.main_process_port={free_port()}",
           "--accelerate-config", str(REPO / "recipes" / "accelerate" / "multi_gpu_ddp.yaml")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / train.SUMMARY_NAME).read_text())
    assert summary["world_size"] == 2 and summary["device"].startswith("cpu")
    first, second = summary["rank_weight_fingerprints"]
    assert first == second and summary["ranks_agree"]
    assert (out / "checkpoints" / "step-00000004" / "layout_rng_1.pt").is_file()
    load_model(out)


# --------------------------------------------------------------------------------------------- a real model

NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Anna"]
THINGS = ["ball", "cat", "dog", "kite", "box", "toy", "tree", "cake", "bird", "boat"]
ADJECTIVES = ["red", "big", "little", "blue", "happy", "soft", "shiny", "funny"]
PLACES = ["park", "garden", "house", "forest", "beach", "school"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud"]
FRAMES = [
    "Once upon a time, there was a {adj} {thing}.",
    "{name} went to the {place} with mom.",
    "{name} saw a {adj} {thing} in the {place}.",
    "{name} wanted to play with the {thing}.",
    "The {thing} was very {adj}, and {name} was {feeling}.",
    "{name} and {other} played in the {place} all day.",
    "\"Look at my {thing}!\" said {name}.",
    "{other} felt {feeling} and gave {name} a hug.",
    "They shared the {thing} and became good friends.",
    "At the end of the day, {name} went home and slept.",
]


def stories(n: int) -> list[str]:
    """Short TinyStories-like texts: four to six sentences drawn from a few frames and word lists."""
    g = torch.Generator().manual_seed(0)

    def pick(xs: list[str]) -> str:
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    texts = []
    for _ in range(n):
        words = {"name": pick(NAMES), "other": pick(NAMES), "thing": pick(THINGS), "adj": pick(ADJECTIVES),
                 "place": pick(PLACES), "feeling": pick(FEELINGS)}
        frames = [FRAMES[int(i)] for i in torch.randperm(len(FRAMES), generator=g)[: 4 + len(texts) % 3]]
        texts.append(" ".join(f.format(**words) for f in frames))
    return texts


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs the real model at {STORIES}")
def test_stories260k_learns_blocks_without_losing_next_token_prediction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stories.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in stories(300)))
    path = recipe(tmp_path, f"""
[model]
path = "{STORIES}"
[[data.sources]]
path = "stories.jsonl"
format = "text"
[data]
output_dir = "data"
template = "none"
cutoff_len = 128
[fluid]
max_k = 4
[lora]
r = 16
alpha = 32
[train]
output_dir = "out"
lr = 3e-3
batch_size = 4
max_steps = 100
log_steps = 1
save_steps = 1000
""")
    assert invoke("prepare-data", str(path)).exit_code == 0
    result = invoke("train-stage1", str(path))
    assert result.exit_code == 0, result.output
    log = metrics(tmp_path / "out")
    ar = [r["loss_ar"] for r in log]
    diff = [r["loss_diff"] for r in log]
    print("\nstep  loss_ar  loss_diff")
    for r in log[::10] + [log[-1]]:
        print(f"{r['step']:4d}  {r['loss_ar']:.3f}    {r['loss_diff']:.3f}")
    first, last = slice(0, 10), slice(-10, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(ar[last]) < mean(ar[first]) + 0.1, ar
    assert mean(diff[last]) < mean(diff[first]) - 0.5, diff
    model = load_model(tmp_path / "out")
    assert model.meta.base_model == str(STORIES.resolve()) and model.mask_token_id == 512
