"""The fused, chunked LM head + loss (chunked.py) against the full-logits reference losses (losses.py)."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_train_student import cfg_for, log

from pipeline.errors import DistilyError
from stage_student.losses import kd as losses
from stage_student.losses.chunked import LossSpec, Targets, head_losses
from stage_student.train import train

N, H, V = 37, 16, 50


def reference(h, w, b, spec: LossSpec, t: Targets) -> dict:
    logits = torch.nn.functional.linear(h, w, b) if w is not None else h
    parts = {}
    if spec.kd and t.teacher_logits is not None:
        parts["kd"] = losses.kd_loss_full(spec.kd, logits, t.teacher_logits, spec.temperature, spec.beta, spec.gamma)
    elif spec.kd:
        parts["kd"] = losses.kd_loss(spec.kd, logits, t.topk_ids, t.topk_logprobs, t.tail_mass, spec.temperature,
                                     spec.tail, spec.beta, spec.gamma)
    if spec.ce_weight > 0:
        parts["ce"] = losses.ce_loss(logits, t.labels)
    parts["loss"] = spec.kd_weight * parts.get("kd", 0.0) + spec.ce_weight * parts.get("ce", 0.0)
    return parts


def inputs(k: int, online: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    teacher = 2 * torch.randn(N, V, generator=g)
    top = torch.log_softmax(teacher, -1).topk(k, -1)
    tail = (1 - top.values.exp().sum(-1)).clamp(0, 1)
    return h, w, b, Targets(labels=torch.randint(0, V, (N,), generator=g), topk_ids=top.indices, topk_logprobs=top.values,
                            tail_mass=tail, teacher_logits=teacher if online else None)


CASES = [
    (name, k, temperature, tail, ce, online)
    for name, k, temperature, tail, ce, online in itertools.product(
        (*losses.KD_LOSSES, None), (8, V), (1.0, 2.0), losses.TAILS, (0.0, 0.3), (False, True))
    if (name or ce) and not (temperature != 1 and tail == "bucket" and k < V and not online)
]


@pytest.mark.parametrize("name,k,temperature,tail,ce,online", CASES)
def test_chunked_equals_reference_values_and_gradients(name, k, temperature, tail, ce, online):
    h, w, b, t = inputs(k, online)
    spec = LossSpec(kd=name, kd_weight=0.7, ce_weight=ce if name else 1.0, temperature=temperature, tail=tail, beta=0.3, gamma=0.4)
    ref = reference(h, w, b, spec, t)
    ref_grads = torch.autograd.grad(ref["loss"], [h, w, b])
    assert ref["loss"].item() > 0
    for chunk in (5, 16, N):
        out = head_losses(h, w, b, spec, t, chunk)
        for key in ref:
            assert out[key].item() == pytest.approx(ref[key].item(), abs=1e-5, rel=1e-5), (key, chunk)
        for got, want in zip(torch.autograd.grad(out["loss"], [h, w, b]), ref_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_logits_input_and_no_grad_and_gradient_scaling():
    h, w, b, t = inputs(8, False, seed=1)
    spec = LossSpec(kd="jsd", ce_weight=0.5)
    logits = torch.nn.functional.linear(h, w, b).detach().requires_grad_()
    ref = reference(logits, None, None, spec, t)
    out = head_losses(logits, None, None, spec, t, 7)  # a head that is not fused: chunks over given logits
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-6)
    torch.testing.assert_close(torch.autograd.grad(3 * out["loss"], logits)[0],
                               torch.autograd.grad(3 * ref["loss"], logits)[0], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        quiet = head_losses(h, w, b, spec, t, 7)
    assert not quiet["loss"].requires_grad and quiet["loss"].item() == pytest.approx(ref["loss"].item(), abs=1e-5)


def test_training_with_chunked_loss_equals_the_reference(tmp_path, hf_cache):
    """Same steps, same losses and weights with the fused chunked head (small chunks) and the full logits."""
    kw = dict(ce_weight=0.3, loss="reverse_kl", optimizer="adamw", max_steps=4, eval_sequences=4)
    train(cfg_for(hf_cache, tmp_path / "ref", loss_chunk_size=0, **kw))
    train(cfg_for(hf_cache, tmp_path / "chunked", loss_chunk_size=37, **kw))
    ref, got = log(tmp_path / "ref"), log(tmp_path / "chunked")
    for a, b in zip(ref, got):
        for key in ("loss", "loss/kd", "loss/ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    result = {p: json.loads((tmp_path / p / "result.json").read_text()) for p in ("ref", "chunked")}
    for key in ("eval/ce", "eval/forward_kl"):
        assert result["chunked"][key] == pytest.approx(result["ref"][key], rel=1e-4)


def test_compiled_student_gives_the_eager_losses(tmp_path, hf_cache):
    kw = dict(loss="forward_kl", optimizer="adamw", max_steps=2, eval_sequences=4)
    train(cfg_for(hf_cache, tmp_path / "eager", **kw))
    train(cfg_for(hf_cache, tmp_path / "compiled", compile=True, **kw))
    for a, b in zip(log(tmp_path / "eager"), log(tmp_path / "compiled")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_negative_chunk_size_is_refused(tmp_path, hf_cache):
    with pytest.raises(DistilyError, match="--loss-chunk-size"):
        train(cfg_for(hf_cache, tmp_path, loss_chunk_size=-1))
