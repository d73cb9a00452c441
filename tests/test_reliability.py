"""Reliability: every user mistake is one line on stderr with exit status 2, and no output is lost or half-written.

One test per class of failure, parametrised over the keys and commands it covers: recipe values (ranges,
consistency, where the value came from), undecodable text, damaged model folders, output locations (read-only, a
file in the way, existing results, a second writer, stale staging, a full disk), a loss that stops being finite,
resuming past the end, and kills during the final save.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file
from test_train import write_dataset
from tiny import TINY_SCRATCH_RECIPE, tiny_fluid_model, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from fluid_cli import calibrate, evaluate, io, train
from fluid_cli.cli import app
from fluid_cli.config import load_recipe, load_recipe_text
from fluid_cli.errors import FluidError
from fluid_cli.folder import KHEAD_NAME, META_NAME, load_model, save_model
from fluid_cli.khead import KHead
from fluid_cli.synthetic import arithmetic_rows

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def fluid(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def error_line(result, *needles: str, alone: bool = True) -> str:
    """The one `error:` line of a failed command: exit status 2, no traceback, and (with `alone`) nothing else on
    stderr but progress bars; each of `needles` must be in it."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip() and "\r" not in line and "%|" not in line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and (not alone or len(lines) == 1), result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes: an output location must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def dead_pid() -> int:
    """The id of a process that has exited (for staging folders a killed run left)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


TRAIN = TINY_SCRATCH_RECIPE + """
[fluid]
max_k = 4
[train]
batch_size = 4
max_steps = 4
save_steps = 2
log_steps = 1
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "data", n=24)


def train_recipe(tmp_path: Path, dataset: Path, extra: str = "", out: Path | None = None) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(TRAIN + f'dataset = "{dataset}"\noutput_dir = "{out or tmp_path / "out"}"\n' + extra)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("trained")
    result = fluid("train-stage1", train_recipe(root, dataset))
    assert result.exit_code == 0, result.output
    return root / "out"


def copy_run(trained: Path, tmp_path: Path, dataset: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out, train_recipe(tmp_path, dataset, out=out)


def interrupted_run(trained: Path, tmp_path: Path, dataset: Path) -> tuple[Path, Path]:
    """A copy of the finished run as a kill after its final save but before its summary leaves it: the model is
    there, the run is not finished, and `--resume` trains steps 3 and 4 again from the step-2 checkpoint."""
    out, recipe = copy_run(trained, tmp_path, dataset)
    (out / train.SUMMARY_NAME).unlink()
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    return out, recipe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A FLUID model folder (full weights, K = 4), never changed: tests copy it."""
    folder = tmp_path_factory.mktemp("model") / "model"
    save_model(tiny_fluid_model(max_k=4), folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, dataset) -> Path:
    """A FLUID model folder with a LoRA adapter over a tiny base model."""
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    cfg = load_recipe_text(f'[model]\npath = "{base}"\n[fluid]\nmax_k = 4\n[train]\ndataset = "{dataset}"\n')
    save_model(train.build_model(cfg), root / "model")
    return root / "model"


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only: by their permissions, and (for root, whom permissions do not stop) by denying what
    a read-only folder denies to `os.access`."""
    folders: list[Path] = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path) in folders:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder)
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


# --------------------------------------------------------------------------------------------- recipe values


BAD_VALUES = [
    ("train.lr=0", "[train] lr: must be greater than 0"),
    ("train.lr=-1e-4", "[train] lr: must be greater than 0"),
    ("train.lr=nan", "[train] lr: must be a finite number, got nan"),
    ("train.lr=inf", "[train] lr: must be a finite number, got inf"),
    ("train.weight_decay=nan", "[train] weight_decay: must be a finite number"),
    ("train.weight_decay=-0.1", "[train] weight_decay: must be at least 0"),
    ("train.warmup_ratio=-1", "[train] warmup_ratio: must be in [0, 1]"),
    ("train.max_grad_norm=-1", "[train] max_grad_norm: must be greater than 0"),
    ("train.epochs=-1", "[train] epochs: must be greater than 0"),
    ("train.epochs=0", "[train] epochs: must be greater than 0"),
    ("train.max_steps=0", "[train] max_steps: must be at least 1"),
    ("train.seed=-1", "[train] seed: must be in [0, 4,294,967,295]"),
    ("train.batch_size=0", "[train] batch_size: must be at least 1"),
    ("train.grad_accum=0", "[train] grad_accum: must be at least 1"),
    ("train.save_steps=0", "[train] save_steps: must be at least 1"),
    ("train.log_steps=0", "[train] log_steps: must be at least 1"),
    ("train.save_total_limit=-1", "[train] save_total_limit: must be at least 0"),
    ("train.max_expanded_len=1", "[train] max_expanded_len: must be at least 2"),
    ("train.max_expanded_len=16", "[train] max_expanded_len: 16 leaves no room for a block of max_k = 16"),
    ('train.output_dir=""', "[train] output_dir: must not be empty"),
    ("fluid.max_k=0", "[fluid] max_k: must be in [1, 128]"),
    ("fluid.max_k=1000", "[fluid] max_k: must be in [1, 128]"),
    ("fluid.max_k=128", "[fluid] max_k: 128 makes a training sequence of up to 1024 tokens about 66,560 positions"),
    ("fluid.p_anchor=1.5", "[fluid] p_anchor: must be in (0, 1]"),
    ("fluid.p_anchor=0", "[fluid] p_anchor: must be in (0, 1]"),
    ("fluid.noise=2.0", "[fluid] noise: must be in [0, 1]"),
    ("fluid.ar_weight=-1", "[fluid] ar_weight: must be at least 0"),
    ("fluid.diff_weight=nan", "[fluid] diff_weight: must be a finite number"),
    ('fluid.mask_token=""', "[fluid] mask_token: must not be empty"),
    ("model.scratch.num_attention_heads=3", "[model.scratch] num_attention_heads: 3 heads do not divide"),
    ("model.scratch.num_attention_heads=0", "[model.scratch] num_attention_heads: must be at least 1"),
    ("model.scratch.num_key_value_heads=3", "[model.scratch] num_key_value_heads: 3 do not divide"),
    ("model.scratch.hidden_size=0", "[model.scratch] hidden_size: must be at least 1"),
    ("lora.r=0", "[lora] r: must be at least 1"),
    ("lora.dropout=1.0", "[lora] dropout: must be in [0, 1)"),
    ("data.cutoff_len=0", "[data] cutoff_len: must be at least 1"),
    ("data.validation=-1", "[data] validation: must be at least 0"),
    ("data.validation=2.5", "[data] validation: a count (>= 1) must be whole"),
    ("data.num_proc=0", "[data] num_proc: must be at least 1"),
    ("data.seed=-3", "[data] seed: must be in [0, 4,294,967,295]"),
    ('data.sources=[{path="synthetic:arithmetic", num_samples=1000000000}]',
     "[data] sources[0] num_samples: must be in [1, 100,000,000]"),
    ('data.sources=[{path="synthetic:arithmetic", num_samples=5000000}]',
     "[data] sources[0] num_samples: 5,000,000 synthetic rows are more than the 1,000,000"),
    ('data.sources=[{path="a.jsonl", num_samples=0}]', "[data] sources[0] num_samples: must be in [1, 100,000,000]"),
    ('data.sources=[{path="a.jsonl", weight=nan}]', "[data] sources[0] weight: must be a finite number"),
    ('data.sources=[{path="a.jsonl", weight=-2.0}]', "[data] sources[0] weight: must be greater than 0"),
    ('data.sources=[{path="self", num_samples=4, prefix_tokens=[5, 2]}]',
     "[data] sources[0] prefix_tokens: expected [min, max] with 1 <= min <= max"),
    ("data.regenerate={temperature=0.0}", "[data.regenerate] temperature: must be greater than 0"),
    ("data.regenerate={max_new_tokens=0}", "[data.regenerate] max_new_tokens: must be at least 1"),
    ("data.regenerate={batch_size=0}", "[data.regenerate] batch_size: must be at least 1"),
    ("data.regenerate={num_proc=0}", "[data.regenerate] num_proc: must be at least 1"),
    ("khead.tau=0", "[khead] tau: must be greater than 0"),
    ("khead.tau=inf", "[khead] tau: must be a finite number"),
    ("khead.sigma=0", "[khead] sigma: must be greater than 0"),
    ("khead.steps=0", "[khead] steps: must be at least 1"),
    ("khead.holdout=1.0", "[khead] holdout: must be in (0, 1)"),
    ("khead.max_examples=1", "[khead] max_examples: must be at least 2"),
    ("khead.max_memory_mb=-1", "[khead] max_memory_mb: must be at least 0"),
    ("generate.tau=-1", "[generate] tau: must be greater than 0"),
    ("generate.threshold=2", "[generate] threshold: must be in [0, 1]"),
    ("generate.max_k=0", "[generate] max_k: must be in [1, 128]"),
    ("eval.limit=0", "[eval] limit: must be at least 1"),
    ("eval.batch_size=0", "[eval] batch_size: must be at least 1"),
    ("eval.num_fewshot=-1", "[eval] num_fewshot: must be at least 0"),
    ("launch.num_processes=0", "[launch] num_processes: must be at least 1"),
    ("launch.main_process_port=70000", "[launch] main_process_port: must be in [1, 65,535]"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[v[0] for v in BAD_VALUES])
def test_a_bad_value_from_set_names_the_set_argument(tmp_path, override, message):
    path = tmp_path / "r.toml"
    path.write_text("[model.scratch]\nhidden_size = 128\n[lora]\nenabled = false\n[khead]\nlr = 1e-3\n")
    error_line(fluid("recipe", path, "--set", override), f"--set {override}: {message}")


@pytest.mark.parametrize("table, key, value, message", [
    ("train", "lr", "0.0", "[train] lr: must be greater than 0"),
    ("train", "epochs", "-1", "[train] epochs: must be greater than 0"),
    ("fluid", "max_k", "1000", "[fluid] max_k: must be in [1, 128]"),
    ("khead", "holdout", "nan", "[khead] holdout: must be a finite number"),
    ("generate", "min_k", "6\nmax_k = 4", "[generate] min_k: 6 is above max_k = 4"),
    ("model.scratch", "nope", "1", "[model.scratch] nope: unknown key"),
])
def test_a_bad_value_in_the_file_names_file_line_and_key(tmp_path, table, key, value, message):
    path = tmp_path / "r.toml"
    path.write_text(f"# a recipe\n[data]\ncutoff_len = 64\n[{table}]\n{key} = {value}\n")
    error_line(fluid("recipe", path), f"{path}:5: {message}")


def test_a_key_of_the_second_array_table_is_found_on_its_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[data.sources]]\npath = "a.jsonl"\nweight = 1.0\n\n[[data.sources]]\npath = "b.jsonl"\n'
                    'weight = -1.0\n')
    error_line(fluid("recipe", path), f"{path}:7: [data] sources[1] weight: must be greater than 0")


def test_a_bad_set_value_is_not_blamed_on_a_recipe_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[khead]\nlr = 1e-3\n[train]\nseed = 1\n")
    line = error_line(fluid("recipe", path, "--set", "train.lr=fast"))
    assert line == "error: --set train.lr=fast: [train] lr: expected a float, got 'fast'"


def test_set_reaches_an_array_of_tables_by_index(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[data.sources]]\npath = "a.jsonl"\n[[data.sources]]\npath = "b.jsonl"\n')
    cfg = load_recipe(path, ["data.sources[1].num_samples=7"])
    assert [s.num_samples for s in cfg.data.sources] == [None, 7]
    assert error_line(fluid("recipe", path, "--set", "data.sources[1].num_samples=-1")).startswith(
        "error: --set data.sources[1].num_samples=-1: [data] sources[1] num_samples: must be in")
    assert error_line(fluid("recipe", path, "--set", "data.sources[2].weight=1")) == (
        "error: --set data.sources[2].weight=1: sources[2]: the recipe has 2 sources entries")


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "m", "-p", "x", "--tau", "nan"], "--tau nan: [generate] tau: must be a finite number"),
    (["generate", "--model", "m", "-p", "x", "--tau", "0"], "--tau 0: [generate] tau: must be greater than 0"),
    (["generate", "--model", "m", "-p", "x", "--tau", "-1"], "--tau -1: [generate] tau: must be greater than 0"),
    (["generate", "--model", "m", "-p", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: [generate] max_new"),
    (["generate", "--model", "m", "-p", "x", "--max-k", "4", "--min-k", "8"], "--min-k 8: [generate] min_k: 8 is"),
    (["bench", "decode", "--model", "m", "-p", "x", "--threshold", "1.5"], "--threshold 1.5: [generate] threshold"),
    (["eval", "arithmetic", "--model", "m", "--limit", "0"], "--limit 0: [eval] limit: must be at least 1"),
    (["eval", "arithmetic", "--model", "m", "--limit", "-1"], "--limit -1: [eval] limit: must be at least 1"),
    (["eval", "arithmetic", "--model", "m", "--batch-size", "0"], "--batch-size 0: [eval] batch_size"),
    (["bench", "decode", "--model", "m", "-p", "x", "--limit", "0"], "--limit 0: [bench] limit: must be at least 1"),
    (["bench", "decode", "--model", "m", "-p", "x", "--limit", "-1"], "--limit -1: [bench] limit: must be at least 1"),
])
def test_a_bad_flag_value_names_the_flag(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # the outputs' default folders are relative
    error_line(fluid(*args), message)
    assert not list(tmp_path.iterdir())  # nothing was written


# --------------------------------------------------------------------------------------------- text that is not UTF-8


def test_a_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b"[train]\nlr = 1e-4\n# caf\xe9\n")
    error_line(fluid("recipe", path), f"{path}:3: not UTF-8 text")


@pytest.mark.parametrize("name, content, fmt, message", [
    ("rows.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n', "prompt_response",
     "rows.jsonl:2: malformed JSON (not UTF-8 text"),
    ("rows.csv", b'prompt,response\na,b\nc,d\n\xff,e\n', "prompt_response", "rows.csv:4: not UTF-8 text"),
    ("rows.json", b'[{"prompt": "a", "response": "\xff"}]', "prompt_response", "rows.json:1: malformed JSON"),
])
def test_a_data_file_that_is_not_utf8_names_file_and_line(tmp_path, name, content, fmt, message):
    (tmp_path / name).write_bytes(content)
    path = tmp_path / "r.toml"
    path.write_text(TINY_SCRATCH_RECIPE + f'[[data.sources]]\npath = "{tmp_path / name}"\nformat = "{fmt}"\n'
                                          f'[data]\noutput_dir = "{tmp_path / "out"}"\ntemplate = "none"\n')
    error_line(fluid("prepare-data", path), message, alone=False)
    assert not (tmp_path / "out").exists()


def test_prompts_that_are_not_utf8(tmp_path, model_dir):
    (tmp_path / "p.txt").write_bytes(b"hello\n\xff\n")
    error_line(fluid("generate", "--model", model_dir, "--prompt-file", tmp_path / "p.txt"), "p.txt:2: not UTF-8")
    error_line(runner.invoke(app, ["generate", "--model", str(model_dir)], input=b"\xff\xfe"), "stdin: not UTF-8")


# --------------------------------------------------------------------------------------------- damaged model folders


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_meta(**fields: object):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / META_NAME).read_text())
        meta.update(fields)
        (folder / META_NAME).write_text(json.dumps(meta))
    return edit


DAMAGE = {
    "model.safetensors truncated": (lambda f: truncate(f / "model.safetensors"), "model.safetensors: corrupt or"),
    "model.safetensors empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors: corrupt"),
    "model.safetensors deleted": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing"),
    "k_head truncated": (lambda f: truncate(f / KHEAD_NAME), "k_head.safetensors: corrupt or truncated"),
    "k_head empty": (lambda f: (f / KHEAD_NAME).write_bytes(b""), "k_head.safetensors: corrupt or truncated"),
    "k_head of another shape": (lambda f: save_file(KHead(16, 4).state_dict(), f / KHEAD_NAME),
                                "k_head.safetensors: K-head weights of another shape"),
    "tokenizer deleted": (lambda f: [p.unlink() for p in f.glob("tokenizer*")], "no tokenizer files"),
    "config.json damaged": (lambda f: (f / "config.json").write_text("{"), "config.json: unreadable JSON"),
    "fluid.json not UTF-8": (lambda f: (f / META_NAME).write_bytes(b"\xff{}"), "fluid.json: not UTF-8 text"),
    "fluid.json max_k": (edit_meta(max_k="abc"), "fluid.json: max_k: expected an integer, got 'abc'"),
    "fluid.json format_version": (edit_meta(format_version="x"), "fluid.json: format_version: expected an integer"),
    "fluid.json khead": (edit_meta(khead="calibrated"), "fluid.json: khead: expected a table, got 'calibrated'"),
    "fluid.json mask id": (edit_meta(mask_token_id=10**6), "fluid.json: mask_token_id: 1000000 is outside"),
}
REMEDY = "re-run `fluid train-stage1`"


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["load_model", "generate", "bench", "eval", "calibrate-khead"])
def test_a_damaged_model_folder_is_one_line_naming_the_file_and_the_fix(tmp_path, model_dir, dataset, damage,
                                                                        command):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    hurt, message = DAMAGE[damage]
    hurt(folder)
    before = snapshot(folder)
    if command == "load_model":
        with pytest.raises(FluidError, match="re-run `fluid train-stage1`") as e:
            load_model(folder)
        assert message in str(e.value) and "\n" not in str(e.value)
        return
    if command == "generate":
        result = fluid("generate", "--model", folder, "-p", "hi", "--max-new-tokens", "2")
    elif command == "bench":
        result = fluid("bench", "decode", "--model", folder, "-p", "hi", "--max-new-tokens", "2",
                       "-o", tmp_path / "b.json")
    elif command == "eval":
        (tmp_path / "held" / "arithmetic").mkdir(parents=True)
        (tmp_path / "held" / "arithmetic" / "test.jsonl").write_text(json.dumps(arithmetic_rows(1, 0)[0]) + "\n")
        result = fluid("eval", "arithmetic", "--model", folder, "--data-dir", tmp_path / "held", "--output-dir",
                       tmp_path / "ev")
    else:
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{dataset}"\nsteps = 2\n')
        result = fluid("calibrate-khead", recipe)
    error_line(result, message, REMEDY)
    assert snapshot(folder) == before
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda f: truncate(f / "adapter_model.safetensors"), "adapter_model.safetensors: corrupt or truncated"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors: corrupt"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
    (lambda f: (f / "adapter_config.json").write_text("{nope"), "adapter_config.json: unreadable JSON"),
], ids=["truncated", "empty", "deleted", "config damaged"])
def test_a_damaged_lora_adapter_is_one_line(tmp_path, lora_dir, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(lora_dir, folder)
    damage(folder)
    error_line(fluid("generate", "--model", folder, "-p", "hi", "--max-new-tokens", "2"), message, REMEDY)


def test_a_damaged_plain_model_names_its_weight_file(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "plain")
    truncate(tmp_path / "plain" / "model.safetensors")
    error_line(fluid("generate", "--model", tmp_path / "plain", "-p", "hi", "--horizon", "fixed"),
               "plain/model.safetensors: corrupt or truncated weight file", "re-download or re-save the model")


# --------------------------------------------------------------------------------------------- output locations


def must_not_run(monkeypatch, target: str) -> None:
    """Fail the test if the work behind `target` starts: the output check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"{target} ran before the output location was checked")
    monkeypatch.setattr(target, refuse)


def output_case(kind: str, tmp_path: Path, out: Path, model_dir: Path, dataset: Path, monkeypatch) -> list[str]:
    """The command line that writes to `out` (a folder, or for bench a file), with its heavy work forbidden."""
    if kind == "prepare-data":
        must_not_run(monkeypatch, "fluid_cli.data.read_source")
        (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + '[[data.sources]]\npath = "synthetic:arithmetic"\n'
                                                               f'num_samples = 4\n[data]\noutput_dir = "{out}"\n')
        return ["prepare-data", str(tmp_path / "r.toml")]
    if kind == "train-stage1":
        must_not_run(monkeypatch, "fluid_cli.train.setup")
        return ["train-stage1", str(train_recipe(tmp_path, dataset, out=out))]
    if kind == "eval":
        must_not_run(monkeypatch, "fluid_cli.evaluate.plan_tasks")
        return ["eval", "arithmetic", "--model", str(model_dir), "--output-dir", str(out)]
    if kind == "bench":
        must_not_run(monkeypatch, "fluid_cli.bench.load_decoding_model")
        return ["bench", "decode", "--model", str(model_dir), "-p", "hi", "-o", str(out)]
    must_not_run(monkeypatch, "fluid_cli.data.run")
    return ["demo", "--fast", "--out", str(out)]


WRITERS = ["prepare-data", "train-stage1", "eval", "bench", "demo"]


@pytest.mark.parametrize("kind", WRITERS)
def test_a_read_only_output_location_fails_before_any_work(tmp_path, model_dir, dataset, monkeypatch, read_only, kind):
    ro = tmp_path / "ro"
    out = ro / ("report.json" if kind == "bench" else "out")
    args = output_case(kind, tmp_path, out, model_dir, dataset, monkeypatch)
    read_only(ro)
    error_line(fluid(*args), f"cannot write to {ro} (permission denied)")
    assert not out.exists()


def test_calibrating_a_read_only_model_folder_fails_before_any_work(tmp_path, model_dir, dataset, monkeypatch,
                                                                    read_only):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    must_not_run(monkeypatch, "fluid_cli.calibrate.load_model")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{dataset}"\n')
    before = snapshot(folder)
    read_only(folder)
    error_line(fluid("calibrate-khead", recipe), f"cannot write to {folder}", "[khead] model_dir")
    assert snapshot(folder) == before


@pytest.mark.parametrize("kind", WRITERS)
def test_a_file_where_a_folder_is_expected(tmp_path, model_dir, dataset, monkeypatch, kind):
    if kind == "bench":  # bench writes a file: a folder is what is in the way
        out = tmp_path / "a-folder"
        out.mkdir()
        message = "a folder, where an output file is expected"
    else:
        out = tmp_path / "a-file"
        out.write_text("keep me")
        message = "a file, where an output folder is expected"
    args = output_case(kind, tmp_path, out, model_dir, dataset, monkeypatch)
    error_line(fluid(*args), f"{out}: {message}")
    assert out.is_dir() if kind == "bench" else out.read_text() == "keep me"


def test_a_file_in_the_path_of_an_output_folder(tmp_path, dataset, monkeypatch):
    (tmp_path / "a-file").write_text("")
    args = output_case("train-stage1", tmp_path, tmp_path / "a-file" / "out", None, dataset, monkeypatch)
    error_line(fluid(*args), "a-file is a file, so no folder can be made there")


@pytest.mark.parametrize("kind", ["eval", "bench", "prepare-data"])
def test_existing_results_are_kept_without_overwrite(tmp_path, model_dir, dataset, monkeypatch, kind):
    out = tmp_path / ("report.json" if kind == "bench" else "out")
    args = output_case(kind, tmp_path, out, model_dir, dataset, monkeypatch)
    if kind == "bench":
        out.write_text("{}")
    else:
        out.mkdir()
        (out / "results.json").write_text("{}")
    before = snapshot(tmp_path)
    error_line(fluid(*args), "exists; pass --overwrite to replace it")
    assert snapshot(tmp_path) == before


def test_eval_overwrite_replaces_the_results(tmp_path, model_dir):
    (tmp_path / "held" / "arithmetic").mkdir(parents=True)
    (tmp_path / "held" / "arithmetic" / "test.jsonl").write_text(json.dumps(arithmetic_rows(1, 0)[0]) + "\n")
    out = tmp_path / "ev"
    out.mkdir()
    (out / "results.json").write_text("{}")
    result = fluid("eval", "arithmetic", "--model", model_dir, "--data-dir", tmp_path / "held", "--output-dir", out,
                   "--limit", "1", "--overwrite", "--set", "eval.max_gen_toks=4")
    assert result.exit_code == 0, result.output
    assert "arithmetic" in json.loads((out / "results.json").read_text())["tasks"]


def test_a_second_writer_of_a_training_folder_fails_at_once(tmp_path, dataset, monkeypatch):
    out = tmp_path / "out"
    recipe = train_recipe(tmp_path, dataset)
    with io.output_lock(out, "[train] output_dir"):  # another run holds the folder
        before = snapshot(out)
        error_line(fluid("train-stage1", recipe), f"another fluid process (pid {os.getpid()}) is training into")
        assert snapshot(out) == before
        with pytest.raises(FluidError, match="another fluid process"), io.output_lock(out, "[train] output_dir"):
            pass  # the lock itself refuses too (a second writer that got past the first look)
        monkeypatch.setenv("RANK", "1")  # a second process of the run that holds the lock: not a second writer
        train.preflight(load_recipe_text(recipe.read_text()), resume=False)
    assert io.locked_by(out) is None  # released with its holder


def test_a_second_calibration_of_a_model_folder_fails_at_once(tmp_path, model_dir, dataset):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{dataset}"\n')
    with io.output_lock(folder, "[train] output_dir"):
        error_line(fluid("calibrate-khead", recipe), "another fluid process", "[khead] model_dir")


# --------------------------------------------------------------------------------------------- staging left behind


def test_staging_a_killed_run_left_is_removed_by_the_next_run(tmp_path, trained, dataset, model_dir):
    pid = dead_pid()
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    stale = [out / "checkpoints" / ".step-00000004.tmp", out / f".staging.{pid}.abc"]
    for folder in stale:
        folder.mkdir()
        (folder / "partial.bin").write_bytes(b"x" * 100)
    result = fluid("train-stage1", recipe, "--resume")
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale)
    load_model(out)

    data_out = tmp_path / "prepared"
    leftovers = [tmp_path / f".prepared.{pid}.xyz.tmp", tmp_path / f".prepared.work-{pid}.xyz"]
    for folder in leftovers:
        folder.mkdir()
    (tmp_path / "d.toml").write_text(TINY_SCRATCH_RECIPE + '[[data.sources]]\npath = "synthetic:arithmetic"\n'
                                                           f'num_samples = 8\n[data]\noutput_dir = "{data_out}"\n')
    assert fluid("prepare-data", tmp_path / "d.toml").exit_code == 0
    assert not any(p.exists() for p in leftovers) and (data_out / "stats.json").is_file()

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    spill = folder / f".calibrate.{pid}.abc"
    spill.mkdir()
    (tmp_path / "c.toml").write_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{dataset}"\n'
                                     "steps = 2\n")
    assert fluid("calibrate-khead", tmp_path / "c.toml").exit_code == 0
    assert not spill.exists()


def test_a_kill_between_the_renames_of_an_overwrite_puts_the_old_folder_back(tmp_path):
    out = tmp_path / "data"
    (tmp_path / ".data.old").mkdir()
    (tmp_path / ".data.old" / "stats.json").write_text("{}")
    io.recover_dir(out)
    assert (out / "stats.json").is_file() and not (tmp_path / ".data.old").exists()


def test_sigint_removes_the_staging_folders(tmp_path, trained, dataset, model_dir, monkeypatch):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    from accelerate import Accelerator

    def interrupted(self, output_dir, **kwargs):
        (Path(output_dir) / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(load_recipe_text(recipe.read_text()), resume=True)
    assert not list((out / "checkpoints").glob(".step-*")) and load_model(out).max_k == 4
    monkeypatch.undo()

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)

    def interrupted_fit(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "fit_head", interrupted_fit)
    cfg = load_recipe_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{dataset}"\n'
                           "max_memory_mb = 0\n")  # the pairs spill to the model folder
    with pytest.raises(KeyboardInterrupt):
        calibrate.run(cfg)
    assert not list(folder.glob(".calibrate.*"))
    monkeypatch.undo()

    import datasets

    from fluid_cli import data

    def interrupted_save(self, path, **kwargs):
        (Path(path) / "partial.arrow").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", interrupted_save)
    prepared = tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        data.run(load_recipe_text(TINY_SCRATCH_RECIPE + '[[data.sources]]\npath = "synthetic:arithmetic"\n'
                                                        f'num_samples = 8\n[data]\noutput_dir = "{prepared}"\n'))
    assert not prepared.exists() and not list(tmp_path.glob(".prepared*"))


# --------------------------------------------------------------------------------------------- a full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def writes_then_no_space(target_of):
    """A writer that leaves a partial file where it was writing, then finds the disk full."""
    def write(*args, **kwargs):
        target = Path(target_of(*args, **kwargs))
        target.mkdir(parents=True, exist_ok=True)
        (target / "partial.bin").write_bytes(b"x" * 1000)
        no_space()
    return write


def test_a_full_disk_during_a_checkpoint(tmp_path, trained, dataset, monkeypatch):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "save_state", writes_then_no_space(lambda self, output_dir, **k: output_dir))
    result = fluid("train-stage1", recipe, "--resume")
    error_line(result, "the disk is full", "the partial checkpoint .step-00000004.tmp was removed", alone=False)
    assert not list((out / "checkpoints").glob(".step-*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert load_model(out).max_k == 4  # the model is kept


def test_a_full_disk_during_the_final_save(tmp_path, trained, dataset, monkeypatch):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr("fluid_cli.folder._write_khead", writes_then_no_space(lambda model, stage: stage))
    result = fluid("train-stage1", recipe, "--resume", "--set", "train.save_steps=10")
    error_line(result, f"{out}: the disk is full", "the partial output was removed", alone=False)
    assert not list(out.glob(".staging*")) and (out / "model.safetensors").read_bytes() == before
    load_model(out)


def test_a_full_disk_during_prepare_data(tmp_path, monkeypatch):
    import datasets

    out = tmp_path / "data"
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + '[[data.sources]]\npath = "synthetic:arithmetic"\n'
                                                           f'num_samples = 8\n[data]\noutput_dir = "{out}"\n')
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", writes_then_no_space(lambda self, path: path))
    error_line(fluid("prepare-data", tmp_path / "r.toml"), f"{out}: the disk is full", alone=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]  # no output, no staging left


def test_a_full_disk_during_calibration_keeps_the_model(tmp_path, model_dir, dataset, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = snapshot(folder)
    monkeypatch.setattr("fluid_cli.folder._write_khead", writes_then_no_space(lambda model, stage: stage))
    (tmp_path / "r.toml").write_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{dataset}"\n'
                                     "steps = 2\n")
    error_line(fluid("calibrate-khead", tmp_path / "r.toml"), "the disk is full", alone=False)
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------- training runs


def test_a_loss_that_is_not_finite_stops_training_and_keeps_the_last_checkpoint(tmp_path, dataset, monkeypatch):
    real = train.Stage1Objective.forward
    calls = {"n": 0}

    def poisoned(self, ex):
        calls["n"] += 1
        out = real(self, ex)
        if calls["n"] >= 3:  # from step 3 on (one micro-batch per step)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train.Stage1Objective, "forward", poisoned)
    out = tmp_path / "out"
    result = fluid("train-stage1", train_recipe(tmp_path, dataset))
    error_line(result, "step 3: the training loss is not a finite number",
               f"the last good checkpoint, {out / 'checkpoints' / 'step-00000002'}, is kept",
               "lower [train] lr or max_grad_norm and train again in another [train] output_dir", alone=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (out / META_NAME).exists()
    assert all(r["step"] < 3 for r in map(json.loads, (out / train.METRICS_NAME).read_text().splitlines()))


def test_a_max_expanded_len_without_room_for_a_block(tmp_path, dataset):
    result = fluid("train-stage1", train_recipe(tmp_path, dataset), "--set", "train.max_expanded_len=20")
    error_line(result, "[train] max_expanded_len: 20 leaves no room for a block of max_k = 4 after the longest row",
               alone=False)
    assert not (tmp_path / "out").exists()  # the lock made the folder, and nothing else went into it


def test_a_log_file_gets_plain_progress_lines(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(train, "PLAIN_PROGRESS_S", 0.0)
    result = fluid("train-stage1", train_recipe(tmp_path, dataset))  # CliRunner's stderr is not a terminal
    assert result.exit_code == 0, result.output
    for step in (1, 2, 3, 4):
        assert f"stage 1: step {step}/4, loss " in result.stderr


KILL_AT_SAVE = """
import os, signal, sys
from fluid_cli import folder, io

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

def die_after_removing_the_marker(folder_path, last):
    (folder_path / last).unlink(missing_ok=True)  # the moment the old model is no longer whole
    die()

if sys.argv[1] == "writing":  # while the new files are written into the staging folder
    folder._write_khead = die
else:  # while they replace the old ones
    io._move_ready = die_after_removing_the_marker
from fluid_cli.cli import app
app(sys.argv[2:])
"""


def killed_at_save(where: str, *args: object) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_AT_SAVE, where, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_kill_at_the_final_save_leaves_a_usable_model(tmp_path, dataset):
    out = tmp_path / "out"
    killed_at_save("moving", "train-stage1", train_recipe(tmp_path, dataset))
    assert not (out / META_NAME).exists()  # the kill came after the marker was removed ...
    model = load_model(out)  # ... and the next reader finishes the save
    assert model.max_k == 4 and not list(out.glob(".staging*"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["writing", "moving"])
def test_a_kill_while_resuming_a_run_leaves_a_usable_model(tmp_path, trained, dataset, where):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    save_model(tiny_fluid_model(max_k=4, seed=1), out)  # other weights than the resumed run writes again
    old = (out / "model.safetensors").read_bytes()
    killed_at_save(where, "train-stage1", recipe, "--resume", "--set", "train.save_steps=10")
    load_model(out)  # the old model (killed while writing) or the new one (killed while moving)
    assert ((out / "model.safetensors").read_bytes() == old) == (where == "writing")
    assert not list(out.glob(".staging*"))


# --------------------------------------------------------------------------------------------- data sources


def test_rows_without_trained_roles_name_a_row_and_the_roles(tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "human", "content": "hi"},
                                                                  {"role": "bot", "content": "yo"}]}) + "\n")
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + f'[[data.sources]]\npath = "{tmp_path / "chat.jsonl"}"\n'
                                                           f'[data]\noutput_dir = "{tmp_path / "out"}"\n')
    error_line(fluid("prepare-data", tmp_path / "r.toml"), "no examples left", "chat.jsonl:1", 'role "assistant"',
               alone=False)


def test_a_file_name_with_glob_characters_is_read_as_a_file(tmp_path):
    (tmp_path / "rows[1].jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + f'[[data.sources]]\npath = "{tmp_path / "rows[1].jsonl"}"\n'
                                     f'format = "prompt_response"\n[data]\noutput_dir = "{tmp_path / "out"}"\n')
    result = fluid("prepare-data", tmp_path / "r.toml")
    assert result.exit_code == 0, result.output


def test_absurd_sample_counts_are_refused_before_any_work(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": str(i), "response": "b"}) + "\n"
                                                 for i in range(20)))
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + f'[[data.sources]]\npath = "{tmp_path / "rows.jsonl"}"\n'
                                     f'format = "prompt_response"\nnum_samples = 100000\n'
                                     f'[data]\noutput_dir = "{tmp_path / "out"}"\n')
    error_line(fluid("prepare-data", tmp_path / "r.toml"), "rows.jsonl: num_samples = 100,000 would repeat each of "
                                                           "its 20 rows 5,000 times (at most 1,000)")
    error_line(fluid("prepare-data", tmp_path / "r.toml", "--set",
                     'data.sources=[{path="synthetic:arithmetic", num_samples=1000000000}]'), "num_samples")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml", "rows.jsonl"]


# --------------------------------------------------------------------------------------------- stdout and noise


def test_generate_json_with_stdout_closed_fails(tmp_path, model_dir):
    proc = subprocess.run(f'{sys.executable} -m fluid_cli generate --model "{model_dir}" -p hi --json >&-',
                          shell=True, stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stdout is closed" in lines[0], proc.stderr


@pytest.mark.slow
def test_eval_prints_no_git_error_and_no_foreign_progress_bars(tmp_path, model_dir, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # not a git checkout: `git describe` fails here
    (tmp_path / "held" / "arithmetic").mkdir(parents=True)
    (tmp_path / "held" / "arithmetic" / "test.jsonl").write_text(json.dumps(arithmetic_rows(1, 0)[0]) + "\n")
    result = fluid("eval", "arithmetic", "--model", model_dir, "--data-dir", "held", "--output-dir", "ev",
                   "--limit", "1", "--set", "eval.max_gen_toks=4")
    assert result.exit_code == 0, result.output
    captured = capfd.readouterr()
    assert "fatal" not in captured.err + result.stderr
    assert "it/s]" not in result.stderr and "examples/s]" not in result.stderr, result.stderr
    assert evaluate.RESULTS_NAME in result.stderr


# --------------------------------------------------------------------------------------------- issue 23, part B:
# generate, bench, eval, prompts, devices, the command line


def test_compare_base_cuts_the_base_output_at_the_same_stop_strings(tmp_path, dataset):
    from tiny import sharpen

    base = tmp_path / "base"
    lm = tiny_model("llama")
    sharpen(lm)  # varied text, so that a stop string can end it early
    lm.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    cfg = load_recipe_text(f'[model]\npath = "{base}"\n[fluid]\nmax_k = 4\n[train]\ndataset = "{dataset}"\n')
    save_model(train.build_model(cfg), tmp_path / "model")
    args = ("generate", "--model", tmp_path / "model", "-p", "hello", "--max-new-tokens", "30", "--compare-base",
            "--json")
    full = json.loads(fluid(*args).stdout)["results"][0]
    stop = full["text"][len(full["text"]) // 2]
    result = fluid(*args, "--stop", stop)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["stats"]["stop_reason"] == "stop" and row["text"].endswith(stop) and len(row["tokens"]) < 30
    assert row["match_base"] and row["base"]["tokens"] == row["tokens"]


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_prompt_spelling_the_mask_token_is_refused(lora_dir, command):
    args = ["bench", "decode"] if command == "bench" else ["generate", "--compare-base"]
    error_line(fluid(*args, "--model", lora_dir, "-p", "fine", "-p", "a <|mask|> b", "--max-new-tokens", "4"),
               "prompt 2 spells '<|mask|>', the model's mask token")


def test_an_lm_eval_request_spelling_the_mask_token_is_refused():
    from fluid_cli.lm_eval_adapter import FluidLM

    lm = FluidLM(tiny_fluid_model())
    assert lm.tok_encode("a <mask> b") == lm.tokenizer.encode("a <mask> b", add_special_tokens=False)
    with pytest.raises(FluidError, match="an lm-eval request spells '<|mask|>'"):
        lm.tok_encode("Question: a <|mask|> b")


@pytest.fixture(scope="module")
def added_mask_dir(tmp_path_factory, dataset) -> tuple[Path, Path]:
    """(a FLUID model whose mask token was added to its base's vocabulary, that base model)."""
    root = tmp_path_factory.mktemp("added")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    cfg = load_recipe_text(f'[model]\npath = "{base}"\n[fluid]\nmax_k = 4\nmask_token = "<|draft|>"\n'
                           f'[train]\ndataset = "{dataset}"\n')
    save_model(train.build_model(cfg), root / "model")
    return root / "model", base


def test_bench_assisted_with_the_models_own_base_as_draft(added_mask_dir, tmp_path):
    model, base = added_mask_dir
    assert json.loads((model / META_NAME).read_text())["vocab_size"] == len(tiny_tokenizer()) + 1
    result = fluid("bench", "decode", "--model", model, "--draft-model", base, "--decoders", "ar", "-p", "hello",
                   "--max-new-tokens", "6", "-o", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    runs = {r["decoder"]: r for r in json.loads((tmp_path / "b.json").read_text())["runs"]}
    assert runs["assisted"]["same_as_hf"] == runs["ar"]["same_as_hf"] == 1  # the base's greedy output
    assert runs["assisted"]["speedup_vs_hf"] is None  # hf did not run
    assert "0.00x" not in result.stderr and "—" in result.stderr


def test_bench_refuses_a_draft_model_with_another_tokenizer(model_dir, tmp_path):
    from fluid_cli.tokenizer import build_char_tokenizer

    other = build_char_tokenizer("abcdefgh ")
    tiny_model("llama", other).save_pretrained(tmp_path / "draft")
    other.save_pretrained(tmp_path / "draft")
    error_line(fluid("bench", "decode", "--model", model_dir, "--draft-model", tmp_path / "draft", "-p", "hi",
                     "--max-new-tokens", "4"), f"--draft-model {tmp_path / 'draft'}: its tokenizer is not the model's")


def test_bench_tokens_per_forward_are_per_row(model_dir, tmp_path):
    result = fluid("bench", "decode", "--model", model_dir, "--decoders", "hf,ar", "--batch-size", "4",
                   *(a for p in ("hello", "2+3=", "abc", "x") for a in ("-p", p)), "--max-new-tokens", "6",
                   "-o", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    for run in json.loads((tmp_path / "b.json").read_text())["runs"]:  # greedy: one token per row per forward
        assert run["tokens_per_forward"] == 1.0 and run["forwards"] < run["row_forwards"] == run["tokens"], run


def test_bench_refuses_a_prompt_that_leaves_no_room_for_the_new_tokens(model_dir):
    result = fluid("bench", "decode", "--model", model_dir, "-p", "hi", "-p", "x" * 200,
                   "--max-new-tokens", "100")
    error_line(result, "prompt 2 (203 tokens) leaves room for 53 of the 100 new tokens",
               "lower --max-new-tokens to 53")


@pytest.mark.parametrize("row, message", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, "messages[0] must be an object with string 'role' and 'content'"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
])
def test_chat_messages_that_are_not_messages(tmp_path, model_dir, row, message):
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    error_line(fluid("generate", "--model", model_dir, "--prompt-file", tmp_path / "p.jsonl"), "p.jsonl:1", message)


def test_prompt_files_json_arrays_byte_order_marks_and_folders(tmp_path):
    from fluid_cli.prompts import read_prompt_file

    (tmp_path / "a.json").write_text(json.dumps(["hello", {"prompt": "abc"}, {"messages": [
        {"role": "user", "content": "hi"}]}]))
    assert read_prompt_file(tmp_path / "a.json") == ["hello", "abc", [{"role": "user", "content": "hi"}]]
    (tmp_path / "b.txt").write_text("[INST] not JSON\nsecond\n")
    assert read_prompt_file(tmp_path / "b.txt") == ["[INST] not JSON", "second"]
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\nabc\n".encode())
    assert read_prompt_file(tmp_path / "bom.txt") == ["hello", "abc"]
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + json.dumps({"prompt": "hello"}) + "\n").encode())
    assert read_prompt_file(tmp_path / "bom.jsonl") == ["hello"]
    with pytest.raises(FluidError, match="a folder, not a prompt file"):
        read_prompt_file(tmp_path)
    os.mkfifo(tmp_path / "pipe")  # `--prompt-file <(command)`
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(tmp_path / 'pipe')!r}, 'w').write('hi\\n')"])
    try:
        assert read_prompt_file(tmp_path / "pipe") == ["hi"]
    finally:
        writer.kill()  # blocked in open() if nothing read the pipe
        writer.wait()
    with pytest.raises(FluidError, match=r"c.json\[1\]: expected a 'messages' list"):
        read_prompt_file((tmp_path / "c.json", (tmp_path / "c.json").write_text('["a", 3]'))[0])


def test_a_recipe_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "r.toml").write_bytes("\ufeff[generate]\nmax_new_tokens = 7\n".encode())
    assert load_recipe(tmp_path / "r.toml").generate.max_new_tokens == 7


@pytest.fixture
def cost_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLUID_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_damaged_cost_cache_is_measured_again(cost_cache, capsys):
    from fluid_cli.decode import Decoder, DecodeSettings

    model = tiny_fluid_model()
    settings = DecodeSettings(horizon="cost", max_new_tokens=4)
    Decoder(model, settings).decode(tiny_tokenizer()("hi")["input_ids"])
    [path] = cost_cache.glob("costs-*.json")
    for damage in ('{"points": []}', '{"points": {"1": NaN}}', '{"points": {"2": 1.0}}', "[", "null"):
        path.write_text(damage)
        decoder = Decoder(model, settings)
        decoder.decode(tiny_tokenizer()("hi")["input_ids"])
        assert decoder.probe_forwards > 0, damage  # measured again
        assert "a damaged forward-cost cache; measuring the costs again" in capsys.readouterr().err
        assert set(json.loads(path.read_text())["points"]) >= {"1", "2"}  # and replaced


def test_the_cost_cache_key_holds_the_adapter_size_and_the_versions(tmp_path, base_for_lora, dataset, monkeypatch):
    import torch
    import transformers

    from fluid_cli import __version__, decode
    from fluid_cli.policy import CostTable

    keys = []
    monkeypatch.setattr(decode, "load_cached_costs", lambda key: keys.append(key) or CostTable.flat())
    for r in (4, 8):
        cfg = load_recipe_text(f'[model]\npath = "{base_for_lora}"\n[fluid]\nmax_k = 4\n[lora]\nr = {r}\n'
                               f'[train]\ndataset = "{dataset}"\n')
        model = train.build_model(cfg).eval()
        decode.Decoder(model, decode.DecodeSettings(horizon="cost", max_new_tokens=2)).decode([5, 6, 7])
    assert keys[0]["parameters"] < keys[1]["parameters"]
    assert keys[0]["versions"] == [__version__, torch.__version__, transformers.__version__]


@pytest.fixture(scope="module")
def base_for_lora(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("base") / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    return base


def test_an_unknown_device_is_one_line(model_dir, tmp_path):
    error_line(fluid("generate", "--model", model_dir, "-p", "hi", "--set", "generate.device=gpu"),
               "[generate] device: 'gpu' is not a device: expected auto, cpu, cuda")
    (tmp_path / "r.toml").write_text('[eval]\ndevice = "cuda0"\n')
    with pytest.raises(FluidError, match=":2: \\[eval\\] device: 'cuda0' is not a device"):
        load_recipe(tmp_path / "r.toml")
    from fluid_cli.hf import resolve_device

    with pytest.raises(FluidError, match="'tpu' is not a device"):
        resolve_device("tpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_missing_gpu_names_no_flag_that_does_not_exist(model_dir, tmp_path, command):
    args = ["generate", "-p", "hi"] if command == "generate" else \
        ["eval", "arithmetic", "--data-dir", held_arithmetic(tmp_path), "--output-dir", tmp_path / "ev"]
    line = error_line(fluid(*args, "--model", model_dir, "--set", f"{command}.device=cuda"),
                      "device cuda: no CUDA device is available here (choose cpu or auto)")
    assert "--device" not in line


@pytest.mark.parametrize("args, message", [
    (["decoder=nope"], "decoder='nope': expected one of fluid, ar"),
    ([], "model folder not found"),
])
def test_the_lm_eval_adapters_command_line_reports_mistakes_in_one_line(tmp_path, monkeypatch, capsys, args,
                                                                         message):
    import lm_eval.__main__

    from fluid_cli import lm_eval_adapter

    kwargs = dict(a.split("=") for a in args)
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: lm_eval_adapter.FluidLM(str(tmp_path / "no"),
                                                                                          **kwargs))
    with pytest.raises(SystemExit) as exit_:
        lm_eval_adapter.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def held_arithmetic(tmp_path: Path) -> Path:
    (tmp_path / "held" / "arithmetic").mkdir(parents=True)
    (tmp_path / "held" / "arithmetic" / "test.jsonl").write_text(json.dumps(arithmetic_rows(1, 0)[0]) + "\n")
    return tmp_path / "held"


def test_eval_apply_chat_template_without_a_template(tmp_path, model_dir):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    error_line(fluid("eval", "arithmetic", "--model", model, "--data-dir", held_arithmetic(tmp_path), "--output-dir",
                     tmp_path / "ev", "--limit", "1", "--apply-chat-template"), "has no chat template")
    assert not (tmp_path / "ev" / evaluate.RESULTS_NAME).exists()


def test_eval_tau_names_no_horizon_flag(tmp_path, model_dir):
    line = error_line(fluid("eval", "arithmetic", "--model", model_dir, "--data-dir", held_arithmetic(tmp_path),
                            "--output-dir", tmp_path / "ev", "--limit", "1", "--tau", "2.8"),
                      "tau = 2.8: the cost horizon does not use tau")
    assert "--horizon" not in line


def test_eval_unknown_task_is_refused_before_lm_eval_is_used(monkeypatch):
    must_not_run(monkeypatch, "fluid_cli.evaluate.run")
    error_line(fluid("eval", "nosuchtask", "--model", "m"), "unknown task 'nosuchtask'")


def test_eval_overwrite_removes_the_sample_files_of_the_replaced_results(tmp_path, model_dir):
    out = tmp_path / "ev"
    out.mkdir()
    (out / evaluate.RESULTS_NAME).write_text("{}")
    (out / "samples_gsm8k.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    result = fluid("eval", "arithmetic", "--model", model_dir, "--data-dir", held_arithmetic(tmp_path),
                   "--output-dir", out, "--limit", "1", "--overwrite", "--set", "eval.max_gen_toks=4")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("samples_*")) == ["samples_arithmetic.jsonl"]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_mask_token_is_refused_on_a_fluid_model(model_dir, tmp_path, command):
    args = ["generate", "-p", "hi", "--mask-token", "<unk>"] if command == "generate" else \
        ["eval", "arithmetic", "--data-dir", held_arithmetic(tmp_path), "--output-dir", tmp_path / "ev",
         "--set", "generate.mask_token=<unk>"]
    error_line(fluid(*args, "--model", model_dir), "mask_token '<unk>':",
               "is a FLUID model, which drafts with the mask token it was trained with ('<|mask|>')")


def test_importing_the_command_line_imports_nothing_heavy():
    """typer reports a flag typo only after `fluid_cli.cli` is imported: nothing heavy may load with it."""
    code = ("import sys, fluid_cli.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("columns, width", [(None, "200"), ("100", "100")])
def test_output_that_is_not_a_terminal_gets_wide_tables(columns, width):
    code = "from fluid_cli.cli import wide_when_piped; wide_when_piped(); from rich.console import Console; " \
           "print(Console().width)"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         check=True, env=env | ({"COLUMNS": columns} if columns else {}))
    assert out.stdout.strip() == width


def test_no_warning_about_sequences_longer_than_model_max_length(tmp_path, caplog):
    from transformers import AutoTokenizer

    from fluid_cli.hf import load_tokenizer

    tok = tiny_tokenizer()
    tok.model_max_length = 8
    tok.save_pretrained(tmp_path)
    load_tokenizer(str(tmp_path))("x" * 20)
    assert "Token indices sequence length" not in caplog.text
    AutoTokenizer.from_pretrained(tmp_path)("x" * 20)  # transformers' own loading does warn
    assert "Token indices sequence length" in caplog.text


# --------------------------------------------------------------------------------------------- issue 23, part A
# training, data preparation, calibration


def test_resuming_a_finished_calibrated_run_says_so_and_changes_nothing(tmp_path, trained, dataset):
    out, recipe = copy_run(trained, tmp_path, dataset)
    calibrated = fluid("calibrate-khead", recipe, "--set", "khead.steps=2", "--set", f"khead.dataset={dataset}")
    assert calibrated.exit_code == 0, calibrated.output
    before = snapshot(out)
    result = fluid("train-stage1", recipe, "--resume")
    error_line(result, f"--resume: {out} holds a finished run (4 steps, K-head calibrated): nothing is left to train, "
                       "and nothing was changed")
    again = error_line(fluid("train-stage1", recipe), "holds a finished run (4 steps, K-head calibrated)")
    assert "--resume" not in again  # the advice for a finished run is advice that works
    assert snapshot(out) == before and load_model(out).meta.khead.calibrated


@pytest.mark.parametrize("override, change", [
    ("lora.r=8", "[lora] r: 16 -> 8"),
    ("lora.target_modules=['q_proj']", '[lora] target_modules: "all-linear" -> ["q_proj"]'),
    ("lora.scope=all", '[lora] scope: "draft" -> "all"'),
    ("fluid.max_k=8", "[fluid] max_k: 4 -> 8"),
    ("train.max_steps=6", "[train] max_steps: 4 -> 6"),
    ("train.lr=1e-3", "[train] lr: 0.0002 -> 0.001"),
    ("train.seed=1", "[train] seed: 0 -> 1"),
    ("train.batch_size=2", "[train] batch_size: 4 -> 2"),
], ids=["lora.r", "lora.target_modules", "lora.scope", "fluid.max_k", "train.max_steps", "train.lr", "train.seed",
        "train.batch_size"])
def test_a_resume_that_changes_the_steps_names_the_keys_and_changes_nothing(tmp_path, trained, dataset, override,
                                                                            change):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    before = snapshot(out)
    result = fluid("train-stage1", recipe, "--resume", "--set", override, "--set", "train.log_steps=2")
    line = error_line(result, f"--resume: {out} was trained with another recipe ({change}); resuming would not "
                              "continue the same run")
    assert "log_steps" not in line  # allowed, so not among the refused
    assert snapshot(out) == before


def test_a_resume_on_other_data_is_refused_and_moved_data_is_not(tmp_path, trained, dataset):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    before = snapshot(out)
    other = write_dataset(tmp_path / "other", n=24, seed=1)
    error_line(fluid("train-stage1", recipe, "--resume", "--set", f"train.dataset={other}"),
               f"--resume: the prepared dataset {other} is not the one", "resuming would continue on other data")
    assert snapshot(out) == before

    moved = shutil.copytree(dataset, tmp_path / "moved")
    result = fluid("train-stage1", recipe, "--resume", "--set", f"train.dataset={moved}", "--set",
                   "train.save_steps=3")
    assert result.exit_code == 0, result.output
    said = next(line for line in result.stderr.splitlines() if line.startswith("resuming with changed "))
    assert f'[train] dataset: "{dataset}" -> "{moved}"' in said and "[train] save_steps: 2 -> 3" in said
    assert (out / train.SUMMARY_NAME).is_file()


def test_calibrating_on_a_dataset_of_another_tokenizer_is_refused(tmp_path, model_dir, dataset):
    data = shutil.copytree(dataset, tmp_path / "data")
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(data / "tokenizer")
    folder = shutil.copytree(model_dir, tmp_path / "model")
    before = snapshot(folder)
    (tmp_path / "r.toml").write_text(f'[fluid]\nmax_k = 4\n[khead]\nmodel_dir = "{folder}"\ndataset = "{data}"\n'
                                     "steps = 2\n")
    error_line(fluid("calibrate-khead", tmp_path / "r.toml"),
               f"{data / 'tokenizer'}: the dataset was tokenized with a different tokenizer than the model in "
               f"{folder} (1 tokens differ, e.g. '<extra>')")
    assert snapshot(folder) == before


@pytest.mark.parametrize("source, message", [
    ('{path="a.jsonl", prefix_tokens=[2, 4]}', "[data] sources[0] prefix_tokens: applies to prompts sampled from "
                                               "the model (path = \"self\"), not 'a.jsonl'"),
    ('{path="self", num_samples=4, prompt_format="Q: {prompt}"}',
     "[data] sources[0] prompt_format: a \"self\" source samples its prompts from the model: it has no rows"),
    ('{path="self", num_samples=4, format="alpaca"}', "[data] sources[0] format: a \"self\" source samples"),
    ('{path="self", num_samples=4, prefix_tokens=[4, 64]}',
     "[data] sources[0] prefix_tokens: prefixes of up to 64 tokens leave no room for a continuation within [data] "
     "cutoff_len = 64"),
], ids=["prefix on rows", "prompt_format on self", "format on self", "prefix too long"])
def test_source_keys_of_the_other_kind_are_refused_by_recipe(tmp_path, source, message):
    (tmp_path / "r.toml").write_text("[data]\ncutoff_len = 64\n")
    error_line(fluid("recipe", tmp_path / "r.toml", "--set", f"data.sources=[{source}]"), message)


def regeneration(tmp_path: Path, n: int = 14, regen: str = "") -> str:
    """A recipe that regenerates `n` rows in chunks of 4 with a tiny model (`tmp_path / "base"`)."""
    from test_lora import sharp_base
    from test_regenerate import recipe, rows_file

    return recipe(tmp_path, sharp_base(tmp_path / "base"), sources=rows_file(tmp_path, n), regen=regen)


def interrupted_after_two_chunks(monkeypatch, text: str) -> list[int]:
    """Run the regeneration of `text` until two chunks are cached (then a kill); returns the list the chunks
    generated from now on are appended to."""
    from fluid_cli import data, regenerate

    original, calls = regenerate._chunk, []

    def dies_after_two(n, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(n)
        return original(n, *args)

    monkeypatch.setattr(regenerate, "_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        data.run(load_recipe_text(text))
    calls.clear()
    monkeypatch.setattr(regenerate, "_chunk", lambda n, *args: (calls.append(n), original(n, *args))[1])
    return calls


def test_a_model_replaced_at_its_path_does_not_continue_the_old_models_cache(tmp_path, monkeypatch):
    from test_lora import sharp_base

    from fluid_cli import data

    text = regeneration(tmp_path)
    calls = interrupted_after_two_chunks(monkeypatch, text)
    old_cache = {p.name for p in tmp_path.glob(".out.regen-*")}
    assert len(old_cache) == 1
    shutil.rmtree(tmp_path / "base")
    sharp_base(tmp_path / "base", arch="qwen2")  # another model, the same path
    data.run(load_recipe_text(text))
    assert calls == [0, 1, 2, 3]  # nothing of the old model's continuations was reused
    assert not list(tmp_path.glob(".out.regen-*"))


def test_a_damaged_cached_chunk_is_generated_again(tmp_path, monkeypatch, capsys):
    from test_regenerate import folder_digest

    from fluid_cli import data

    text = regeneration(tmp_path)
    data.run(load_recipe_text(text))
    whole = folder_digest(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    calls = interrupted_after_two_chunks(monkeypatch, text)
    (cache,) = tmp_path.glob(".out.regen-*")
    (cache / "chunk-0000000.json").write_bytes(b"")  # empty, as a crash of the machine can leave an unsynced file
    (cache / "chunk-0000001.json").write_text('{"prompts": [[1]], "continuations": [')  # cut short
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    data.run(load_recipe_text(text))
    assert calls == [0, 1, 2, 3] and len(synced) >= 4  # every chunk reaches the disk before its rename
    err = capsys.readouterr().err.replace("\n", "")
    assert f"{cache / 'chunk-0000000.json'}: a damaged cached chunk; generating it again" in err
    assert folder_digest(tmp_path / "out") == whole


def test_a_regeneration_failing_on_a_mistake_leaves_no_cache(tmp_path, monkeypatch):
    from fluid_cli import data, regenerate

    def mistake(*args):
        raise FluidError("a mistake")

    monkeypatch.setattr(regenerate, "_chunk", mistake)
    with pytest.raises(FluidError):
        data.run(load_recipe_text(regeneration(tmp_path)))
    assert not list(tmp_path.glob(".out*"))


def test_a_second_prepare_data_into_the_same_output_fails_at_once(tmp_path):
    (tmp_path / "r.toml").write_text(regeneration(tmp_path))
    with io.output_lock(tmp_path / "out", "[data] output_dir", beside=True):
        error_line(fluid("prepare-data", tmp_path / "r.toml"), f"{tmp_path / 'out'}: another fluid process (pid "
                                                               f"{os.getpid()}) is writing", "[data] output_dir")
    assert not list(tmp_path.glob(".out.regen-*")) and not (tmp_path / "out").exists()


def test_one_chunk_starts_no_worker_processes(tmp_path, monkeypatch):
    import multiprocessing

    def no_pool(*args):
        raise AssertionError("a process pool was started for one chunk")

    monkeypatch.setattr(multiprocessing, "get_context", no_pool)
    (tmp_path / "r.toml").write_text(regeneration(tmp_path, n=3, regen="num_proc = 4"))
    result = fluid("prepare-data", tmp_path / "r.toml")
    assert result.exit_code == 0, result.output


def test_a_worker_whose_parent_was_killed_exits_quietly(tmp_path):
    import time

    # The parent is killed while the worker still starts up (as a pool worker importing torch), before it watches.
    child = ("import os, sys, time\nprint(os.getpid(), flush=True)\nfrom fluid_cli.regenerate import _exit_with\n"
             "_exit_with(int(sys.argv[1]))\ntime.sleep(120)\n")
    starter = (f"import os, subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}, "
               "str(os.getpid())])\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(240):  # (the import takes seconds on a busy machine)
        state = Path(f"/proc/{pid}/status")
        if not state.exists() or "zombie" in state.read_text():
            break
        time.sleep(0.25)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the orphaned worker kept running")
    assert parent.stderr.read() == ""


@pytest.mark.parametrize("batch_size", [1, 4])
def test_an_empty_prompt_in_a_regeneration_is_a_bad_row(tmp_path, batch_size):
    from test_lora import sharp_base
    from test_regenerate import recipe

    from fluid_cli import data

    rows = [{"prompt": "ab", "response": "c"}, {"prompt": "", "response": "c"}, {"prompt": "de", "response": "f"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = recipe(tmp_path, sharp_base(tmp_path / "base"),  # template none: no BOS, no template before the prompt
                  sources=f'[[data.sources]]\npath = "{tmp_path / "rows.jsonl"}"\nformat = "prompt_response"\n')
    (tmp_path / "r.toml").write_text(text.replace("batch_size = 4", f"batch_size = {batch_size}"))
    error_line(fluid("prepare-data", tmp_path / "r.toml"), f"{tmp_path / 'rows.jsonl'}:2: an empty prompt",
               "nothing for [data.regenerate] to continue", "skip_bad_rows", alone=False)
    stats = data.run(load_recipe(tmp_path / "r.toml", ["data.skip_bad_rows=true"]))
    assert stats["dropped"]["bad_row"] == 1 and stats["examples_out"]["train"] == 2


def test_every_output_folder_has_the_mode_mkdir_gives(tmp_path):
    from fluid_cli import data

    probe = tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + '[[data.sources]]\npath = "synthetic:arithmetic"\n'
                                     f'num_samples = 8\n[data]\noutput_dir = "{tmp_path / "d"}"\n')
    data.run(load_recipe(tmp_path / "r.toml"))
    assert (tmp_path / "d").stat().st_mode == probe.stat().st_mode


@pytest.mark.slow
def test_training_with_an_added_mask_token_prints_no_library_notices(tmp_path, dataset):
    from test_lora import sharp_base

    base = sharp_base(tmp_path / "base")
    (tmp_path / "r.toml").write_text(f'[model]\npath = "{base}"\n[fluid]\nmask_token = "<|new_mask|>"\nmax_k = 4\n'
                                     f'[lora]\nr = 4\n[train]\ndataset = "{dataset}"\n'
                                     f'output_dir = "{tmp_path / "out"}"\nmax_steps = 1\nbatch_size = 2\n')
    proc = subprocess.run([sys.executable, "-m", "fluid_cli", "train-stage1", str(tmp_path / "r.toml")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert load_model(tmp_path / "out").meta.vocab_size == len(tiny_tokenizer()) + 1  # the token was added
    assert "multivariate normal" not in proc.stderr and "save_embedding_layers" not in proc.stderr, proc.stderr


def test_a_path_the_recipe_does_not_name_is_reported_with_the_key_it_defaults_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE)
    error_line(fluid("train-stage1", "r.toml"), "runs/data: dataset folder not found (the default of [data] "
                                                "output_dir, as [train] dataset is not set)")
    error_line(fluid("calibrate-khead", "r.toml"), "runs/stage1: model folder not found (the default of [train] "
                                                   "output_dir, as [khead] model_dir is not set)")
    (tmp_path / "r.toml").write_text(TINY_SCRATCH_RECIPE + '[train]\noutput_dir = "mine"\n')
    error_line(fluid("calibrate-khead", "r.toml"), "mine: model folder not found ([train] output_dir, as [khead] "
                                                   "model_dir is not set)")


@pytest.mark.parametrize("field, value, message", [
    ("world_size", 2, "step-00000002 was written by 2 processes, the run now has 1"),
    ("step", 9, "the newest checkpoint is after step 9, beyond the run's 4 steps, so it is not this run's"),
], ids=["processes", "past the end"])
def test_a_checkpoint_of_another_run_shape_is_refused(tmp_path, trained, dataset, field, value, message):
    out, recipe = interrupted_run(trained, tmp_path, dataset)
    state = out / "checkpoints" / "step-00000002" / train.STATE_NAME
    state.write_text(json.dumps({**json.loads(state.read_text()), field: value}))
    before = snapshot(out)
    error_line(fluid("train-stage1", recipe, "--resume"), message, alone=False)
    assert snapshot(out) == before


# ------------------------------------------------------------------------ probing sampling and LLaMA-Factory input


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_with_nan_or_infinite_logits_is_refused_not_decoded(tmp_path, bad, temperature):
    """argmax and sampling both pick a token from NaN scores (sampling picked the vocabulary's last one): one line,
    nothing written as if it were the model's text."""
    import torch

    model = tiny_fluid_model(max_k=4)
    with torch.no_grad():
        model.lm.lm_head.weight[5] = bad  # inf times hidden states of either sign: +inf, -inf and NaN logits
    save_model(model, tmp_path / "m")
    error_line(fluid("generate", "--model", tmp_path / "m", "-p", "ab", "--max-new-tokens", "4", "--temperature",
                     temperature, "--seed", "1"), "the model's logits are not numbers (NaN or infinite)")


def test_hf_sampling_at_a_temperature_it_cannot_handle_is_one_line():
    from fluid_cli.hf import generate_batch

    with pytest.raises(FluidError, match=r"temperature = 1e-300: transformers' generate cannot sample at it"):
        generate_batch(tiny_model(), [[5, 6]], 2, temperature=1e-300)


def test_python_m_fluid_cli_cli_runs_the_command_line():
    """`python -m fluid_cli.cli ...` did nothing and exited 0: the module had no __main__ guard."""
    out = subprocess.run([sys.executable, "-m", "fluid_cli.cli", "recipe", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "Usage" in out.stdout, out
