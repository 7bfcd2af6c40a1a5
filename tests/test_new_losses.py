"""sinkhorn (--loss), mutual_information and logsum (--hs-loss): each against an independent float64 reference or a
closed form, and each in a short train-student run on the tiny cache, where the logged loss is recomputed."""
from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from test_train_student import cfg_for, log

from pipeline.config import TrainConfig
from pipeline.errors import DistilyError
from stage_student.losses import kd as losses
from stage_student.losses.hidden import hidden_loss, info_nce, logsum
from stage_student.plan import resolve_kd_targets
from stage_student.train import Trainer

# ------------------------------------------------------------------------------------------ sinkhorn


def _lse(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def ref_entropic_ot(a, b, eps, tol=1e-12, max_iters=100_000):
    """Rows [n, k] of a and b: min <pi, C> + eps KL(pi || a x b), C = 1 - I as a dense matrix, by log-domain
    Sinkhorn in float64 to convergence (every row's marginal error below tol); value <a, f> + <b, g> per row."""
    c = 1.0 - np.eye(a.shape[-1])
    with np.errstate(divide="ignore"):
        la, lb = np.log(a), np.log(b)
    f, g = np.zeros_like(a), np.zeros_like(b)
    for _ in range(max_iters):
        f = -eps * _lse(lb[:, None, :] + (g[:, None, :] - c) / eps, axis=2)
        g = -eps * _lse(la[:, :, None] + (f[:, :, None] - c) / eps, axis=1)
        plan = np.exp(la[:, :, None] + lb[:, None, :] + (f[:, :, None] + g[:, None, :] - c) / eps)
        if np.abs(plan.sum(2) - a).sum(1).max() < tol:
            break
    return np.sum(np.where(a > 0, a * f, 0.0), 1) + np.sum(np.where(b > 0, b * g, 0.0), 1)


def ref_self_ot(a, eps, tol=1e-12, max_iters=100_000):
    """OT_eps(a, a) by the symmetric fixed point f = (f + T(f)) / 2 (Feydy et al. 2019, arXiv 1810.08278), another
    algorithm than the one under test: alternating Sinkhorn oscillates on a symmetric problem and takes about 20,000
    iterations at eps 0.1 where this takes a handful. Value 2 <a, f> per row."""
    c = 1.0 - np.eye(a.shape[-1])
    with np.errstate(divide="ignore"):
        la = np.log(a)
    f = np.zeros_like(a)
    for _ in range(max_iters):
        f = 0.5 * (f - eps * _lse(la[:, None, :] + (f[:, None, :] - c) / eps, axis=2))
        plan = np.exp(la[:, :, None] + la[:, None, :] + (f[:, :, None] + f[:, None, :] - c) / eps)
        if np.abs(plan.sum(2) - a).sum(1).max() < tol:
            break
    return 2 * np.sum(np.where(a > 0, a * f, 0.0), 1)


def ref_sinkhorn(p, q, eps):
    """Mean over rows of the debiased Sinkhorn divergence."""
    return float(np.mean(ref_entropic_ot(p, q, eps) - 0.5 * ref_self_ot(p, eps) - 0.5 * ref_self_ot(q, eps)))


def test_the_symmetric_reference_equals_alternating_sinkhorn():
    logp, s = lm_like(n=4, k=9, seed=3)
    for a in (logp.exp().numpy(), s.softmax(-1).numpy()):
        for eps in (0.25, 1.0):
            np.testing.assert_allclose(ref_self_ot(a, eps), ref_entropic_ot(a, a, eps), rtol=1e-10)


def lm_like(n=12, k=17, seed=0):
    """Teacher log-probs over k buckets (Zipf-like, peaked) and a student's nearby logits."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    t = -1.2 * ranks.log() + 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    s = t + torch.randn(n, k, generator=g, dtype=torch.float64)
    return t.log_softmax(-1), s


@functools.cache
def ref_lm_like(eps, k=17):
    logp, s = lm_like(k=k)
    return ref_sinkhorn(logp.exp().numpy(), s.softmax(-1).numpy(), eps)


@pytest.mark.parametrize("eps,iters,rel,k", [(0.25, losses.SINKHORN_ITERS, 1e-5, 17), (0.1, losses.SINKHORN_ITERS, 2e-4, 17),
                                            (0.1, losses.SINKHORN_ITERS, 2e-4, 65), (0.1, 5000, 1e-6, 17), (1.0, 20, 1e-5, 17)])
def test_sinkhorn_equals_a_dense_float64_reference(eps, iters, rel, k):
    """In float32, at the default iterations within 2e-4 of the converged float64 value at eps 0.1 on 17- and
    65-bucket rows (Sinkhorn converges slowly at small eps; docs/train-student.md), 1e-6 given enough iterations."""
    logp, s = lm_like(k=k)
    got = losses.sinkhorn(logp.float(), s.float().log_softmax(-1), epsilon=eps, iters=iters).mean()
    assert got.item() == pytest.approx(ref_lm_like(eps, k), rel=rel)


def test_sinkhorn_closed_forms():
    logp, s = lm_like(seed=1)
    logq = s.log_softmax(-1)
    p, q = logp.exp(), logq.exp()
    # eps -> inf: 1/2 ||p - q||^2 (the MMD end, Feydy et al. 2019); eps -> 0: the total variation, its upper bound
    big = losses.sinkhorn(logp, logq, epsilon=1e4, iters=5)
    torch.testing.assert_close(big, 0.5 * ((p - q) ** 2).sum(-1), rtol=1e-4, atol=0)
    tvd = losses.tvd(logp, logq)
    small = losses.sinkhorn(logp, logq, epsilon=0.05, iters=400)
    assert (small < tvd).all() and (small > 0.8 * tvd).all()
    # disjoint point masses: the only coupling moves everything at cost 1, whatever eps
    one_hot = torch.eye(5, dtype=torch.float64)
    for eps in (0.05, 1.0):
        got = losses.sinkhorn(one_hot[:4].log(), one_hot[1:].log(), epsilon=eps, iters=3)
        torch.testing.assert_close(got, torch.ones(4, dtype=torch.float64))
    # identical distributions: exactly 0; otherwise positive
    assert losses.sinkhorn(logp, logp).abs().max() == 0
    assert (losses.sinkhorn(logp, logq) > 0).all()


def test_sinkhorn_gradient_is_finite_and_equals_finite_differences_of_the_reference():
    logp, s = lm_like(n=3, k=9, seed=2)
    eps = 0.25
    z = s.clone().requires_grad_()
    losses.sinkhorn(logp, z.log_softmax(-1), epsilon=eps, iters=200).mean().backward()
    assert torch.isfinite(z.grad).all()
    h = 1e-5
    fd = torch.zeros_like(s)
    p = logp.exp().numpy()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            up, down = s.clone(), s.clone()
            up[i, j] += h
            down[i, j] -= h
            fd[i, j] = (ref_sinkhorn(p, up.softmax(-1).numpy(), eps) - ref_sinkhorn(p, down.softmax(-1).numpy(), eps)) / (2 * h)
    torch.testing.assert_close(z.grad, fd, rtol=1e-4, atol=1e-7)


def test_sinkhorn_under_bf16_autocast_is_computed_in_float32():
    """No bf16 anywhere inside (Distily's sinkhorn failed there: cdist has no CUDA bf16 kernel): the loss on
    bf16 logits under autocast is the float32 loss of the same (rounded) logits, and within bf16 rounding of the
    loss of the unrounded ones."""
    g = torch.Generator().manual_seed(3)
    teacher, student = 3 * torch.randn(64, 200, generator=g), 3 * torch.randn(64, 200, generator=g)
    lp = teacher.log_softmax(-1).topk(16, -1)
    tail = 1 - lp.values.exp().sum(-1)
    rounded = student.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = losses.kd_loss("sinkhorn", rounded, lp.indices, lp.values, tail)
        full = losses.kd_loss_full("sinkhorn", rounded, teacher)
    assert under.dtype == torch.float32 and full.dtype == torch.float32
    assert under.item() == pytest.approx(losses.kd_loss("sinkhorn", rounded.float(), lp.indices, lp.values, tail).item(), rel=1e-6)
    assert full.item() == pytest.approx(losses.kd_loss_full("sinkhorn", rounded.float(), teacher).item(), rel=1e-6)
    assert under.item() == pytest.approx(losses.kd_loss("sinkhorn", student, lp.indices, lp.values, tail).item(), rel=1e-2)


def test_sinkhorn_is_refused_on_sampled_targets():
    cfg = TrainConfig(loss="sinkhorn", kd_targets="sampled")
    with pytest.raises(DistilyError, match="--loss sinkhorn is not defined on sampled"):
        resolve_kd_targets(cfg, "both", kd_on=True)


# ------------------------------------------------------------------------------------- mutual information


def ref_info_nce(s, t, temperature):
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = s @ t.T / temperature
    return math.log(len(s)) - float(np.mean(_lse(logits, axis=1) - np.diag(logits)))


def test_info_nce_equals_a_float64_reference():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    t = s + 0.7 * torch.randn(3, 7, 16, generator=g, dtype=torch.float64)
    for temp in (0.1, 0.5):
        want = ref_info_nce(s.reshape(21, 16).numpy(), t.reshape(21, 16).numpy(), temp)
        assert info_nce(s, t, temp).item() == pytest.approx(want, rel=1e-12)
    assert hidden_loss(s, t, "mutual_information").item() == pytest.approx(-ref_info_nce(
        s.reshape(21, 16).numpy(), t.reshape(21, 16).numpy(), 0.1), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_info_nce_closed_form_on_identical_orthogonal_states(temperature):
    n = 8
    states = torch.eye(16, dtype=torch.float64)[:n] * torch.linspace(0.5, 3, n, dtype=torch.float64)[:, None]
    want = math.log(n) - math.log(1 + (n - 1) * math.exp(-1 / temperature))
    assert info_nce(states, states, temperature).item() == pytest.approx(want, rel=1e-12)


def test_info_nce_is_near_zero_for_independent_and_below_the_true_mi_for_correlated_states():
    g = torch.Generator().manual_seed(5)
    n = 256
    a, b = torch.randn(n, 4096, generator=g, dtype=torch.float64), torch.randn(n, 4096, generator=g, dtype=torch.float64)
    assert abs(info_nce(a, b).item()) < 0.05
    # Gaussians with correlation rho per coordinate: I = -d/2 log(1 - rho^2) (3.32 nats at d 4, rho 0.9)
    d, rho = 4, 0.9
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g, dtype=torch.float64)
    bound = info_nce(x, y).item()
    assert 1.0 < bound < -d / 2 * math.log(1 - rho**2) < math.log(n)


def test_mutual_information_gradient_is_finite_and_raises_the_bound():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(32, 8, generator=g)
    s = torch.randn(32, 8, generator=g).requires_grad_()
    opt = torch.optim.SGD([s], lr=0.5)
    first = hidden_loss(s, t, "mutual_information")
    for _ in range(20):
        opt.zero_grad()
        loss = hidden_loss(s, t, "mutual_information")
        loss.backward()
        assert torch.isfinite(s.grad).all()
        opt.step()
    assert loss.item() < first.item() - 1.0 and loss.item() > -math.log(32)


# ---------------------------------------------------------------------------------------------- logsum


def test_logsum_equals_distilys_formula_in_float64():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    want = math.log(np.sum(np.abs(s.numpy() - t.numpy()) ** 4))  # Distily's logsum_v2_loss
    assert logsum(s, t).item() == pytest.approx(want, rel=1e-13)
    assert hidden_loss(s, t, "logsum").item() == pytest.approx(want, rel=1e-6)
    assert logsum(s, t, alpha=5.0).item() == pytest.approx(math.log(np.sum(np.abs(s.numpy() - t.numpy()) ** 5)), rel=1e-13)
    # float32 states of size 1e12: the plain formula overflows (|d|^4 = 1e48), this one does not
    big = (s * 1e12).float(), (t * 1e12).float()
    assert not math.isfinite(torch.log(((big[0] - big[1]).abs() ** 4).sum()).item())
    assert logsum(*big).item() == pytest.approx(want + 4 * math.log(1e12), rel=1e-5)


def test_logsum_gradient_equals_the_reference_and_is_zero_where_states_agree():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t[0] = s[0]  # a row where the student already matches
    x = s.clone().requires_grad_()
    logsum(x, t).backward()
    d = s - t
    want = 4 * d.sign() * d.abs() ** 3 / (d.abs() ** 4).sum()
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=0)
    assert (x.grad[0] == 0).all()


# ------------------------------------------------------------------------------ train-student, from the cache


def _first_step_expected(trainer: Trainer) -> dict:
    """The first step's losses recomputed from its batch with the student's plain forward and the reference losses."""
    batch = next(iter(trainer.train_stream()))
    ids = batch["input_ids"]
    with torch.no_grad():
        out = trainer.model(input_ids=ids, output_hidden_states=True)
        expected = {}
        if trainer.plan.kd:
            logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
            k = batch["topk_ids"].shape[-1]
            expected["loss/kd"] = losses.kd_loss(trainer.cfg.loss, logits, batch["topk_ids"].reshape(-1, k),
                                                 batch["topk_logprobs"].reshape(-1, k), batch["tail_mass"].reshape(-1)).item()
        if trainer.cfg.hs_weight > 0:
            parts = []
            for s_layer, t_layers in trainer.plan.pairs:
                student = trainer.projectors(s_layer, out.hidden_states[s_layer])
                for t_layer in t_layers:
                    teacher = batch["hidden_states"][t_layer]
                    parts.append(-info_nce(student, teacher) if trainer.cfg.hs_loss == "mutual_information"
                                 else logsum(student.double(), teacher.double()))
            expected["loss/hs"] = float(sum(parts) / len(parts))
    return expected


@pytest.mark.parametrize("kw", [dict(loss="sinkhorn"),
                                dict(loss="forward_kl", hs_weight=0.5, hs_loss="mutual_information", layer_mapper="uniform"),
                                dict(loss="ce", hs_weight=0.1, hs_loss="logsum", layer_mapper="uniform")],
                         ids=["sinkhorn", "mutual_information", "logsum"])
def test_train_student_with_each_new_loss(tmp_path, hf_cache, kw):
    trainer = Trainer(cfg_for(hf_cache, tmp_path, max_steps=4, optimizer="adamw", eval_sequences=2, **kw))
    expected = _first_step_expected(trainer)
    trainer.run()
    rows = log(tmp_path)
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    for key, value in expected.items():
        assert rows[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert {k: config["config"][k] for k in kw} == kw
    if kw["loss"] == "sinkhorn":
        assert 0 < rows[-1]["loss/kd"] < rows[0]["loss/kd"] <= 1  # bounded by the total variation
