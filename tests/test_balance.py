"""Gradient-weighted loss balancing (stage_student/losses/balance.py): PCGrad and fixed-ratio GradNorm on constructed
gradients, per-term gradients against plain backward, and the measurement and balancing end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_train_student import cfg_for, log

from pipeline.errors import ConfigError
from stage_student.losses import balance
from stage_student.train import Trainer, train


def test_pcgrad_projects_a_conflicting_pair_exactly_and_leaves_others():
    g_logit = torch.tensor([2.0, 0.0, 0.0])
    conflicting = torch.tensor([-1.0, 3.0, 0.5])
    out = balance.pcgrad(conflicting, g_logit)
    torch.testing.assert_close(out, torch.tensor([0.0, 3.0, 0.5]), rtol=0, atol=0)  # its component along g_logit, gone
    assert float(out @ g_logit) == 0
    agreeing = torch.tensor([1.0, -3.0, 0.5])
    assert balance.pcgrad(agreeing, g_logit) is agreeing
    orthogonal = torch.tensor([0.0, 1.0, 0.0])
    assert balance.pcgrad(orthogonal, g_logit) is orthogonal
    rng = np.random.default_rng(0)  # against a float64 reference on random vectors
    for _ in range(20):
        a, b = rng.normal(size=50), rng.normal(size=50)
        want = a - min(0.0, a @ b) / (b @ b) * b
        got = balance.pcgrad(torch.tensor(a), torch.tensor(b)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_gradnorm_keeps_the_direction_at_the_set_norm_ratio():
    g_logit, g_aux = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.1])
    out = balance.gradnorm(g_aux, g_logit, 0.5)
    assert float(out.norm()) == pytest.approx(2.5, rel=1e-6)  # 0.5 x |g_logit| = 0.5 x 5
    assert float(torch.nn.functional.cosine_similarity(out, g_aux, dim=0)) == pytest.approx(1.0, abs=1e-7)


def test_term_gradients_sum_to_the_plain_backward_and_cosines_match_numpy():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    proj = torch.nn.Parameter(torch.randn(4, 3))  # reached by the auxiliary term only
    x = torch.randn(8, 5)
    h = x @ w
    terms = {"logit": h.pow(2).mean(), "hs": 0.5 * (h @ proj).sin().mean()}
    params = [w, proj]
    grads = balance.term_gradients(terms, params)
    assert torch.equal(grads["logit"][1], torch.zeros_like(proj))
    combined = balance.combine(grads, "none", {"hs": 0.5})
    (x @ w).pow(2).mean().add(0.5 * ((x @ w) @ proj).sin().mean()).backward()
    for c, p in zip(combined, params):
        torch.testing.assert_close(c, p.grad, rtol=1e-6, atol=1e-7)
    got = balance.cosines(grads)
    a = np.concatenate([g.double().numpy().ravel() for g in grads["logit"]])
    b = np.concatenate([g.double().numpy().ravel() for g in grads["hs"]])
    assert got["grad/cos_hs"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)
    assert got["grad/norm_logit"] == pytest.approx(np.linalg.norm(a), rel=1e-5)
    assert got["grad/norm_hs"] == pytest.approx(np.linalg.norm(b), rel=1e-5)
    # pcgrad through combine: the auxiliary part of the combined gradient never opposes the logit gradient
    pc = torch.cat([g.reshape(-1) for g in balance.combine(grads, "pcgrad", {"hs": 0.5})])
    aux = pc - torch.tensor(a, dtype=torch.float32)
    assert float(aux @ torch.tensor(a, dtype=torch.float32)) >= -1e-5 * math.sqrt(a @ a) * float(aux.norm())


@pytest.mark.parametrize("method", ["none", "pcgrad", "gradnorm"])
def test_training_logs_gradient_cosines_and_balances(tmp_path, hf_cache, method):
    """KD + hidden-state + attention-free run: every logging window carries the cosine between the logit and the
    hidden-state gradients and their norms; the balanced runs train (the loss falls)."""
    out = tmp_path / method
    train(cfg_for(hf_cache, out, max_steps=6, logging_steps=2, hs_weight=1.0, layer_mapper="uniform", init="random",
                  lr=1e-2, loss_balance=method, num_workers=0))
    rows = log(out)
    logged = [r for r in rows if "grad/cos_hs" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 6]
    assert all(-1 <= r["grad/cos_hs"] <= 1 and r["grad/norm_logit"] > 0 and r["grad/norm_hs"] > 0 for r in logged)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_balancing_differs_from_the_plain_sum_only_when_asked(tmp_path, hf_cache):
    kw = dict(max_steps=3, hs_weight=1.0, layer_mapper="uniform", init="random", lr=1e-2, num_workers=0)
    train(cfg_for(hf_cache, tmp_path / "a", **kw))
    train(cfg_for(hf_cache, tmp_path / "b", loss_balance="gradnorm", **kw))
    plain, norm = log(tmp_path / "a"), log(tmp_path / "b")
    assert plain[0]["loss"] == pytest.approx(norm[0]["loss"], rel=1e-6)  # same start
    assert plain[-1]["loss"] != pytest.approx(norm[-1]["loss"], rel=1e-4)  # different updates


@pytest.mark.parametrize("kw, message", [
    (dict(loss_balance="sometimes"), "--loss-balance 'sometimes' is unknown"),
    (dict(loss_balance="pcgrad"), "lacks one of the two"),  # no auxiliary loss
    (dict(loss_balance="pcgrad", hs_weight=1.0, kd_weight=0.0), "lacks one of the two"),  # no logit loss
])
def test_bad_balance_input(tmp_path, hf_cache, kw, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg_for(hf_cache, tmp_path, **kw))
