"""Cross-tokenizer losses (cross_tokenizer.py aligns the rows). Every function is pure: tensors in, tensor out.

At an aligned pair the teacher and the student predict text that starts at the same byte. Inputs, one row per
aligned pair: the student's logits z [P, V_s]; the teacher's cached top-k in *student* ids (`mapped_ids` [P, k],
-1 where the teacher token has no byte-exact student token), its log-probs [P, k] and tail mass [P]; and the span
bucket: the student's next token where it is >= 2 whole teacher tokens (`span_ids` [P], -1: none), the teacher's
probability of it by the chain rule (`span_logprob`) and the top-k slot of its first teacher token (`span_slot`).

mapped_buckets   k + 2 buckets on both sides: the mapped tokens (teacher tokens that map to one student token
                 share its bucket: " Washington" and " Wash" both count for the student's " Wash"), the span token, and a rest bucket
                 (teacher: tail + unmapped top-k mass - the span's mass; student: 1 - mapped - span). The span's
                 teacher mass is taken from the bucket of its first teacher token ("the" of "there": P("the" then
                 more) is not P(the student's "the")), or from the rest when that token is not in the top-k.
                 Any --loss divergence (kd.divergence) then compares them. With the teacher's own tokenizer
                 every top-k token maps, no span exists, and this is exactly the cached-path bucket loss.
uld_unmatched    GOLD's second term: 1-Wasserstein distance between the sorted probabilities of the tokens the
                 mapping does not cover (teacher: its unmapped top-k; student: its top-k outside the mapped set).
uld              ULD (arXiv 2402.12030) alone: the sorted top-k probabilities plus the rest, no mapping at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stage_student.losses.kd import divergence

FLOOR = -1e4  # log-probability of an empty bucket: exp() is exactly 0 in float32, so it adds nothing to any divergence


def teacher_buckets(mapped_ids, topk_logprobs, tail_mass, span_ids, span_logprob, span_slot):
    """[P, k + 2] log P over (mapped top-k, span, rest). Slots that map to the same student token share the bucket
    of the first of them (their mass added); the others are empty."""
    lp = topk_logprobs.float()
    mapped = mapped_ids >= 0
    same = (mapped_ids[:, :, None] == mapped_ids[:, None, :]) & mapped[:, None, :]  # [P, slot, slot]
    merged = same.sum(-1) > 1
    lp = torch.where(merged, torch.bmm(same.float(), lp.exp()[:, :, None])[:, :, 0].log(), lp)
    first = _first_slots(mapped_ids)
    span = _span_valid(mapped_ids, span_ids)
    # the span's mass comes out of the bucket of its first teacher token's student token when mapped, else the rest
    slot = (mapped_ids == mapped_ids.gather(-1, span_slot.clamp_min(0)[:, None])).float().argmax(-1, keepdim=True)
    from_slot = span & (span_slot >= 0) & mapped.gather(-1, slot)[:, 0]
    rest = tail_mass.float() + torch.where(mapped, 0.0, lp.exp()).sum(-1)
    source = torch.where(from_slot, lp.gather(-1, slot)[:, 0].exp(), rest)
    p_span = torch.where(span, torch.minimum(span_logprob.float().exp(), source), 0.0)
    hit = F.one_hot(slot[:, 0], lp.shape[-1]).bool() & from_slot[:, None]
    lp = torch.where(hit, (source - p_span).clamp_min(1e-30).log()[:, None], lp)
    rest = torch.where(span & ~from_slot, rest - p_span, rest)
    buckets = torch.cat([torch.where(first, lp, FLOOR), torch.where(span, p_span.clamp_min(1e-30).log(), FLOOR)[:, None],
                         rest.clamp_min(1e-30).log()[:, None]], dim=-1)
    return torch.log_softmax(buckets, dim=-1)


def student_buckets(logits, mapped_ids, span_ids):
    """[P, k + 2] log Q over the same buckets as teacher_buckets, from the student's logits [P, V]."""
    z = logits.float()
    mapped = mapped_ids >= 0
    span = _span_valid(mapped_ids, span_ids)
    covered = torch.zeros_like(z).scatter_add_(-1, mapped_ids.clamp_min(0), mapped.float())
    covered.scatter_add_(-1, span_ids.clamp_min(0)[:, None], span.float()[:, None])
    log_rest = torch.logsumexp(z.masked_fill(covered > 0, float("-inf")), dim=-1, keepdim=True).clamp_min(FLOOR)
    out = torch.cat([z.gather(-1, mapped_ids.clamp_min(0)), z.gather(-1, span_ids.clamp_min(0)[:, None]), log_rest], -1)
    out = out - torch.logsumexp(z, dim=-1, keepdim=True)
    return torch.where(torch.cat([_first_slots(mapped_ids), span[:, None], torch.ones_like(span[:, None])], -1), out, FLOOR)


def _first_slots(mapped_ids):
    """[P, k] True at the first top-k slot of each mapped student token in its row."""
    k = mapped_ids.shape[-1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=mapped_ids.device).tril(-1)  # [j, i]: slot i comes before j
    repeated = ((mapped_ids[:, :, None] == mapped_ids[:, None, :]) & earlier).any(-1)
    return (mapped_ids >= 0) & ~repeated


def _span_valid(mapped_ids, span_ids):
    """A span bucket only where the student's next token is not already one of the mapped top-k."""
    return (span_ids >= 0) & ~(mapped_ids == span_ids[:, None]).any(-1)


def mapped_kd(name: str, logits, mapped_ids, topk_logprobs, tail_mass, span_ids, span_logprob, span_slot,
              beta: float = 0.5, gamma: float = 0.5):
    """Mean over aligned pairs of D(P_teacher, Q_student) on the mapped, span and rest buckets."""
    logp = teacher_buckets(mapped_ids, topk_logprobs, tail_mass, span_ids, span_logprob, span_slot)
    logq = student_buckets(logits, mapped_ids, span_ids)
    return divergence(name, logp, logq, 1.0, beta, gamma)


def sorted_w1(p, q):
    """1-Wasserstein distance between two discrete distributions' probabilities sorted in descending order (ULD):
    sum_i |p_(i) - q_(i)|, the shorter one padded with zeros. Mean over rows."""
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    q = F.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1).mean()


def uld_unmatched(logits, mapped_ids, topk_logprobs, span_ids):
    """ULD on what the mapping leaves out: the teacher's unmapped top-k probabilities against the student's
    largest probabilities outside the mapped (and span) tokens, as many as the top-k."""
    mapped = mapped_ids >= 0
    p = torch.where(mapped, torch.zeros_like(topk_logprobs, dtype=torch.float32), topk_logprobs.float().exp())
    logq = torch.log_softmax(logits.float(), dim=-1)
    span = _span_valid(mapped_ids, span_ids)
    covered = torch.zeros_like(logq).scatter_add_(-1, mapped_ids.clamp_min(0), mapped.float())
    covered.scatter_add_(-1, span_ids.clamp_min(0)[:, None], span.float()[:, None])
    q = logq.masked_fill(covered > 0, float("-inf")).topk(min(p.shape[-1], logq.shape[-1]), dim=-1).values.exp()
    return sorted_w1(p, q)


def uld(logits, topk_logprobs, tail_mass):
    """ULD without a mapping: the teacher's sorted top-k + tail against the student's sorted top-k + the rest."""
    p = torch.cat([topk_logprobs.float().exp(), tail_mass.float()[:, None]], dim=-1)
    top = torch.log_softmax(logits.float(), dim=-1).topk(min(topk_logprobs.shape[-1], logits.shape[-1]), dim=-1).values.exp()
    q = torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)
    return (p - q).abs().sum(-1).mean()  # the rest buckets sit at the end of both, compared with each other


def kd_term(method: str, name: str, logits, t: dict, beta: float, gamma: float):
    """The KD term of --cross-tokenizer `method` at the aligned rows (t: the batch's "cross" fields)."""
    if method == "uld":
        return uld(logits, t["topk_logprobs"], t["tail_mass"])
    kd = mapped_kd(name, logits, t["mapped_ids"], t["topk_logprobs"], t["tail_mass"], t["span_ids"], t["span_logprob"],
                   t["span_slot"], beta, gamma)
    if method == "gold":
        kd = kd + uld_unmatched(logits, t["mapped_ids"], t["topk_logprobs"], t["span_ids"])
    return kd


def head_losses(out, weight, bias, spec, t: dict) -> dict:
    """{"kd", "ce", "loss"} for a cross-tokenizer batch from the student's output over its positions [N, H] (with the
    head's weight and bias) or its logits [N, V] (weight None). A plain unfused head: student vocabularies that
    need cross-tokenizer KD are mostly small, and only the aligned rows enter the KD term."""
    logits = F.linear(out, weight, bias) if weight is not None else out
    values = {}
    if spec.kd is not None:
        rows = t["rows"]
        values["kd"] = kd_term(t["method"], spec.kd, logits[rows], t, spec.beta, spec.gamma) if len(rows) \
            else logits.sum() * 0.0
    if spec.ce_weight > 0:
        values["ce"] = F.cross_entropy(logits.float(), t["labels"], ignore_index=-100)
    values["loss"] = spec.kd_weight * values.get("kd", 0.0) + spec.ce_weight * values.get("ce", 0.0)
    if not torch.is_tensor(values["loss"]):
        values["loss"] = logits.sum() * 0.0
    return values
