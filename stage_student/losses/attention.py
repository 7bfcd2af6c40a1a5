"""Attention losses of arXiv 2310.08797 (Udagawa et al.) on the teacher's cached Q/K/V (`--attn-loss`).

  mha_relation  MiniLMv2 (arXiv 2012.15828): for each of Q, K, V, the heads' outputs concatenated ([B, T, W]) are
                re-split into A relation heads of width d_r = W / A; the relation R = softmax(X X^T / sqrt(d_r))
                over positions, causally masked; loss = KL(teacher R || student R) per row, averaged over heads
                and rows, summed over Q-Q, K-K and V-V with --relation-weights (--attn-relation-loss mse: the
                mean squared difference of the relation matrices instead, the roadmap's "MHA MSE"). A is free of
                either model's head count, so a student with other heads learns from the same cache.
  direct_mha    the MSE between a learned linear map of the student's Q (K, V) and the teacher's ("Direct MHA").

Each loss is a pure function of tensors; `AttnMaps` holds direct_mha's learned maps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DistilyError

ATTN_LOSSES = ("none", "mha_relation", "direct_mha")
RELATION_LOSSES = ("kl", "mse")
KINDS = ("q", "k", "v")


RELATION_CHUNK_ROWS = 256  # query rows per chunk: [B, A, 256, T] relation tensors instead of [B, A, T, T]


def relation_logits(x: torch.Tensor, heads: int, rows: slice = slice(None)) -> torch.Tensor:
    """[B, T, W] -> scaled dot products [B, A, R, K] of A relation heads for the query rows `rows` (R of them)
    against the keys they may see (K = the last row + 1), -inf above the diagonal (causal)."""
    b, t, w = x.shape
    start, stop, _ = rows.indices(t)
    xh = x.float().reshape(b, t, heads, w // heads).transpose(1, 2)  # [B, A, T, d_r]
    scores = xh[:, :, start:stop] @ xh[:, :, :stop].transpose(-1, -2) / math.sqrt(w // heads)
    future = torch.arange(stop, device=x.device)[None, :] > torch.arange(start, stop, device=x.device)[:, None]
    return scores.masked_fill(future, float("-inf"))


def relation_kl_sum(student: torch.Tensor, teacher: torch.Tensor, heads: int, rows: slice) -> torch.Tensor:
    """KL(teacher R || student R) of the rows `rows`, summed over rows, their positions and the heads."""
    log_s = torch.log_softmax(relation_logits(student, heads, rows), -1)
    log_t = torch.log_softmax(relation_logits(teacher, heads, rows), -1)
    future = ~torch.isfinite(log_t)  # above the diagonal: probability 0 in both, adds nothing
    log_s, log_t = log_s.masked_fill(future, 0.0), log_t.masked_fill(future, 0.0)
    return (log_t.exp().masked_fill(future, 0.0) * (log_t - log_s)).sum()


def relation_mse_sum(student: torch.Tensor, teacher: torch.Tensor, heads: int, rows: slice) -> torch.Tensor:
    """Squared differences of the relation matrices' causal entries in the rows `rows`, summed."""
    s = torch.softmax(relation_logits(student, heads, rows), -1)
    t = torch.softmax(relation_logits(teacher, heads, rows), -1)
    return ((s - t) ** 2).sum()  # above the diagonal both are 0


def by_row_chunks(fn, student: torch.Tensor, teacher: torch.Tensor, heads: int, chunk_rows: int) -> torch.Tensor:
    """sum over chunks of query rows of fn(student, teacher, heads, rows). With more than one chunk each runs
    under activation checkpointing, so only one chunk's [B, A, C, T] tensors are alive, forward or backward
    (memory linear in T per chunk; the backward recomputes each chunk once)."""
    from torch.utils.checkpoint import checkpoint

    t = student.shape[1]
    if chunk_rows <= 0 or chunk_rows >= t:
        return fn(student, teacher, heads, slice(0, t))
    return sum(checkpoint(fn, student, teacher, heads, slice(a, min(t, a + chunk_rows)), use_reentrant=False)
               for a in range(0, t, chunk_rows))


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, chunk_rows: int = RELATION_CHUNK_ROWS) -> torch.Tensor:
    """KL(teacher R || student R), summed over each row's positions, averaged over heads and rows."""
    b, t, _ = student.shape
    return by_row_chunks(relation_kl_sum, student, teacher, heads, chunk_rows) / (b * heads * t)


def relation_mse(student: torch.Tensor, teacher: torch.Tensor, heads: int, chunk_rows: int = RELATION_CHUNK_ROWS) -> torch.Tensor:
    """Mean squared difference of the relation matrices' causal entries."""
    b, t, _ = student.shape
    return by_row_chunks(relation_mse_sum, student, teacher, heads, chunk_rows) / (b * heads * t * (t + 1) // 2)


RELATIONS = {"kl": relation_kl, "mse": relation_mse}


def mha_relation_loss(student: dict, teacher: dict, heads: int, weights=(1.0, 1.0, 1.0), kind: str = "kl",
                      chunk_rows: int = RELATION_CHUNK_ROWS) -> torch.Tensor:
    """Sum over Q-Q, K-K, V-V of the weighted relation loss; student/teacher: {"q"|"k"|"v": [B, T, W]}.
    chunk_rows: query rows per chunk (0: all rows at once, [B, A, T, T] tensors)."""
    fn = RELATIONS[kind]
    return sum(w * fn(student[x], teacher[x], heads, chunk_rows) for x, w in zip(KINDS, weights) if w)


def direct_mha_loss(student: dict, teacher: dict, maps: dict, weights=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Sum over Q, K, V of the weighted MSE between maps[x](student x) and the teacher's x."""
    return sum(w * F.mse_loss(maps[x](student[x].float()), teacher[x].float()) for x, w in zip(KINDS, weights) if w)


class AttnMaps(nn.Module):
    """direct_mha's learned maps, one Linear per mapped student layer and Q/K/V (student width -> teacher width),
    starting from the identity where the widths match (a copied layer starts at zero loss)."""

    def __init__(self, student_layers: list[int], student_widths: dict, teacher_widths: dict):
        super().__init__()
        self.by_layer = nn.ModuleDict()
        for layer in student_layers:
            maps = nn.ModuleDict()
            for x in KINDS:
                linear = nn.Linear(student_widths[x]["width"], teacher_widths[x]["width"], bias=False)
                if linear.weight.shape[0] == linear.weight.shape[1]:
                    nn.init.eye_(linear.weight)
                maps[x] = linear
            self.by_layer[str(layer)] = maps

    def forward(self, layer: int) -> nn.ModuleDict:
        return self.by_layer[str(layer)]


def auto_relation_heads(student_widths: dict, teacher_widths: dict) -> int:
    """The most relation heads, up to the teacher's attention heads, that divide every Q/K/V width of both."""
    widths = [w[x]["width"] for w in (student_widths, teacher_widths) for x in KINDS]
    g = math.gcd(*widths)
    return max(a for a in range(1, teacher_widths["q"]["heads"] + 1) if g % a == 0)


def check_relation_heads(heads: int, student_widths: dict, teacher_widths: dict) -> None:
    widths = {f"{who} {x}": w[x]["width"] for who, w in (("student", student_widths), ("teacher", teacher_widths)) for x in KINDS}
    bad = {k: v for k, v in widths.items() if heads < 1 or v % heads}
    if bad:
        g = math.gcd(*widths.values())
        raise DistilyError(f"--relation-heads {heads} must divide every Q/K/V width ({widths}); it does not divide "
                           f"{bad}. Choose a divisor of {g}, e.g. {auto_relation_heads(student_widths, teacher_widths)}.")


def check_attn_options(loss: str, relation_loss: str, weights: list[float]) -> None:
    if loss not in ATTN_LOSSES:
        raise DistilyError(f"--attn-loss {loss!r} is unknown; choose one of {', '.join(ATTN_LOSSES)}")
    if relation_loss not in RELATION_LOSSES:
        raise DistilyError(f"--attn-relation-loss {relation_loss!r} is unknown; choose one of {', '.join(RELATION_LOSSES)}")
    if len(weights) != 3 or min(weights) < 0 or not sum(weights):
        raise DistilyError(f"--relation-weights {weights}: give three weights >= 0 (Q-Q, K-K, V-V), not all 0, e.g. 1,1,1")
