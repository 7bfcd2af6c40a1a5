"""Teacher targets of format 2: LM-head hooks in the vLLM pass, RS-KD sampled targets, narrow storage, v1 caches."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_HIDDEN_LAYERS, assert_mean_is_forward_kl, capture_cfg, read_all

from pipeline.cache import CacheReader
from pipeline.cache_write import merge_manifests
from pipeline.errors import CacheError, ConfigError, DistilyError
from stage_student.losses import chunked
from stage_student.losses import kd as losses
from stage_teacher.capture import run
from stage_teacher.targets import TargetSpec, chunk_targets, sequence_generator, unique_counts

FIXTURES = ROOT / "tests" / "fixtures"


# ------------------------------------------------------------------------------------ the estimator


def draws_for(z: torch.Tensor, spec: TargetSpec, repeats: int, seed: int = 0) -> dict:
    """`repeats` independent sampled targets for each row of z (rows repeated; one generator)."""
    rows = z.repeat_interleave(repeats, 0)
    return chunk_targets(rows, torch.zeros(len(rows), dtype=torch.long), spec, sequence_generator(seed, 0, "cpu"))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_sampled_estimate_is_unbiased(temperature):
    """Averaged over many caches, the RS-KD loss and its gradient equal the full-vocabulary forward KL's."""
    g = torch.Generator().manual_seed(0)
    vocab, positions, repeats = 40, 3, 20000
    teacher = torch.randn(positions, vocab, generator=g, dtype=torch.float64) * 2
    student = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    spec = TargetSpec(targets="sampled", samples=16, sample_temperature=temperature)
    t = draws_for(teacher, spec, repeats)
    counts = t["sample_counts"]
    assert (counts.sum(-1) == 16).all()  # counts sum to N at every position
    ids = t["sample_ids"]
    for row_ids, row_counts in zip(ids[:50], counts[:50]):  # unique ids, ascending, padding (-1, 0) at the end
        m = int((row_ids >= 0).sum())
        assert torch.equal(row_ids[:m], torch.unique(row_ids[:m])) and (row_counts[m:] == 0).all() and (row_ids[m:] == -1).all()
    p_full = torch.softmax(teacher, -1)
    entropy = -(p_full * torch.log_softmax(teacher, -1)).sum(-1)
    np.testing.assert_allclose(t["teacher_entropy"][::repeats], entropy.float(), rtol=1e-5)
    weights = counts / 16.0 * (t["sample_iw"] if temperature != 1.0 else 1.0)

    s = student.repeat_interleave(repeats, 0).requires_grad_(True)
    per_row = (weights * -torch.log_softmax(s, -1).gather(-1, ids.clamp_min(0))).sum(-1) - t["teacher_entropy"].double()
    per_row.sum().backward()
    estimate = per_row.detach().reshape(positions, repeats)
    grad = s.grad.reshape(positions, repeats, vocab)

    assert_mean_is_forward_kl(estimate, grad, teacher, student)
    # and the trainer's loss on these targets is this estimate
    flat = losses.sampled_kd_loss(student[:1].expand(repeats, -1), ids[:repeats], weights[:repeats], t["teacher_entropy"][:repeats])
    assert flat.item() == pytest.approx(estimate[0].mean().item(), rel=1e-4)


def test_unique_counts():
    draws = torch.tensor([[5, 1, 5, 5], [2, 2, 2, 2], [0, 3, 1, 2]])
    ids, counts = unique_counts(draws)
    assert ids.tolist() == [[1, 5, -1, -1], [2, -1, -1, -1], [0, 1, 2, 3]]
    assert counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("chunk", [7, 64])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_sampled_chunked_loss_equals_reference(chunk, ce_weight):
    """The fused head on sampled targets: values and gradients (hidden, weight, bias) equal losses.py."""
    g = torch.Generator().manual_seed(1)
    n, h, vocab = 50, 16, 30
    teacher = torch.randn(n, vocab, generator=g) * 2
    t = chunk_targets(teacher, torch.zeros(n, dtype=torch.long), TargetSpec(targets="sampled", samples=8),
                      sequence_generator(0, 0, "cpu"))
    targets = chunked.Targets(labels=torch.randint(0, vocab, (n,), generator=g), sample_ids=t["sample_ids"],
                              sample_weights=t["sample_counts"] / 8.0, teacher_entropy=t["teacher_entropy"])
    spec = chunked.LossSpec(kd="forward_kl", ce_weight=ce_weight, kd_weight=0.7)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(vocab, h, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True)
    out = chunked.head_losses(hidden, weight, bias, spec, targets, chunk)
    grads = torch.autograd.grad(out["loss"] * 1.5, (hidden, weight, bias))
    ref = chunked.reference_losses(torch.nn.functional.linear(hidden, weight, bias), spec, targets)
    ref_grads = torch.autograd.grad(ref["loss"] * 1.5, (hidden, weight, bias))
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    assert out["kd"].item() == pytest.approx(ref["kd"].item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------- captured caches


@pytest.fixture(scope="module")
def both_cache(tmp_path_factory, tiny_teacher, text_file) -> Path:
    out = tmp_path_factory.mktemp("cache-both")
    run(capture_cfg(tiny_teacher, text_file, out, targets="both", logprob_dtype="uint8", hidden_dtype="int8"))
    return out


def test_sampled_cache_fixed_seed_resume_and_array_jobs(tmp_path, tiny_teacher, text_file, both_cache):
    """Draws are seeded per sequence: a rerun, a resumed run and array jobs give the single run's cache."""
    rows = read_all(both_cache)
    assert all((r["sample_counts"].sum(-1) == 64).all() for r in rows)
    again = tmp_path / "again"
    run(capture_cfg(tiny_teacher, text_file, again, targets="both", logprob_dtype="uint8", hidden_dtype="int8"))
    shared = tmp_path / "jobs"
    for i in range(2):
        run(capture_cfg(tiny_teacher, text_file, shared, targets="both", logprob_dtype="uint8", hidden_dtype="int8",
                        num_shards=2, shard_index=i))
    merge_manifests(str(shared), [])
    for other in (read_all(again), read_all(shared)):
        for a, b in zip(rows, other):
            for key in ("sample_ids", "sample_counts", "teacher_entropy", "topk_ids", "topk_logprobs"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other_seed = tmp_path / "seed1"
    run(capture_cfg(tiny_teacher, text_file, other_seed, targets="sampled", seed=1, max_tokens=64 * 4))
    x, y = read_all(other_seed)[0], rows[0]
    assert x["sample_ids"].shape != y["sample_ids"].shape or not np.array_equal(x["sample_ids"], y["sample_ids"]) \
        or not np.array_equal(x["sample_counts"], y["sample_counts"])  # another seed, other draws


def test_sampled_targets_match_teacher_distribution(tiny_teacher, both_cache):
    """The stored entropy is the teacher's, and the counts follow p (the top token's share)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    rows = read_all(both_cache)[:4]
    ids = torch.tensor(np.stack([r["input_ids"] for r in rows]))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    np.testing.assert_allclose(np.stack([r["teacher_entropy"] for r in rows]), entropy.numpy(), rtol=1e-4)
    # the empirical frequency of the teacher's top token over all positions matches its probability
    top = logp.argmax(-1)
    freq = np.mean([r["sample_counts"][t][r["sample_ids"][t] == int(top[i, t])].sum() / 64
                    for i, r in enumerate(rows) for t in range(63)])
    assert freq == pytest.approx(logp.max(-1).values.exp().mean().item(), abs=0.02)


def test_uint8_logprobs_within_kl_target(hf_cache, both_cache):
    """8-bit log-probs: each within half a step of the exact float32 value; mean KL(stored || exact) <= 1e-4."""
    exact, stored = read_all(hf_cache), read_all(both_cache)
    kls = []
    for a, b in zip(exact, stored):
        np.testing.assert_array_equal(a["topk_ids"][:, :4], b["topk_ids"][:, :4])
        step = (a["topk_logprobs"].max(-1) - a["topk_logprobs"].min(-1)) / 255
        assert (np.abs(a["topk_logprobs"] - b["topk_logprobs"]) <= step[:, None] / 2 + 1e-5).all()
        np.testing.assert_allclose(a["tail_mass"], b["tail_mass"], atol=1e-6)
        p = np.concatenate([np.exp(a["topk_logprobs"].astype(np.float64)), a["tail_mass"][:, None]], -1)
        q = np.concatenate([np.exp(b["topk_logprobs"].astype(np.float64)), b["tail_mass"][:, None]], -1)
        q /= q.sum(-1, keepdims=True)
        kls.append((q * (np.log(np.maximum(q, 1e-30)) - np.log(np.maximum(p, 1e-30)))).sum(-1))
    assert np.mean(kls) <= 1e-4, np.mean(kls)
    ratio = (CacheReader(both_cache).manifest["shards"][0]["column_bytes"]["topk_logprobs"]
             / CacheReader(hf_cache).manifest["shards"][0]["column_bytes"]["topk_logprobs"])
    assert ratio < 0.5  # and it is what makes the cache small


def test_int8_hidden_states_cosine(hf_cache, both_cache):
    for a, b in zip(read_all(hf_cache), read_all(both_cache)):
        for l in TINY_HIDDEN_LAYERS:
            x, y = torch.from_numpy(a["hidden_states"][l]), torch.from_numpy(b["hidden_states"][l])
            assert torch.nn.functional.cosine_similarity(x, y, dim=-1).min() >= 0.999
            assert ((x - y).abs() <= x.abs().amax(-1, keepdim=True) / 127 / 2 * 1.001 + 1e-6).all()  # within a code
            top = x.abs().topk(4, dim=-1).indices  # the largest values are kept (to bfloat16)
            torch.testing.assert_close(y.gather(-1, top), x.gather(-1, top), rtol=4e-3, atol=0)


def test_vllm_hooks_sampled_equal_hf(tmp_path, tiny_teacher, text_file, vllm_engine, both_cache):
    """The hooks path draws the same samples as the HF reference (same logits to ~1e-6, same seeded generator)."""
    run(capture_cfg(tiny_teacher, text_file, tmp_path, backend="vllm", targets="both", logprob_dtype="uint8",
                    hidden_dtype="int8"), teacher=vllm_engine)
    assert CacheReader(tmp_path).manifest["capture"]["targets_from"] == "hooks"
    same = total = 0
    for a, b in zip(read_all(tmp_path), read_all(both_cache)):
        m = min(a["sample_ids"].shape[1], b["sample_ids"].shape[1])
        rows_equal = (a["sample_ids"][:, :m] == b["sample_ids"][:, :m]).all(-1) & (a["sample_counts"][:, :m] == b["sample_counts"][:, :m]).all(-1)
        same, total = same + rows_equal.sum(), total + len(rows_equal)
    assert same >= 0.98 * total, (same, total)


def test_engine_path_still_matches_hooks(tmp_path, tiny_teacher, text_file, vllm_engine):
    """--targets-from engine (vLLM's prompt log-probs) and hooks give the same top-k cache."""
    a, b = tmp_path / "engine", tmp_path / "hooks"
    run(capture_cfg(tiny_teacher, text_file, a, backend="vllm", targets_from="engine", max_tokens=64 * 4), teacher=vllm_engine)
    run(capture_cfg(tiny_teacher, text_file, b, backend="vllm", targets_from="hooks", max_tokens=64 * 4), teacher=vllm_engine)
    assert CacheReader(a).manifest["capture"]["targets_from"] == "engine"
    for x, y in zip(read_all(a), read_all(b)):
        np.testing.assert_allclose(x["topk_logprobs"], y["topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(x["target_logprob"], y["target_logprob"], atol=1e-4)
        assert (x["topk_ids"][:, 0] == y["topk_ids"][:, 0]).mean() > 0.99


def test_train_on_sampled_targets_lowers_heldout_kl(tmp_path, both_cache):
    from pipeline.config import TrainConfig
    from stage_student.train import train

    common = dict(cache=str(both_cache), student_layers=2, init="random", batch_size=2, eval_sequences=4,
                  logging_steps=5, save_steps=100, optimizer="adamw", lr=3e-3, kd_targets="sampled")
    before = train(TrainConfig(output=str(tmp_path / "a"), max_steps=1, lr=1e-9, **{k: v for k, v in common.items() if k != "lr"}))
    after = train(TrainConfig(output=str(tmp_path / "b"), max_steps=15, **common))
    assert after["eval/forward_kl"] < 0.8 * before["eval/forward_kl"]
    with pytest.raises(DistilyError, match="not defined on sampled"):
        train(TrainConfig(output=str(tmp_path / "c"), loss="reverse_kl", max_steps=1, **common))


def test_sampled_targets_refused_on_topk_cache(tmp_path, hf_cache):
    from pipeline.config import TrainConfig
    from stage_student.train import train

    with pytest.raises(DistilyError, match="holds topk targets only"):
        train(TrainConfig(cache=str(hf_cache), output=str(tmp_path), kd_targets="sampled", init="random", max_steps=1))


@pytest.mark.parametrize("kw, match", [
    ({"samples": 0}, "--samples 0"),
    ({"sample_temperature": 0.0}, "--sample-temperature"),
    ({"targets": "logits"}, "--targets 'logits' is unknown"),
    ({"logprob_dtype": "int4"}, "--logprob-dtype"),
    ({"targets_from": "magic"}, "--targets-from 'magic'"),
    ({"backend": "vllm", "targets": "sampled", "targets_from": "engine"}, "needs the full distribution"),
])
def test_bad_target_options(tmp_path, tiny_teacher, text_file, kw, match):
    from stage_teacher.capture import prepare

    with pytest.raises(ConfigError, match=match):
        prepare(capture_cfg(tiny_teacher, text_file, tmp_path, **kw))


# ------------------------------------------------------------------------------------------ versions


def test_reads_version_1_cache():
    """A cache written by format 1 (checked in) reads back exactly as it did, and trains."""
    expected = np.load(FIXTURES / "cache-v1-expected.npz")
    rows = read_all(FIXTURES / "cache-v1")
    assert CacheReader(FIXTURES / "cache-v1").manifest["format_version"] == 1
    for key in ("seq_index", "input_ids", "topk_ids", "topk_logprobs", "target_logprob", "tail_mass"):
        np.testing.assert_array_equal(np.stack([r[key] for r in rows]), expected[key], err_msg=key)
    for l in (0, 2):
        np.testing.assert_array_equal(np.stack([r["hidden_states"][l] for r in rows]), expected[f"hidden_{l}"])
    assert CacheReader(FIXTURES / "cache-v1").verify() == []


def test_train_from_version_1_cache(tmp_path):
    from pipeline.config import TrainConfig
    from stage_student.train import train

    cache = tmp_path / "v1"
    shutil.copytree(FIXTURES / "cache-v1", cache)
    out = train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"), init="random", student_layers=1, batch_size=2,
                            eval_sequences=2, max_steps=2, hs_weight=1.0, layer_mapper="last", optimizer="adamw"))
    assert np.isfinite(out["loss"])


def test_future_version_refused(tmp_path):
    cache = tmp_path / "v9"
    shutil.copytree(FIXTURES / "cache-v1", cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["format_version"] = 9
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="format version 9 is newer"):
        CacheReader(cache).manifest


def test_inspect_shows_bytes_per_part(both_cache):
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(both_cache)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "bytes/token targets" in l)
    for part in ("tokens", "top-k", "target", "sampled"):
        assert part in line
    assert "int8" in r.stdout and "unique ids/position" in r.stdout


def test_rskd_draws_after_a_crash_and_resume_equal_an_uninterrupted_capture(tmp_path, tiny_teacher, text_file, both_cache):
    """A capture that dies after two shards and is resumed stores the same RS-KD draws as one that never stopped
    (draws are seeded by sequence, not by the job's progress). `make faults` does the same with kill -9."""
    from test_teacher_cache import CrashAfter, Interrupt

    cfg = capture_cfg(tiny_teacher, text_file, tmp_path, targets="both", logprob_dtype="uint8", hidden_dtype="int8")
    with pytest.raises(Interrupt):
        run(cfg, teacher=CrashAfter(cfg, 2))
    assert 1 <= len(json.loads((tmp_path / "manifest.json").read_text())["shards"]) < 5
    run(cfg)
    resumed, whole = read_all(tmp_path), read_all(both_cache)
    assert len(resumed) == len(whole) == 20
    for a, b in zip(resumed, whole):
        for key in ("sample_ids", "sample_counts", "sample_weights", "teacher_entropy"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
