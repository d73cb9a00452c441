"""The decoder: verified FLUID decoding equals HF greedy decoding, alone or in batches, its statistics are true,
bad input is refused."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import ARCHITECTURES, sharpen, tiny_fluid_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from fluid_cli.bench import ForwardCounter
from fluid_cli.decode import Decoder, DecodeSettings, Request, ar_decode, decode_batch, fluid_decode
from fluid_cli.errors import FluidError
from fluid_cli.khead import KHeadMeta
from fluid_cli.model import FluidModel
from fluid_cli.policy import CostTable

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
POLICIES = ("cost", "khead", "fixed", "entropy")
N_NEW = 40
CPU_COSTS = CostTable({1: 1.0, 8: 1.3, 32: 1.6})  # the shape measured on a 2-core CPU (deterministic in tests)


def sharp_model(arch: str, max_k: int = 16) -> FluidModel:
    """A random tiny model with a sharpened head (`tiny.sharpen`): confident drafts that are often wrong exercise
    verification's cut path. Its random K-head counts as calibrated (Gaussian), so the khead policy draws varied
    horizons."""
    model = tiny_fluid_model(arch, max_k=max_k)
    sharpen(model.lm)
    model.meta.khead = KHeadMeta(objective="gaussian", calibrated=True, tau=3.0)
    return model


def settings(horizon: str = "fixed", **kw) -> DecodeSettings:
    """Settings for a policy, with what it needs to be deterministic: entropy's tau, cost's cost table."""
    extra = {"tau": 3.0} if horizon == "entropy" else {"costs": CPU_COSTS} if horizon == "cost" else {}
    return DecodeSettings(horizon=horizon, **{"max_new_tokens": N_NEW, **extra, **kw})


def hf_greedy(model: FluidModel, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    out = model.lm.generate(torch.tensor([prompt], device=model.device),
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
                            do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert eos is not None or len(tokens) == n  # no early stop on a default EOS from the generation config
    return tokens


def random_prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 100) for _ in range(rng.randrange(1, 20))] for _ in range(count)]


def cuts(result) -> int:
    return sum(a < c for a, c in zip(result.stats.accepted, result.stats.committed))


# Every policy x max_k x threshold on llama; on the other architectures every policy with three (max_k, threshold)
# pairs that between them cover each max_k and each threshold.
FULL = [(p, k, t) for p in POLICIES for k in (1, 4, 16) for t in (0.0, 0.5, 0.9, 1.0)]
COVER = [(p, k, t) for p in POLICIES for k, t in ((16, 0.5), (4, 0.0), (1, 1.0))]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_verified_decoding_equals_hf_greedy(arch, device):
    model = sharp_model(arch).to(device)
    combos = FULL if arch == "llama" else COVER
    prompts = random_prompts(seed=len(arch), count=3 if arch == "llama" else 2)
    total_cuts = 0
    for prompt in prompts:
        reference = hf_greedy(model, prompt, N_NEW)
        assert ar_decode(model, prompt, DecodeSettings(max_new_tokens=N_NEW)).tokens == reference
        for horizon, max_k, threshold in combos:
            result = fluid_decode(model, prompt, settings(horizon, max_k=max_k, threshold=threshold))
            assert result.tokens == reference, (horizon, max_k, threshold, prompt)
            total_cuts += cuts(result)
    assert total_cuts > 0  # the drafts were wrong often enough to test the correction path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_batches_equal_each_prompts_own_decoding(arch, device):
    """Mixed prompt lengths, rows ending at different times (EOS, stop sequences, budgets), more prompts than
    rows (a finished row takes the next prompt): every output equals its batch-1 decoding and HF greedy."""
    model = sharp_model(arch).to(device)
    prompts = random_prompts(seed=21, count=7)
    full = [hf_greedy(model, p, N_NEW) for p in prompts]
    eos = full[0][10]  # ends some generations early, at different places
    pair = full[1][4:6]

    def stop(ids, pair=pair):
        return len(ids) if ids[-2:] == pair else None

    requests = [Request(p, max_new_tokens=[N_NEW, 25, 7, N_NEW][i % 4], stop=stop if i == 1 else None)
                for i, p in enumerate(prompts)]
    for horizon in POLICIES:
        s = settings(horizon, max_k=8, eos_token_ids=(eos,))
        alone = [Decoder(model, s).run([r])[0][0].tokens for r in requests]
        results, batch = decode_batch(model, requests, s, batch_size=3)
        assert [r.tokens for r in results] == alone, horizon
        for r, reference, req in zip(results, full, requests):
            expected = reference[: req.max_new_tokens]
            if eos in expected:
                expected = expected[: expected.index(eos) + 1]
            if req.stop is not None:
                end = next((n for n in range(1, len(expected) + 1) if stop(expected[:n])), len(expected))
                expected = expected[:end]
            assert r.tokens == expected, horizon
        assert {r.stats.stop_reason for r in results} >= {"eos", "length"}
        assert batch.new_tokens == sum(r.stats.new_tokens for r in results)
        assert batch.row_forwards == sum(r.stats.forwards for r in results)
        assert batch.forwards < batch.row_forwards  # rows shared forwards


def test_batch_forward_counts_are_the_model_calls():
    model = sharp_model("llama")
    counter = ForwardCounter(model)
    decoder = Decoder(model, replace(settings("cost", max_k=8), costs=None), batch_size=4)
    results, batch = decoder.run(random_prompts(seed=4, count=6))
    assert counter.calls == batch.forwards + batch.probe_forwards
    assert batch.probe_forwards > 0  # no cost table given: the decoder measured one, and said so
    assert sum(r.stats.new_tokens for r in results) == batch.new_tokens == 6 * N_NEW


@pytest.mark.parametrize("s", [settings("fixed", max_k=4, threshold=0.0),
                               settings("cost", max_k=4, costs=CostTable({1: 1.0, 2: 4.0}))],
                         ids=["fixed", "cost-few-masks"])
def test_fixed_shapes_compiled_step_is_exact(monkeypatch, s, device):
    """`compile=True`: every decode forward has the same shape over the whole cache; outputs are unchanged. With
    drafting that does not pay, a prompt's first forward carries few masks: prompts longer than K (5 and 6
    tokens) then fit the 2K - 1 columns without fitting the K main columns, and must run at their own shape."""
    if device.type == "cpu":  # dynamo's capture without C++ code generation (fast); a GPU compiles CUDA graphs
        monkeypatch.setenv("FLUID_COMPILE_BACKEND", "eager")
    model = sharp_model("llama").to(device)
    prompts = random_prompts(seed=8, count=3) + [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26]]
    shapes = set()
    handle = model.lm.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: shapes.add(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    results, batch = decode_batch(model, prompts, replace(s, compile=True), batch_size=2)
    handle.remove()
    assert [r.tokens for r in results] == [hf_greedy(model, p, N_NEW) for p in prompts]
    assert batch.compiled
    decode_shapes = {shape for shape in shapes if shape[1] <= 4}
    # two shapes for every decode step: batch x (2K - 1), and batch x 1 for a plain step
    assert (2, 7) in shapes and decode_shapes <= {(2, 1)}


def test_compiled_decoding_allocates_its_cache_eagerly_at_fixed_addresses(monkeypatch, device):
    """CUDA graphs replay a compiled step in place only if the tensors it writes are marked as fixed addresses,
    which can only be done outside compiled code: a new cache is allocated by an eager forward, even when the
    prompt's first feed (1 token and K - 1 masks) fits the compiled shape."""
    if device.type == "cpu":
        monkeypatch.setenv("FLUID_COMPILE_BACKEND", "eager")
    model = sharp_model("llama").to(device)
    decoder = Decoder(model, settings("fixed", max_k=4, threshold=0.0, compile=True))
    assert decoder.decode([10]).tokens == hf_greedy(model, [10], N_NEW)
    [cache] = decoder._caches.values()
    assert all(getattr(t, "_dynamo_static_input_type", None) for layer in cache.layers for t in (layer.keys,
                                                                                                  layer.values))


def test_loss_curve_head_is_exact_too():
    model = sharp_model("llama")
    model.meta.khead = KHeadMeta(objective="loss-curve", tau=2.0, calibrated=True)
    for prompt in random_prompts(seed=7, count=2):
        result = fluid_decode(model, prompt, DecodeSettings(horizon="khead", threshold=0.5, max_new_tokens=N_NEW))
        assert result.tokens == hf_greedy(model, prompt, N_NEW)
        assert result.stats.tau == 2.0 and result.stats.tau_source == "calibration"


def test_run_time_tau_changes_loss_curve_horizons():
    model = sharp_model("llama")
    model.meta.khead = KHeadMeta(objective="loss-curve", tau=2.0, calibrated=True)
    with torch.no_grad():  # a head that predicts the loss curve 0.5, 1.5, 2.5, ... for every prefix
        head = model.khead.net[2]
        head.weight.zero_()
        head.bias.copy_(torch.arange(16) + 0.5)
    prompt = random_prompts(seed=3, count=1)[0]
    mean_k = {}
    for tau in (1.0, 3.0, 6.0):
        result = fluid_decode(model, prompt, DecodeSettings(horizon="khead", tau=tau, max_new_tokens=N_NEW))
        assert result.tokens == hf_greedy(model, prompt, N_NEW) and result.stats.tau_source == "flag"
        mean_k[tau] = max(result.stats.horizons)
    # K* = max{k : mean(0.5 .. k-0.5) < tau} = largest k with k/2 < tau
    assert mean_k == {1.0: 1, 3.0: 5, 6.0: 11}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eos_inside_a_block_stops_where_hf_stops(arch):
    model = sharp_model(arch)
    inside = 0
    for prompt in random_prompts(seed=11, count=4):
        full = hf_greedy(model, prompt, N_NEW)
        # as EOS, the token whose first appearance in the greedy output comes last (random models loop early)
        eos = max(set(full), key=full.index)
        expected = hf_greedy(model, prompt, N_NEW, eos=eos)
        assert expected == full[: full.index(eos) + 1]
        # threshold 1.0 drafts greedily, so the drafted block holds EOS past slot 0 and must be cut there
        for horizon, threshold in (("fixed", 0.0), ("fixed", 1.0), ("entropy", 0.9), ("khead", 0.5), ("cost", 0.0)):
            result = fluid_decode(model, prompt, settings(horizon, max_k=16, threshold=threshold,
                                                          eos_token_ids=(eos,)))
            assert result.tokens == expected, (horizon, threshold)
            assert result.stats.stop_reason == "eos"
            inside += result.stats.committed[-1] > 1
    assert inside > 0  # some generations ended part-way into a multi-token block


def test_stop_sequence_inside_a_block():
    model = sharp_model("llama")
    inside = 0
    for prompt in random_prompts(seed=3, count=4):
        full = hf_greedy(model, prompt, N_NEW)
        pair = full[6:8]
        end = next(i for i in range(1, len(full)) if full[i - 1: i + 1] == pair) + 1  # first completion

        def stop(ids, pair=pair):
            return len(ids) if ids[-2:] == pair else None

        def stop_and_trim(ids, pair=pair):  # drop the stop sequence itself
            return len(ids) - 2 if ids[-2:] == pair else None

        for horizon, threshold in (("fixed", 0.0), ("fixed", 1.0), ("khead", 0.5), ("entropy", 0.9), ("cost", 0.0)):
            s = settings(horizon, max_k=16, threshold=threshold, stop=stop)
            result = fluid_decode(model, prompt, s)
            assert result.tokens == full[:end], (horizon, threshold)
            assert result.stats.stop_reason == "stop"
            inside += result.stats.committed[-1] > 1
            assert fluid_decode(model, prompt, replace(s, stop=stop_and_trim)).tokens == full[: end - 2]
    assert inside > 0


@pytest.mark.parametrize(
    "s",
    [
        settings("fixed", max_k=4, threshold=0.5),
        settings("khead", max_k=16, threshold=0.5),
        settings("entropy", max_k=8, threshold=0.9),
        settings("fixed", max_k=16, threshold=0.0, verify=False),
        settings("khead", max_k=1),
        settings("cost", max_k=16),
    ],
    ids=["fixed", "khead", "entropy", "no-verify", "k1", "cost"],
)
def test_reported_forwards_are_the_model_calls(s):
    model = sharp_model("llama")
    counter = ForwardCounter(model)
    per_block = []

    def on_block(tokens):
        per_block.append(counter.calls)

    for prompt in random_prompts(seed=5, count=3):
        before = counter.calls
        per_block.clear()
        result = fluid_decode(model, prompt, s, on_block=on_block)
        st = result.stats
        assert counter.calls - before == st.forwards >= st.draft_forwards + st.verify_forwards
        assert st.new_tokens == len(result.tokens) == sum(st.committed) == N_NEW
        assert len(st.horizons) == len(st.accepted) == len(st.committed) == len(per_block)
        assert all(1 <= c <= k and a <= c for k, a, c in zip(st.horizons, st.accepted, st.committed))
        assert st.tokens_per_forward == pytest.approx(N_NEW / st.forwards)
        # a block costs at most K_t forwards, plus one when its first forward also caches a pending token
        costs = [b - a for a, b in zip([before, *per_block], per_block)]
        assert all(c <= k + 1 for c, k in zip(costs, st.horizons))


def test_forward_counts_at_the_extremes():
    model = sharp_model("llama")
    prompt = random_prompts(seed=9, count=1)[0]
    greedy = hf_greedy(model, prompt, N_NEW)
    counter = ForwardCounter(model)
    hf_greedy(model, prompt, N_NEW)
    assert counter.calls == N_NEW  # the hook counts what HF generate runs: one forward per token

    # ar_decode: one forward per token, like HF
    assert ar_decode(model, prompt, DecodeSettings(max_new_tokens=N_NEW)).stats.forwards == N_NEW
    # threshold 1.0 fills nothing early: drafts are greedy, nothing is cut; one forward per token plus the first
    # block's fold forward (it caches the prompt and drafts with every slot masked)
    r = fluid_decode(model, prompt, settings("fixed", max_k=4, threshold=1.0))
    assert r.tokens == greedy and r.stats.accepted == r.stats.committed and r.stats.forwards == N_NEW + 1
    # unverified, threshold 1.0: still exactly greedy, one forward per token
    r = fluid_decode(model, prompt, settings("fixed", max_k=4, threshold=1.0, verify=False))
    assert r.tokens == greedy and r.stats.forwards == N_NEW
    # unverified, threshold 0: every block is drafted by one forward
    r = fluid_decode(model, prompt, settings("fixed", max_k=16, threshold=0.0, verify=False))
    assert r.stats.forwards == r.stats.draft_forwards == 3 and r.stats.committed == [16, 16, 8]


def certain_model(token: int = 42) -> FluidModel:
    """A model that always predicts `token` with probability ~1: every draft is confident and right."""
    model = tiny_fluid_model("llama", max_k=4)
    lm = model.lm
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 30.0
    lm.config.tie_word_embeddings = False
    lm.set_output_embeddings(head)
    return model


@pytest.mark.parametrize("horizon", ["fixed", "cost"])
def test_best_case_is_one_forward_per_block(horizon):
    # Each block costs one forward, the one that verifies it and drafts the next block at once.
    model = certain_model()
    counter = ForwardCounter(model)
    r = fluid_decode(model, [10, 11, 12], settings(horizon, costs=CostTable.flat()))
    calls = counter.calls
    assert r.tokens == [42] * N_NEW == hf_greedy(model, [10, 11, 12], N_NEW)
    # the prompt's forward drafts block 1; each later forward verifies one block and drafts the next
    assert r.stats.committed == [4] * 10 and r.stats.forwards == calls == 11
    assert r.stats.verify_forwards == 10 and r.stats.draft_forwards == 1


def test_cost_policy_falls_back_to_plain_steps_when_drafts_fail():
    """Drafts that are always wrong: after a few blocks the cost rule stops drafting and runs one-row steps, so
    the forwards per token approach greedy decoding's, with an occasional look at a first draft."""
    model = sharp_model("llama")
    with torch.no_grad():  # the mask token's embedding is the same as token 9's: drafts read the wrong input
        emb = model.lm.get_input_embeddings().weight
        emb[model.mask_token_id] = emb[9] * 50
    prompt = random_prompts(seed=2, count=1)[0]
    reference = hf_greedy(model, prompt, 120)
    counter = ForwardCounter(model)
    result = fluid_decode(model, prompt, settings("cost", max_new_tokens=120, costs=CPU_COSTS))
    assert result.tokens == reference
    late = result.stats.horizons[-60:]
    assert sum(k == 1 for k in late) > 0.8 * len(late)
    assert counter.calls == result.stats.forwards <= 1.15 * 120


def test_zero_new_tokens_and_the_context_limit():
    model = sharp_model("llama")
    assert fluid_decode(model, [10, 11], DecodeSettings(max_new_tokens=0)).tokens == []
    context = model.lm.config.max_position_embeddings
    result = fluid_decode(model, [10] * (context - 3), settings("fixed", max_new_tokens=50))
    assert len(result.tokens) == 3 and result.stats.stop_reason == "context"


@pytest.mark.parametrize(
    "prompt, s, message",
    [
        ([], DecodeSettings(), "empty prompt"),
        ([10] * 256, DecodeSettings(), "does not fit the model's context of 256"),
        ([10], DecodeSettings(max_k=17), "max_k = 17: must be between 1 and the model's K = 16"),
        ([10], DecodeSettings(max_k=0), "max_k = 0"),
        ([10], DecodeSettings(max_k=4, min_k=5), "min_k = 5"),
        ([10], DecodeSettings(threshold=1.5), "threshold = 1.5"),
        ([10], DecodeSettings(threshold=float("nan")), "threshold = nan"),
        ([10], DecodeSettings(horizon="wide"), "horizon = 'wide'"),
        ([10], DecodeSettings(max_new_tokens=-1), "max_new_tokens = -1"),
        ([10], DecodeSettings(horizon="entropy", tau=0.0), "tau = 0.0: must be a positive"),
        ([10], DecodeSettings(horizon="entropy", tau=-1.0), "tau = -1.0"),
        ([10], DecodeSettings(horizon="fixed", tau=2.8), "the fixed horizon does not use tau"),
        ([10], DecodeSettings(horizon="khead"), "K-head is not calibrated"),
        ([10], DecodeSettings(horizon="cost", verify=False), "without verification choose"),
    ],
)
def test_bad_input_is_a_clear_error(prompt, s, message):
    with pytest.raises(FluidError, match=message.replace("(", r"\(")):
        fluid_decode(tiny_fluid_model("llama", max_k=16), prompt, s)


def test_tau_on_a_gaussian_head_must_be_its_calibrated_tau():
    model = sharp_model("llama")
    assert fluid_decode(model, [10], settings("khead", tau=3.0, max_new_tokens=4)).stats.tau_source == "calibration"
    with pytest.raises(FluidError, match="Gaussian classifier calibrated at tau = 3.*khead.objective=loss-curve"):
        fluid_decode(model, [10], settings("khead", tau=2.0))


def test_loss_curve_head_without_tau_is_refused():
    model = tiny_fluid_model("llama")
    model.meta.khead = KHeadMeta(objective="loss-curve", calibrated=True)
    with pytest.raises(FluidError, match="pass --tau"):
        fluid_decode(model, [10], DecodeSettings(horizon="khead"))


def test_batch_size_must_be_positive():
    with pytest.raises(FluidError, match="batch size 0: must be at least 1"):
        decode_batch(sharp_model("llama"), [[10]], DecodeSettings(), batch_size=0)


def test_an_attention_that_cannot_take_the_mask_is_refused():
    model = sharp_model("llama")
    model.lm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(FluidError, match="'flash_attention_2': FLUID decoding feeds a 4D attention mask"):
        fluid_decode(model, [10], settings("fixed"))


def test_a_prompt_beyond_the_context_names_itself_in_a_batch():
    with pytest.raises(FluidError, match="prompt of 300 tokens does not fit"):
        decode_batch(sharp_model("llama"), [[10] * 5, [10] * 300], settings("fixed"), batch_size=2)


@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_stories260k_plain_model_decoding_equals_hf_greedy():
    lm = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = FluidModel.from_plain(lm, tok, max_k=8)
    prompts = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They"]
    ids = [tok(text)["input_ids"] for text in prompts]
    references = [hf_greedy(model, p, 60, eos=tok.eos_token_id) for p in ids]
    total_cuts = 0
    for horizon, threshold in (("fixed", 0.5), ("fixed", 0.0), ("entropy", 0.9), ("cost", 0.0)):
        s = settings(horizon, max_k=8, threshold=threshold, max_new_tokens=60, eos_token_ids=(tok.eos_token_id,))
        for prompt, reference in zip(ids, references):
            result = fluid_decode(model, prompt, s)
            assert result.tokens == reference, (prompt, horizon, threshold)
            total_cuts += cuts(result)
        results, _ = decode_batch(model, ids, s, batch_size=3)
        assert [r.tokens for r in results] == references, horizon
    assert total_cuts > 0
    story = fluid_decode(model, ids[0], DecodeSettings(max_new_tokens=60, costs=CPU_COSTS)).tokens
    assert tok.decode(story).startswith(", there was a little girl named Lily. She loved to play outside")
