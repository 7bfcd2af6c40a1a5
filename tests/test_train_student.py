"""Stage two end to end on a tiny real cache: learning, 8-bit state, exact resume, torchrun, bad input."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, build_llama, build_tokenizer

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.errors import CacheError, ConfigError, DistilyError
from stage_student.train import Trainer, train
from stage_student.training.data import CacheStream, rank_batches, split_eval
from stage_student.training.evaluate import evaluate


def cfg_for(cache, out, **kw) -> TrainConfig:
    base = dict(cache=str(cache), output=str(out), student_layers=2, init="teacher-layers", batch_size=2,
                max_steps=6, save_steps=100, logging_steps=1, eval_sequences=4, lr=3e-3, warmup_steps=2,
                num_workers=1, shuffle_buffer=8)
    base.update(kw)
    return TrainConfig(**base)


def log(out) -> list[dict]:
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l]


def test_kd_training_lowers_the_loss_with_8bit_state(tmp_path, hf_cache):
    trainer = Trainer(cfg_for(hf_cache, tmp_path, max_steps=30, lr=1e-2, init="random", hs_weight=0.5,
                              layer_mapper="uniform", student_config={"hidden_size": 64, "head_dim": 32, "intermediate_size": 128}))
    before = evaluate(trainer)
    result = trainer.run()
    assert result["eval/forward_kl"] < 0.7 * before["eval/forward_kl"]
    rows = log(tmp_path)
    assert rows[-1]["loss/kd"] < rows[0]["loss/kd"] and rows[-1]["loss/hs"] < rows[0]["loss/hs"]
    assert {"lr", "grad_norm", "tokens_seen", "tokens_per_s", "step_time_s", "data_wait_s", "peak_memory_mb"} <= set(rows[0])
    assert rows[-1]["tokens_seen"] == 30 * 2 * 64
    # bitsandbytes AdamW8bit: uint8 moments, about 2 bytes per parameter for the large matrices
    big = [p for p in trainer.model.parameters() if p.numel() >= 4096]
    states = [trainer.optimizer.state[p] for p in big]
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)
    n_big = sum(p.numel() for p in big)
    moments = sum(s[k].numel() * s[k].element_size() for s in states for k in ("state1", "state2")) / n_big
    total = sum(v.numel() * v.element_size() for s in states for v in s.values() if torch.is_tensor(v)) / n_big
    assert moments == 2.0 and total < 2.5  # + per-block absmax and 2 x 256-entry quantisation maps per tensor
    # projectors (student 64 wide -> teacher 128) are trained and saved
    assert set(trainer.projectors.by_layer) == {"1", "2"}
    blob = torch.load(next((tmp_path / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)
    assert any(k.startswith("by_layer.") for k in blob["projectors"])
    # the final model is a plain HF dir with the tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert len(AutoTokenizer.from_pretrained(tmp_path / "final")) == CacheReader(hf_cache).manifest["tokenizer"]["vocab_size"]
    assert (tmp_path / "tb").is_dir() and json.loads((tmp_path / "run_config.json").read_text())["cache_manifest"]["stats"]


def test_resume_equals_uninterrupted_run(tmp_path, hf_cache):
    kw = dict(ce_weight=0.3, hs_weight=0.2, layer_mapper="last", loss="jsd", save_steps=2,
              embedding_noise=5.0, gradient_noise=0.5)  # NEFTune draws from the training RNG: a resume must
    # continue its stream; the gradient noise is drawn from (seed, step)
    train(cfg_for(hf_cache, tmp_path / "a", **kw))
    result = train(cfg_for(hf_cache, tmp_path / "b", stop_after_steps=3, **kw))
    assert not result["finished"] and result["step"] == 3
    with pytest.raises(DistilyError, match="--resume"):
        train(cfg_for(hf_cache, tmp_path / "b", **kw))
    train(cfg_for(hf_cache, tmp_path / "b", resume=True, **kw))
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss/kd", "loss/ce", "loss/hs", "lr"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    assert (tmp_path / "a" / "data-rank0.log").read_text() == (tmp_path / "b" / "data-rank0.log").read_text()
    wa = torch.load(tmp_path / "a/checkpoints/step-000006/state.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/step-000006/state.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    # a later --max-steps extends the run
    result = train(cfg_for(hf_cache, tmp_path / "b", resume=True, max_steps=8, **kw))
    assert result["step"] == 8 and result["finished"]
    # --resume of a finished run: nothing trains, nothing is rewritten, the stored result comes back
    written = [tmp_path / "b/result.json", *(tmp_path / "b/final").iterdir()]
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in written}
    logged = (tmp_path / "b/log.jsonl").read_text()
    assert train(cfg_for(hf_cache, tmp_path / "b", resume=True, max_steps=8, **kw)) == result
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in written} == kept
    assert (tmp_path / "b/log.jsonl").read_text() == logged
    with pytest.raises(DistilyError, match=r"finished run trained with lr=0.003 \(now 0.001\)"):  # not that run
        train(cfg_for(hf_cache, tmp_path / "b", resume=True, max_steps=8, **{**kw, "lr": 1e-3}))


def test_loader_order_is_deterministic_disjoint_and_streams_from_fsspec(hf_cache):
    shards = CacheReader(hf_cache).shards
    train_pairs, eval_pairs = split_eval(shards, 4)
    assert len(train_pairs) == 16 and len(set(train_pairs) & set(eval_pairs)) == 0
    r0 = rank_batches(train_pairs, 0, 0, 8, 0, 2, 2)
    r1 = rank_batches(train_pairs, 0, 0, 8, 1, 2, 2)
    seen0, seen1 = {p for b in r0 for p in b}, {p for b in r1 for p in b}
    assert not seen0 & seen1 and len(seen0) == len(seen1) == 8
    assert r0 == rank_batches(train_pairs, 0, 0, 8, 0, 2, 2) != rank_batches(train_pairs, 0, 1, 8, 0, 2, 2)
    stream = CacheStream(f"file://{hf_cache}", train_pairs, 2, 0, 8, start=3, hidden_layers=[4])
    batch = next(iter(stream))
    want = [seq for seq in CacheReader(hf_cache).iter_sequences()]
    order = rank_batches(train_pairs, 0, 0, 8, 0, 1, 2)[3]
    for i, (s, r) in enumerate(order):
        seq = want[sum(sh["rows"] for sh in shards[:s]) + r]
        np.testing.assert_array_equal(batch["input_ids"][i].numpy(), seq["input_ids"])
        np.testing.assert_array_equal(batch["hidden_states"][4][i].numpy(), seq["hidden_states"][4])


def test_torchrun_two_ranks_see_disjoint_data(tmp_path, hf_cache):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "pipeline.cli", "train-student", "--cache", str(hf_cache), "-o", str(out), "--student-layers", "2",
           "--batch-size", "2", "--max-steps", "3", "--logging-steps", "1", "--eval-sequences", "4", "--num-workers", "0",
           "--optimizer", "adamw8bit", "--hs-weight", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = []
    for rank in (0, 1):
        lines = (out / f"data-rank{rank}.log").read_text().splitlines()
        assert len(lines) == 3
        seen.append({int(x) for line in lines for x in line.split()[1:]})
    assert len(seen[0]) == 6 and len(seen[1]) == 6 and not seen[0] & seen[1]
    assert log(out)[-1]["tokens_seen"] == 3 * 2 * 2 * 64
    assert (out / "final" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"loss": "kl"}, "--loss 'kl' is unknown"),
        ({"layer_mapper": "every-other", "hs_weight": 1.0}, "--layer-mapper 'every-other' is unknown"),
        ({"optimizer": "sgd8bit"}, "--optimizer 'sgd8bit' is unknown"),
        ({"hs_weight": 1.0, "layer_mapper": "uniform-consecutive", "student_layers": 1}, r"needs teacher hidden layers \[1, 2, 3, 4\].*missing \[1, 3\]"),
        ({"init_layers": [0, 9]}, r"must be auto, evenly, or a list of 2 teacher layers in \[0, 4\)"),
        ({"init_layers": "auto", "select_sequences": 17}, "--select-sequences 17 cached training sequences, but the cache holds 16"),
        ({"student_config": {"hidden_size": 64}}, "narrower student needs --init random"),
        ({"student_config": {"hiddn_size": 64}}, "not in the teacher's llama config"),
    ],
)
def test_bad_training_input(tmp_path, hf_cache, kw, message):
    with pytest.raises(DistilyError, match=message):
        Trainer(cfg_for(hf_cache, tmp_path, **kw))


def test_student_or_online_teacher_with_another_tokenizer(tmp_path, hf_cache, texts):
    other = tmp_path / "other"
    tok = build_tokenizer(texts[:50], other, vocab_size=300)
    build_llama(other, len(tok), layers=2)
    with pytest.raises(DistilyError, match="--student .* is not the cache's"):
        Trainer(cfg_for(hf_cache, tmp_path / "out", student=str(other)))
    with pytest.raises(DistilyError, match="--online-teacher .* is not the cache's"):
        Trainer(cfg_for(hf_cache, tmp_path / "out", online_teacher=str(other)))


def test_empty_or_missing_cache(tmp_path, hf_cache):
    with pytest.raises(CacheError, match="no manifest.json"):
        Trainer(cfg_for(tmp_path / "nothing", tmp_path / "out"))
    empty = tmp_path / "empty"
    shutil.copytree(hf_cache, empty)
    m = json.loads((empty / "manifest.json").read_text())
    m["shards"] = []
    (empty / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DistilyError, match="empty or unfinished"):
        Trainer(cfg_for(empty, tmp_path / "out"))
    broken = tmp_path / "broken"
    shutil.copytree(hf_cache, broken)
    (broken / "shard-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(CacheError, match="shard-00001.parquet has 11 bytes"):
        Trainer(cfg_for(broken, tmp_path / "out"))  # before any model is built
    with pytest.raises(CacheError, match="shard-00001.parquet is corrupt"):
        CacheReader(broken).read_shard(CacheReader(broken).shards[1])
    shutil.copy(hf_cache / "shard-00001.parquet", broken / "shard-00001.parquet")
    (broken / "shard-00003.hidden.safetensors.zst").unlink()
    with pytest.raises(CacheError, match="shard-00003.hidden.safetensors.zst is missing"):
        CacheReader(broken).check_files()


def test_logged_values_are_window_means_and_eval_is_timed_apart(tmp_path, hf_cache):
    kw = dict(ce_weight=0.3, max_steps=6, eval_steps=3)
    train(cfg_for(hf_cache, tmp_path / "every", **kw))
    train(cfg_for(hf_cache, tmp_path / "window", **{**kw, "logging_steps": 3}))
    every = {r["step"]: r for r in log(tmp_path / "every")}
    window = {r["step"]: r for r in log(tmp_path / "window")}
    assert sorted(window) == [1, 3, 6] and window[3]["window_steps"] == 2 and window[6]["window_steps"] == 3
    for key in ("loss", "loss/kd", "loss/ce"):
        assert window[6][key] == pytest.approx(sum(every[s][key] for s in (4, 5, 6)) / 3, rel=1e-6)
        assert window[3][key] == pytest.approx((every[2][key] + every[3][key]) / 2, rel=1e-6)
    assert window[3]["eval_time_s"] > 0 and "eval/forward_kl" in window[3] and "eval_time_s" not in window[1]
    assert all(r["memory_mb"] > 0 and r["peak_memory_mb"] >= r["memory_mb"] * 0.5 for r in window.values())


def test_window_peak_memory_restarts():
    from stage_student.training.metrics import memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    block = torch.ones(200 * 2**20 // 4)  # 200 MB touched
    _, peak_with = memory_mb(cpu)
    del block
    reset_peak_memory(cpu)
    current, peak_after = memory_mb(cpu)
    assert peak_with - peak_after > 150 and peak_after < current + 50


def test_bitsandbytes_import_is_quiet_on_cpu():
    """The 8-bit optimizers come without bitsandbytes' warning about a 4-bit kernel distily never uses."""
    code = ("import torch; from stage_student.training.optim import make_optimizer; "
            "make_optimizer('adamw8bit', [torch.nn.Parameter(torch.zeros(4096))], 1e-3, 0.0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "gemm_4bit_forward" not in r.stderr + r.stdout



def test_loading_a_model_is_quiet_with_torchao_installed(tmp_path):
    """transformers imports torchao on every model load; its CPU kernel-load lines and torch's enum deprecation
    warnings are not shown (they said nothing about the run)."""
    build_llama(tmp_path / "m", 64, layers=1)
    code = ("import pipeline, transformers; "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    import importlib.util
    assert importlib.util.find_spec("torchao") is not None  # the test means something only where torchao is installed
    out = r.stderr + r.stdout
    assert "Failed to load" not in out and "register_constant" not in out, out

def test_embedding_noise_is_neftune_in_training_only(tmp_path, hf_cache):
    """--embedding-noise alpha: the student's input embeddings get uniform noise within +-alpha/sqrt(T x H) in
    train mode (NEFTune), none in eval mode; the trained run differs from the noiseless one."""
    trainer = Trainer(cfg_for(hf_cache, tmp_path / "n", embedding_noise=5.0, init="random"))
    emb = trainer.model.get_input_embeddings()
    ids = torch.randint(0, emb.num_embeddings, (2, 16))
    clean = torch.nn.functional.embedding(ids, emb.weight)
    emb.train()
    noisy = emb(ids)
    bound = 5.0 / (16 * emb.embedding_dim) ** 0.5
    assert 0.5 * bound < float((noisy - clean).detach().abs().max()) <= bound * (1 + 1e-6)
    emb.eval()
    assert torch.equal(emb(ids).detach(), clean.detach())
    train(cfg_for(hf_cache, tmp_path / "a", max_steps=3, init="random", lr=1e-2))
    train(cfg_for(hf_cache, tmp_path / "b", max_steps=3, init="random", lr=1e-2, embedding_noise=5.0))
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert a[0]["loss"] != b[0]["loss"] and all(math.isfinite(r["loss"]) for r in b)
    with pytest.raises(ConfigError, match="--embedding-noise -1"):
        Trainer(cfg_for(hf_cache, tmp_path / "bad", embedding_noise=-1.0))


def test_gradient_noise_has_the_stated_norm_decay_and_seed():
    """add_gradient_noise: zero-mean Gaussian noise whose norm is ratio x the given norm at step 0, decaying as
    (1 + step)^-0.275 (variance (1 + t)^-0.55), the same draw for the same (seed, step) whatever ran before."""
    from stage_student.training.step import add_gradient_noise

    def noise(step, seed=3, ratio=0.5):
        torch.manual_seed(step)  # the global RNG must not matter
        grads = [torch.zeros(300, 100), torch.zeros(5000, dtype=torch.float64)]
        add_gradient_noise(grads, ratio, torch.tensor(2.0), seed, step)
        return torch.cat([g.reshape(-1).double() for g in grads])

    n0, n99 = noise(0), noise(99)
    assert float(n0.norm()) == pytest.approx(0.5 * 2.0, rel=0.01)  # 35,000 elements: the norm's spread is 0.4%
    assert float(n99.norm()) == pytest.approx(1.0 * 100 ** -0.275, rel=0.01)
    assert abs(float(n0.mean())) < 4 * float(n0.std()) / len(n0) ** 0.5
    assert torch.equal(noise(0), n0) and not torch.equal(noise(0, seed=4), n0)
    assert not torch.allclose(n99 / n99.norm(), n0 / n0.norm())  # each step its own draw
    grads = [torch.ones(10)]
    add_gradient_noise(grads, 0.0, torch.tensor(1.0), 0, 0)
    assert torch.equal(grads[0], torch.ones(10))


def test_gradient_noise_changes_training_and_bad_values_are_refused(tmp_path, hf_cache):
    train(cfg_for(hf_cache, tmp_path / "a", max_steps=3, init="random", lr=1e-2, gradient_noise=0.0))
    train(cfg_for(hf_cache, tmp_path / "b", max_steps=3, init="random", lr=1e-2, gradient_noise=1.0))
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert a[0]["loss"] == b[0]["loss"]  # the first step's loss comes before any noise
    assert a[-1]["loss"] != b[-1]["loss"] and all(math.isfinite(r["loss"]) for r in b)
    assert json.loads((tmp_path / "b" / "run_config.json").read_text())["config"]["gradient_noise"] == 1.0
    with pytest.raises(ConfigError, match="--gradient-noise -1"):
        Trainer(cfg_for(hf_cache, tmp_path / "bad", gradient_noise=-1.0))
