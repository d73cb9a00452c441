"""Time the Stage I block-layout builder (sampling + expansion + dense 4D mask) on CPU.

    python bench/layout.py --batch 8 --seq 1024 --max-k 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.console import Console
from rich.table import Table

from fluid_cli.layout import build_expanded_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--max-k", type=int, default=16)
    ap.add_argument("--p-anchor", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    B, N = args.batch, args.seq
    ids = torch.randint(100, 30_000, (B, N), generator=g)
    labels = ids.clone()
    labels[:, : N // 4] = -100  # a prompt quarter, as in SFT data
    am = torch.ones_like(ids)
    noise_ids = torch.arange(100, 30_000)

    layout_s, mask_s = [], []
    for _ in range(args.repeats + 1):  # the first round is a warm-up and is dropped below
        t0 = time.perf_counter()
        ex = build_expanded_batch(ids, labels, am, mask_token_id=1, max_k=args.max_k, p_anchor=args.p_anchor,
                                  noise_ids=noise_ids, generator=g)
        t1 = time.perf_counter()
        ex.attention_mask(torch.bfloat16)
        t2 = time.perf_counter()
        layout_s.append(t1 - t0)
        mask_s.append(t2 - t1)
    layout_s, mask_s = layout_s[1:], mask_s[1:]
    result = {
        "batch": B, "seq": N, "max_k": args.max_k, "expanded_len": ex.input_ids.shape[1],
        "layout_ms": 1000 * min(layout_s), "mask_ms": 1000 * min(mask_s),
        "total_ms": 1000 * (min(layout_s) + min(mask_s)), "threads": torch.get_num_threads(),
    }
    table = Table(title="block layout builder (best of %d)" % args.repeats)
    for key in result:
        table.add_column(key)
    table.add_row(*[f"{v:.1f}" if isinstance(v, float) else str(v) for v in result.values()])
    Console().print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
