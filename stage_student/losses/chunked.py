"""The LM head and the KD/CE losses, fused and computed in chunks of positions (`--loss-chunk-size`).

The plain way (`--loss-chunk-size 0`, the reference in kd.py) builds the student's logits for every
position, [N, V], and the losses then make several more [N, V] float tensors (the tempered logits, a copy
with the teacher's top-k masked out, the log-sum-exps and, in the backward, their gradients). At a
151,936-token vocabulary and 4 x 1024 positions each is 2.5 GB.

Here the student stops at its final hidden states h [N, H]. For each chunk of C positions the head makes
z = h_c W^T (+ b) [C, V], the chunk's losses and their gradient dL/dz are computed at once, and dL/dh_c and
dL/dW are accumulated; z is freed before the next chunk. The gradients are computed in the forward pass
(as fused linear-cross-entropy kernels do) and scaled by the incoming gradient in the backward, so no
chunk is ever recomputed. Peak memory is a few [C, V] tensors instead of several [N, V] ones.

Cached RS-KD samples take `sampled_chunk` (the forward-KL estimate is linear in the gathered logits and the
log-sum-exp, so its gradient is written directly). Cached top-k targets (ids, log-probs, tail mass) take
the fast path, `cached_chunk`: every loss depends on
the logits only through the top-k logits and one log-sum-exp over the other tokens per temperature (plus
the true token's logit for CE), so autograd runs on those small [C, k+1] tensors, and the gradient wrt z is
put back together in place:  dL/dz_j = g_rest * softmax(z / t masked to j outside the top-k)_j / t  for
the tail tokens, g_j for the top-k, + g_y at the true token. Any other target (the full-vocabulary
--online-teacher) takes `autograd_chunk`, the reference losses on each chunk. Both equal kd.py to
float32 rounding (tests/test_chunked_loss.py).

On-policy targets (--loss token_reverse_kl: the student's own sampled tokens, the teacher's log-prob of each and
optionally the student's behaviour log-prob) take `token_chunk`: the estimate rho (log q - log p) of
kd.token_reverse_kl, whose gradient rho (log q - log p)(e_x - softmax(z)) is written directly
(tests/test_on_policy_loss.py).

Padded vocabularies (LossSpec.vocab = the cache's real tokens, len(tokenizer)): every loss is over the first
`vocab` logits only. The fused head uses the first `vocab` rows of the weight (tied or untied; the padding rows get
no gradient), unfused logits and the online teacher's logits are cut to the same columns.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from pipeline.errors import DistilyError
from stage_student.losses.kd import (
    ce_loss,
    divergence,
    kd_loss,
    kd_loss_full,
    sampled_kd_loss,
    teacher_log_probs,
    token_reverse_kl,
)


@dataclass
class LossSpec:
    """Which losses the head feeds and how they are weighted into the total."""

    kd: str | None = "forward_kl"  # a kd.KD_LOSSES name, "token_reverse_kl" (on-policy), or None for no KD term
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    tail: str = "bucket"
    beta: float = 0.5
    gamma: float = 0.5
    vocab: int | None = None  # the real tokens: logits beyond (padding rows of a head) are cut; None: the whole head


@dataclass
class Targets:
    """Flattened over the N positions: next tokens [N], and cached top-k [N, k] + tail [N], cached samples
    (RS-KD) [N, m], full logits [N, V], or on-policy grades: the teacher's log-prob of labels[i] [N] and the
    student's behaviour log-prob of it [N] (None: the current student's)."""

    labels: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_mass: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_token_logprob: torch.Tensor | None = None
    behaviour_logprob: torch.Tensor | None = None


def head_losses(hidden, head_weight, head_bias, spec: LossSpec, targets: Targets, chunk_size: int) -> dict:
    """{"kd", "ce": detached means over positions, "loss": their weighted sum, differentiable wrt hidden/W/b}.

    head_weight None: `hidden` already holds the logits [N, V] (heads that are not a plain linear layer).
    """
    hidden, head_weight, head_bias, targets = real_tokens(spec.vocab, hidden, head_weight, head_bias, targets)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, head_weight, head_bias))
    n = hidden.shape[0]
    if spec.kd == "token_reverse_kl":
        fn = token_chunk
    else:
        fn = autograd_chunk if targets.teacher_logits is not None else sampled_chunk \
            if targets.sample_ids is not None else cached_chunk
    names = [name for name, on in (("kd", spec.kd is not None), ("ce", spec.ce_weight > 0)) if on]

    def chunk(z, sl):
        return fn(z, sl, n, spec, targets, need_grad)

    total, parts = _FusedHead.apply(hidden, head_weight, head_bias, chunk, max(1, chunk_size or n), need_grad, names)
    out = {name: parts[i] for i, name in enumerate(names)}
    out["loss"] = total
    return out


def real_tokens(vocab: int | None, hidden, head_weight, head_bias, targets: Targets):
    """The head (its first `vocab` rows) or the logits [N, V] (their first `vocab` columns), and the online
    teacher's logits, cut to the real tokens. Views, only where something is wider: the gradient flows back to
    the rows kept."""
    if vocab is None:
        return hidden, head_weight, head_bias, targets
    width = head_weight.shape[0] if head_weight is not None else hidden.shape[-1]
    if width < vocab:
        raise DistilyError(f"the student's LM head has {width} rows, fewer than the {vocab} tokens of the targets")
    if width > vocab and head_weight is not None:
        head_weight, head_bias = head_weight[:vocab], None if head_bias is None else head_bias[:vocab]
    elif width > vocab:
        hidden = hidden[:, :vocab]
    if targets.teacher_logits is not None and targets.teacher_logits.shape[-1] > vocab:
        targets = replace(targets, teacher_logits=targets.teacher_logits[:, :vocab])
    return hidden, head_weight, head_bias, targets


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk, chunk_size, need_grad, names):
        n = hidden.shape[0]
        compute = _compute_dtype(hidden, weight)
        w = weight.to(compute) if weight is not None else None
        b = bias.to(compute) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad and weight is not None else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_grad and bias is not None else None
        total = torch.zeros((), device=hidden.device)
        parts = torch.zeros(len(names), device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(n, start + chunk_size))
            h = hidden[sl].to(compute)
            z = F.linear(h, w, b).float() if w is not None else hidden[sl].float().clone()
            values, gz = chunk(z, sl)
            del z
            total += values["loss"]
            for i, name in enumerate(names):
                parts[i] += values[name]
            if gz is None:
                continue
            if w is None:
                grad_h[sl] = gz.to(hidden.dtype)
                continue
            gz = gz.to(compute)
            grad_h[sl] = (gz @ w).to(hidden.dtype)
            grad_w += (gz.t() @ h).float()
            if grad_b is not None:
                grad_b += gz.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, g_total, _g_parts):
        grads = [None if g is None else g * g_total.to(g.dtype) for g in ctx.saved_tensors]
        if grads[1] is not None:
            grads[1] = grads[1].to(ctx.weight_dtype)
        if grads[2] is not None:
            grads[2] = grads[2].to(ctx.weight_dtype)
        return (*grads, None, None, None, None)


def _compute_dtype(hidden, weight):
    """The head's matmul dtype: the autocast dtype when autocast is on (bf16 on GPUs), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype if weight is not None else hidden.dtype


# ------------------------------------------------------------------------------------------- chunks


def tail_temperatures(spec: LossSpec, has_rest: bool, kd: bool, ce: bool) -> list[float]:
    """The temperatures whose tail log-sum-exp a loss needs: KD's with the rest bucket, CE's at 1."""
    temps = [spec.temperature] if has_rest and kd and spec.tail == "bucket" else []
    return temps + [1.0] if has_rest and ce and 1.0 not in temps else temps


def student_bucket_log_probs(picked, rest, spec: LossSpec, has_rest: bool):
    """The student's log-probs of the top-k tokens and (with --tail bucket) the rest, at spec.temperature."""
    scaled = picked / spec.temperature
    if spec.tail == "renormalize" or not has_rest:
        return torch.log_softmax(scaled, dim=-1)
    buckets = torch.cat([scaled, rest[:, None]], dim=-1)
    return buckets - torch.logsumexp(buckets, dim=-1, keepdim=True)


def cached_chunk(z, sl: slice, n: int, spec: LossSpec, t: Targets, need_grad: bool):
    """Losses of one chunk of logits z [C, V] against cached top-k targets, and dL/dz (z is overwritten)."""
    c, vocab = z.shape
    kd, ce = spec.kd is not None, spec.ce_weight > 0
    # CE alone: the "top-k" is empty and the tail is the whole vocabulary
    ids = t.topk_ids[sl].long() if kd else torch.empty(c, 0, dtype=torch.long, device=z.device)
    has_rest = ids.shape[-1] < vocab
    labels = t.labels[sl].long() if ce else None
    temps = tail_temperatures(spec, has_rest, kd, ce)
    need_rest = bool(temps)

    picked = z.gather(-1, ids)
    label_logit = z.gather(-1, labels[:, None])[:, 0] if ce else None
    rest = {}
    if need_rest:
        z.scatter_(-1, ids, float("-inf"))  # z now holds the tail tokens only
        for temp in temps:
            rest[temp] = torch.logsumexp(z / temp if temp != 1.0 else z, dim=-1)

    leaves = [x.detach().requires_grad_(need_grad) for x in (picked, *rest.values(), *([label_logit] if ce else []))]
    p_leaf, r_leaf = leaves[0], dict(zip(rest, leaves[1 : 1 + len(rest)]))
    with torch.enable_grad():
        values = {}
        if kd:
            logq = student_bucket_log_probs(p_leaf, r_leaf.get(spec.temperature), spec, has_rest)
            logp = teacher_log_probs(t.topk_logprobs[sl], t.tail_mass[sl], vocab, spec.temperature, spec.tail)
            values["kd"] = divergence(spec.kd, logp, logq, spec.temperature, spec.beta, spec.gamma) * (c / n)
        if ce:
            full = torch.cat([p_leaf, r_leaf[1.0][:, None]], dim=-1) if has_rest else p_leaf
            values["ce"] = (torch.logsumexp(full, dim=-1) - leaves[-1]).sum() / n
        values["loss"] = spec.kd_weight * values.get("kd", 0.0) + spec.ce_weight * values.get("ce", 0.0)
        if not need_grad:
            return {k: v.detach() for k, v in values.items()}, None
        grads = torch.autograd.grad(values["loss"], leaves, allow_unused=True)
    g_picked, g_rest = grads[0], dict(zip(rest, grads[1 : 1 + len(rest)]))

    # dL/dz, built in z's memory: the tail part first (softmax over the tail tokens, per temperature), then the
    # top-k entries (which the tail part leaves at 0) and the true token.
    if need_rest:
        extra = [_tail_grad(z, rest[temp], g_rest[temp], temp) for temp in list(rest)[:-1]]
        last = list(rest)[-1]
        z.div_(last) if last != 1.0 else None
        z.sub_(rest[last][:, None]).exp_().mul_(_zero_if_none(g_rest[last], rest[last])[:, None] / last)
        for e in extra:
            z.add_(e)
    else:
        z.zero_()
    if ids.shape[-1]:
        z.scatter_add_(-1, ids, _zero_if_none(g_picked, picked))
    if ce:
        z.scatter_add_(-1, labels[:, None], _zero_if_none(grads[-1], label_logit)[:, None])
    return {k: v.detach() for k, v in values.items()}, z


def sampled_chunk(z, sl: slice, n: int, spec: LossSpec, t: Targets, need_grad: bool):
    """Losses of one chunk against cached RS-KD samples (forward KL estimate, CE), and dL/dz (z is overwritten).

    KD = sum_i w_i (lse - z_i) - H(p) and CE = lse - z_y are linear in z's gathered entries and its
    log-sum-exp, so dL/dz = (kd_w sum_i w_i + ce_w) softmax(z) - kd_w sum_i w_i e_{x_i} - ce_w e_y (over n)."""
    kd, ce = spec.kd is not None, spec.ce_weight > 0
    lse = torch.logsumexp(z, dim=-1)
    values = {}
    if kd:
        ids = t.sample_ids[sl].long().clamp_min(0)
        w = t.sample_weights[sl].float()
        picked = z.gather(-1, ids)
        values["kd"] = ((w * (lse[:, None] - picked)).sum() - t.teacher_entropy[sl].float().sum()) / n
    if ce:
        labels = t.labels[sl].long()
        values["ce"] = (lse - z.gather(-1, labels[:, None])[:, 0]).sum() / n
    values["loss"] = spec.kd_weight * values.get("kd", 0.0) + spec.ce_weight * values.get("ce", 0.0)
    if not need_grad:
        return values, None
    g_lse = torch.zeros_like(lse)
    if kd:
        g_lse += spec.kd_weight * w.sum(-1) / n
    if ce:
        g_lse += spec.ce_weight / n
    z.sub_(lse[:, None]).exp_().mul_(g_lse[:, None])
    if kd:
        z.scatter_add_(-1, ids, -spec.kd_weight * w / n)
    if ce:
        z.scatter_add_(-1, labels[:, None], torch.full_like(lse[:, None], -spec.ce_weight / n))
    return values, z


def token_chunk(z, sl: slice, n: int, spec: LossSpec, t: Targets, need_grad: bool):
    """Losses of one chunk against on-policy grades (kd.token_reverse_kl, CE on the same tokens), and dL/dz (z is
    overwritten). With A = log q(y) - log p(y) and rho = q(y) / q_old(y) at the sampled token y:
    KD = sum rho A / n, and dL/dz = (kd_w rho A - ce_w) / n * (e_y - softmax(z))."""
    check_token_targets(spec, t)
    labels = t.labels[sl].long()
    lse = torch.logsumexp(z, dim=-1)
    logq = z.gather(-1, labels[:, None])[:, 0] - lse
    adv = logq - t.teacher_token_logprob[sl].float()
    old = t.behaviour_logprob
    rho = torch.exp(logq - old[sl].float()) if old is not None else torch.ones_like(logq)
    values = {"kd": (rho * adv).sum() / n}
    coef = spec.kd_weight * rho * adv / n  # d loss / d log q(y), per position
    if spec.ce_weight > 0:
        values["ce"] = -logq.sum() / n
        coef -= spec.ce_weight / n
    values["loss"] = spec.kd_weight * values.get("kd", 0.0) + spec.ce_weight * values.get("ce", 0.0)
    if not need_grad:
        return values, None
    z.sub_(lse[:, None]).exp_().mul_(-coef[:, None])
    z.scatter_add_(-1, labels[:, None], coef[:, None])
    return values, z


def check_token_targets(spec: LossSpec, t: Targets) -> None:
    """--loss token_reverse_kl grades the student's own samples at temperature 1: the teacher's log-probs must be there."""
    if t.labels is None or t.teacher_token_logprob is None:
        raise DistilyError("--loss token_reverse_kl is on-policy distillation: it needs the student's sampled tokens "
                           "graded by the teacher (its log-prob of each), which these targets (a teacher cache or "
                           "the online teacher's logits) do not hold")
    if spec.temperature != 1.0:
        raise DistilyError("--loss token_reverse_kl estimates KL(q || p) at temperature 1, the one the student "
                           f"sampled at: --temperature {spec.temperature} does not apply")


def _tail_grad(z_tail, lse, g, temp):
    return torch.exp(z_tail / temp - lse[:, None]) * (_zero_if_none(g, lse)[:, None] / temp)


def _zero_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def reference_losses(logits, spec: LossSpec, t: Targets) -> dict:
    """The losses of kd.py on full logits [N, V] (the reference; --loss-chunk-size 0), differentiable."""
    logits, _, _, t = real_tokens(spec.vocab, logits, None, None, t)
    values = {}
    if spec.kd == "token_reverse_kl":
        check_token_targets(spec, t)
        values["kd"] = token_reverse_kl(logits, t.labels, t.teacher_token_logprob, t.behaviour_logprob)
    elif spec.kd is not None and t.teacher_logits is not None:
        values["kd"] = kd_loss_full(spec.kd, logits, t.teacher_logits, spec.temperature, spec.beta, spec.gamma)
    elif spec.kd is not None and t.sample_ids is not None:
        values["kd"] = sampled_kd_loss(logits, t.sample_ids, t.sample_weights, t.teacher_entropy)
    elif spec.kd is not None:
        values["kd"] = kd_loss(spec.kd, logits, t.topk_ids, t.topk_logprobs, t.tail_mass, spec.temperature,
                                      spec.tail, spec.beta, spec.gamma)
    if spec.ce_weight > 0:
        values["ce"] = ce_loss(logits, t.labels)
    values["loss"] = spec.kd_weight * values.get("kd", 0.0) + spec.ce_weight * values.get("ce", 0.0)
    return values


def autograd_chunk(z, sl: slice, n: int, spec: LossSpec, t: Targets, need_grad: bool):
    """The reference losses on one chunk (full-vocabulary teacher logits), scaled to its share, and dL/dz."""
    z = z.detach().requires_grad_(need_grad)
    chunk_targets = Targets(**{k: v[sl] if v is not None else None for k, v in vars(t).items()})
    with torch.enable_grad():
        values = {k: v * (z.shape[0] / n) for k, v in reference_losses(z, spec, chunk_targets).items()}
        grad = torch.autograd.grad(values["loss"], z)[0] if need_grad else None
    return {k: v.detach() for k, v in values.items()}, grad
