"""On-policy distillation's per-token reverse-KL estimator (kd.token_reverse_kl) and its fused-head chunk
(chunked.token_chunk): a float64 hand computation, unbiasedness by sampling, and the fused head against the reference."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import DistilyError
from stage_student.losses import kd as losses
from stage_student.losses.chunked import (
    LossSpec,
    Targets,
    head_losses,
    reference_losses,
)

N, H, V = 37, 16, 50
SIGMAS = 5.0  # the unbiasedness tolerance, in standard errors of the Monte-Carlo mean


def hand(logits, labels, teacher_logprob, behaviour_logprob):
    """The estimator's value and its gradient wrt the logits, in float64 by hand: mean of rho A, rho A (e_y - s) / n."""
    z = logits.double()
    logq_all = torch.log_softmax(z, -1)
    logq = logq_all.gather(-1, labels[:, None])[:, 0]
    adv = logq - teacher_logprob.double()
    rho = torch.ones_like(logq) if behaviour_logprob is None else torch.exp(logq - behaviour_logprob.double())
    onehot = torch.nn.functional.one_hot(labels, z.shape[-1]).double()
    grad = (rho * adv / z.shape[0])[:, None] * (onehot - logq_all.exp())
    return (rho * adv).mean(), grad


@pytest.mark.parametrize("behaviour", [False, True])
def test_value_and_gradient_equal_a_float64_hand_computation(behaviour):
    g = torch.Generator().manual_seed(0)
    n, v = 7, 11
    logits = (2 * torch.randn(n, v, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = torch.log_softmax(2 * torch.randn(n, v, generator=g), -1).gather(-1, labels[:, None])[:, 0]
    old = torch.log_softmax(logits.detach() + torch.randn(n, v, generator=g), -1).gather(-1, labels[:, None])[:, 0]
    old = old if behaviour else None
    loss = losses.token_reverse_kl(logits, labels, teacher, old)
    grad = torch.autograd.grad(loss, logits)[0]
    want, want_grad = hand(logits.detach(), labels, teacher, old)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)
    assert abs(want.item()) > 0.1
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-7, rtol=1e-5)
    if behaviour:  # the ratio matters: not the rho = 1 estimate
        assert abs(loss.item() - losses.token_reverse_kl(logits, labels, teacher).item()) > 0.05
    else:  # the current student's own log-probs as the behaviour's: the same value and gradient
        same = losses.token_reverse_kl(logits, labels, teacher,
                                       torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0])
        assert same.item() == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(torch.autograd.grad(same, logits)[0], grad)


def exact_kl_and_gradient(z, logp):
    """sum_x q(x) (log q(x) - log p(x)) per position and its gradient wrt z, by autograd in float64."""
    z = z.double().detach().requires_grad_()
    logq = torch.log_softmax(z, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return kl.detach(), torch.autograd.grad(kl.sum(), z)[0]


@pytest.mark.parametrize("off_policy", [False, True])
def test_estimator_is_unbiased_for_reverse_kl_and_its_gradient(off_policy):
    """x ~ q_old, 200k draws per position: the mean value is KL(q||p) and the mean gradient is d KL(q||p) / dz,
    within SIGMAS standard errors (computed from the draws). Off-policy (q_old != q) the ratio is what makes it so."""
    g = torch.Generator().manual_seed(1)
    positions, v, draws = 3, 6, 200_000
    z = torch.randn(positions, v, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(1.5 * torch.randn(positions, v, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(z, -1)
    log_old = torch.log_softmax(z + 0.8 * torch.randn(positions, v, generator=g, dtype=torch.float64), -1) \
        if off_policy else logq
    kl, kl_grad = exact_kl_and_gradient(z, logp)
    for i in range(positions):
        x = torch.multinomial(log_old[i].exp(), draws, replacement=True, generator=g)
        leaf = z[i].float().expand(draws, v).clone().requires_grad_()
        loss = losses.token_reverse_kl(leaf, x, logp[i][x], log_old[i][x] if off_policy else None)
        per_draw_grad = torch.autograd.grad(loss, leaf)[0].double() * draws  # each draw's own gradient
        per_draw = torch.exp(logq[i][x] - log_old[i][x]) * (logq[i][x] - logp[i][x])  # each draw's value (float64)
        assert loss.item() == pytest.approx(per_draw.mean().item(), rel=1e-5)
        se = per_draw.std().item() / draws**0.5
        assert abs(loss.item() - kl[i].item()) <= SIGMAS * se, (i, loss.item(), kl[i].item(), se)
        grad_se = per_draw_grad.std(0) / draws**0.5
        assert ((per_draw_grad.mean(0) - kl_grad[i]).abs() <= SIGMAS * grad_se + 1e-6).all(), (i, grad_se)
        assert se < 0.01 and grad_se.max() < 0.01  # tight enough to catch a missing ratio or a wrong sign
        if off_policy:  # without the ratio the mean is E_{q_old}[A], not the KL: far outside the tolerance
            assert abs((logq[i][x] - logp[i][x]).mean().item() - kl[i].item()) > 4 * SIGMAS * se


def on_policy_inputs(seed: int = 0, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (N,), generator=g)
    teacher = torch.log_softmax(2 * torch.randn(N, vocab, generator=g), -1).gather(-1, labels[:, None])[:, 0]
    logits = torch.nn.functional.linear(h, w, b).detach()[:, :vocab]
    old = torch.log_softmax(logits + 0.5 * torch.randn(N, vocab, generator=g), -1).gather(-1, labels[:, None])[:, 0]
    return h, w, b, labels, teacher, old


@pytest.mark.parametrize("ce", [0.0, 0.5])
@pytest.mark.parametrize("behaviour", [False, True])
@pytest.mark.parametrize("vocab", [None, V - 7])
def test_fused_head_equals_the_reference(ce, behaviour, vocab):
    h, w, b, labels, teacher, old = on_policy_inputs(vocab=vocab or V)
    t = Targets(labels=labels, teacher_token_logprob=teacher, behaviour_logprob=old if behaviour else None)
    spec = LossSpec(kd="token_reverse_kl", kd_weight=0.7, ce_weight=ce, vocab=vocab)
    ref = reference_losses(torch.nn.functional.linear(h, w, b), spec, t)
    ref_grads = torch.autograd.grad(ref["loss"], [h, w, b])
    assert set(ref) == ({"kd", "loss", "ce"} if ce else {"kd", "loss"})
    assert abs(ref["kd"].item()) > 0.1
    for chunk in (1, 3, N):
        out = head_losses(h, w, b, spec, t, chunk)
        assert set(out) == set(ref)
        for key in ref:
            assert out[key].item() == pytest.approx(ref[key].item(), abs=1e-5, rel=1e-5), (key, chunk)
        for got, want in zip(torch.autograd.grad(out["loss"], [h, w, b]), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        quiet = head_losses(h, w, b, spec, t, 5)
    assert not quiet["loss"].requires_grad and quiet["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5)


def test_fused_head_on_given_logits_and_gradient_scaling():
    h, w, b, labels, teacher, old = on_policy_inputs(seed=2)
    t = Targets(labels=labels, teacher_token_logprob=teacher, behaviour_logprob=old)
    spec = LossSpec(kd="token_reverse_kl", ce_weight=0.3)
    logits = torch.nn.functional.linear(h, w, b).detach().requires_grad_()
    ref = reference_losses(logits, spec, t)
    out = head_losses(logits, None, None, spec, t, 4)  # a head that is not fused: chunks over given logits
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-6)
    torch.testing.assert_close(torch.autograd.grad(3 * out["loss"], logits)[0],
                               torch.autograd.grad(3 * ref["loss"], logits)[0], atol=1e-6, rtol=1e-5)


def test_targets_without_teacher_grades_or_a_temperature_are_refused():
    h, w, b, labels, teacher, _ = on_policy_inputs()
    cached = Targets(labels=labels, topk_ids=torch.zeros(N, 4, dtype=torch.long), topk_logprobs=torch.zeros(N, 4),
                     tail_mass=torch.zeros(N))
    spec = LossSpec(kd="token_reverse_kl")
    for fn in (lambda: head_losses(h, w, b, spec, cached, 8), lambda: reference_losses(h @ w.t() + b, spec, cached)):
        with pytest.raises(DistilyError, match="token_reverse_kl"):
            fn()
    hot = LossSpec(kd="token_reverse_kl", temperature=2.0)
    with pytest.raises(DistilyError, match="temperature"):
        head_losses(h, w, b, hot, Targets(labels=labels, teacher_token_logprob=teacher), 8)


def test_loss_name_is_accepted_but_is_not_a_divergence():
    losses.check_loss_name("token_reverse_kl")
    assert "token_reverse_kl" in losses.LOSSES and "token_reverse_kl" in losses.ON_POLICY_LOSSES
    assert "token_reverse_kl" not in losses.KD_LOSSES and "token_reverse_kl" not in losses.SAMPLED_LOSSES
    assert "token_reverse_kl" not in losses.DIVERGENCES
