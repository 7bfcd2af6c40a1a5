"""Layer-mapping strategies of arXiv 2310.08797 (Udagawa et al.): which teacher hidden states each student
layer learns from. Indices follow HF output_hidden_states: 1..L are the layers' outputs (L after the final
norm); the embeddings (0) are never mapped.

  1-to-1  last                 student L_S <- teacher L_T
          uniform              student i <- teacher round(i * L_T / L_S), for every student layer
          last-k               the student's last k layers <- the teacher's last k layers, in order
          all                  student i <- teacher i (equal depth only)
          copied               student i <- the teacher layer it was copied from (--init teacher-layers)
  1-to-N  uniform-consecutive  student i <- teacher layers ceil((i-1) L_T / L_S) + 1 .. ceil(i L_T / L_S): the teacher's
                               layers in L_S contiguous groups, every student layer mapped
          uniform+last         student i <- {teacher round(i * L_T / L_S), teacher L_T}
  1-to-1  upper-middle         student L_S <- teacher L_T - max(1, L_T // 8): an upper-middle teacher layer, the best
                               source in 2310.08797 and MiniLMv2 (layer 21 of 24, 27 of 30)
"""
from __future__ import annotations

from pipeline.errors import DistilyError

MAPPERS = ("last", "uniform", "last-k", "all", "copied", "uniform-consecutive", "uniform+last", "upper-middle")


def map_layers(name: str, student_layers: int, teacher_layers: int, k: int = 4,
               copied_from: list[int] | None = None) -> list[tuple[int, list[int]]]:
    """[(student_layer, [teacher_layers])], HF hidden-state numbering. `copied_from`: the 0-based teacher
    layer each student layer was initialised from (the `copied` mapper)."""
    s, t = student_layers, teacher_layers
    uniform = lambda i: max(1, round(i * t / s))  # noqa: E731
    if name == "last":
        return [(s, [t])]
    if name == "uniform":
        return [(i, [uniform(i)]) for i in range(1, s + 1)]
    if name == "last-k":
        if not 1 <= k <= min(s, t):
            raise DistilyError(f"--layer-mapper last-k needs 1 <= --layer-mapper-k <= {min(s, t)}, got {k}")
        return [(s - k + j, [t - k + j]) for j in range(1, k + 1)]
    if name == "all":
        if s != t:
            raise DistilyError(f"--layer-mapper all needs equal depth; the student has {s} layers, the teacher {t}")
        return [(i, [i]) for i in range(1, s + 1)]
    if name == "copied":
        if copied_from is None or len(copied_from) != s:
            raise DistilyError("--layer-mapper copied needs --init teacher-layers (student layer i learns from the teacher layer it copied)")
        return [(i + 1, [l + 1]) for i, l in enumerate(copied_from)]
    if name == "uniform-consecutive":
        # every student layer gets a contiguous group; group sizes differ by at most one
        groups = []
        for i in range(1, s + 1):
            lo = min(t, -(-(i - 1) * t // s) + 1)
            groups.append((i, list(range(lo, max(lo, -(-i * t // s)) + 1))))
        return groups
    if name == "upper-middle":
        return [(s, [max(1, t - max(1, t // 8))])]
    if name == "uniform+last":
        return [(i, sorted({uniform(i), t})) for i in range(1, s + 1)]
    raise DistilyError(f"--layer-mapper {name!r} is unknown; choose one of {', '.join(MAPPERS)}")


def required_teacher_layers(pairs: list[tuple[int, list[int]]]) -> list[int]:
    return sorted({l for _, ls in pairs for l in ls})
