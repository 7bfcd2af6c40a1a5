"""What cutting a padded head's logits to the tokenizer's tokens costs at capture (stage_teacher/targets.py).

At Qwen2.5-7B's shape (152,064 head rows, 151,665 tokens) one chunk of positions is turned into targets from the
whole head (what a cache of an unpadded head costs) and from the cut logits (a contiguous copy of the first
151,665 columns, then the same work). Prints a table and writes JSON.

    .venv/bin/python tests/bench/bench_padded_vocab.py [--positions 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stage_teacher.targets import TargetSpec, sequence_targets


def timed(spec: TargetSpec, logits: torch.Tensor, next_ids: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sequence_targets(lambda a, b: logits[a:b].clone(), next_ids, spec, 0)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--head", type=int, default=152064)
    ap.add_argument("--tokens", type=int, default=151665)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="bench-results/padded_vocab.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.positions, args.head, generator=g) * 3
    next_ids = torch.randint(0, args.tokens, (args.positions,), generator=g)
    rows, lines = [], [f"{'targets':8} {'whole head (s)':>15} {'cut (s)':>9} {'ratio':>6}"]
    for targets in ("topk", "both"):
        base = dict(top_k=64, targets=targets, samples=64, chunk_positions=args.positions)
        whole = timed(TargetSpec(**base), logits, next_ids, args.repeats)
        cut = timed(TargetSpec(**base, vocab=args.tokens), logits, next_ids, args.repeats)
        rows.append({"targets": targets, "whole_head_s": whole, "cut_s": cut, "ratio": cut / whole})
        lines.append(f"{targets:8} {whole:15.4f} {cut:9.4f} {cut / whole:6.2f}")
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"positions": args.positions, "head": args.head, "tokens": args.tokens,
                                           "torch_threads": torch.get_num_threads(), "rows": rows, "table": lines},
                                          indent=2))


if __name__ == "__main__":
    main()
