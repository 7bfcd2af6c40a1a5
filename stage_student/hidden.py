"""Hidden-state distillation: projectors from student to teacher width, optional norm, per-layer losses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DistilyError

HS_LOSSES = ("mse", "cosine")
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
    raise DistilyError(f"--hs-loss {loss!r} is unknown; choose one of {', '.join(HS_LOSSES)}")


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
