"""Draft-only LoRA: verified FLUID decoding equals the *original* model's greedy decoding after a real Stage I run,
training and decoding agree on the draft rows, and only the adapter (and the mask row) learns."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import pytest
import torch
from test_decode import N_NEW, random_prompts, settings
from tiny import sharpen, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid_cli import train
from fluid_cli.cache import RowCache
from fluid_cli.config import load_recipe_text
from fluid_cli.decode import Decoder, _Feed, decode_batch, fluid_decode
from fluid_cli.errors import FluidError
from fluid_cli.folder import load_model, save_model
from fluid_cli.hf import greedy_generate
from fluid_cli.khead import KHeadMeta
from fluid_cli.layout import MASK_SLOT, BlockPlan, expand_batch, pad_batch

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
NEW_MASK = "<|new_mask|>"


def sharp_base(folder: Path, arch: str = "llama") -> Path:
    """A tiny "pretrained" model on disk: random weights with an untied, scaled-up head, so that its greedy text
    varies and its top two logits are far apart (no near-ties)."""
    tok = tiny_tokenizer()
    lm = tiny_model(arch, tok, seed=5)
    sharpen(lm, seed=1)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def rows(tok, n: int = 96) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice("abcdef") for _ in range(rng.randint(3, 8))) + "="
        answer = "".join(str(x) for x in range(rng.randint(3, 9), -1, -1)) + "."
        p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        out.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return out


def stage1(root: Path, base: Path, scope: str, steps: int = 40, extra: str = "") -> Path:
    """`fluid train-stage1`'s own run: LoRA of the given scope on `base`, the mask token added."""
    data = root / "data"
    if not data.exists():
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(tiny_tokenizer()))}).save_to_disk(str(data))
    out = root / f"stage1-{scope}"
    recipe = f"""
[model]
path = "{base}"
[fluid]
mask_token = "{NEW_MASK}"
max_k = 8
[lora]
scope = "{scope}"
r = 8
alpha = 16
dropout = 0.0
[train]
dataset = "{data}"
output_dir = "{out}"
lr = 1e-2
batch_size = 8
max_steps = {steps}
log_steps = 10
save_steps = 1000
{extra}
"""
    train.run(load_recipe_text(recipe))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = sharp_base(root / "base")
    return {"base": base, "draft": stage1(root, base, "draft"), "all": stage1(root, base, "all")}


def lora_moved(model) -> bool:
    return any(p.abs().sum() > 0 for n, p in model.backbone.named_parameters() if "lora_B" in n)


def test_draft_scope_is_lossless_against_the_original_model(trained, device):
    original = AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float32).eval().to(device)
    model = load_model(trained["draft"], merge=True).to(device)
    assert model.meta.lora_scope == "draft" and model.meta.exact_to == "base" and model.gate is not None
    assert lora_moved(model)  # the adapter was trained: the drafts are not the base model's
    model.meta.khead = KHeadMeta(objective="gaussian", calibrated=True, tau=3.0)  # a random head, for khead
    prompts = random_prompts(seed=12, count=3)
    eos = (model.tokenizer.eos_token_id,)
    references = [greedy_generate(original, p, N_NEW, eos) for p in prompts]
    for horizon in ("cost", "khead", "fixed", "entropy"):
        for max_k in (1, 4, 8):
            s = settings(horizon, max_k=max_k, threshold=0.0 if horizon in ("cost", "fixed") else 0.5,
                         eos_token_ids=eos)
            for prompt, reference in zip(prompts, references):
                assert fluid_decode(model, prompt, s).tokens == reference, (horizon, max_k, prompt)
        results, _ = decode_batch(model, prompts, settings(horizon, max_k=8, eos_token_ids=eos), batch_size=2)
        assert [r.tokens for r in results] == references, horizon


def test_all_scope_is_lossless_against_the_adapted_model_only(trained):
    original = AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float32).eval()
    model = load_model(trained["all"], merge=True)  # merged: the adapted weights
    assert model.meta.lora_scope == "all" and model.meta.exact_to == "adapted" and model.gate is None
    prompts = random_prompts(seed=12, count=3)
    eos = (model.tokenizer.eos_token_id,)
    adapted = [greedy_generate(model.lm, p, N_NEW, eos) for p in prompts]
    assert [fluid_decode(model, p, settings("fixed", max_k=8, eos_token_ids=eos)).tokens for p in prompts] == adapted
    assert adapted != [greedy_generate(original, p, N_NEW, eos) for p in prompts]  # not the user's model


def test_base_weights_stay_bit_identical(trained):
    original = AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float32)
    model = load_model(trained["draft"])
    base = dict(original.named_parameters())
    checked = 0
    for name, p in model.lm.named_parameters():
        plain = name.replace(".base_layer", "")
        if "lora_" in name or "trainable_tokens" in name or plain not in base:
            continue
        rows = base[plain].shape[0]  # the embedding grew by the mask row
        assert torch.equal(p[:rows], base[plain]), name
        checked += 1
    assert checked == len(base) - 1  # every base tensor but the untied head's twin key


@pytest.mark.parametrize("scope", ["draft", "all"])
def test_gradients_reach_only_the_adapter_and_the_mask_row(tmp_path, scope):
    base = sharp_base(tmp_path / "base")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(tiny_tokenizer()))}).save_to_disk(
        str(tmp_path / "data"))
    cfg = load_recipe_text(f'[model]\npath = "{base}"\n[fluid]\nmask_token = "{NEW_MASK}"\nmax_k = 4\n'
                           f'[lora]\nscope = "{scope}"\n[train]\ndataset = "{tmp_path / "data"}"\n')
    model = train.build_model(cfg)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the draft rows
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = pad_batch(rows(model.tokenizer, 4), 0)
    ex = train.build_expanded_batch(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    mask_token_id=model.mask_token_id, max_k=4, p_anchor=0.5,
                                    generator=torch.Generator().manual_seed(0))
    out = model.stage1_loss(ex)
    adapter = [p for p in model.parameters() if p.requires_grad]
    ar_grads = torch.autograd.grad(out.loss_ar, adapter, allow_unused=True, retain_graph=True)
    ar_moves = any(g is not None and g.abs().sum() > 0 for g in ar_grads)
    assert ar_moves == (scope == "all")  # draft-only: L_AR is the base model's loss, which no weight changes
    out.loss.backward()
    trained_names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained_names and all("lora_" in n or "trainable_tokens" in n for n in trained_names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n
               and "trainable_tokens" not in n)


@pytest.mark.parametrize("scope", ["draft", "all"])
def test_training_and_decoding_agree_on_the_draft_rows(trained, scope, device):
    """The Stage I forward's logits at a block's slots (mask and revealed) equal the decoder's draft forward
    over the same prefix and block, which feeds the prefix as main rows and the block as draft rows."""
    model = load_model(trained[scope]).to(device)
    tok = model.tokenizer
    row = rows(tok, 1)[0]
    batch = pad_batch([row], 0)
    n = len(row["input_ids"])
    anchor, k = n - 7, 5
    plan = BlockPlan(k=torch.zeros(1, n, dtype=torch.long), reveal=torch.zeros(1, n, 8, dtype=torch.bool),
                     noise=torch.full((1, n, 8), -1))
    plan.k[0, anchor] = k
    plan.reveal[0, anchor, 2] = True  # slot 3 shows its true token, slots 1, 2, 4, 5 are masks
    ex = expand_batch(batch["input_ids"], batch["labels"], batch["attention_mask"], plan, model.mask_token_id)
    ex = ex.to(device)
    with torch.no_grad():
        hidden = model.hidden_states(draft_from=ex.num_main, **ex.model_inputs()).last_hidden_state
        train_logits = model.logits(hidden[0, ex.slot_type[0] == MASK_SLOT])
        block = ex.input_ids[0, ex.slot_type[0] == MASK_SLOT].tolist()
        assert block.count(model.mask_token_id) == 4
        decoder = Decoder(model, settings("fixed"))
        cache = RowCache(model.lm.config.num_hidden_layers, n + 16, model.device)
        prefix = row["input_ids"][: anchor + 1]
        hidden, wm = decoder._step(cache, [_Feed(prefix, block, 0, False, False)])
        decode_logits = model.logits(hidden[0, wm:])
    torch.testing.assert_close(decode_logits, train_logits, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_decodes_the_same(trained, tmp_path):
    model = load_model(trained["draft"])
    save_model(model, tmp_path / "again")
    again = load_model(tmp_path / "again")
    assert again.meta == model.meta
    prompts = random_prompts(seed=3, count=2)
    s = settings("fixed", max_k=8)
    assert [fluid_decode(again, p, s).tokens for p in prompts] == [fluid_decode(model, p, s).tokens for p in prompts]
    a = dict(model.backbone.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in again.backbone.named_parameters())


def test_a_moved_base_model_names_where_its_path_came_from(trained, tmp_path):
    import json
    import shutil

    folder = tmp_path / "moved"
    shutil.copytree(trained["draft"], folder)
    meta = json.loads((folder / "fluid.json").read_text())
    (folder / "fluid.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(FluidError, match=r"gone: model folder not found — the base model path comes from .*fluid.json"):
        load_model(folder)
    (folder / "fluid.json").write_text(json.dumps({**meta, "lora_scope": None}))
    with pytest.raises(FluidError, match="lora_scope: adapter weights need their scope"):
        load_model(folder)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"needs the real model at {STORIES}")
def test_stories260k_draft_scope_equals_the_original_models_greedy(tmp_path):
    tok = AutoTokenizer.from_pretrained(STORIES)
    texts = ["Once upon a time, there was a little girl named Lily.", "The dog ran to the park and saw a ball.",
             "Tom and Sue went to the beach. They played in the sand."] * 20
    data = [{"input_ids": ids, "labels": [-100] + ids[1:]} for ids in (tok(t)["input_ids"] for t in texts)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(data)}).save_to_disk(str(tmp_path / "data"))
    cfg = load_recipe_text(f'[model]\npath = "{STORIES}"\n[fluid]\nmax_k = 8\n[lora]\nscope = "draft"\n'
                           f'[train]\ndataset = "{tmp_path / "data"}"\noutput_dir = "{tmp_path / "out"}"\n'
                           "lr = 3e-3\nbatch_size = 4\nmax_steps = 30\nsave_steps = 1000\n")
    train.run(cfg)
    model = load_model(tmp_path / "out", merge=True)
    assert lora_moved(model) and model.mask_token_id == 512  # added: the original has 512 tokens
    original = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The little dog", "Lily and Ben")]
    s = settings("cost", max_k=8, max_new_tokens=60, eos_token_ids=(tok.eos_token_id,))
    for prompt in prompts:
        reference = greedy_generate(original, prompt, 60, (tok.eos_token_id,))
        assert fluid_decode(model, prompt, s).tokens == reference
    results, _ = decode_batch(model, prompts, s, batch_size=3)
    assert [r.tokens for r in results] == [greedy_generate(original, p, 60, (tok.eos_token_id,)) for p in prompts]
