"""bf16 readiness on the CPU: every loss under bf16 autocast equals its float32 value and gradients within bf16
tolerances, and the MiniLMv2 relation loss computed in chunks of query rows equals the unchunked loss."""
from __future__ import annotations

import pytest
import torch

from stage_student.losses import attention
from stage_student.losses import kd as losses
from stage_student.losses.chunked import LossSpec, Targets, head_losses

N, H, V, K = 64, 32, 200, 16
BF16 = dict(rtol=2e-2, atol=2e-3)  # bf16 keeps 8 mantissa bits: ~0.4% per rounding, a few roundings deep


def fp32_and_bf16(fn, *leaves):
    """(value, grads) of fn(*leaves) in float32 and under CPU bf16 autocast."""
    out = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = fn(*leaves)
        out.append((value.float(), torch.autograd.grad(value, leaves)))
    return out


def assert_bf16_close(fp32, bf16, grad_rtol: float = BF16["rtol"]):
    (v32, g32), (v16, g16) = fp32, bf16
    assert v16.item() == pytest.approx(v32.item(), rel=BF16["rtol"], abs=BF16["atol"])
    for a, b in zip(g16, g32):
        assert a.dtype == b.dtype == torch.float32  # gradients of float32 leaves stay float32
        # within a few bf16 roundings in norm, and pointing the same way (elementwise checks would trip on
        # tvd's |p - q|, whose sign flips where bf16 rounds p and q past each other)
        assert (a - b).norm() <= grad_rtol * b.norm()
        assert torch.cosine_similarity(a.flatten(), b.flatten(), 0) > 1 - grad_rtol**2 / 2


def head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (0.3 * torch.randn(V, H, generator=g)).requires_grad_()
    teacher = 2 * torch.randn(N, V, generator=g)
    top = torch.log_softmax(teacher, -1).topk(K, -1)
    tail = (1 - top.values.exp().sum(-1)).clamp(0, 1)
    targets = Targets(labels=torch.randint(0, V, (N,), generator=g), topk_ids=top.indices, topk_logprobs=top.values,
                      tail_mass=tail)
    return h, w, teacher, targets


@pytest.mark.parametrize("name", losses.KD_LOSSES)
def test_kd_losses_in_bf16_autocast(name):
    h, w, teacher, t = head_inputs()
    grad_rtol = 0.1 if name == "tvd" else BF16["rtol"]  # |p - q| is not smooth: 2.5-7% measured here
    for temperature, tail in ((1.0, "bucket"), (2.0, "renormalize")):
        kd = lambda h, w: losses.kd_loss(name, h @ w.t(), t.topk_ids, t.topk_logprobs, t.tail_mass,  # noqa: E731
                                         temperature, tail, 0.3, 0.4)
        assert_bf16_close(*fp32_and_bf16(kd, h, w), grad_rtol)
        full = lambda h, w: losses.kd_loss_full(name, h @ w.t(), teacher, temperature, 0.3, 0.4)  # noqa: E731
        assert_bf16_close(*fp32_and_bf16(full, h, w), grad_rtol)


def test_ce_and_sampled_losses_in_bf16_autocast():
    h, w, teacher, t = head_inputs()
    assert_bf16_close(*fp32_and_bf16(lambda h, w: losses.ce_loss(h @ w.t(), t.labels), h, w))
    ids = torch.multinomial(torch.softmax(teacher, -1), 8, replacement=True)
    weights = torch.full(ids.shape, 1 / 8)
    entropy = -(torch.softmax(teacher, -1) * torch.log_softmax(teacher, -1)).sum(-1)
    sampled = lambda h, w: losses.sampled_kd_loss(h @ w.t(), ids, weights, entropy)  # noqa: E731
    assert_bf16_close(*fp32_and_bf16(sampled, h, w))


@pytest.mark.parametrize("name", [*losses.KD_LOSSES, None])
def test_fused_chunked_head_in_bf16_autocast(name):
    h, w, _, t = head_inputs()
    spec = LossSpec(kd=name, kd_weight=0.7, ce_weight=0.3 if name else 1.0)
    for chunk in (16, N):
        fused = lambda h, w: head_losses(h, w, None, spec, t, chunk)["loss"]  # noqa: E731
        assert_bf16_close(*fp32_and_bf16(fused, h, w), 0.1 if name == "tvd" else BF16["rtol"])


def qkv_inputs(t=48, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, t, width, generator=g)).requires_grad_() for _ in range(6)]


@pytest.mark.parametrize("kind", attention.RELATION_LOSSES)
def test_relation_losses_in_bf16_autocast(kind):
    leaves = qkv_inputs()

    def loss(*x):
        s, te = dict(zip(attention.KINDS, x[:3])), dict(zip(attention.KINDS, x[3:]))
        return attention.mha_relation_loss(s, te, heads=4, weights=(1.0, 0.5, 2.0), kind=kind, chunk_rows=16)

    assert_bf16_close(*fp32_and_bf16(loss, *leaves))


def test_direct_mha_in_bf16_autocast():
    widths = {x: {"width": 32} for x in attention.KINDS}
    maps = attention.AttnMaps([1], widths, widths).forward(1)
    with torch.no_grad():
        for m in maps.values():
            m.weight.add_(0.1 * torch.randn_like(m.weight))
    leaves = qkv_inputs()

    def loss(*x):
        return attention.direct_mha_loss(dict(zip(attention.KINDS, x[:3])), dict(zip(attention.KINDS, x[3:])), maps)

    assert_bf16_close(*fp32_and_bf16(loss, *leaves))


@pytest.mark.parametrize("kind", attention.RELATION_LOSSES)
@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 47])
def test_relation_loss_in_row_chunks_equals_the_whole(kind, chunk_rows):
    s, t = qkv_inputs(t=47, seed=1)[:2]
    fn = attention.RELATIONS[kind]
    whole = fn(s, t, 4, 0)
    g_whole = torch.autograd.grad(whole, [s, t])
    chunked = fn(s, t, 4, chunk_rows)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5) and whole.item() > 0
    for a, b in zip(torch.autograd.grad(chunked, [s, t]), g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_relation_loss_matches_a_float64_reference():
    """The unchunked loss of attention.py against a direct float64 transcription of MiniLMv2's formula."""
    s, t = (x.double() for x in qkv_inputs(t=20, seed=2)[:2])
    heads, d = 4, 8

    def rel(x):
        xh = x.reshape(2, 20, heads, d).transpose(1, 2)
        scores = xh @ xh.transpose(-1, -2) / d**0.5
        return torch.softmax(scores.masked_fill(torch.ones(20, 20).triu(1).bool(), float("-inf")), -1)

    rs, rt = rel(s), rel(t)
    mask = torch.ones(20, 20).tril().bool()
    kl = (rt * (rt.clamp_min(1e-300).log() - rs.clamp_min(1e-300).log())).masked_fill(~mask, 0).sum(-1).mean()
    mse = ((rs - rt) ** 2)[..., mask].mean()
    for chunk_rows in (0, 6):
        assert attention.relation_kl(s.float(), t.float(), heads, chunk_rows).item() == pytest.approx(kl.item(), rel=1e-5)
        assert attention.relation_mse(s.float(), t.float(), heads, chunk_rows).item() == pytest.approx(mse.item(), rel=1e-5)
