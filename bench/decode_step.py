"""Per-step cost of the FLUID decode step against one plain greedy step, on random-weight Llama shapes.

    python bench/decode_step.py                          # a GPU: 1B and 7B shapes, bf16, compiled (CUDA graphs)
    python bench/decode_step.py --shapes tiny --no-compile   # anywhere: a tiny shape (the CI smoke run)

No downloads: the models are built from configs with random weights (the cost of a forward does not depend on
the values). For each shape and batch size, after a prompt of `--context` tokens, it times the decoder's own steps
(`fluid_cli.decode.Decoder`, fixed shapes when compiled): a plain greedy step (one row per prompt) and the FLUID
step at each K (`K` verify rows and `K - 1` mask rows per prompt, the fused verify+draft forward), and prints
milliseconds per step, the FLUID/greedy ratio and the peak GPU memory. A FLUID step pays off in wall-clock time
when its ratio is below the tokens per forward it gains (METHOD section 4: at batch 1 on an H200 a 16-row forward
costs about as much as a one-row forward).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fluid_cli.bench import timed
from fluid_cli.decode import DecodeSettings, Decoder, Request, ar_settings
from fluid_cli.khead import KHead
from fluid_cli.model import FluidMeta, FluidModel

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                 num_key_value_heads=4),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
}


def llama_config(shape: str) -> LlamaConfig:
    return LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)


def build(shape: str, device: torch.device, dtype: torch.dtype, max_k: int) -> FluidModel:
    config = llama_config(shape)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    meta = FluidMeta(mask_token="<mask>", mask_token_id=config.vocab_size - 1, max_k=max_k,
                     vocab_size=config.vocab_size, weights="full")
    return FluidModel(lm, KHead(config.hidden_size, max_k).to(device, dtype), meta).eval()


def per_step_ms(model: FluidModel, k: int, batch: int, context: int, steps: int, compile_: bool) -> float:
    """Milliseconds per decode forward of `batch` prompts with blocks of `k` (k = 1: plain greedy steps), the
    prompt's prefill left out (a run of one new token is timed and subtracted)."""
    settings = DecodeSettings(horizon="fixed", max_k=k, threshold=0.0, compile=compile_)
    decoder = Decoder(model, ar_settings(settings) if k == 1 else settings, batch_size=batch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.meta.vocab_size - 1, (context,), generator=g).tolist() for _ in range(batch)]

    def run(new_tokens: int) -> tuple[float, int]:
        (_, stats), wall = timed(model.device, lambda: decoder.run([Request(p, max_new_tokens=new_tokens)
                                                                    for p in prompts]))
        return wall, stats.forwards

    run(steps)  # warm-up: allocation, kernel choice, compilation
    full, forwards = run(steps)
    prefill, prefill_forwards = run(1)
    return 1000 * (full - prefill) / max(forwards - prefill_forwards, 1)


def measure(shapes: list[str], batches: list[int], ks: list[int], context: int, steps: int, compile_: bool,
            device: torch.device, dtype: torch.dtype, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """For each shape and batch size: a plain greedy step and the FLUID step at each K, in milliseconds, with the
    peak GPU memory (None on a CPU); `log` gets one line per row."""
    cuda = device.type == "cuda"
    rows = []
    for shape in shapes:
        model = build(shape, device, dtype, max(ks))
        for batch in batches:
            if compile_:
                # Dynamo keeps one entry per shape and model for the decoder's forward, and past its recompile limit
                # (8) runs the forward uncompiled without failing: start each batch size with none.
                torch._dynamo.reset()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            greedy = per_step_ms(model, 1, batch, context, steps, compile_)
            for k in ks:
                fluid = per_step_ms(model, k, batch, context, steps, compile_)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
                rows.append({"shape": shape, "batch": batch, "k": k, "greedy_ms": greedy, "fluid_ms": fluid,
                             "ratio": fluid / greedy, "peak_gib": peak})
                log(f"{shape:>4} batch {batch:2d} K={k:2d}: greedy step {greedy:8.3f} ms, FLUID step "
                    f"{fluid:8.3f} ms, ratio {fluid / greedy:5.2f}x" + (f", peak {peak:.1f} GiB" if cuda else ""))
        del model
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,7b" if cuda else "tiny")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--k", default="4,8,16")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64, help="new tokens per prompt in each timed run")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = measure(args.shapes.split(","), [int(b) for b in args.batch.split(",")],
                   [int(k) for k in args.k.split(",")], args.context, args.steps, args.compile, device, dtype,
                   lambda line: print(line, flush=True))
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, {dtype}, compile={args.compile}, "
          f"context {args.context}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
                       "compile": args.compile, "context": args.context, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
