"""Small versions of `make faults` (tests/bench/faults.py): real CLI jobs, SIGKILLed at random moments."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from conftest import ROOT, capture_cfg
from test_train_student import cfg_for, log

from pipeline.errors import DistilyError
from stage_student.train import train
from stage_student.training.checkpoint import complete_checkpoints
from stage_teacher.capture import run

sys.path.insert(0, str(ROOT / "tests" / "bench"))
import faults  # noqa: E402


def test_concurrent_capture_jobs_killed_and_restarted_merge_to_a_single_jobs_cache(tmp_path):
    teacher, text = faults.make_fixtures(tmp_path)
    cap = faults.capture_faults(teacher, text, tmp_path / "capture", jobs=4, kills=1, seed=1, tokens=32 * 24)
    # a job that finishes within the random delay after its first write escapes its kill: count, not assume
    assert cap["kills"] >= 2 and cap["rows"] == 24
    assert cap["rows_lost"] == cap["rows_duplicated"] == cap["rows_differing"] == cap["verify_problems"] == 0
    # every stored field was compared, the RS-KD draws (and their importance weights at t = 1.5) among them
    assert {"topk_logprobs", "target_logprob", "sample_ids", "sample_counts", "sample_weights", "teacher_entropy",
            "hidden_states", "qkv"} <= set(cap["fields_compared"])
    tr = faults.train_faults(tmp_path / "capture" / "shared", tmp_path / "train", kills=2, seed=1, steps=10)
    assert tr["kills"] >= 1 and tr["steps_logged"] == 10 and tr["steps_repeated"] == tr["steps_missing"] == 0
    assert tr["max_loss_difference"] <= 1e-6 and tr["max_weight_difference"] <= 1e-6 and tr["data_log_equal"]
    assert tr["tensorboard_steps"] == 10 and tr["tensorboard_repeated"] == 0
    assert faults.failures({"capture": cap, "train": tr}) == []


def test_fault_run_fails_loudly_and_watches_each_jobs_own_files(tmp_path):
    """`make faults` exits non-zero on any lost, duplicated or differing row or repeated step; each kill waits
    for progress in the killed job's own files, never another job's."""
    cap = {"rows": 24, "rows_lost": 0, "rows_duplicated": 0, "rows_differing": 0, "verify_problems": 0, "stray_temps": 0}
    tr = {"steps_repeated": 0, "tensorboard_repeated": 0, "steps_missing": 0, "max_loss_difference": 0.0,
          "max_weight_difference": 0.0, "data_log_equal": True}
    assert faults.failures({"capture": cap, "train": tr}) == []
    for part, key, bad in [("capture", "rows_lost", 1), ("capture", "rows_duplicated", 2), ("capture", "rows_differing", 1),
                           ("train", "steps_repeated", 1), ("train", "max_weight_difference", 1e-3)]:
        broken = {"capture": dict(cap), "train": dict(tr)}
        broken[part][key] = bad
        assert len(faults.failures(broken)) == 1, (part, key)
    names = ["shard-00001.parquet", "shard-00005.hidden.safetensors.zst", ".shard-00009.parquet.x1.tmp",
             "manifest.part-00001-of-00004.json", "manifest.part-00001-of-00004.journal.jsonl",
             ".manifest.part-00001-of-00004.json.x2.tmp",  # job 1's
             "shard-00002.parquet", "shard-00004.parquet", "manifest.part-00003-of-00004.journal.jsonl",
             "tokenizer", "teacher_config.json", "teacher-weights.json"]  # other jobs' and shared
    for name in names:
        (tmp_path / name).write_text("x")
    assert sorted(f.name for f in faults.own_files(tmp_path, 1, 4)) == sorted(names[:6])
    a = {"input_ids": np.arange(3), "hidden_states": {1: np.zeros((3, 2))}, "qkv": {1: {"q": np.ones((3, 2))}}}
    b = {**a, "qkv": {1: {"q": np.ones((3, 2)) * 1.0001}}}
    assert not faults.rows_differ(a, dict(a)) and faults.rows_differ(a, b)


def test_a_job_removes_only_its_own_stale_temporaries(tmp_path, tiny_teacher, text_file):
    cfg = capture_cfg(tiny_teacher, text_file, tmp_path, num_shards=2, shard_index=0)
    mine, theirs = tmp_path / ".shard-00002.parquet.abc.tmp", tmp_path / ".shard-00001.parquet.abc.tmp"
    tmp_path.mkdir(exist_ok=True)
    mine.write_bytes(b"half")
    theirs.write_bytes(b"in flight")  # job 1 owns odd shards and is still writing
    run(cfg)
    assert not mine.exists() and theirs.read_bytes() == b"in flight"
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists() and not list(tmp_path.glob(".tokenizer.*"))


def test_a_run_killed_before_its_first_checkpoint_restarts_with_one_event_per_step(tmp_path, hf_cache):
    """kill -9 after step 1 was logged but before any checkpoint: --resume starts afresh, and TensorBoard (as its
    reader shows it) holds each step once, like log.jsonl (no purge step covers a run that resumes nothing)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as tb:  # what the killed run left: its step-1 record, no checkpoint
        tb.add_scalar("loss", 9.0, 1)
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    train(cfg_for(hf_cache, tmp_path, max_steps=3, resume=True))
    assert faults.tensorboard_steps(tmp_path / "tb", "loss") == [1, 2, 3] and [r["step"] for r in log(tmp_path)] == [1, 2, 3]
    assert 9.0 not in [r["loss"] for r in log(tmp_path)]


def test_partial_checkpoints_are_never_loaded(tmp_path, hf_cache):
    train(cfg_for(hf_cache, tmp_path, max_steps=3, save_steps=2, stop_after_steps=2))
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-000003.tmp").mkdir()
    (ckpt / "step-000003.tmp" / "state.pt").write_bytes(b"cut short")
    (ckpt / "step-000004").mkdir()  # a checkpoint without its trainer_state.json: its write never finished
    (ckpt / "step-000004" / "state.pt").write_bytes(b"cut short")
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step-000002"]
    result = train(cfg_for(hf_cache, tmp_path, max_steps=3, save_steps=2, resume=True))
    assert result["finished"] and [r["step"] for r in log(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("change, field", [
    ({"seed": 1}, "seed=0"), ({"shuffle_buffer": 4}, "shuffle_buffer=8"), ({"eval_sequences": 6}, "eval_sequences=4"),
    ({"loss": "jsd"}, "loss='forward_kl'"), ({"temperature": 2.0, "tail": "renormalize"}, "temperature=1.0"),
    ({"ce_weight": 0.5}, "ce_weight=0.0"),
])
def test_resume_refuses_a_different_setup_naming_the_field(tmp_path, hf_cache, change, field):
    train(cfg_for(hf_cache, tmp_path, max_steps=4, save_steps=2, stop_after_steps=2))
    with pytest.raises(DistilyError, match=f"cannot resume .*{field.replace('(', '[(]')}"):
        train(cfg_for(hf_cache, tmp_path, max_steps=4, save_steps=2, resume=True, **change))


def test_resume_refuses_another_cache(tmp_path, hf_cache):
    other = tmp_path / "other-cache"
    shutil.copytree(hf_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:-1]  # a different (smaller) cache
    (other / "manifest.json").write_text(json.dumps(manifest))
    train(cfg_for(hf_cache, tmp_path / "run", max_steps=4, save_steps=2, stop_after_steps=2))
    with pytest.raises(DistilyError, match=r"cannot resume .*the cache \(--cache\)"):
        train(cfg_for(other, tmp_path / "run", max_steps=4, save_steps=2, resume=True))


def test_resume_inside_a_logging_window_logs_the_same_means(tmp_path, hf_cache):
    kw = dict(ce_weight=0.3, max_steps=6, logging_steps=3, save_steps=100)
    train(cfg_for(hf_cache, tmp_path / "a", **kw))
    train(cfg_for(hf_cache, tmp_path / "b", stop_after_steps=4, **kw))  # checkpoint at step 4, inside the window 4..6
    train(cfg_for(hf_cache, tmp_path / "b", resume=True, **kw))
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 3, 6]
    by_step = {r["step"]: r for r in b}
    for ra in a:
        for key in ("loss", "loss/kd", "loss/ce"):
            assert by_step[ra["step"]][key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    assert by_step[6]["window_steps"] == 3


FULL_DISK_RUN = """
import resource, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk or quota
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from test_train_student import cfg_for
from pipeline.errors import DistilyError
from stage_student.train import train
try:
    train(cfg_for({cache!r}, {out!r}, max_steps=4, save_steps=2))
except DistilyError as e:
    print(e)
    sys.exit(3)
"""


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_advice_and_resume_finishes_it(tmp_path, hf_cache):
    import subprocess

    train(cfg_for(hf_cache, tmp_path / "probe", max_steps=2, save_steps=2))
    size = (tmp_path / "probe" / "checkpoints" / "step-000002" / "state.pt").stat().st_size
    out = tmp_path / "run"  # files may not grow past half a checkpoint: the logs fit, the checkpoint does not
    script = FULL_DISK_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), limit=size // 2, cache=str(hf_cache), out=str(out))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr[-3000:]
    assert f"could not write checkpoint step-000002 in {out} (" in r.stdout
    assert "GB free there (a full disk reads as torch.save's 'iostream error' or 'unexpected pos'). The run stopped; " \
           "no checkpoint was written before it. Free space or fix the dir, then run the same command with --resume." \
           in r.stdout
    assert not (out / "checkpoints" / "step-000002.tmp").exists()  # the partial write is gone, its space freed
    result = train(cfg_for(hf_cache, out, max_steps=4, save_steps=2, resume=True))
    assert result["finished"] and [r["step"] for r in log(out)] == [1, 2, 3, 4]


def test_only_failed_writes_become_the_full_disk_advice():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from stage_student.training.checkpoint import write_failed

    assert write_failed(OSError(28, "No space left on device"))
    assert write_failed(RuntimeError("basic_ios::clear: iostream error"))  # torch.save on a full disk
    assert write_failed(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1135936 vs 1135888"))
    try:
        raise OSError(28, "No space left on device")
    except OSError as e:
        rank_error = _wrap_exception(e)  # as dcp.save wraps each rank's failure
    assert write_failed(CheckpointException("save", {0: rank_error}))  # FSDP's dcp.save, a BaseException
    assert not write_failed(RuntimeError("CUDA out of memory"))
    assert not write_failed(KeyError("model.embed_tokens.weight"))
    assert not write_failed(KeyboardInterrupt())
