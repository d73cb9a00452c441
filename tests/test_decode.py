"""The decoder: verified FLUID decoding equals HF greedy decoding, its statistics are true, bad input is refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tiny import ARCHITECTURES, tiny_fluid_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from fluid_cli.decode import DecodeSettings, ar_decode, fluid_decode
from fluid_cli.errors import FluidError
from fluid_cli.khead import KHead
from fluid_cli.modeling import FluidMeta, FluidModel

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
POLICIES = ("khead", "fixed", "entropy")
N_NEW = 40




def sharp_model(arch: str, max_k: int = 16) -> FluidModel:
    """A random tiny model with an untied random LM head scaled up. Its greedy text does not collapse into one
    repeated token (a tied head copies the current token), its drafts fill slots confidently and are often
    wrong (which exercises verification's cut path), and its top two logits stay far apart (no near-ties)."""
    model = tiny_fluid_model(arch, max_k=max_k)
    lm = model.lm
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 12 / lm.config.hidden_size**0.5)
    lm.config.tie_word_embeddings = False
    lm.set_output_embeddings(head)
    return model


def hf_greedy(model: FluidModel, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    out = model.lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert eos is not None or len(tokens) == n  # no early stop on a default EOS from the generation config
    return tokens


def random_prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 100) for _ in range(rng.randrange(1, 20))] for _ in range(count)]


class ForwardCounter:
    """Counts calls of the decoder stack: every model forward, whoever runs it."""

    def __init__(self, model: FluidModel):
        self.calls = 0
        self.handle = model.lm.get_decoder().register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def cuts(result) -> int:
    return sum(a < c for a, c in zip(result.stats.accepted, result.stats.committed))


# Every policy x max_k x threshold on llama; on the other architectures every policy with three (max_k, threshold)
# pairs that between them cover each max_k and each threshold.
FULL = [(p, k, t) for p in POLICIES for k in (1, 4, 16) for t in (0.5, 0.9, 1.0)]
COVER = [(p, k, t) for p in POLICIES for k, t in ((16, 0.5), (4, 0.9), (1, 1.0))]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_verified_decoding_equals_hf_greedy(arch):
    model = sharp_model(arch)
    combos = FULL if arch == "llama" else COVER
    prompts = random_prompts(seed=len(arch), count=3 if arch == "llama" else 2)
    total_cuts = 0
    for prompt in prompts:
        reference = hf_greedy(model, prompt, N_NEW)
        assert ar_decode(model, prompt, DecodeSettings(max_new_tokens=N_NEW)).tokens == reference
        for horizon, max_k, threshold in combos:
            settings = DecodeSettings(horizon=horizon, max_k=max_k, threshold=threshold, max_new_tokens=N_NEW,
                                      tau=3.0)
            result = fluid_decode(model, prompt, settings)
            assert result.tokens == reference, (horizon, max_k, threshold, prompt)
            total_cuts += cuts(result)
    assert total_cuts > 0  # the drafts were wrong often enough to test the correction path


def test_loss_curve_head_is_exact_too():
    model = sharp_model("llama")
    model.meta.khead = {"objective": "loss-curve", "tau": 2.0, "calibrated": True}
    for prompt in random_prompts(seed=7, count=2):
        result = fluid_decode(model, prompt, DecodeSettings(horizon="auto", threshold=0.5, max_new_tokens=N_NEW))
        assert result.tokens == hf_greedy(model, prompt, N_NEW)


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
        for horizon, threshold in (("fixed", 0.0), ("fixed", 1.0), ("entropy", 0.9), ("khead", 0.5)):
            settings = DecodeSettings(horizon=horizon, max_k=16, threshold=threshold, max_new_tokens=N_NEW,
                                      eos_token_ids=(eos,), tau=3.0)
            result = fluid_decode(model, prompt, settings)
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

        for horizon, threshold in (("fixed", 0.0), ("fixed", 1.0), ("khead", 0.5), ("entropy", 0.9)):
            settings = DecodeSettings(horizon=horizon, max_k=16, threshold=threshold, max_new_tokens=N_NEW,
                                      stop=stop, tau=3.0)
            result = fluid_decode(model, prompt, settings)
            assert result.tokens == full[:end], (horizon, threshold)
            assert result.stats.stop_reason == "stop"
            inside += result.stats.committed[-1] > 1
            settings.stop = stop_and_trim
            assert fluid_decode(model, prompt, settings).tokens == full[: end - 2]
    assert inside > 0


@pytest.mark.parametrize(
    "settings",
    [
        DecodeSettings(horizon="fixed", max_k=4, threshold=0.5),
        DecodeSettings(horizon="khead", max_k=16, threshold=0.5),
        DecodeSettings(horizon="entropy", max_k=8, threshold=0.9, tau=3.0),
        DecodeSettings(horizon="fixed", max_k=16, threshold=0.0, verify=False),
        DecodeSettings(horizon="khead", max_k=1),
    ],
    ids=["fixed", "khead", "entropy", "no-verify", "k1"],
)
def test_reported_forwards_are_the_model_calls(settings):
    model = sharp_model("llama")
    settings.max_new_tokens = N_NEW
    counter = ForwardCounter(model)
    per_block = []

    def on_block(tokens):
        per_block.append(counter.calls)

    for prompt in random_prompts(seed=5, count=3):
        before = counter.calls
        per_block.clear()
        result = fluid_decode(model, prompt, settings, on_block=on_block)
        s = result.stats
        assert counter.calls - before == s.forwards >= s.draft_forwards + s.verify_forwards
        assert s.new_tokens == len(result.tokens) == sum(s.committed) == N_NEW
        assert len(s.horizons) == len(s.accepted) == len(s.committed) == len(per_block)
        assert all(1 <= c <= k and a <= c for k, a, c in zip(s.horizons, s.accepted, s.committed))
        assert s.tokens_per_forward == pytest.approx(N_NEW / s.forwards)
        # a block costs at most K_t forwards, plus one when its first forward also caches a pending token
        costs = [b - a for a, b in zip([before, *per_block], per_block)]
        assert all(c <= k + 1 for c, k in zip(costs, s.horizons))


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
    r = fluid_decode(model, prompt, DecodeSettings(horizon="fixed", max_k=4, threshold=1.0, max_new_tokens=N_NEW))
    assert r.tokens == greedy and r.stats.accepted == r.stats.committed and r.stats.forwards == N_NEW + 1
    # unverified, threshold 1.0: still exactly greedy, one forward per token
    r = fluid_decode(model, prompt, DecodeSettings(horizon="fixed", max_k=4, threshold=1.0, verify=False,
                                                   max_new_tokens=N_NEW))
    assert r.tokens == greedy and r.stats.forwards == N_NEW
    # unverified, threshold 0: every block is drafted by one forward
    r = fluid_decode(model, prompt, DecodeSettings(horizon="fixed", max_k=16, threshold=0.0, verify=False,
                                                   max_new_tokens=N_NEW))
    assert r.stats.forwards == r.stats.draft_forwards == 3 and r.stats.committed == [16, 16, 8]


def test_best_case_is_one_forward_per_block():
    # A model that always predicts token 42 with probability ~1: every draft is confident and right, so each
    # block costs one forward, the one that verifies it and drafts the next block at once.
    model = tiny_fluid_model("llama", max_k=4)
    lm = model.lm
    head = torch.nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[42] = 30.0
    lm.config.tie_word_embeddings = False
    lm.set_output_embeddings(head)
    counter = ForwardCounter(model)
    r = fluid_decode(model, [10, 11, 12], DecodeSettings(horizon="fixed", threshold=0.9, max_new_tokens=N_NEW))
    calls = counter.calls
    assert r.tokens == [42] * N_NEW == hf_greedy(model, [10, 11, 12], N_NEW)
    # the prompt's forward drafts block 1; each later forward verifies one block and drafts the next
    assert r.stats.committed == [4] * 10 and r.stats.forwards == calls == 11
    assert r.stats.verify_forwards == 10 and r.stats.draft_forwards == 1


def test_cache_is_only_rolled_back_by_dropping_its_tail(monkeypatch):
    # `crop(-m)` means "drop m" in every supported transformers version; `crop(n)` changed meaning.
    calls = []
    original = DynamicCache.crop

    def crop(self, n):
        calls.append(n)
        return original(self, n)

    monkeypatch.setattr(DynamicCache, "crop", crop)
    model = sharp_model("llama")
    prompt = random_prompts(seed=1, count=1)[0]
    result = fluid_decode(model, prompt, DecodeSettings(horizon="fixed", max_k=8, threshold=0.5,
                                                        max_new_tokens=N_NEW))
    assert result.tokens == hf_greedy(model, prompt, N_NEW)
    assert calls and all(n < 0 for n in calls)


def test_zero_new_tokens_and_the_context_limit():
    model = sharp_model("llama")
    assert fluid_decode(model, [10, 11], DecodeSettings(max_new_tokens=0)).tokens == []
    context = model.lm.config.max_position_embeddings
    result = fluid_decode(model, [10] * (context - 3), DecodeSettings(horizon="fixed", max_new_tokens=50))
    assert len(result.tokens) == 3 and result.stats.stop_reason == "context"


@pytest.mark.parametrize(
    "prompt, settings, message",
    [
        ([], DecodeSettings(), "empty prompt"),
        ([10] * 256, DecodeSettings(), "does not fit the model's context of 256"),
        ([10], DecodeSettings(max_k=17), "max_k = 17: must be between 1 and the model's K = 16"),
        ([10], DecodeSettings(max_k=0), "max_k = 0"),
        ([10], DecodeSettings(max_k=4, min_k=5), "min_k = 5"),
        ([10], DecodeSettings(threshold=1.5), "threshold = 1.5"),
        ([10], DecodeSettings(horizon="wide"), "horizon = 'wide'"),
        ([10], DecodeSettings(max_new_tokens=-1), "max_new_tokens = -1"),
    ],
)
def test_bad_input_is_a_clear_error(prompt, settings, message):
    with pytest.raises(FluidError, match=message.replace("(", r"\(")):
        fluid_decode(tiny_fluid_model("llama", max_k=16), prompt, settings)


def test_loss_curve_head_without_tau_is_refused():
    model = tiny_fluid_model("llama")
    model.meta.khead = {"objective": "loss-curve", "calibrated": True}
    with pytest.raises(FluidError, match="pass --tau"):
        fluid_decode(model, [10], DecodeSettings())


@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_stories260k_with_an_untrained_khead_equals_hf_greedy():
    lm = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    torch.manual_seed(0)
    meta = FluidMeta(mask_token=tok.unk_token, mask_token_id=tok.unk_token_id, max_k=8, vocab_size=len(tok),
                     weights="full")
    model = FluidModel(lm, KHead(lm.config.hidden_size, 8), meta, tok).eval()
    prompts = ["Once upon a time", "The little dog", "Tom and Sue went to the park. They"]
    total_cuts = 0
    for text in prompts:
        prompt = tok(text)["input_ids"]
        reference = hf_greedy(model, prompt, 60, eos=tok.eos_token_id)
        for horizon, threshold in (("khead", 0.5), ("khead", 0.9), ("fixed", 0.5), ("entropy", 0.9)):
            settings = DecodeSettings(horizon=horizon, max_k=8, threshold=threshold, max_new_tokens=60,
                                      eos_token_ids=(tok.eos_token_id,))
            result = fluid_decode(model, prompt, settings)
            assert result.tokens == reference, (text, horizon, threshold)
            total_cuts += cuts(result)
    assert total_cuts > 0
    story = fluid_decode(model, tok("Once upon a time")["input_ids"], DecodeSettings(max_new_tokens=60)).tokens
    assert tok.decode(story).startswith(", there was a little girl named Lily. She loved to play outside")
