"""One writer per output (pipeline/run_lock.py): a second train-student into the same dir, or a second copy of the
same array job, is refused before any work while the first runs; a kill -9 of the first frees the dir at once, and
processes the holder forked (vLLM's and the data loader's workers) do not keep the lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, capture_cfg
from test_train_student import cfg_for

from pipeline.errors import DistilyError
from pipeline.run_lock import run_lock
from pipeline.schema import part_manifest_name
from stage_student.train import train
from stage_teacher.capture import run as capture

HOLDER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.run_lock import run_lock
with run_lock(Path({path!r}), "the holder"):
    if {fork}:
        child = os.fork()
        if child == 0:  # a forked worker that outlives its parent
            time.sleep(600)
            os._exit(0)
        print(child, flush=True)
    print("held", flush=True)
    time.sleep(600)
"""


def hold(path: Path, fork: bool = False) -> tuple[subprocess.Popen, int | None]:
    """A process holding the lock on `path` (and, with fork, a child it forked); returns (process, child pid)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), path=str(path), fork=fork)],
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline()) if fork else None
    assert proc.stdout.readline().strip() == "held"
    return proc, child


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_second_train_student_into_the_same_dir_is_refused_until_the_first_dies(tmp_path, hf_cache):
    out = tmp_path / "run"
    holder, _ = hold(out / ".train.lock")
    try:
        with pytest.raises(DistilyError, match=rf"train-student into {out} is already running \(pid {holder.pid} on "
                                               r".*since .*; lock file .*\.train\.lock\)\. Wait for it to end or stop it"):
            train(cfg_for(hf_cache, out))
        assert sorted(p.name for p in out.iterdir()) == [".train.lock"]  # refused before any work
    finally:
        kill(holder)
    result = train(cfg_for(hf_cache, out))  # kill -9 left no stale lock
    assert result["step"] == 6 and (out / "final" / "config.json").exists()


def test_a_second_copy_of_an_array_job_is_refused_and_the_other_jobs_run(tmp_path, tiny_teacher, text_file):
    out = tmp_path / "cache"
    holder, _ = hold(out / f".{part_manifest_name(0, 2)}.lock")
    try:
        with pytest.raises(DistilyError, match=rf"teacher-cache job 0 of 2 into {out} is already running \(pid {holder.pid}"):
            capture(capture_cfg(tiny_teacher, text_file, out, num_shards=2, shard_index=0))
        assert not list(out.glob("shard-*"))
        manifest = capture(capture_cfg(tiny_teacher, text_file, out, num_shards=2, shard_index=1))
        assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [1, 3]
    finally:
        kill(holder)
    manifest = capture(capture_cfg(tiny_teacher, text_file, out, num_shards=2, shard_index=0))
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 2, 4]


def test_a_forked_worker_does_not_keep_its_dead_parents_lock(tmp_path):
    lock = tmp_path / ".train.lock"
    holder, child = hold(lock, fork=True)
    try:
        with pytest.raises(DistilyError, match="already running"):
            with run_lock(lock, "the second"):
                pass
        kill(holder)
        os.kill(child, 0)  # the forked child still runs
        with run_lock(lock, "the second"):
            assert lock.read_text().startswith(f"pid {os.getpid()} on ")
    finally:
        kill(holder)
        os.kill(child, signal.SIGKILL)
