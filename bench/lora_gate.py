"""Per-forward cost of the draft-only LoRA gate against a merged adapter (and the bare base model).

    python bench/lora_gate.py [--model ../shared/models/stories260K] [--rank 16] [--k 8] [--prefix 60]

Builds LoRA (rank `--rank`, all linear layers, random non-zero weights) on the model (default: a random model
of stories260K's shape, so it runs anywhere), and times the decoder's own forwards after a `--prefix`-token
prompt: a plain one-row step and the fused verify+draft step (`k` main rows and `k - 1` draft rows), for the
gated adapter (`scope = "draft"` as decoding loads it: stacked base and adapted weights for a model this small),
the gate's low-rank path (what large models use), the merged adapter (`scope = "all"`) and the base model.
Prints milliseconds per forward (median of `--reps`) and the gated/merged ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fluid_cli.cache import RowCache
from fluid_cli.decode import Decoder, DecodeSettings, _Feed
from fluid_cli.khead import KHead
from fluid_cli.lora import STACK_LIMIT, apply_lora
from fluid_cli.model import FluidMeta, FluidModel


def stories_shape() -> AutoModelForCausalLM:
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def build(path: str | None, scope: str | None, rank: int, k: int, stack_limit: int = STACK_LIMIT) -> FluidModel:
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() if path else stories_shape()
    mask = lm.config.vocab_size - 1
    backbone = lm
    if scope is not None:
        backbone = apply_lora(lm, r=rank, alpha=2 * rank, dropout=0.0, target_modules="all-linear",
                              mask_token_id=mask)
        with torch.no_grad():
            for name, p in backbone.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        if scope == "all":
            backbone = backbone.merge_and_unload()
    meta = FluidMeta(mask_token="m", mask_token_id=mask, max_k=k, vocab_size=lm.config.vocab_size,
                     weights="adapter" if scope == "draft" else "full",
                     lora_scope="draft" if scope == "draft" else None, base_model="x")
    model = FluidModel(backbone, KHead(lm.config.hidden_size, k), meta).eval()
    if model.gate is not None:
        model.gate.freeze_for_decoding(stack_limit=stack_limit)
    return model


def time_step(model: FluidModel, main: int, draft: int, prefix: int, reps: int) -> float:
    decoder = Decoder(model, DecodeSettings(horizon="fixed"))
    cache = RowCache(model.lm.config.num_hidden_layers, prefix + main + draft + 2, model.device)
    ids = list(range(5, 5 + prefix))
    feeds = [_Feed(ids, [], 0, False, False)]
    with torch.inference_mode():
        decoder._outputs(*decoder._step(cache, feeds), feeds)
        step = [_Feed(ids[-main:], [model.mask_token_id] * draft, prefix - main, True, False)]
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            decoder._outputs(*decoder._step(cache, step), step)
            samples.append(time.perf_counter() - start)
    return 1000 * sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a transformers model folder (default: random, stories260K's "
                                                       "shape)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=60)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: build(args.model, scope, args.rank, args.k, limit)
              for name, scope, limit in (("gated (draft)", "draft", STACK_LIMIT), ("low-rank gate", "draft", 0),
                                         ("merged (all)", "all", 0), ("base", None, 0))}
    shapes = {"plain step (1 main row)": (1, 0), f"verify+draft ({args.k} main + {args.k - 1} draft rows)":
              (args.k, args.k - 1)}
    print(f"model: {args.model or 'random, stories260K shape'}; LoRA rank {args.rank}; prefix {args.prefix}; "
          f"{torch.get_num_threads()} thread(s); median of {args.reps}")
    print(f"{'forward':44s} " + " ".join(f"{n:>14s}" for n in models) + "   gated/merged")
    for label, (main_rows, draft_rows) in shapes.items():
        ms = {n: time_step(m, main_rows, draft_rows, args.prefix, args.reps) for n, m in models.items()}
        print(f"{label:44s} " + " ".join(f"{v:11.3f} ms" for v in ms.values())
              + f"   {ms['gated (draft)'] / ms['merged (all)']:.2f}x")


if __name__ == "__main__":
    main()
