"""Q/K/V in the cache (vLLM and HF against an independent forward) and the attention losses of 2310.08797."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import capture_cfg, read_all

from pipeline.cache import CacheReader
from pipeline.errors import DistilyError
from stage_student.losses import attention
from stage_student.training.evaluate import evaluate
from stage_teacher.capture import run

QKV_LAYERS = [2, 4]


# ----------------------------------------------------------------------------------------- the losses


def reference_relations(x: np.ndarray, heads: int) -> np.ndarray:
    """float64, loop over rows: R[b, a, i, j] = softmax_j<=i(x_a[i] . x_a[j] / sqrt(d_r)), 0 for j > i."""
    b, t, w = x.shape
    d = w // heads
    out = np.zeros((b, heads, t, t))
    for bi in range(b):
        for a in range(heads):
            xa = x[bi, :, a * d : (a + 1) * d].astype(np.float64)
            for i in range(t):
                s = np.array([xa[i] @ xa[j] / math.sqrt(d) for j in range(i + 1)])
                e = np.exp(s - s.max())
                out[bi, a, i, : i + 1] = e / e.sum()
    return out


def reference_kl(s: np.ndarray, t: np.ndarray, heads: int) -> float:
    rs, rt = reference_relations(s, heads), reference_relations(t, heads)
    kl = np.where(rt > 0, rt * (np.log(np.where(rt > 0, rt, 1)) - np.log(np.where(rt > 0, rs, 1))), 0.0)
    return kl.sum(-1).mean()


def reference_mse(s: np.ndarray, t: np.ndarray, heads: int) -> float:
    rs, rt = reference_relations(s, heads), reference_relations(t, heads)
    n = s.shape[1]
    mask = np.tril(np.ones((n, n), dtype=bool))
    return ((rs - rt) ** 2)[..., mask].mean()


def random_qkv(seed: int, widths: dict, b: int = 2, t: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {x: torch.randn(b, t, widths[x], generator=g) * 2 for x in "qkv"}


@pytest.mark.parametrize("kind,reference", [("kl", reference_kl), ("mse", reference_mse)])
def test_relation_losses_equal_a_float64_reference(kind, reference):
    # the student has other widths (other head counts) than the teacher: relation heads make them comparable
    student, teacher = random_qkv(0, {"q": 12, "k": 8, "v": 8}), random_qkv(1, {"q": 24, "k": 16, "v": 16})
    weights = (0.5, 1.0, 2.0)
    got = attention.mha_relation_loss(student, teacher, heads=4, weights=weights, kind=kind).item()
    want = sum(w * reference(student[x].numpy(), teacher[x].numpy(), 4) for x, w in zip("qkv", weights))
    assert got == pytest.approx(want, rel=1e-5)
    assert got > 0
    same = attention.mha_relation_loss(teacher, {x: v.clone() for x, v in teacher.items()}, 4, weights, kind).item()
    assert abs(same) < 1e-6


def test_direct_mha_loss_is_mse_after_the_learned_map():
    s_w = {x: {"width": w, "heads": 1} for x, w in zip("qkv", (12, 8, 8))}
    t_w = {x: {"width": w, "heads": 1} for x, w in zip("qkv", (24, 8, 8))}
    maps = attention.AttnMaps([3], s_w, t_w)
    student, teacher = random_qkv(0, {"q": 12, "k": 8, "v": 8}), random_qkv(1, {"q": 24, "k": 8, "v": 8})
    got = attention.direct_mha_loss(student, teacher, maps(3), (1.0, 1.0, 0.5)).item()
    want = sum(w * ((maps(3)[x](student[x]).double() - teacher[x].double()) ** 2).mean().item()
               for x, w in zip("qkv", (1.0, 1.0, 0.5)))
    assert got == pytest.approx(want, rel=1e-6)
    assert torch.equal(maps(3)["k"].weight, torch.eye(8))  # equal widths start at the identity
    assert attention.direct_mha_loss(teacher, teacher, {x: torch.nn.Identity() for x in "qkv"}).item() == 0


def test_relation_heads_are_checked_and_chosen():
    s_w = {x: {"width": w, "heads": h} for x, w, h in zip("qkv", (576, 192, 192), (9, 3, 3))}
    assert attention.auto_relation_heads(s_w, s_w) == 8  # at most 9 heads, dividing 576 and 192
    with pytest.raises(DistilyError, match="must divide every Q/K/V width"):
        attention.check_relation_heads(9, s_w, s_w)


# ----------------------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def qkv_cache(tmp_path_factory, tiny_teacher, text_file):
    out = tmp_path_factory.mktemp("cache-qkv")
    run(capture_cfg(tiny_teacher, text_file, out, hidden_layers=[4], qkv_layers=QKV_LAYERS))
    return out


def test_qkv_cache_matches_an_independent_hf_forward(tiny_teacher, qkv_cache):
    """q_l = q_proj(input_layernorm(hidden state l-1)), before RoPE; likewise k and v (grouped-query widths)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    reader = CacheReader(qkv_cache)
    cap = reader.manifest["capture"]
    assert cap["qkv_layers"] == QKV_LAYERS
    assert [cap["qkv"][x]["width"] for x in "qkv"] == [128, 64, 64]  # 2 heads x 64, 1 key-value head x 64
    seqs = read_all(qkv_cache)[:3]
    ids = torch.tensor(np.stack([s["input_ids"] for s in seqs]).astype(np.int64))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        for l in QKV_LAYERS:
            block = model.model.layers[l - 1]
            x = block.input_layernorm(hidden[l - 1])
            for kind in "qkv":
                want = getattr(block.self_attn, f"{kind}_proj")(x).numpy()
                got = np.stack([s["qkv"][l][kind] for s in seqs])
                np.testing.assert_allclose(got, want, atol=1e-4)
    assert CacheReader(qkv_cache).verify() == []
    from typer.testing import CliRunner

    from pipeline.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(qkv_cache)]).output
    assert "qkv layers  [2, 4] as float32 (widths q 128, k 64, v 64; before RoPE)" in shown
    per_layer = float(shown.split("bytes/token/layer qkv")[1].split()[0])
    assert 0 < per_layer < 256 * 4  # q 128 + k 64 + v 64 float32 values per token, less zstd's saving


def test_vllm_qkv_equals_the_hf_backend(tmp_path, tiny_teacher, text_file, vllm_engine, qkv_cache):
    run(capture_cfg(tiny_teacher, text_file, tmp_path, backend="vllm", hidden_layers=[0, 2, 4], qkv_layers=QKV_LAYERS),
        teacher=vllm_engine)
    v, h = read_all(tmp_path), read_all(qkv_cache)
    assert len(v) == len(h) == 20
    for a, b in zip(v, h):
        for l in QKV_LAYERS:
            for kind in "qkv":
                np.testing.assert_allclose(a["qkv"][l][kind], b["qkv"][l][kind], atol=2e-4, err_msg=f"{kind}_{l}")
    vllm_engine.configure(vllm_engine.spec, "hooks", [])  # the shared engine back to no Q/K/V
    m = CacheReader(tmp_path).manifest
    assert m["capture"]["qkv_layers"] == QKV_LAYERS and all(s.get("qkv_share", 0) > 0 for s in m["shards"])


def test_qkv_layers_are_checked_before_the_engine(tmp_path, tiny_teacher, text_file):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--qkv-layers \[0, 5\] out of range.*1 \.\. 4"):
        run(capture_cfg(tiny_teacher, text_file, tmp_path, qkv_layers=[0, 5]))


# ----------------------------------------------------------------------------------------- training


def attn_cfg(cache, out, **kw):
    from test_train_student import cfg_for

    base = dict(init="random", kd_weight=0.0, attn_loss="mha_relation", attn_layer_mapper="uniform", max_steps=12,
                lr=1e-2, student_config={"hidden_size": 64, "head_dim": 32, "intermediate_size": 128,
                                         "num_attention_heads": 2, "num_key_value_heads": 2})
    base.update(kw)
    return cfg_for(cache, out, **base)


@pytest.mark.parametrize("loss,extra", [("mha_relation", {}), ("mha_relation", {"attn_relation_loss": "mse"}),
                                        ("direct_mha", {})])
def test_training_on_the_attention_loss_alone_lowers_it_on_held_out_sequences(tmp_path, qkv_cache, loss, extra):
    from stage_student.train import Trainer

    # a narrower student (Q 64 wide, K/V 64) than the teacher (Q 128, K/V 64): 2 relation heads divide both
    trainer = Trainer(attn_cfg(qkv_cache, tmp_path, attn_loss=loss, **extra))
    assert trainer.plan.attn_pairs == [(1, [2]), (2, [4])]
    before = evaluate(trainer)["eval/attn"]
    result = trainer.run()
    assert result["eval/attn"] < 0.8 * before, (before, result["eval/attn"])
    if loss == "direct_mha":
        assert (tmp_path / "final" / "attn_maps.pt").exists()


def test_attention_loss_with_kd_resumes_exactly(tmp_path, qkv_cache):
    from stage_student.train import train

    full = train(attn_cfg(qkv_cache, tmp_path / "a", kd_weight=1.0, max_steps=6, save_steps=3))
    train(attn_cfg(qkv_cache, tmp_path / "b", kd_weight=1.0, max_steps=6, save_steps=3, stop_after_steps=3))
    resumed = train(attn_cfg(qkv_cache, tmp_path / "b", kd_weight=1.0, max_steps=6, save_steps=3, resume=True))
    assert resumed["loss/attn"] == pytest.approx(full["loss/attn"], rel=1e-5)
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-5)


def test_attention_loss_needs_the_layers_cached(tmp_path, hf_cache, qkv_cache):
    from stage_student.train import Trainer

    with pytest.raises(DistilyError, match=r"needs the teacher's Q/K/V of layers \[4\].*--qkv-layers 4"):
        Trainer(attn_cfg(hf_cache, tmp_path, attn_layer_mapper="last"))
    with pytest.raises(DistilyError, match="--relation-heads 3 must divide"):
        Trainer(attn_cfg(qkv_cache, tmp_path, relation_heads=3))
    with pytest.raises(DistilyError, match="--attn-loss 'mha' is unknown"):
        Trainer(attn_cfg(qkv_cache, tmp_path, attn_loss="mha"))


def test_a_ternary_student_trains_with_every_loss_at_once(tmp_path, qkv_cache):
    """--student-quant bitnet with KD, CE, the hidden-state loss and the relation loss, AdamW8bit."""
    from stage_student.students.bitnet import BitLinear
    from stage_student.train import Trainer

    trainer = Trainer(attn_cfg(qkv_cache, tmp_path, kd_weight=1.0, ce_weight=0.5, hs_weight=1.0, layer_mapper="last",
                               student_quant="bitnet", max_steps=10, logging_steps=1, student_config={}, init="teacher-layers",
                               lr=2e-3))
    assert isinstance(trainer.model.model.layers[0].self_attn.q_proj, BitLinear)
    before = evaluate(trainer)
    result = trainer.run()
    assert result["eval/attn"] < before["eval/attn"]
    from test_train_student import log

    rows = log(tmp_path)
    assert {"loss/kd", "loss/ce", "loss/hs", "loss/attn"} <= set(rows[0])
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
