"""Hidden-state distillation: projectors from student to teacher width, optional norm, per-layer losses.

--hs-loss, on the student's projected hidden states S and the teacher's T, [..., H]:
  mse                 mean (S - T)^2
  cosine              mean over positions of 1 - cos(S, T)
  mutual_information  -InfoNCE (van den Oord et al. 2018): minus a lower bound on I(S; T) in nats, over the N
                      positions of the micro-batch; see `info_nce`
  logsum              Distily's `logsum_v2_loss`: log sum |S - T|^alpha over every element, alpha 4
                      (Miles & Mikolajczyk 2023, arXiv 2303.11098); see `logsum`
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DistilyError

HS_LOSSES = ("mse", "cosine", "mutual_information", "logsum")
MI_TEMPERATURE = 0.1  # InfoNCE temperature on cosine similarities (SimCLR's and Distily's `mi` 0.1)
LOGSUM_ALPHA = 4.0  # 2303.11098 finds 4 to 5 best; Distily's default
HS_NORMS = ("none", "layernorm", "teacher_layernorm")
PROJECTORS = ("auto", "none", "linear", "orthogonal")


def make_projector(kind: str, student_width: int, teacher_width: int) -> nn.Module:
    if kind == "auto":
        kind = "none" if student_width == teacher_width else "linear"
    if kind == "none":
        if student_width != teacher_width:
            raise DistilyError(
                f"--projector none needs equal widths; student {student_width} != teacher {teacher_width}. "
                "Use --projector linear or orthogonal."
            )
        return nn.Identity()
    linear = nn.Linear(student_width, teacher_width, bias=False)
    if kind == "linear":
        return linear
    if kind == "orthogonal":
        return nn.utils.parametrizations.orthogonal(linear)
    raise DistilyError(f"--projector {kind!r} is unknown; choose one of {', '.join(PROJECTORS)}")


class Projectors(nn.Module):
    """One projector per mapped student layer; trained with the student and saved in its checkpoints."""

    def __init__(self, kind: str, student_layers: list[int], student_width: int, teacher_width: int):
        super().__init__()
        self.by_layer = nn.ModuleDict({str(l): make_projector(kind, student_width, teacher_width) for l in student_layers})

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return self.by_layer[str(layer)](h)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str = "mse", norm: str = "none") -> torch.Tensor:
    """Mean loss between [..., H] hidden states (student already projected to the teacher's width)."""
    student, teacher = student.float(), teacher.float()
    if norm in ("layernorm", "teacher_layernorm"):
        teacher = F.layer_norm(teacher, teacher.shape[-1:])
    if norm == "layernorm":
        student = F.layer_norm(student, student.shape[-1:])
    if loss == "mse":
        return F.mse_loss(student, teacher)
    if loss == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if loss == "mutual_information":
        return -info_nce(student, teacher)
    if loss == "logsum":
        return logsum(student, teacher)
    raise DistilyError(f"--hs-loss {loss!r} is unknown; choose one of {', '.join(HS_LOSSES)}")


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = MI_TEMPERATURE) -> torch.Tensor:
    """InfoNCE lower bound on the mutual information I(S; T) in nats, over the N positions of [..., H] states.

    With s_i, t_j the L2-normalised states of positions i and j and logits l_ij = <s_i, t_j> / temperature,
    InfoNCE = log N - mean_i CE(softmax_j l_ij, i) <= I(S; T): each student state must pick its own position's
    teacher state among the N (the other N - 1 are the negatives), so it is below log N; orthogonal, identical
    S and T give log N - log(1 + (N - 1) e^{-1/t}); independent ones about 0 at large H.
    Float32 with autocast off (the N x N similarities)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.reshape(-1, student.shape[-1]).to(dtype), dim=-1)
        t = F.normalize(teacher.reshape(-1, teacher.shape[-1]).to(dtype), dim=-1)
        logits = s @ t.T / temperature
        n = logits.shape[0]
        return math.log(n) - F.cross_entropy(logits, torch.arange(n, device=logits.device))


def logsum(student: torch.Tensor, teacher: torch.Tensor, alpha: float = LOGSUM_ALPHA) -> torch.Tensor:
    """log sum |S - T|^alpha over every element (Distily's logsum_v2_loss, after 2303.11098's reference code):
    alpha log of the alpha-norm of the difference, so its gradient alpha sign(d) |d|^(alpha-1) / sum |d|^alpha
    does not shrink as the states approach. Computed as alpha log m + log sum (|d| / m)^alpha, m = max |d|
    (no overflow at large alpha, and a zero gradient where d = 0)."""
    d = (student - teacher).abs()
    m = d.detach().max().clamp_min(torch.finfo(d.dtype).tiny)
    return alpha * torch.log(m) + torch.log(((d / m) ** alpha).sum())


def mapped_hidden_loss(pairs, student_hidden, teacher_hidden, projectors: Projectors, loss: str, norm: str):
    """Average over mapped pairs; a 1-to-N pair averages its N teacher layers."""
    total = 0.0
    for s_layer, t_layers in pairs:
        projected = projectors(s_layer, student_hidden[s_layer])
        total = total + sum(hidden_loss(projected, teacher_hidden[t], loss, norm) for t in t_layers) / len(t_layers)
    return total / len(pairs)


def check_hidden_options(loss: str, norm: str, projector: str) -> None:
    if loss not in HS_LOSSES:
        raise DistilyError(f"--hs-loss {loss!r} is unknown; choose one of {', '.join(HS_LOSSES)}")
    if norm not in HS_NORMS:
        raise DistilyError(f"--hs-norm {norm!r} is unknown; choose one of {', '.join(HS_NORMS)}")
    if projector not in PROJECTORS:
        raise DistilyError(f"--projector {projector!r} is unknown; choose one of {', '.join(PROJECTORS)}")
