"""`--sample-order embedding` (a prototype): the order of the vocabulary along which systematic draws are spaced.

Systematic sampling puts its N points (u + j) / N on the cumulative sum of the teacher's distribution. Whatever the
order of the ids, id v is drawn with chance min(1, N p_v), so the estimate stays unbiased; the order decides which ids
are drawn together: each 1/N stretch of probability gets exactly one draw. In embedding order neighbours have similar
rows of the teacher's LM head, so each draw stands for a group of similar tokens and the draws' errors should cancel
along the directions the student's hidden state sees.

The order is a recursive bisection of the head's rows: split at the median of their projection on the top principal
direction, and order each half the same way, down to groups of LEAF rows ordered by that projection.
"""
from __future__ import annotations

import torch

POWER_STEPS = 12  # power-iteration steps for each split's top principal direction
LEAF = 16


def embedding_order(weight: torch.Tensor) -> torch.Tensor:
    """A permutation of the vocabulary (int64 [V]) in which neighbouring ids have similar head rows weight [V, H]."""
    w = weight.detach().to("cpu", torch.float64)
    out, stack = [], [torch.arange(w.shape[0])]
    start = torch.ones(w.shape[1], dtype=torch.float64) / w.shape[1] ** 0.5
    while stack:
        idx = stack.pop()
        x = w[idx] - w[idx].mean(0)
        v = start.clone()
        for _ in range(POWER_STEPS):
            v = x.T @ (x @ v)
            v = v / v.norm().clamp_min(1e-300)
        ranked = idx[torch.argsort(x @ v, stable=True)]
        if len(idx) <= LEAF:
            out.append(ranked)
            continue
        half = len(ranked) // 2
        stack += [ranked[half:], ranked[:half]]  # the first half is popped (and written) first
    return torch.cat(out)


def spread(order: torch.Tensor, weight: torch.Tensor) -> float:
    """The mean distance between neighbours' unit head rows along `order`."""
    w = torch.nn.functional.normalize(weight.double(), dim=-1)[order]
    return float((w[1:] - w[:-1]).norm(dim=-1).mean())
