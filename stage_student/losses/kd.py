"""Distillation losses on the cached teacher top-k. Every function is pure: tensors in, tensor out.

The cache holds, per position, the teacher's top-k log-probs (temperature 1) and the tail mass outside
them. A loss compares the teacher distribution P with the student distribution Q on "buckets":

  tail="bucket" (default): k+1 buckets, the top-k tokens plus one "rest" bucket holding all other tokens.
      P_rest is the cached tail mass; Q_rest = the student's total probability outside the teacher's top-k
      (computed exactly, with a log-sum-exp over the non-top-k logits). Nothing is thrown away, and the
      loss equals the full-vocabulary loss whenever the teacher puts no mass outside its top-k.
  tail="renormalize": k buckets; both P and Q are renormalised over the teacher's top-k.

Temperature tau: the student uses softmax(z / tau) exactly; KL-family losses are multiplied by tau^2
(Hinton et al.), so gradient scales stay comparable across temperatures. With tail="bucket" only tau=1 is
allowed: tempering moves most of the teacher's mass into the tail (at T=2, 76% at k=64 and 87% at k=8 on
the embedded teacher), whose split the cache does not hold, and the bucket KL then misses 60-74% of the full
tempered KL even with the exact tempered tail (tests/bench/bench_temperature.py). tail="renormalize"
tempers the top-k alone (as other top-k toolkits do); --online-teacher tempers the full vocabulary.

Divergences D(P, Q), summed over buckets and averaged over positions:
  forward_kl  KL(P||Q)                      reverse_kl  KL(Q||P)
  jsd         beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q      (generalised JSD, GKD;
              at beta 0 and 1 its limits as GKD and TRL define them: KL(P||Q) and KL(Q||P))
  skew_kl     KL(P || a P + (1-a) Q)        skew_rkl    KL(Q || a Q + (1-a) P)  (DistiLLM, a = beta)
  cakld       gamma KL(Q||P) + (1-gamma) KL(P||Q), gamma = teacher's mean confidence (BitDistiller)
  tvd         1/2 sum |P - Q|
  sinkhorn    the Sinkhorn divergence S_eps(P, Q) = OT_eps(P, Q) - OT_eps(P, P)/2 - OT_eps(Q, Q)/2 (Feydy et al.
              2019, geomloss's default), OT_eps the entropic optimal transport cost between the buckets under the
              discrete ground cost c(i, j) = [i != j]; see `sinkhorn`.

On-policy (ON_POLICY_LOSSES, not a divergence over buckets): `token_reverse_kl`, the per-token estimate of
KL(Q||P) on tokens the student sampled itself, from the teacher's log-prob of each sampled token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.errors import DistilyError

TEMPERATURE_WITH_BUCKET = (
    "--temperature other than 1 needs --tail renormalize (temper the top-k alone) or --online-teacher (the full "
    "vocabulary): with the default --tail bucket, tempering moves most of the teacher's mass into the tail the cache "
    "does not split (76% at k=64, T=2 on the embedded teacher), and the loss would miss 60-74% of the tempered KL. "
    "See tests/bench/bench_temperature.py."
)
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "cakld", "tvd", "sinkhorn")
ON_POLICY_LOSSES = ("token_reverse_kl",)  # per-token estimates on the student's own samples, not over buckets
LOSSES = (*KD_LOSSES, "ce", *ON_POLICY_LOSSES)
TAILS = ("bucket", "renormalize")


def teacher_log_probs(topk_logprobs, tail_mass, vocab_size: int, temperature: float = 1.0, tail: str = "bucket"):
    """[N, k] cached log-probs + [N] tail -> [N, k(+1)] log P over the buckets."""
    k = topk_logprobs.shape[-1]
    scaled = topk_logprobs.float() / temperature
    if tail == "renormalize" or k >= vocab_size:
        return torch.log_softmax(scaled, dim=-1)
    if temperature != 1.0:
        raise DistilyError(TEMPERATURE_WITH_BUCKET)
    log_rest = torch.log(tail_mass.float().clamp_min(1e-30))
    return torch.log_softmax(torch.cat([scaled, log_rest[..., None]], dim=-1), dim=-1)


def truncate_topk(topk_ids, topk_logprobs, k: int):
    """The teacher's top k of a larger cached top-k, with the tail mass recomputed (exact)."""
    lp = topk_logprobs[..., :k]
    tail = (1.0 - lp.double().exp().sum(-1)).clamp(0.0, 1.0).to(lp.dtype)
    return topk_ids[..., :k], lp, tail


def student_log_probs(logits, topk_ids, temperature: float = 1.0, tail: str = "bucket"):
    """[N, V] student logits -> [N, k(+1)] log Q over the same buckets as the teacher's."""
    z = logits.float() / temperature
    picked = z.gather(-1, topk_ids.long())
    if tail == "renormalize" or topk_ids.shape[-1] >= z.shape[-1]:
        return torch.log_softmax(picked, dim=-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    rest = z.scatter(-1, topk_ids.long(), float("-inf"))
    log_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
    return torch.cat([picked, log_rest], dim=-1) - lse


def _kl(logp, logq):
    """sum_i p_i (log p_i - log q_i), with 0 log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _log_mix(logp, logq, a: float):
    """log(a p + (1-a) q), stable."""
    a = min(max(a, 1e-12), 1 - 1e-12)
    return torch.logaddexp(logp + math.log(a), logq + math.log(1 - a))


def forward_kl(logp, logq, **_):
    return _kl(logp, logq)


def reverse_kl(logp, logq, **_):
    return _kl(logq, logp)


def jsd(logp, logq, beta: float = 0.5, **_):
    if beta <= 0:  # the limits GKD (and TRL) use: forward KL at beta 0, reverse KL at beta 1
        return _kl(logp, logq)
    if beta >= 1:
        return _kl(logq, logp)
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def skew_kl(logp, logq, beta: float = 0.1, **_):
    return _kl(logp, _log_mix(logp, logq, beta))


def skew_rkl(logp, logq, beta: float = 0.1, **_):
    return _kl(logq, _log_mix(logq, logp, beta))


def cakld(logp, logq, gamma: float = 0.5, **_):
    return gamma * _kl(logq, logp) + (1 - gamma) * _kl(logp, logq)


def tvd(logp, logq, **_):
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


SINKHORN_EPSILON = 0.1  # entropic regularisation, in units of the ground cost (SinKD's and Distily's 0.1)
SINKHORN_ITERS = 50  # Sinkhorn iterations: within 2e-4 of convergence at eps 0.1 on LM-like 65-bucket rows


def sinkhorn(logp, logq, epsilon: float = SINKHORN_EPSILON, iters: int = SINKHORN_ITERS, **_):
    """Sinkhorn divergence S_eps(P, Q) = OT_eps(P, Q) - OT_eps(P, P)/2 - OT_eps(Q, Q)/2 per position, in float32.

    OT_eps(P, Q) = min over couplings pi of P and Q of <pi, C> + eps KL(pi || P x Q), the entropic optimal
    transport cost (Cuturi 2013), solved by log-domain Sinkhorn iterations on its dual potentials f, g.
    Ground cost: the discrete metric C_ij = [i != j] between buckets. The buckets of a position are tokens (and
    the rest), which carry no metric the cache holds, and the teacher's top-k differ from position to position,
    so the cross-position cost of SinKD (arXiv 2402.17110) and Distily's `sinkhorn_loss` (the L1 distance
    between the whole distributions of two positions, which needs one support for all) is not defined on them.
    Under the discrete metric unregularised OT is the total variation 1/2 sum |P - Q|, and the debiased S_eps
    runs from it (eps -> 0) to 1/2 sum (P - Q)^2 (eps -> inf; Feydy et al. 2019, arXiv 1810.08278); S_eps >= 0
    with equality iff P = Q, because exp(-C / eps) is positive definite.

    The kernel exp(-C / eps) = kappa 11^T + (1 - kappa) I, kappa = exp(-1 / eps), is applied in O(K) per row
    (no K x K matrix, no cdist, so the full vocabulary works too). The potentials are found without autograd;
    the value <P, f> + <Q, g> is then differentiable in P and Q with gradient (f, g), the envelope theorem
    (exact at convergence), so memory does not grow with the iterations. Autocast is off inside: float32
    (or float64) throughout, whatever the caller's autocast dtype."""
    dtype = torch.promote_types(logq.dtype, torch.float32)
    with torch.autocast(logq.device.type, enabled=False):
        logp, logq = logp.to(dtype), logq.to(dtype)
        pq = _entropic_ot(logp, logq, epsilon, iters)
        pp = _entropic_ot(logp, logp, epsilon, iters)
        qq = _entropic_ot(logq, logq, epsilon, iters)
        return pq - 0.5 * pp - 0.5 * qq


def _entropic_ot(loga, logb, eps: float, iters: int):
    """OT_eps(a, b) under the discrete cost: Sinkhorn's potentials without grad, then <a, f> + <b, g>."""
    with torch.no_grad():
        f, g = torch.zeros_like(loga), torch.zeros_like(logb)
        for _ in range(iters):
            f = -eps * _discrete_kernel_lse(logb.detach(), g, eps)
            g = -eps * _discrete_kernel_lse(loga.detach(), f, eps)
    return _dot(loga, f) + _dot(logb, g)


def _discrete_kernel_lse(logw, h, eps: float):
    """log sum_j w_j exp((h_j - C_ij) / eps) for every i, C_ij = [i != j]: log(kappa S + (1 - kappa) w_i e^{h_i/eps})."""
    a = logw + h / eps
    return torch.logaddexp(torch.logsumexp(a, dim=-1, keepdim=True) - 1.0 / eps, a + math.log1p(-math.exp(-1.0 / eps)))


def _dot(logw, h):
    """sum_i w_i h_i, with 0 * anything = 0."""
    w = logw.exp()
    return torch.where(w > 0, w * h, torch.zeros_like(w)).sum(-1)


DIVERGENCES = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
    "skew_rkl": skew_rkl, "cakld": cakld, "tvd": tvd, "sinkhorn": sinkhorn,
}
UNSCALED = ("tvd", "sinkhorn")  # not KL-family: no tau^2 factor


def kd_loss(name: str, student_logits, topk_ids, topk_logprobs, tail_mass, temperature: float = 1.0,
            tail: str = "bucket", beta: float = 0.5, gamma: float = 0.5):
    """Mean over positions of D(P_teacher, Q_student). Inputs are flattened over positions: [N, V], [N, k], [N]."""
    logq = student_log_probs(student_logits, topk_ids, temperature, tail)
    logp = teacher_log_probs(topk_logprobs, tail_mass, student_logits.shape[-1], temperature, tail)
    return divergence(name, logp, logq, temperature, beta, gamma)


def kd_loss_full(name: str, student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5,
                 gamma: float = 0.5):
    """The same divergence on full-vocabulary teacher logits (online KD, the reference): [N, V], [N, V]."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return divergence(name, logp, logq, temperature, beta, gamma)


def sampled_kd_loss(student_logits, sample_ids, sample_weights, teacher_entropy):
    """RS-KD: the unbiased estimate of KL(P_teacher || Q_student) from sampled targets (arXiv 2503.16870).

    Per position the cache holds the unique ids x_i of N draws from the teacher, weights w_i = count_i / N
    (x p/q when drawn at a temperature; padding has id -1 and weight 0) and the teacher's entropy H(P).
    sum_i w_i (-log q(x_i)) has expectation CE(P, Q) = KL(P||Q) + H(P), so the loss minus H(P) estimates the
    KL without bias, and its gradient is that of the full-vocabulary forward KL. Inputs flattened over
    positions: [N, V], [N, m], [N, m], [N]."""
    logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, sample_ids.long().clamp_min(0))
    return ((sample_weights.float() * -logq).sum(-1) - teacher_entropy.float()).mean()


def token_reverse_kl(student_logits, labels, teacher_logprob, behaviour_logprob=None):
    """On-policy distillation's per-token reverse KL (GKD, arXiv 2306.13649; Thinking Machines, "On-policy
    distillation", 2025): the mean over positions of  rho * stopgrad(log q(x) - log p(x)),  rho = q(x) / q_old(x).

    x is the token the student sampled, log p(x) the teacher's log-prob of it (a teacher-forced pass), log q(x)
    the current student's log-softmax at x, and log q_old(x) its log-prob when it sampled x (None: q_old = q,
    rho = 1 in value). The value rho (log q - log p) is an unbiased estimate of KL(q || p) at the position, for
    x ~ q_old; its gradient wrt the logits z, rho (log q - log p)(e_x - softmax(z)), is the policy gradient of
    that KL (its E[grad log q] term is zero in expectation). Float32. Inputs flattened over positions: [N, V],
    [N], [N], [N] or None."""
    logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, labels.long()[:, None])[:, 0]
    old = logq if behaviour_logprob is None else behaviour_logprob.float()
    rho = torch.exp(logq - old.detach())
    return (rho * (logq - teacher_logprob.float()).detach()).mean()


SAMPLED_LOSSES = ("forward_kl",)  # the losses linear in P, which the sampled estimate keeps unbiased


def divergence(name: str, logp, logq, temperature: float, beta: float, gamma: float):
    per_position = DIVERGENCES[name](logp, logq, beta=beta, gamma=gamma)
    scale = temperature**2 if name not in UNSCALED else 1.0
    return scale * per_position.mean()


def ce_loss(student_logits, targets):
    """Plain next-token cross-entropy on the true tokens: [N, V], [N]."""
    return F.cross_entropy(student_logits.float(), targets.long())


def check_loss_name(name: str, tail: str = "bucket") -> None:
    if name not in LOSSES:
        raise DistilyError(f"--loss {name!r} is unknown; choose one of {', '.join(LOSSES)}")
    if tail not in TAILS:
        raise DistilyError(f"--tail {tail!r} is unknown; choose one of {', '.join(TAILS)}")
