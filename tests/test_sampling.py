"""Sampled decoding is exact: every committed token follows the model's own warped distribution.

The exactness test samples many generations of one prompt from a tiny-vocabulary model whose drafts come from real
mask rows, and compares the joint distribution of the first three tokens with the exact one, enumerated from the
model. The same test must reject deliberately broken samplers: that is what shows it can catch one.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fluid_cli import acceptance, decode
from fluid_cli.acceptance import Sampling, sample, warp
from fluid_cli.decode import DecodeSettings, Request, decode_batch
from fluid_cli.errors import FluidError
from fluid_cli.khead import KHead
from fluid_cli.model import FluidMeta, FluidModel
from fluid_cli.policy import CostTable

VOCAB, MASK = 8, 7
PROMPT = [1, 2, 3]
SAMPLING = Sampling(temperature=1.0, top_k=4)
N = 12_000


def tiny_vocab_model() -> FluidModel:
    """A random 8-token Llama whose mask rows draft like a trained model's, partly right: the token embeddings
    (the mask's too) are one shared vector plus a little noise, so `q` resembles `p` without equalling it (about 60%
    of the drafts are kept), and the head is scaled up so that the distributions are far from uniform."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embed = lm.model.embed_tokens.weight
        shared = torch.randn(embed.shape[1], generator=generator)
        embed.copy_(shared + 0.3 * torch.randn(embed.shape, generator=generator))
        lm.lm_head.weight.mul_(30)
    meta = FluidMeta(mask_token="<m>", mask_token_id=MASK, max_k=3, vocab_size=VOCAB, weights="full")
    return FluidModel(lm, KHead(32, 3), meta).eval()


@pytest.fixture(scope="module")
def model() -> FluidModel:
    return tiny_vocab_model()


def exact_joint(model: FluidModel, sampling: Sampling, n: int = 3) -> dict[tuple[int, ...], float]:
    """P(x_1..x_n | prompt) under the warped distribution, by enumerating every sequence of kept tokens with plain
    forwards of the model (main rows keep the mask token's own logit: it is a token of this vocabulary)."""
    def dist(seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model.lm(torch.tensor([PROMPT + seq])).logits[0, -1:].float()
        return warp(logits, torch.tensor([sampling.temperature]), torch.tensor([sampling.top_k]),
                    torch.tensor([sampling.top_p]))[0]

    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, prob in joint.items():
            for tok, pt in enumerate(dist(list(seq)).tolist()):
                if pt > 0:
                    nxt[seq + (tok,)] = prob * pt
        joint = nxt
    return joint


def sampled(model: FluidModel, n: int = N, seed: int = 0) -> tuple[list[tuple[int, ...]], float]:
    """`n` sampled generations of three tokens (fixed horizon 3: slot 0 and two drafts from one forward), each
    request seeded on its own; and the share of drafts that verification kept."""
    settings = DecodeSettings(horizon="fixed", max_k=3, max_new_tokens=3, costs=CostTable.flat())
    reqs = [Request(PROMPT, sampling=Sampling(SAMPLING.temperature, SAMPLING.top_p, SAMPLING.top_k, seed + i))
            for i in range(n)]
    results, _ = decode_batch(model, reqs, settings, batch_size=1000)
    drafted = sum(h - 1 for r in results for h in r.stats.horizons)
    kept = sum(a - 1 for r in results for a in r.stats.accepted)
    return [tuple(r.tokens) for r in results], kept / max(drafted, 1)


def compare(samples: list[tuple[int, ...]], joint: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """(chi-square p-value, total variation) of the samples against the exact joint; cells expecting fewer than 5
    samples are pooled, so the chi-square approximation holds."""
    n = len(samples)
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    tv = 0.5 * sum(abs(counts.get(k, 0) / n - joint.get(k, 0.0)) for k in set(counts) | set(joint))
    cells, pooled_obs, pooled_exp = [], 0.0, 0.0
    for k, prob in joint.items():
        if prob * n >= 5:
            cells.append((counts.get(k, 0), prob * n))
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(k, 0), pooled_exp + prob * n
    outside = sum(c for k, c in counts.items() if k not in joint)  # a sequence the model cannot produce
    cells.append((pooled_obs + outside, max(pooled_exp, 1e-9)))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    p = torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2, dtype=torch.float64),
                                torch.tensor(chi2 / 2, dtype=torch.float64)).item()
    return p, tv


@pytest.fixture(scope="module")
def joint(model: FluidModel) -> dict[tuple[int, ...], float]:
    return exact_joint(model, SAMPLING)


# --------------------------------------------------------------------------------------------- exactness


@pytest.mark.slow
def test_sampled_tokens_follow_the_models_distribution(model, joint):
    samples, kept = sampled(model)
    p, tv = compare(samples, joint)
    assert kept > 0.3, f"drafts kept {kept:.2f}: too few for the test to exercise acceptance"
    assert kept < 0.95, f"drafts kept {kept:.2f}: rejections (the residual) must be exercised too"
    assert p > 1e-3 and tv < 0.03, (p, tv)


def _always_accept(p, q, drafts, u_accept, u_residual):
    return drafts.to(p.device)


def _residual_is_p(p, q):
    return p


def _ratio_with_another_q(q, u):
    other = q.sqrt()
    return sample(q, u), other / other.sum(-1, keepdim=True)


_choose = acceptance.choose


def _verify_row_off_by_one(p, q, drafts, u_accept, u_residual):
    return _choose(p.roll(1, 0), q, drafts, u_accept, u_residual)


_horizon = decode._Row._horizon


def _horizon_from_drafted_values(self, out, cap):
    """Leave the first draft out of the block when its value is even: the horizon looks at what was drawn."""
    k = _horizon(self, out, cap)
    return 1 if out.draft_ids and out.draft_ids[0] % 2 == 0 else k


BROKEN = {
    "always accept": (decode, "choose", _always_accept),
    "residual = p": (acceptance, "residual", _residual_is_p),
    "ratio with another q": (decode, "draft", _ratio_with_another_q),
    "verify row off by one": (decode, "choose", _verify_row_off_by_one),
    "horizon from drafted values": (decode._Row, "_horizon", _horizon_from_drafted_values),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BROKEN))
def test_the_exactness_test_catches_a_broken_sampler(model, joint, monkeypatch, name):
    where, attr, broken = BROKEN[name]
    monkeypatch.setattr(where, attr, broken)
    samples, _ = sampled(model)
    p, tv = compare(samples, joint)
    assert p < 1e-4, f"{name}: p = {p:.3g}, tv = {tv:.3f}: the test did not notice"


# --------------------------------------------------------------------------------------------- warping


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 7, 0.8),
                                                     (2.0, 3, 0.3), (1.0, 0, 1e-6)])
def test_warp_equals_hf_generate_warpers(temperature, top_k, top_p):
    """temperature, then top-k, then top-p, as HF `generate(do_sample=True)` applies them."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = warp(logits, torch.full((6,), temperature), torch.full((6,), top_k), torch.full((6,), top_p))
    torch.testing.assert_close(got, ref.softmax(-1), atol=1e-6, rtol=1e-5)


def test_extreme_temperatures_are_their_limits(model):
    """A temperature float32 rounds to 0 (1e-300) is greedy decoding, one it rounds to infinity (1e39) uniform over
    the tokens the model can write: not NaN probabilities, from which `sample` drew the vocabulary's last token."""
    logits = torch.tensor([[2.0, 1.0, -math.inf, 2.0 - 1e-6, -3.0]])
    def warped(t):
        return warp(logits, torch.tensor([t], dtype=torch.float64), torch.tensor([0]), torch.tensor([1.0]))[0].tolist()
    assert warped(1e-300) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert warped(1e39) == [0.25, 0.25, 0.0, 0.25, 0.25]
    settings = DecodeSettings(horizon="fixed", max_k=3, max_new_tokens=9, costs=CostTable.flat())
    greedy, _ = decode_batch(model, [PROMPT], settings)
    cold, _ = decode_batch(model, [Request(PROMPT, sampling=Sampling(1e-300, seed=i)) for i in range(4)], settings,
                           batch_size=4)
    assert {tuple(r.tokens) for r in cold} == {tuple(greedy[0].tokens)}


def test_sample_draws_each_token_with_its_probability():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    u = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000  # a uniform grid: counts are exact
    counts = torch.bincount(sample(probs.expand(10_000, 4), u), minlength=4)
    assert counts.tolist() == [1000, 0, 6000, 3000]


# --------------------------------------------------------------------------------------------- seeds, settings


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_batch(model):
    settings = DecodeSettings(horizon="fixed", max_k=3, max_new_tokens=12, costs=CostTable.flat())
    reqs = [Request([1, 2, 3 + i % 3], sampling=Sampling(0.8, 0.95, 0, 100 + i)) for i in range(7)]
    batched, _ = decode_batch(model, reqs, settings, batch_size=4)
    for req, res in zip(reqs, batched):
        alone, _ = decode_batch(model, [req], settings, batch_size=1)
        assert alone[0].tokens == res.tokens
        assert res.stats.sampling["seed"] == req.sampling.seed
    again, _ = decode_batch(model, reqs, settings, batch_size=3)
    assert [r.tokens for r in again] == [r.tokens for r in batched]
    assert len({tuple(r.tokens) for r in batched}) > 1  # different seeds, different samples


def test_greedy_and_sampled_requests_share_a_batch(model):
    """A temperature-0 request inside a sampled batch is still greedy decoding, token for token."""
    settings = DecodeSettings(horizon="fixed", max_k=3, max_new_tokens=10, costs=CostTable.flat())
    greedy, _ = decode_batch(model, [PROMPT], settings)
    mixed, _ = decode_batch(model, [Request(PROMPT, sampling=Sampling(1.0, seed=i)) for i in range(3)] + [PROMPT],
                            settings, batch_size=4)
    assert mixed[-1].tokens == greedy[0].tokens and mixed[-1].stats.sampling is None


@pytest.mark.parametrize("sampling,message", [
    (Sampling(temperature=-0.1), "temperature = -0.1"),
    (Sampling(temperature=math.nan), "temperature = nan"),
    (Sampling(temperature=0.7, top_p=0.0), "top_p = 0.0"),
    (Sampling(temperature=0.7, top_p=1.5), "top_p = 1.5"),
    (Sampling(temperature=0.7, top_k=-1), "top_k = -1"),
])
def test_meaningless_sampling_values_are_refused(model, sampling, message):
    with pytest.raises(FluidError, match=message.replace(".", r"\.")):
        decode_batch(model, [Request(PROMPT, sampling=sampling)], DecodeSettings(max_new_tokens=2))


def test_sampling_refuses_what_would_make_it_inexact(model):
    hot = Sampling(temperature=0.7)
    with pytest.raises(FluidError, match="sampling needs verification"):
        decode_batch(model, [PROMPT], DecodeSettings(sampling=hot, verify=False, horizon="fixed"))
    with pytest.raises(FluidError, match="threshold = 0.5: with sampling"):
        decode_batch(model, [PROMPT], DecodeSettings(sampling=hot, threshold=0.5, horizon="fixed"))


def test_top_k_1_sampling_is_greedy_decoding(model):
    """With one token kept, `p` and `q` are one-hot: a draft other than the greedy token is always rejected and its
    residual is the greedy token, so sampling writes the greedy text, whatever the seed."""
    settings = DecodeSettings(horizon="fixed", max_k=3, max_new_tokens=9, costs=CostTable.flat())
    greedy, _ = decode_batch(model, [PROMPT], settings)
    reqs = [Request(PROMPT, sampling=Sampling(1.0, top_k=1, seed=i)) for i in range(20)]
    results, _ = decode_batch(model, reqs, settings, batch_size=8)
    assert {tuple(r.tokens) for r in results} == {tuple(greedy[0].tokens)}


# --------------------------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def fluid_dir(tmp_path_factory):
    from test_decode import sharp_model

    from fluid_cli.folder import save_model

    folder = tmp_path_factory.mktemp("fluid")
    save_model(sharp_model("llama", max_k=4), folder)
    return folder


def _cli(*args):
    from typer.testing import CliRunner

    from fluid_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_samples_reproducibly_with_a_seed(fluid_dir):
    args = ("generate", "--model", fluid_dir, "-p", "ab", "-p", "ab", "--max-new-tokens", "24", "--horizon", "fixed",
            "--temperature", "1.2", "--top-p", "0.95", "--seed", "7", "--json")
    first, again = (_cli(*args) for _ in range(2))
    assert first.exit_code == 0, first.output
    runs = [[r["tokens"] for r in json.loads(x.stdout)["results"]] for x in (first, again)]
    assert runs[0] == runs[1]
    results = json.loads(first.stdout)["results"]
    assert [r["stats"]["sampling"]["seed"] for r in results] == [7, 8]  # prompt i samples with seed + i
    assert runs[0][0] != runs[0][1]  # the same prompt twice: two samples
    batched = _cli(*args, "--batch-size", "2")
    assert [r["tokens"] for r in json.loads(batched.stdout)["results"]] == runs[0]


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "--temperature -1"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--temperature", "0.7", "--top-p", "0"], "--top-p 0"),
    (["--temperature", "0.7", "--top-p", "1.5"], "--top-p 1.5"),
    (["--temperature", "0.7", "--top-k", "-1"], "--top-k -1"),
    (["--temperature", "0.7", "--no-verify"], "sampling needs verification"),
    (["--temperature", "0.7", "--threshold", "0.5"], "sampling takes every draft slot from the first draft"),
    (["--top-p", "0.5"], "--top-p 0.5: [generate] top_p: 0.5 without a temperature: greedy decoding does not use"),
    (["--top-k", "5", "--temperature", "0"], "--top-k 5: [generate] top_k: 5 without a temperature"),
])
def test_bad_sampling_flags_are_one_line_errors(fluid_dir, flags, message):
    result = _cli("generate", "--model", fluid_dir, "-p", "ab", *flags)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_compares_sampled_decoders(fluid_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = _cli("bench", "decode", "--model", fluid_dir, "-p", "ab", "-p", "ba", "--max-new-tokens", "8",
                  "--decoders", "hf,prompt-lookup,ar,fluid", "--temperature", "0.7", "--top-p", "0.95", "--seed", "1",
                  "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["settings"]["sampling"] == {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "seed": 1}
    assert {r["decoder"] for r in report["runs"]} == {"hf", "prompt-lookup", "ar", "fluid"}
    assert all(r["same_as_hf"] is None and r["tokens"] > 0 for r in report["runs"])


def test_eval_follows_the_tasks_generation_kwargs(fluid_dir):
    """A task that asks for sampling samples (HF's temperature 1.0 when it names none), one that does not is
    greedy, and a temperature given to the model wins over both; each sampled request has the next seed."""
    from lm_eval.models.utils import normalize_gen_kwargs

    from fluid_cli.lm_eval_adapter import FluidLM

    lm = FluidLM(str(fluid_dir), seed=10)
    def asked(kw):
        return lm.sampling_for(kw, normalize_gen_kwargs(kw))

    assert asked({"do_sample": False, "until": ["\n"]}).greedy
    assert asked({"do_sample": True}) == Sampling(1.0, 1.0, 0, 10)
    assert asked({"do_sample": True, "temperature": 0.6, "top_p": 0.9}) == Sampling(0.6, 0.9, 0, 11)
    assert asked({"temperature": 0.0}).greedy
    forced_greedy = FluidLM(str(fluid_dir), temperature=0.0)  # --temperature 0: greedy, even where a task samples
    assert forced_greedy.sampling_for({"do_sample": True}, normalize_gen_kwargs({"do_sample": True})).greedy
    flagged = FluidLM(str(fluid_dir), temperature=0.8, top_k=5, seed=3)
    assert flagged.sampling_for({"do_sample": False}, normalize_gen_kwargs({"do_sample": False})) == \
        Sampling(0.8, 1.0, 5, 3)
