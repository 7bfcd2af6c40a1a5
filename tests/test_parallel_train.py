"""DDP that provably agrees: under torchrun every rank holds the same parameters and optimizer state after
every step, with every kind of trainable part present; runs that leave the LM head unused work; the extra
trainable parts start from --seed whatever the student is."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, build_llama, capture_cfg

from pipeline.config import TrainConfig
from stage_student.train import DIGEST_ENV, Trainer


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, tiny_teacher, text_file):
    """Top-k targets, hidden states of layers 0, 2, 4 and Q/K/V of layers 2, 4."""
    from stage_teacher.capture import run

    out = tmp_path_factory.mktemp("cache-full")
    run(capture_cfg(tiny_teacher, text_file, out, qkv_layers=[2, 4]))
    return out


def torchrun(cache, out, port: int, *args: str) -> list[list[str]]:
    """Train on 2 ranks (gloo); return each rank's per-step state digests."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "pipeline.cli", "train-student", "--cache", str(cache), "-o", str(out), "--student-layers", "2",
           "--batch-size", "2", "--logging-steps", "1", "--eval-sequences", "4", "--num-workers", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), DIGEST_ENV: "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [(out / f"digest-rank{rank}.log").read_text().splitlines() for rank in (0, 1)]


def log(out) -> list[dict]:
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l]


def test_ranks_hold_identical_weights_and_optimizer_state_every_step(tmp_path, full_cache):
    """A narrower student (hidden-state projectors 64 -> 128), direct-MHA maps, BitNet latent weights, 8-bit
    AdamW, gradient accumulation, gradient noise: ranks train on disjoint data, yet agree bit for bit after each step."""
    out = tmp_path / "ddp"
    rank0, rank1 = torchrun(
        full_cache, out, 29531, "--max-steps", "4", "--grad-accum", "2", "--init", "random", "--lr", "1e-2",
        "--student-config", '{"hidden_size": 64, "head_dim": 32, "intermediate_size": 128}',
        "--hs-weight", "0.5", "--layer-mapper", "uniform", "--attn-loss", "direct_mha", "--attn-weight", "0.5",
        "--attn-layer-mapper", "last", "--student-quant", "bitnet", "--optimizer", "adamw8bit",
        "--gradient-noise", "0.5")
    assert [l.split()[0] for l in rank0] == ["1", "2", "3", "4"]
    assert rank0 == rank1  # parameters and optimizer state, every step
    assert len({l.split()[1] for l in rank0}) == 4  # and they do change: each step trained something
    first_epoch = [{int(x) for line in (out / f"data-rank{r}.log").read_text().splitlines()[:2] for x in line.split()[1:]}
                   for r in (0, 1)]  # 16 training sequences: 2 steps x 2 micro-batches x 2 sequences x 2 ranks
    assert len(first_epoch[0]) == len(first_epoch[1]) == 8 and not first_epoch[0] & first_epoch[1]
    rows = log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss/hs"] > 0 and r["loss/attn"] > 0 for r in rows)
    blob = torch.load(out / "checkpoints/step-000004/state.pt", weights_only=False)
    assert any(k.startswith("by_layer.") for k in blob["projectors"]) and blob["attn_maps"]
    q_map = blob["attn_maps"]["by_layer.2.q.weight"]
    assert q_map.shape == (128, 64)  # student Q width 64 -> teacher's 128: a learned map, not the identity


def test_kd_weight_0_leaves_the_lm_head_unused_and_runs_under_torchrun(tmp_path, full_cache):
    """Hidden-state loss alone: the untied LM head gets no gradient; DDP must not wait for it."""
    out = tmp_path / "hs-only"
    rank0, rank1 = torchrun(full_cache, out, 29532, "--max-steps", "3", "--kd-weight", "0", "--hs-weight", "1",
                            "--layer-mapper", "last", "--init", "random", "--optimizer", "adamw")
    assert len(rank0) == 3 and rank0 == rank1
    rows = log(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and "loss/kd" not in rows[0] and "loss/hs" in rows[0]
    # the head is exactly its seeded start (no gradient, no update); the layers the hidden loss reaches trained
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(cache=str(full_cache), output=str(tmp_path / "start"), student_layers=2, init="random",
                      kd_weight=0.0, hs_weight=1.0, layer_mapper="last", eval_sequences=4)
    start = {k: v.detach().clone() for k, v in Trainer(cfg).model.state_dict().items()}
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not final.config.tie_word_embeddings
    end = final.state_dict()
    torch.testing.assert_close(end["lm_head.weight"], start["lm_head.weight"], rtol=0, atol=0)
    assert not torch.equal(end["model.layers.1.mlp.down_proj.weight"], start["model.layers.1.mlp.down_proj.weight"])


def test_extra_trainable_parts_start_from_the_seed(tmp_path, hf_cache):
    """Projectors and direct-MHA maps are drawn from --seed, not from whatever the process's RNG holds
    (with --student DIR nothing else seeds it): equal for equal seeds, different for another seed."""
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader

    vocab = len(AutoTokenizer.from_pretrained(CacheReader(hf_cache).tokenizer_dir()))
    student = build_llama(tmp_path / "student", vocab, layers=2, hidden=64, seed=5)

    def projector(seed: int, noise: int) -> torch.Tensor:
        torch.manual_seed(noise)  # the process's RNG state before the trainer is built
        cfg = TrainConfig(cache=str(hf_cache), output=str(tmp_path / "out"), student=str(student), hs_weight=1.0,
                          layer_mapper="last", projector="linear", eval_sequences=4, seed=seed)
        return Trainer(cfg).projectors.by_layer["2"].weight.detach().clone()

    a, b, c = projector(0, noise=1), projector(0, noise=2), projector(1, noise=1)
    assert a.shape == (128, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_ddp_with_neftune_and_a_hidden_loss_resumes_after_kill_9_as_the_uninterrupted_run(tmp_path, full_cache):
    """Every rank's RNG is checkpointed and restored (NEFTune draws differ by rank), and rank 0's gradient-cosine
    measurement (a train-mode forward, so NEFTune draws) does not move its stream: a torchrun job SIGKILLed after
    its step-2 checkpoint and resumed trains steps 3-4 as the uninterrupted job did, on both ranks."""
    import signal
    import time

    args = ("--max-steps", "4", "--save-steps", "2", "--embedding-noise", "5", "--hs-weight", "0.5",
            "--layer-mapper", "uniform", "--lr", "1e-2", "--optimizer", "adamw")
    whole = torchrun(full_cache, tmp_path / "whole", 29541, *args)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29542",
           "-m", "pipeline.cli", "train-student", "--cache", str(full_cache), "-o", str(out), "--student-layers", "2",
           "--batch-size", "2", "--logging-steps", "1", "--eval-sequences", "4", "--num-workers", "0", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), DIGEST_ENV: "1"}
    job = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000002" / "trainer_state.json").exists():
        assert job.poll() is None and time.time() < deadline, "the job ended before its step-2 checkpoint"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both ranks, wherever they are
    job.wait()
    assert not (out / "result.json").exists()  # killed mid-run, not after the end
    resumed = torchrun(full_cache, out, 29543, *args, "--resume")
    assert [l.split()[0] for l in resumed[0]][-2:] == ["3", "4"]
    for rank in (0, 1):
        steps = {l.split()[0]: l for l in resumed[rank]}
        assert [steps["3"], steps["4"]] == whole[rank][2:4], f"rank {rank} diverged after the resume"
    assert any("grad/cos_hs" in r for r in log(tmp_path / "whole"))  # the measurement ran
