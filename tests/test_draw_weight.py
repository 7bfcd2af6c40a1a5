"""--draw-weight: the chance-drawn ids of a sampled-exact cache shrunk toward the student's own tail.

The reference is written here in float64 numpy from the definition (kd.shrunk_sampled_kd_loss's docstring): the
target P_a = P_E + a P_noisy + (1 - a) M q / Q(not E), the loss CE(P_a, Q) - H, its gradient sum(P_a) q - P_a.
"""
import numpy as np
import pytest
import torch

from stage_student.losses import chunked
from stage_student.losses.kd import sampled_kd_loss, shrunk_sampled_kd_loss


def batch(seed=0, n=9, vocab=50, m=6):
    """Random logits and sample targets: unique ids per position (padding -1 at the end), weights, noisy flags."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(vocab)[:m] for _ in range(n)])
    ids[:, -1] = -1  # one padded slot
    ids[0, 2:] = -1  # a position with two ids only
    weights = np.where(ids >= 0, rng.uniform(0.01, 0.3, ids.shape), 0.0)
    noisy = (rng.random(ids.shape) < 0.5) & (ids >= 0)
    noisy[1] = ids[1] >= 0  # a position whose ids are all noisy (E empty)
    noisy[2] = False  # and one with none
    logits = rng.normal(0, 2, (n, vocab))
    entropy = rng.uniform(1, 3, n)
    return logits, ids, weights, noisy, entropy


def numpy_reference(logits, ids, weights, noisy, entropy, a):
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    q = np.exp(logq)
    target = np.zeros_like(q)
    exact = np.zeros_like(q, bool)
    for i in range(ids.shape[0]):
        for j, x in enumerate(ids[i]):
            if x >= 0:
                target[i, x] += weights[i, j] * (a if noisy[i, j] else 1.0)
                exact[i, x] |= not noisy[i, j]
    mass = (weights * noisy).sum(-1)
    rest = np.where(exact, 0.0, q)
    target += (1 - a) * (mass / rest.sum(-1))[:, None] * rest
    loss = ((target * -logq).sum(-1) - entropy).mean()
    grad = (target.sum(-1, keepdims=True) * q - target) / ids.shape[0]
    return loss, grad, target


@pytest.mark.parametrize("a", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("chunk", [0, 4])
def test_fused_and_reference_equal_the_float64_definition(a, chunk):
    logits, ids, weights, noisy, entropy = batch()
    want, want_grad, target = numpy_reference(logits, ids, weights, noisy, entropy, a)
    np.testing.assert_allclose(target.sum(-1), weights.sum(-1), rtol=1e-12)  # the target keeps the estimate's mass
    z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    t = chunked.Targets(sample_ids=torch.tensor(ids), sample_weights=torch.tensor(weights, dtype=torch.float32),
                        sample_noisy=torch.tensor(noisy), teacher_entropy=torch.tensor(entropy, dtype=torch.float32))
    spec = chunked.LossSpec(kd="forward_kl", draw_weight=a)
    out = chunked.reference_losses(z, spec, t) if chunk == 0 else chunked.head_losses(z, None, None, spec, t, chunk)
    (grad,) = torch.autograd.grad(out["loss"], z)
    assert out["kd"].item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad.numpy(), want_grad, atol=2e-7)


def test_weight_one_is_the_unbiased_loss_and_no_mask_means_every_id_is_noisy():
    logits, ids, weights, noisy, entropy = batch(1)
    z, i, w, h = (torch.tensor(logits), torch.tensor(ids), torch.tensor(weights), torch.tensor(entropy))
    plain = sampled_kd_loss(z, i, w, h)
    assert shrunk_sampled_kd_loss(z, i, w, torch.tensor(noisy), h, 1.0).item() == pytest.approx(plain.item(), rel=1e-6)
    all_noisy = torch.tensor(ids >= 0)
    spec = chunked.LossSpec(kd="forward_kl", draw_weight=0.5)
    fused = chunked.head_losses(z.float(), None, None, spec, chunked.Targets(sample_ids=i, sample_weights=w.float(),
                                                                             teacher_entropy=h.float()), 4)
    want, _, _ = numpy_reference(logits, ids, weights, ids >= 0, entropy, 0.5)
    assert fused["kd"].item() == pytest.approx(want, rel=1e-5)
    assert shrunk_sampled_kd_loss(z, i, w, all_noisy, h, 0.5).item() == pytest.approx(want, rel=1e-5)


def test_a_student_with_the_teachers_tail_shape_gets_the_unbiased_mean_gradient():
    """What the shrinkage keeps: averaged over many systematic draws, the gradient at a < 1 equals a x the unbiased
    one plus (1 - a) x the gradient that only matches the tail's mass. So where the student's tail already has the
    teacher's shape and mass, both vanish in the mean, as online KD's does."""
    rng = np.random.default_rng(3)
    vocab, draws = 40, 8
    p = rng.dirichlet(np.full(vocab, 0.3))
    z = torch.tensor(np.log(p), dtype=torch.float64)[None]  # the student equals the teacher
    grads = []
    for _ in range(4000):
        u = (rng.random() + np.arange(draws)) / draws
        drawn, counts = np.unique(np.searchsorted(np.cumsum(p), u).clip(max=vocab - 1), return_counts=True)
        pi = np.minimum(1.0, draws * p[drawn])
        w = np.where(pi < 1, 1.0 / draws, p[drawn])
        zz = z.clone().requires_grad_(True)
        loss = shrunk_sampled_kd_loss(zz, torch.tensor(drawn)[None], torch.tensor(w)[None], torch.tensor(pi < 1)[None],
                                      torch.zeros(1, dtype=torch.float64), 0.5)
        grads.append(torch.autograd.grad(loss, zz)[0][0].numpy())
    grads = np.array(grads)
    assert np.abs(grads.mean(0)).max() < 4 * grads.std(0).max() / len(grads) ** 0.5 + 1e-12


def test_a_student_sure_of_the_exact_ids_gives_a_finite_loss_equal_to_the_definition():
    """The spread's proportions come from a log-sum-exp outside E, not 1 - q(E): a student with ~all its mass on E
    (here 1 - 1e-13) still gets the float64 value and gradient (1 - q(E) would be 0 in float32)."""
    logits, ids, weights, noisy, entropy = batch(2)
    for i in range(ids.shape[0]):
        logits[i, ids[i][(ids[i] >= 0) & ~noisy[i]]] += 40.0
    want, want_grad, _ = numpy_reference(logits, ids, weights, noisy, entropy, 0.3)
    z = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    t = chunked.Targets(sample_ids=torch.tensor(ids), sample_weights=torch.tensor(weights, dtype=torch.float32),
                        sample_noisy=torch.tensor(noisy), teacher_entropy=torch.tensor(entropy, dtype=torch.float32))
    for out in (chunked.head_losses(z, None, None, chunked.LossSpec(draw_weight=0.3), t, 4),
                chunked.reference_losses(z, chunked.LossSpec(draw_weight=0.3), t)):
        (grad,) = torch.autograd.grad(out["loss"], z)
        assert out["kd"].item() == pytest.approx(want, rel=1e-5)
        np.testing.assert_allclose(grad.numpy(), want_grad, atol=2e-7)
