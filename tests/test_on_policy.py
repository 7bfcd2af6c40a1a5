"""On-policy rounds: the writer's log-probs in `distily generate`, graded caches (`teacher-cache --graded`), training
on the written positions only, and `distily on-policy` end to end with kill -9 inside each stage."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_llama, build_tokenizer, capture_cfg, read_all

from pipeline.config import GenerateConfig, OnPolicyConfig, TrainConfig
from pipeline.errors import ConfigError, DistilyError
from stage_teacher import generate
from stage_teacher.capture import run as capture

SEQ = 40


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_teacher, text_file, vllm_engine) -> Path:
    """12 continuations of 6-token prompts, written by the tiny model (the session's engine)."""
    out = tmp_path_factory.mktemp("written")
    generate.run(GenerateConfig(output=str(out), teacher=str(tiny_teacher), prompts=str(text_file), generator="prefix",
                                num_sequences=12, max_seq_len=SEQ, prefix_tokens=6, sequences_per_shard=5), engine=vllm_engine)
    return out


def generated_rows(path: Path) -> list[dict]:
    rows = [r for f in sorted(path.glob("gen-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["seq_index"])


@pytest.fixture(scope="module")
def graded_cache(tmp_path_factory, written, tiny_teacher, vllm_engine) -> Path:
    out = tmp_path_factory.mktemp("graded")
    capture(capture_cfg(tiny_teacher, written, out, backend="vllm", max_seq_len=SEQ, max_tokens=None, graded=True),
            teacher=vllm_engine)
    return out


def test_generate_records_the_writers_log_prob_of_each_written_token(written, tiny_teacher):
    """The logprobs column equals an HF forward's log-softmax at every written token; NaN on the prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32).eval()
    rows = generated_rows(written)
    assert len(rows) == 12
    for r in rows:
        ids, lp, k = r["input_ids"], np.asarray(r["logprobs"], dtype=np.float64), r["prompt_tokens"]
        assert len(lp) == len(ids) and np.isnan(lp[:k]).all() and not np.isnan(lp[k:]).any()
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        want = ref[torch.arange(k - 1, len(ids) - 1), torch.tensor(ids[k:])].numpy()
        np.testing.assert_allclose(lp[k:], want, atol=2e-3)


def test_graded_cache_holds_one_sequence_per_row_and_masks_the_prompt(graded_cache, written, tiny_teacher, vllm_engine):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_teacher).eos_token_id
    rows, gen = read_all(graded_cache), generated_rows(written)
    assert len(rows) == len(gen)
    for r, g in zip(rows, gen):
        n, k = len(g["input_ids"]), g["prompt_tokens"]
        np.testing.assert_array_equal(r["input_ids"][:n], g["input_ids"])
        assert (r["input_ids"][n:] == eos).all()
        mask = np.zeros(SEQ - 1, dtype=np.uint8)
        mask[k - 1 : n - 1] = 1  # position t predicts token t + 1: graded where the writer wrote it
        np.testing.assert_array_equal(r["loss_mask"], mask)
        np.testing.assert_allclose(r["behaviour_logprob"][k - 1 : n - 1], np.asarray(g["logprobs"][k:]), atol=1e-6)
        assert (r["behaviour_logprob"][mask == 0] == 0).all()
    forced = vllm_engine(np.stack([r["input_ids"] for r in rows[:3]]), np.arange(3))["targets"]
    for i, r in enumerate(rows[:3]):  # the teacher's log-prob of each written token: a teacher-forced pass
        np.testing.assert_allclose(r["target_logprob"], forced["target_logprob"][i], atol=1e-5)


def test_graded_is_refused_where_it_cannot_hold(tmp_path, written, tiny_teacher, text_file):
    from stage_teacher.capture import prepare

    with pytest.raises(ConfigError, match="--graded needs a generated --dataset"):
        prepare(capture_cfg(tiny_teacher, text_file, tmp_path / "a", graded=True))
    with pytest.raises(ConfigError, match="more than --max-seq-len 16"):
        prepare(capture_cfg(tiny_teacher, written, tmp_path / "b", graded=True, max_seq_len=16, max_tokens=None))


def batch_of(cache: Path, rows: slice) -> dict:
    from pipeline.cache import CacheReader
    from stage_student.training.data import collate

    reader = CacheReader(cache)
    data = reader.read_shard(reader.shards[0], hidden=False)
    picked = [{k: v[i] for k, v in data.items()} | {"hidden_states": {}} for i in range(*rows.indices(len(data["seq_index"])))]
    return collate(picked)


def test_training_learns_only_at_written_positions(graded_cache, other_teacher):
    """Distiller's token_reverse_kl on a graded batch equals kd.token_reverse_kl over the masked positions of the
    student's logits; changing the targets at masked positions changes nothing, at a graded one it does."""
    from transformers import AutoModelForCausalLM

    from stage_student.losses import chunked
    from stage_student.losses.kd import token_reverse_kl
    from stage_student.students.build import StudentForward
    from stage_student.training.step import CachedTeacher, Distiller

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(other_teacher, torch_dtype=torch.float32)  # a student that is not the writer
    batch = batch_of(graded_cache, slice(0, 3))
    ids = batch["input_ids"]
    distiller = Distiller(StudentForward(hf, fuse=True), torch.nn.ModuleDict(), torch.nn.ModuleDict(), hs_pairs=[], chunk_size=16)
    spec = chunked.LossSpec(kd="token_reverse_kl")
    teacher = CachedTeacher("token", torch.device("cpu"))
    loss = distiller(ids, teacher(batch, ids), spec)["kd"].item()
    with torch.no_grad():
        logits = hf(ids).logits[:, :-1].reshape(-1, hf.config.vocab_size)
    keep = batch["loss_mask"].reshape(-1).bool()
    ref = token_reverse_kl(logits[keep], ids[:, 1:].reshape(-1)[keep], batch["target_logprob"].reshape(-1)[keep],
                           batch["behaviour_logprob"].reshape(-1)[keep]).item()
    assert loss == pytest.approx(ref, rel=1e-5)
    masked = np.argwhere(batch["loss_mask"].numpy() == 0)[0]
    graded = np.argwhere(batch["loss_mask"].numpy() == 1)[0]
    for pos, changes in ((masked, False), (graded, True)):
        moved = {**batch, "target_logprob": batch["target_logprob"].clone()}
        moved["target_logprob"][tuple(pos)] -= 3.0
        after = distiller(ids, teacher(moved, ids), spec)["kd"].item()
        assert (after != pytest.approx(loss, rel=1e-6)) == changes


def test_token_reverse_kl_needs_a_graded_cache(hf_cache, graded_cache, tiny_teacher):
    from stage_student.plan import plan_run

    with pytest.raises(DistilyError, match="needs a graded cache"):
        plan_run(TrainConfig(cache=str(hf_cache), loss="token_reverse_kl"))
    with pytest.raises(DistilyError, match="drop --online-teacher, --kd-targets and --kd-top-k"):
        plan_run(TrainConfig(cache=str(graded_cache), loss="token_reverse_kl", online_teacher=str(tiny_teacher)))


def test_on_policy_refuses_bad_input_before_any_engine(tmp_path, tiny_teacher, texts):
    from pipeline.on_policy import check, round_commands

    base = dict(output=str(tmp_path), student=str(tiny_teacher), teacher=str(tiny_teacher))
    with pytest.raises(ConfigError, match="--student is required"):
        check(OnPolicyConfig(output=str(tmp_path)))
    with pytest.raises(ConfigError, match="prompts must be shorter than --max-seq-len 32"):
        check(OnPolicyConfig(**base, prefix_tokens=32, max_seq_len=32))
    other = tmp_path / "other-tok"
    other.mkdir()
    build_llama(other, len(build_tokenizer(texts[:60], other, vocab_size=320)), layers=1)
    with pytest.raises(ConfigError, match="another tokenizer than the teacher"):
        check(OnPolicyConfig(**{**base, "student": str(other)}))
    cfg = OnPolicyConfig(**base, train_args=["--ce-weight 0.1"])
    assert check(cfg) == str(tiny_teacher)
    cmds = round_commands(cfg, 2, "prev/final")
    assert cmds["generate"][cmds["generate"].index("--teacher") + 1] == "prev/final"
    assert "--graded" in cmds["teacher-cache"] and cmds["train-student"][-3:] == ["--ce-weight", "0.1", "--resume"]


def run_until(cmd: list[str], env: dict, ready, timeout: float = 300) -> None:
    """Start `cmd` in its own process group and kill -9 the whole group once ready() holds (or it ends)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_on_policy_round_end_to_end_resumes_after_kill_9_in_each_stage(tmp_path, tiny_teacher, text_file):
    """One round with a 1-layer student; the orchestrator (and the stage under it) is killed while generating,
    while capturing and after the first checkpoint; each rerun goes on, and the round completes."""
    student = tmp_path / "student"
    student.mkdir()
    for f in tiny_teacher.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, student / f.name)
    from transformers import AutoTokenizer

    build_llama(student, len(AutoTokenizer.from_pretrained(tiny_teacher)), layers=1, seed=3)
    out = tmp_path / "op"
    cmd = [sys.executable, "-m", "pipeline.cli", "on-policy", "-o", str(out), "--student", str(student), "--teacher",
           str(tiny_teacher), "--prompts", str(text_file), "--rounds", "1", "--num-sequences", "12", "--max-seq-len",
           "40", "--prefix-tokens", "6", "--steps", "6", "--batch-size", "2", "--eval-sequences", "2"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    r1 = out / "round-1"
    run_until(cmd, env, lambda: (r1 / "generated").exists() and any((r1 / "generated").iterdir()))
    run_until(cmd, env, lambda: (r1 / "cache").exists() and any((r1 / "cache").glob("manifest*")))
    run_until(cmd, env, lambda: any((r1 / "student" / "checkpoints").glob("step-*[0-9]")) if (r1 / "student").exists() else False)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "rounds.json").read_text())
    (entry,) = record["rounds"]
    assert entry["student_out"] == str(r1 / "student" / "final") and (r1 / "student" / "final" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in (r1 / "student" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step logged once across the kills
    check = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(r1 / "cache")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)  # nothing left to do: no stage runs
    assert again.returncode == 0 and "on-policy round 1/1: distily" not in again.stdout


def test_mix_puts_documents_own_text_into_a_round(tmp_path, tiny_teacher, text_file, vllm_engine):
    """GKD's lambda: generate --corpus-fraction continues some prompts with the document's own tokens (no writer
    log-probs), the graded cache grades them alike, and the estimator that needs the student's samples is refused."""
    from pipeline.on_policy import check, round_commands
    from stage_student.plan import plan_run

    gen = tmp_path / "gen"
    generate.run(GenerateConfig(output=str(gen), teacher=str(tiny_teacher), prompts=str(text_file), generator="prefix",
                                num_sequences=12, max_seq_len=SEQ, prefix_tokens=6, corpus_fraction=0.5), engine=vllm_engine)
    rows = generated_rows(gen)
    _, ctx, _ = generate.prepare(GenerateConfig(output=str(gen), teacher=str(tiny_teacher), prompts=str(text_file),
                                                generator="prefix", num_sequences=12, max_seq_len=SEQ, prefix_tokens=6,
                                                corpus_fraction=0.5))
    corpus = [r for r in rows if r["generator"] == "corpus"]
    assert 0 < len(corpus) < 12 and all(r["finish"] == "corpus" and np.isnan(r["logprobs"]).all() for r in corpus)
    for r in corpus:  # prompt + the same document's next tokens
        assert any(r["input_ids"] == d[: len(r["input_ids"])] for d in ctx.documents)
    cache = tmp_path / "cache"
    capture(capture_cfg(tiny_teacher, gen, cache, backend="vllm", max_seq_len=SEQ, max_tokens=None, graded=True),
            teacher=vllm_engine)
    for r, g in zip(read_all(cache), rows):
        assert r["loss_mask"].sum() == len(g["input_ids"]) - g["prompt_tokens"]
    with pytest.raises(DistilyError, match="also holds documents' own text"):
        plan_run(TrainConfig(cache=str(cache), loss="token_reverse_kl"))
    base = dict(output=str(tmp_path / "op"), student=str(tiny_teacher), teacher=str(tiny_teacher))
    with pytest.raises(ConfigError, match="--mix 0.75 puts the documents' own text"):
        check(OnPolicyConfig(**base, mix=0.75))
    cmds = round_commands(OnPolicyConfig(**base, mix=0.75, loss="forward_kl"), 1, "s")
    assert cmds["generate"][-2:] == ["--corpus-fraction", "0.25"]
