"""FluidModel: the Stage I loss, the mask token, LoRA, and the save/load format."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fluid_cli.errors import FluidError
from fluid_cli.folder import KHEAD_NAME, META_NAME, load_model, save_model
from fluid_cli.hf import noise_token_ids, resolve_mask_token
from fluid_cli.khead import KHead
from fluid_cli.layout import BlockPlan, build_expanded_batch, expand_batch, pad_batch
from fluid_cli.lora import apply_lora
from fluid_cli.model import FluidMeta, FluidModel
from tiny import ARCHITECTURES, tiny_fluid_model, tiny_model, tiny_tokenizer


def batch(tok):
    rows = []
    for prompt, answer in [("2+3=", "5 yes"), ("hello ", "world, again"), ("a", "bc")]:
        p, a = tok(prompt)["input_ids"], tok(answer)["input_ids"] + [tok.eos_token_id]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return pad_batch(rows, tok.pad_token_id)


@pytest.mark.parametrize("arch", ARCHITECTURES[:4])
def test_loss_without_anchors_is_the_plain_causal_lm_loss(arch, device):
    model = tiny_fluid_model(arch).to(device)
    b = batch(model.tokenizer)
    plan = BlockPlan(k=torch.zeros_like(b["input_ids"]), reveal=torch.zeros(*b["input_ids"].shape, 4, dtype=torch.bool),
                     noise=torch.full((*b["input_ids"].shape, 4), -1))
    ex = expand_batch(b["input_ids"], b["labels"], b["attention_mask"], plan, model.mask_token_id).to(device)
    out = model.stage1_loss(ex)
    ref = model.lm(**{name: t.to(device) for name, t in b.items()}).loss
    torch.testing.assert_close(out.loss_ar, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    assert out.n_diff == 0 and out.loss_diff.item() == 0.0


@pytest.mark.parametrize("arch", ARCHITECTURES + ["cohere"])
def test_fluid_forward_matches_the_models_own_logits(arch, device):
    """The decoder stack + head path (used by the loss and decoding) equals the model's own forward."""
    model = tiny_fluid_model(arch).to(device)
    if hasattr(model.lm.config, "logits_scaling"):
        model.lm.config.logits_scaling = 4.0  # make Granite's scaling visible
    ids = torch.tensor([[9, 40, 41, model.mask_token_id, 50]], device=device)
    with torch.no_grad():
        logits, _ = model(ids)
        torch.testing.assert_close(logits, model.lm(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_stage1_loss_parts_match_a_full_forward(device):
    model = tiny_fluid_model("qwen2").to(device)
    b = batch(model.tokenizer)
    ex = build_expanded_batch(b["input_ids"], b["labels"], b["attention_mask"], mask_token_id=model.mask_token_id,
                              max_k=4, p_anchor=0.8, generator=torch.Generator().manual_seed(0)).to(device)
    out = model.stage1_loss(ex, ar_weight=0.5, diff_weight=2.0)
    logits = model.lm(**ex.model_inputs()).logits
    main = ex.slot_type == 0
    ce = torch.nn.functional.cross_entropy
    ar = ce(logits[main], ex.labels[main], ignore_index=-100)
    diff = ce(logits[~main], ex.labels[~main], ignore_index=-100)
    torch.testing.assert_close(out.loss_ar, ar)
    torch.testing.assert_close(out.loss_diff, diff)
    torch.testing.assert_close(out.loss, 0.5 * ar + 2.0 * diff)
    assert out.n_diff > 0


def test_mask_token_is_reused_or_added():
    tok = tiny_tokenizer()
    model = tiny_model("llama", tok)
    n = model.get_input_embeddings().num_embeddings
    token_id, added = resolve_mask_token(tok, model, "<|mask|>")
    assert not added and token_id == tok.convert_tokens_to_ids("<|mask|>")
    token_id, added = resolve_mask_token(tok, model, "<|new_mask|>")
    assert added and token_id == n and model.get_input_embeddings().num_embeddings == n + 1
    assert tok.convert_ids_to_tokens(token_id) == "<|new_mask|>"
    assert token_id not in noise_token_ids(tok, n + 1).tolist()
    with pytest.raises(FluidError, match="add_mask_token = false"):
        resolve_mask_token(tok, model, "<|absent|>", add=False)


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def round_trip(model: FluidModel, folder) -> FluidModel:
    save_model(model, folder)
    assert (folder / META_NAME).is_file() and (folder / KHEAD_NAME).is_file()
    return load_model(folder)


def outputs(model: FluidModel, ids: torch.Tensor):
    with torch.no_grad():
        logits, hidden = model(ids)
        return logits, model.khead(hidden)


def test_full_weights_round_trip_is_bit_exact(tmp_path):
    model = tiny_fluid_model("mistral")
    ids = torch.tensor([[9, 40, 41, model.mask_token_id, 50]])
    before = outputs(model, ids)
    loaded = round_trip(model, tmp_path / "m")
    assert loaded.meta.weights == "full" and loaded.meta.max_k == 4
    for a, b in zip(before, outputs(loaded, ids)):
        assert torch.equal(a, b)


def test_adapter_round_trip_with_added_mask_token_is_bit_exact(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_model("llama", tok)
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    mask_id, added = resolve_mask_token(tok, base, "<|new_mask|>")
    assert added
    peft_model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear", mask_token_id=mask_id)
    perturb(peft_model, 0)  # LoRA B starts at zero; make the adapter and the mask row matter
    meta = FluidMeta(mask_token="<|new_mask|>", mask_token_id=mask_id, max_k=4, vocab_size=len(tok),
                     lora_scope="all", base_model=str(tmp_path / "base"))
    model = FluidModel(peft_model, KHead(32, 4), meta, tok).eval()
    ids = torch.tensor([[9, 40, 41, mask_id, mask_id, 50]])
    before = outputs(model, ids)
    loaded = round_trip(model, tmp_path / "m")
    assert loaded.meta.weights == "adapter" and loaded.mask_token_id == mask_id
    assert loaded.tokenizer.convert_tokens_to_ids("<|new_mask|>") == mask_id
    for a, b in zip(before, outputs(loaded, ids)):
        assert torch.equal(a, b)
    merged = load_model(tmp_path / "m", merge=True)
    torch.testing.assert_close(outputs(merged, ids)[0], before[0], atol=1e-5, rtol=1e-5)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FluidError, match="model folder not found"):
        load_model(tmp_path / "absent")
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(FluidError, match=r"not a FLUID model folder \(no fluid.json\).*--horizon fixed"):
        load_model(tmp_path / "plain")
    model = tiny_fluid_model("llama", max_k=4)
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / META_NAME).read_text())
    (tmp_path / "m" / META_NAME).write_text(json.dumps({**meta, "max_k": 8}))
    with pytest.raises(FluidError, match="K-head weights of another shape"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / META_NAME).write_text(json.dumps({**meta, "vocab_size": 10_000}))
    with pytest.raises(FluidError, match="does not match its base model"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / META_NAME).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(FluidError, match="newer than this fluid supports"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / META_NAME).write_text(json.dumps({**meta, "weights": "adapter", "lora_scope": "all",
                                                         "base_model": str(tmp_path / "x")}))
    with pytest.raises(FluidError, match="weights: says 'adapter', but the folder has no adapter_config.json"):
        load_model(tmp_path / "m")
