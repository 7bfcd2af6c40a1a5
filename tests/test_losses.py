"""Each loss against a straightforward float64 reference on full distributions; top-k -> full as k -> V."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import DistilyError
from stage_student.losses import kd as losses
from stage_student.losses.hidden import hidden_loss, make_projector
from stage_student.students.layer_map import map_layers

V = 50


def ref_divergence(name, p, q, beta=0.5, gamma=0.3):
    """Textbook formulas, row by row, in float64 numpy."""
    kl = lambda a, b: float(np.sum(np.where(a > 0, a * np.log(a / b), 0.0)))  # noqa: E731
    out = []
    for a, b in zip(p, q):
        if name == "forward_kl":
            out.append(kl(a, b))
        elif name == "reverse_kl":
            out.append(kl(b, a))
        elif name == "jsd":
            m = beta * a + (1 - beta) * b
            out.append(beta * kl(a, m) + (1 - beta) * kl(b, m))
        elif name == "skew_kl":
            out.append(kl(a, beta * a + (1 - beta) * b))
        elif name == "skew_rkl":
            out.append(kl(b, beta * b + (1 - beta) * a))
        elif name == "cakld":
            out.append(gamma * kl(b, a) + (1 - gamma) * kl(a, b))
        elif name == "tvd":
            out.append(0.5 * np.abs(a - b).sum())
    return float(np.mean(out))


def random_logits(n=32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g, dtype=torch.float64) * scale


def cache_view(teacher_logits, k):
    """What the cache would hold: top-k ids/log-probs and the tail mass."""
    lp = torch.log_softmax(teacher_logits, -1)
    top = lp.topk(k, dim=-1)
    tail = (1 - top.values.exp().sum(-1)).clamp_min(0)
    return top.indices, top.values.float(), tail.float()


@pytest.mark.parametrize("name", [n for n in losses.KD_LOSSES if n != "sinkhorn"])  # its reference: test_new_losses.py
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocab_loss_equals_reference(name, temperature):
    t, s = random_logits(seed=1), random_logits(seed=2)
    ids, lp, tail = cache_view(t, V)
    got = losses.kd_loss(name, s.float(), ids, lp, tail, temperature=temperature, beta=0.5, gamma=0.3)
    p = torch.softmax(t / temperature, -1).numpy()
    q = torch.softmax(s / temperature, -1).numpy()
    scale = temperature**2 if name not in losses.UNSCALED else 1.0
    assert got.item() == pytest.approx(scale * ref_divergence(name, p, q, 0.5, 0.3), rel=1e-4, abs=1e-6)


def test_forward_and_reverse_kl_match_torch_kl_div():
    t, s = random_logits(seed=3).float(), random_logits(seed=4).float()
    ids, lp, tail = cache_view(t, V)
    logp, logq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    fkl = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
    rkl = F.kl_div(logp, logq, log_target=True, reduction="batchmean")
    assert losses.kd_loss("forward_kl", s, ids, lp, tail).item() == pytest.approx(fkl.item(), rel=1e-5)
    assert losses.kd_loss("reverse_kl", s, ids, lp, tail).item() == pytest.approx(rkl.item(), rel=1e-5)


@pytest.mark.parametrize("name", losses.KD_LOSSES)
@pytest.mark.parametrize("tail", losses.TAILS)
def test_zero_for_identical_distributions(name, tail):
    t = random_logits(seed=5)
    ids, lp, tail_mass = cache_view(t, 10)
    got = losses.kd_loss(name, t.float(), ids, lp, tail_mass, tail=tail, temperature=1.0)
    assert abs(got.item()) < 1e-5


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_topk_bucket_loss_converges_to_full_loss(name):
    t, s = random_logits(seed=6, scale=2.0), random_logits(seed=7, scale=2.0)
    full = losses.kd_loss(name, s.float(), *cache_view(t, V)).item()
    errors = [abs(losses.kd_loss(name, s.float(), *cache_view(t, k)).item() - full) for k in (5, 20, 40, 49, V)]
    assert errors[-1] < 1e-5
    assert errors[3] < errors[0] and errors[2] < errors[0]


def test_bucket_is_exact_when_teacher_has_no_tail():
    """A teacher with support on k tokens: the k+1-bucket forward KL equals the full-vocabulary one."""
    t = random_logits(seed=8)
    k = 12
    keep = t.topk(k, -1).indices
    masked = torch.full_like(t, float("-inf")).scatter(-1, keep, t.gather(-1, keep))
    s = random_logits(seed=9).float()
    ids, lp, tail = cache_view(masked, k)
    assert tail.max() < 1e-6
    logp, logq = torch.log_softmax(masked, -1), torch.log_softmax(s.double(), -1)
    full = torch.where(logp.isfinite(), logp.exp() * (logp - logq), torch.zeros_like(logp)).sum(-1).mean()
    got = losses.kd_loss("forward_kl", s, ids, lp, tail, tail="bucket")
    assert got.item() == pytest.approx(full.item(), rel=1e-5)
    renorm = losses.kd_loss("forward_kl", s, ids, lp, tail, tail="renormalize")
    assert renorm.item() < got.item()  # renormalising hides the student's mass outside the top-k


def test_student_rest_bucket_is_its_mass_outside_topk():
    s = random_logits(seed=10).float()
    ids = torch.arange(7).expand(s.shape[0], 7)
    logq = losses.student_log_probs(s, ids, tail="bucket")
    q = torch.softmax(s, -1)
    torch.testing.assert_close(logq.exp()[:, -1], q[:, 7:].sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logq.exp().sum(-1), torch.ones(s.shape[0]), rtol=1e-5, atol=1e-5)


def test_gradients_flow_and_ce_is_cross_entropy():
    s = random_logits(seed=11).float().requires_grad_()
    ids, lp, tail = cache_view(random_logits(seed=12), 8)
    losses.kd_loss("jsd", s, ids, lp, tail, temperature=2.0, tail="renormalize").backward()
    assert s.grad.abs().sum() > 0
    y = torch.randint(0, V, (s.shape[0],))
    ref = -torch.log_softmax(s.detach().double(), -1)[torch.arange(len(y)), y].mean()
    assert losses.ce_loss(s.detach(), y).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("name", losses.KD_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_online_full_vocab_loss_equals_the_cached_loss_at_k_equal_v(name, temperature):
    t, s = random_logits(seed=21), random_logits(seed=22)
    want = losses.kd_loss(name, s.float(), *cache_view(t, V), temperature=temperature, beta=0.3, gamma=0.6)
    got = losses.kd_loss_full(name, s.float(), t.float(), temperature=temperature, beta=0.3, gamma=0.6)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)


def zipf_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    sharp = 0.8 + 0.8 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    z = -sharp * ranks.log() + 0.3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    return torch.stack([row[torch.randperm(vocab, generator=g)] for row in z]).float()


def test_temperature_with_the_tail_bucket_is_refused():
    """At T > 1 the tail the cache lumps together holds most of the tempered mass: even the exact tempered
    tail leaves the bucket KL far below the full-vocabulary KL, so the loss refuses rather than mislead."""
    t = zipf_logits(64, 8192, seed=31)  # LM-like: Zipf over a random order, per-position sharpness and noise
    s = (t + torch.randn(t.shape, generator=torch.Generator().manual_seed(32))).double()
    t = t.double()
    ids, lp, tail = cache_view(t, 8)
    with pytest.raises(DistilyError, match="--temperature other than 1 needs --tail renormalize"):
        losses.kd_loss("forward_kl", s.float(), ids, lp, tail, temperature=2.0)
    T = 2.0
    logp = torch.log_softmax(t, -1)
    rest = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    exact_rest = torch.logsumexp(torch.where(rest, logp / T, float("-inf")), -1)  # the best any estimate can do
    logp_b = torch.log_softmax(torch.cat([lp.double() / T, exact_rest[:, None]], -1), -1)
    bucket = T * T * losses.forward_kl(logp_b, losses.student_log_probs(s, ids, T, "bucket").double()).mean()
    full = losses.kd_loss_full("forward_kl", s.float(), t.float(), temperature=T)
    assert bucket.item() < 0.5 * full.item()


def test_unknown_loss_name():
    with pytest.raises(DistilyError, match="forward_kl"):
        losses.check_loss_name("kl_forward")


# ------------------------------------------------------------------------------------- hidden states


def test_hidden_losses_against_reference():
    a, b = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    assert hidden_loss(a, b, "mse").item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    assert hidden_loss(a, b, "cosine").item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    assert hidden_loss(a, a, "mse").item() == 0
    ln = (b - b.mean(-1, keepdim=True)) / torch.sqrt(b.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert hidden_loss(a, b, "mse", "teacher_layernorm").item() == pytest.approx(((a - ln) ** 2).mean().item(), rel=1e-4)


def test_orthogonal_projector_is_orthogonal():
    proj = make_projector("orthogonal", 8, 16)
    w = proj.weight  # [16, 8]: columns orthonormal
    torch.testing.assert_close(w.T @ w, torch.eye(8), atol=1e-5, rtol=0)
    assert isinstance(make_projector("auto", 8, 8), torch.nn.Identity)
    assert isinstance(make_projector("auto", 8, 16), torch.nn.Linear)
    with pytest.raises(DistilyError, match="equal widths"):
        make_projector("none", 8, 16)


# ------------------------------------------------------------------------------------- layer mappers


def test_layer_mappers_of_2310_08797():
    assert map_layers("last", 15, 30) == [(15, [30])]
    assert map_layers("uniform", 3, 30) == [(1, [10]), (2, [20]), (3, [30])]
    assert map_layers("last-k", 6, 12, k=2) == [(5, [11]), (6, [12])]
    assert map_layers("all", 3, 3) == [(1, [1]), (2, [2]), (3, [3])]
    assert map_layers("uniform-consecutive", 3, 7) == [(1, [1, 2, 3]), (2, [4, 5]), (3, [6, 7])]
    assert map_layers("uniform-consecutive", 15, 30)[-1] == (15, [29, 30])
    for s, t in ((12, 30), (4, 2), (7, 7), (5, 31)):  # every student layer mapped, every teacher layer used, in order
        pairs = map_layers("uniform-consecutive", s, t)
        assert [i for i, _ in pairs] == list(range(1, s + 1))
        flat = [l for _, ls in pairs for l in ls]
        assert sorted(set(flat)) == list(range(1, t + 1)) and flat == sorted(flat)
    assert map_layers("uniform+last", 2, 6) == [(1, [3, 6]), (2, [6])]
    with pytest.raises(DistilyError, match="equal depth"):
        map_layers("all", 2, 4)
    with pytest.raises(DistilyError, match="unknown"):
        map_layers("every-other", 2, 4)


def test_jsd_at_beta_0_and_1_is_the_forward_and_reverse_kl():
    torch.manual_seed(3)
    logp, logq = torch.randn(6, 9).log_softmax(-1), torch.randn(6, 9).log_softmax(-1)
    torch.testing.assert_close(losses.jsd(logp, logq, beta=0.0), losses.forward_kl(logp, logq))
    torch.testing.assert_close(losses.jsd(logp, logq, beta=1.0), losses.reverse_kl(logp, logq))
    assert losses.forward_kl(logp, logq).min() > 0
