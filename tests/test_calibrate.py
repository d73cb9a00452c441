"""Stage II calibration (`fluid calibrate-khead`, METHOD 2): targets, pair collection, head fit, the command."""

from __future__ import annotations

import doctest
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_SCRATCH_RECIPE, tiny_fluid_model, tiny_tokenizer
from typer.testing import CliRunner

from fluid_cli import calibrate
from fluid_cli.cli import app
from fluid_cli.config import load_recipe, load_recipe_text
from fluid_cli.khead import gaussian_soft_labels, horizon_from_curve
from fluid_cli.layout import build_expanded_batch, pad_batch
from fluid_cli.folder import load_model

runner = CliRunner()
K = 4
TAU = 1.0  # nats; the char vocabulary is ~100 tokens, so a random letter costs > 2.3




# --------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    "losses, valid, expected",
    [
        ([5.0, 4.0, 3.0, 6.0], None, 1),  # no running mean under tau -> 1
        ([0.5, 0.9, 0.4, 0.2], None, 4),  # every prefix qualifies -> K
        ([0.5, 3.0, 0.1, 0.1], None, 4),  # dips back under tau late (mean 0.925) -> the largest qualifying k
        ([0.5, 1.6, 0.1, 3.0], None, 3),  # means 0.5, 1.05, 0.73, 1.3: under tau again at k=3, not at k=4
        ([1.0, 1.0, 1.0, 1.0], None, 1),  # strict: mean == tau does not qualify
        ([0.1, 0.1, 0.1, 0.1], [True, True, False, False], 2),  # slots past the sequence end are excluded
        ([0.1, 0.1, 0.1, 0.1], [False, False, False, False], 1),  # a block at the very end
        ([0.1, 0.1, 0.1, 0.1], [True, False, True, True], 1),  # k qualifies only if slots 1..k all exist
    ],
)
def test_target_horizon_rule(losses, valid, expected):
    valid_t = torch.tensor(valid) if valid is not None else None
    assert int(horizon_from_curve(torch.tensor(losses), TAU, valid_t)) == expected


def test_target_uses_existing_slots_only_in_batches():
    # The value stored in an invalid slot must not matter (it is 0 in collected pairs, but any value is ignored).
    losses = torch.tensor([[0.2, 0.4, 50.0, 50.0], [0.2, 0.4, -50.0, -50.0]])
    valid = torch.tensor([[True, True, False, False]] * 2)
    assert horizon_from_curve(losses, TAU, valid).tolist() == [2, 2]


@pytest.mark.parametrize("k_star", [1, 5, 16, 32])
@pytest.mark.parametrize("sigma", [0.7, 1.5, 3.0])
def test_soft_labels_normalised_peaked_with_width_sigma(k_star, sigma):
    max_k = 32
    q = gaussian_soft_labels(torch.tensor([k_star]), max_k, sigma)[0].double()
    ks = torch.arange(1, max_k + 1, dtype=torch.float64)
    assert q.shape == (max_k,) and (q >= 0).all()
    assert math.isclose(float(q.sum()), 1.0, abs_tol=1e-6)
    assert int(q.argmax()) + 1 == k_star
    # Gaussian shape: within 3 sigma (where float32 has not underflowed) log q is the parabola -(k-K*)^2/2sigma^2.
    near = (ks - k_star).abs() <= 3 * sigma
    expected = -((ks - k_star) ** 2) / (2 * sigma**2)
    assert torch.allclose(torch.log(q / q[k_star - 1])[near], expected[near], atol=1e-4)
    if 4 * sigma < k_star < max_k - 4 * sigma:  # away from the edges the spread is sigma (to 1%: classes are integers)
        std = float(((q * (ks - k_star) ** 2).sum()).sqrt())
        assert math.isclose(std, sigma, rel_tol=1e-2)


def test_docstring_examples():
    result = doctest.testmod(calibrate)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------- pairs


def _rows(tok, texts, prompt=1):
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_block_losses_equal_a_plain_forward_over_prefix_and_masks():
    """Per-slot losses and anchor states from the expanded batch equal those of the decoding layout
    `x_0..x_i, [M] x K` run as a plain causal forward (slot o predicts x_{i+o+1}; past-the-end slots invalid)."""
    model = tiny_fluid_model("llama", max_k=K)
    tok = model.tokenizer
    rows = _rows(tok, ["hello world", "abcabc"])
    batch = pad_batch(rows, tok.pad_token_id)
    ex = build_expanded_batch(batch["input_ids"], batch["labels"], batch["attention_mask"],
                              mask_token_id=model.mask_token_id, max_k=K, p_anchor=0.6, fixed_k=True,
                              reveal=False, noise=0.0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden, losses, valid = calibrate.block_losses(model, ex)
        blocks = [(b, int(i)) for b in range(2) for i in ex.anchor[b][ex.slot_type[b] == 1].view(-1, K)[:, 0]]
        assert len(blocks) == len(hidden) > 2
        for n, (b, i) in enumerate(blocks):
            x = rows[b]["input_ids"]
            seq = torch.tensor([x[: i + 1] + [model.mask_token_id] * K])
            logits, ref_hidden = model(seq)
            torch.testing.assert_close(hidden[n], ref_hidden[0, i], atol=1e-5, rtol=1e-5)
            for o in range(1, K + 1):
                exists = i + o + 1 < len(x)
                assert bool(valid[n, o - 1]) == exists
                if exists:
                    ref = torch.nn.functional.cross_entropy(logits[0, i + o], torch.tensor(x[i + o + 1]))
                    torch.testing.assert_close(losses[n, o - 1], ref, atol=1e-4, rtol=1e-4)
                else:
                    assert losses[n, o - 1] == 0


def test_memory_mapped_store_holds_the_same_pairs(tmp_path):
    model = tiny_fluid_model("llama", max_k=K)
    rows = _rows(model.tokenizer, ["the cat sat on the mat", "a b c d e f g", "xyzzy plugh"])

    def collect(max_bytes, folder):
        store = calibrate.PairStore(model.lm.config.hidden_size, K, max_bytes, folder)
        pairs = calibrate.collect_pairs(model, [rows[:2], rows[2:]], store, p_anchor=0.5,
                                        generator=torch.Generator().manual_seed(0))
        return store, pairs

    mem_store, mem = collect(1 << 30, tmp_path / "a")
    map_store, mapped = collect(0, tmp_path / "b")
    assert not mem_store.spilled and map_store.spilled and (tmp_path / "b" / "hidden.bin").is_file()
    assert len(mem) == len(mapped) > 5
    assert mem.hidden.dtype == torch.float16
    for name in ("hidden", "losses", "valid"):
        assert torch.equal(getattr(mem, name), getattr(mapped, name))


# --------------------------------------------------------------------------------------------- a Stage I model


def _sequence(rng: random.Random, tok, n: int = 40) -> dict:
    """Random letter spans (unpredictable) followed by countdowns 'd..0' (predictable once started): the
    horizon depends on where in the pattern the anchor is, which its hidden state knows."""
    text = ""
    while len(text) < n:
        text += "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5)))
        text += "".join(str(x) for x in range(rng.randint(3, 9), -1, -1))
    ids = [tok.bos_token_id] + tok(text[:n], add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "labels": [-100] + ids[1:]}


RECIPE = TINY_SCRATCH_RECIPE + """
[fluid]
max_k = {K}

[data]
output_dir = "{root}/data"

[train]
output_dir = "{root}/model"
batch_size = 8
max_steps = 200
lr = 3e-3
log_steps = 50
save_steps = 1000

[khead]
tau = {TAU}
sigma = 1.0
steps = 300
lr = 3e-3
batch_size = 256
cutoff_len = 64
holdout = 0.25
collect_batch_size = 16
"""


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A tiny Stage I model from `fluid train-stage1` on the synthetic data (saved as `prepare-data` saves it),
    and the recipe that trained it."""
    import datasets

    from fluid_cli import train

    root = tmp_path_factory.mktemp("stage1")
    rng = random.Random(0)
    tok = tiny_tokenizer()
    rows = [_sequence(rng, tok) for _ in range(400)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(root / "data"))
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE.format(K=K, TAU=TAU, root=root))
    train.run(load_recipe(recipe))
    return root


def test_backbone_frozen_and_only_the_head_trained(stage1, monkeypatch):
    model = load_model(stage1 / "model")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    old_head = {k: v.clone() for k, v in model.khead.state_dict().items()}
    monkeypatch.setattr(calibrate, "load_model", lambda *a, **kw: model)
    cfg = load_recipe_text((stage1 / "recipe.toml").read_text(), ["khead.steps=20"])
    calibrate.run(cfg)

    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    head_params = list(model.khead.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_params)
    # The head that was fitted is the one on disk, and it is not the one that was there before.
    saved = load_file(stage1 / "model" / "k_head.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.khead.state_dict().items())
    assert not all(torch.equal(saved[k], old_head[k]) for k in saved)


def test_calibrate_end_to_end_sweep(stage1):
    model_dir = stage1 / "model"
    weights = (model_dir / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["calibrate-khead", str(stage1 / "recipe.toml"), "--tau", "0.5,1.0,1.5",
                                 "--set", "khead.sigma=1.25", "--set", "khead.objective=gaussian"])
    assert result.exit_code == 0, result.output
    assert "Saved the head for tau=1 (gaussian)" in result.stdout
    assert "held-out loss per slot (nats)" in result.stdout  # the scale tau is chosen on

    report = json.loads((model_dir / "calibration.json").read_text())
    assert [r["tau"] for r in report["results"]] == [0.5, 1.0, 1.5]
    assert [r["saved"] for r in report["results"]] == [False, True, False]
    assert report["pairs"]["train"] > 1000 and report["pairs"]["holdout"] > 300
    for r in report["results"]:  # the head beats always answering the most common K*, on held-out pairs
        assert r["within1"] >= r["majority_within1"] + 0.15 and r["exact"] >= r["majority_exact"] + 0.15
        assert sum(r["hist_k_star"]) == sum(r["hist_pred"]) == report["pairs"]["holdout"]
    assert len({r["mean_k_star"] for r in report["results"]}) == 3  # tau changes the targets

    meta = json.loads((model_dir / "fluid.json").read_text())
    assert meta["khead"] == {
        "objective": "gaussian", "calibrated": True, "tau": 1.0, "sigma": 1.25, "slot_loss": report["slot_loss"],
        "steps": 300, "lr": 3e-3,
        "data": {"path": str(stage1 / "data"), "pairs": report["pairs"]["train"],
                 "holdout_pairs": report["pairs"]["holdout"]},
    }
    assert len(report["slot_loss"]) == K and report["slot_loss"][0] < report["slot_loss"][-1]
    assert "sigma = 1.25" in (model_dir / "calibration-config.toml").read_text()  # the calibration recipe
    assert (model_dir / "model.safetensors").read_bytes() == weights  # the backbone is untouched
    assert not list(model_dir.glob(".calibrate.*")) and not list(model_dir.glob(".staging*"))  # nothing left over
    assert load_model(model_dir).khead.max_k == K


def test_single_tau_replaces_the_recipes(stage1):
    result = runner.invoke(app, ["calibrate-khead", str(stage1 / "recipe.toml"), "--tau", "1.5",
                                 "--set", "khead.objective=gaussian"])
    assert result.exit_code == 0, result.output
    report = json.loads((stage1 / "model" / "calibration.json").read_text())
    assert [(r["tau"], r["saved"]) for r in report["results"]] == [(1.5, True)]
    assert json.loads((stage1 / "model" / "fluid.json").read_text())["khead"]["tau"] == 1.5


def test_loss_curve_objective_one_head_for_every_tau(stage1):
    result = runner.invoke(app, ["calibrate-khead", str(stage1 / "recipe.toml"), "--tau", "0.5,1.5",
                                 "--set", "khead.objective=loss-curve", "--set", "khead.max_memory_mb=0"])
    assert result.exit_code == 0, result.output
    report = json.loads((stage1 / "model" / "calibration.json").read_text())
    assert report["storage"] == {"train": "memmap", "holdout": "memmap"}
    results = report["results"]
    assert [r["tau"] for r in results] == [0.5, 1.0, 1.5]  # the recipe's tau is added: its head is saved
    assert len({r["fit_s"] for r in results}) == 1  # one fit, scored at each tau
    for r in results:
        assert r["within1"] >= r["majority_within1"] + 0.15
    assert json.loads((stage1 / "model" / "fluid.json").read_text())["khead"]["objective"] == "loss-curve"


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tau", "0"], "--tau 0: tau must be a positive number"),
        (["--tau", "1.0,-2"], "--tau -2: tau must be a positive number"),
        (["--tau", "fast"], "--tau fast: expected a number"),
        (["--set", "khead.tau=0"], "--set khead.tau=0: [khead] tau: must be greater than 0"),
        (["--set", "fluid.max_k=8"], "[fluid] max_k = 8 but the model in"),
        (["--set", "khead.holdout=1.0"], "--set khead.holdout=1.0: [khead] holdout: must be in (0, 1)"),
    ],
)
def test_bad_input_is_one_line(stage1, args, message):
    before = (stage1 / "model" / "fluid.json").read_text()
    result = runner.invoke(app, ["calibrate-khead", str(stage1 / "recipe.toml"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (stage1 / "model" / "fluid.json").read_text() == before


def test_not_a_stage1_directory(stage1, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a plain model folder has no fluid.json
    for folder in (tmp_path, tmp_path / "absent"):
        result = runner.invoke(app, ["calibrate-khead", str(stage1 / "recipe.toml"),
                                     "--set", f'khead.model_dir="{folder}"'])
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert str(folder) in result.stderr
    assert not (tmp_path / "k_head.safetensors").exists()
