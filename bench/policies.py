"""FLUID against greedy decoding on prompt sets where drafting pays and where it does not, per horizon policy.

    python bench/policies.py SET... [--max-new-tokens 128] [--json out.json]

Each SET is `name=MODEL_DIR:PROMPT_FILE` (a FLUID model folder or a plain transformers one; a prompt file as
`fluid generate --prompt-file` reads). For every set it decodes the prompts with this package's greedy loop (`ar`,
the reference) and with FLUID under each setting below, one prompt at a time, and prints tokens per forward,
tokens/s and the wall-clock ratio to `ar` (best of `--repeats` runs). Every FLUID output is checked against `ar`'s.

Settings: `cost` (the default policy: cost-aware horizons, no extra draft forwards), the previous defaults
(`khead` with threshold 0.9 for a calibrated model, `fixed` with 0.9 otherwise), and `fixed` horizons at
thresholds 0, 0.5 and 0.9 (the best of which the default should match).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from fluid_cli.decode import DecodeSettings, Decoder, ar_settings
from fluid_cli.folder import load_for_inference
from fluid_cli.hf import eos_token_ids
from fluid_cli.prompts import encode_prompt, read_prompt_file


def settings_for(model) -> dict[str, DecodeSettings]:
    previous = "khead" if model.meta.khead.calibrated else "fixed"
    return {
        "cost (default)": DecodeSettings(horizon="cost"),
        f"previous default ({previous}, 0.9)": DecodeSettings(horizon=previous, threshold=0.9),
        "fixed, threshold 0": DecodeSettings(horizon="fixed", threshold=0.0),
        "fixed, threshold 0.5": DecodeSettings(horizon="fixed", threshold=0.5),
        "fixed, threshold 0.9": DecodeSettings(horizon="fixed", threshold=0.9),
    }


def timed(decoder: Decoder, prompts: list[list[int]], repeats: int) -> tuple[float, int, int, list[list[int]]]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        results = [decoder.decode(p) for p in prompts]
        best = min(best, time.perf_counter() - start)
        out = results
    return best, sum(r.stats.new_tokens for r in out), sum(r.stats.forwards for r in out), [r.tokens for r in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="name=MODEL_DIR:PROMPT_FILE")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = []
    for spec in args.sets:
        name, _, rest = spec.partition("=")
        model_dir, _, prompt_file = rest.rpartition(":")
        model = load_for_inference(model_dir, device="cpu", max_k=8)  # max_k: a plain model's (a FLUID one has its own)
        # the chat template when the tokenizer has one
        prompts = [encode_prompt(model.tokenizer, p, True) for p in read_prompt_file(Path(prompt_file))][: args.limit]
        common = {"max_new_tokens": args.max_new_tokens, "eos_token_ids": eos_token_ids(model.tokenizer, model.lm)}
        ar = Decoder(model, ar_settings(DecodeSettings(**common)))
        ar.decode(prompts[0])  # warm-up
        ar_s, ar_tokens, _, reference = timed(ar, prompts, args.repeats)
        print(f"\n{name}: {len(prompts)} prompts, {model_dir} (exact to {model.meta.exact_to}); ar {ar_tokens / ar_s:.0f} tok/s")
        for label, s in settings_for(model).items():
            decoder = Decoder(model, replace(s, **common))
            decoder.decode(prompts[0])  # warm-up (and the cost policy's one-time probe)
            wall, tokens, forwards, outputs = timed(decoder, prompts, args.repeats)
            same = sum(a == b for a, b in zip(outputs, reference))
            row = {"set": name, "setting": label, "tokens_per_forward": tokens / forwards,
                   "tokens_per_s": tokens / wall, "vs_ar": ar_s / wall, "identical": same, "prompts": len(prompts)}
            report.append(row)
            print(f"  {label:34s} {row['tokens_per_forward']:5.2f} tok/fwd {row['tokens_per_s']:8.0f} tok/s "
                  f"{row['vs_ar']:5.2f}x ar   identical {same}/{len(prompts)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
