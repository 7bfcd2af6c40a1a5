"""The array-job runner (stage_teacher/runner.py) and the manifest journal, on synthetic shards: a real kill -9."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_same_rows, read_all

from pipeline.cache import CacheReader
from pipeline.errors import CacheError
from pipeline.manifest import atomic_write_bytes, fold_journal, journal_path, parse_journal, read_manifest
from stage_teacher import runner


def job_in(out, shards=8, num_jobs=1, index=0) -> runner.Job:
    return runner.Job(out=out, manifest_file=out / "manifest.json", num_dataset_shards=shards, num_jobs=num_jobs,
                      job_index=index, files=lambda j: [f"s-{j:03d}.bin"], stats=lambda s: {"shards": len(s)})


def write(out):
    def write_one(j: int, data: bytes) -> dict:
        atomic_write_bytes(out / f"s-{j:03d}.bin", data)
        return {"index": j, "file": f"s-{j:03d}.bin", "sha256": hashlib.sha256(data).hexdigest()}
    return write_one


KILLED_JOB = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
from test_runner import job_in, write
from stage_teacher import runner

out = Path({out!r})
job, manifest = job_in(out), {{"shards": [], "complete": False}}

def compute(j):
    if j == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while shard 4 is being written: no cleanup runs
    return bytes([j]) * 1000

runner.run_shards(job, manifest, runner.start(job, manifest), compute, write(out), lambda j: 1, "test", "shard")
"""


def test_a_killed_job_resumes_from_its_journal_losing_nothing(tmp_path):
    script = KILLED_JOB.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    # the manifest was written whole once, before the first shard; each finished shard is one journal line
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == []
    journal = journal_path(tmp_path / "manifest.json")
    assert journal.name == "manifest.journal.jsonl"
    assert [json.loads(l)["index"] for l in journal.read_text().splitlines()] == [0, 1, 2, 3]
    with open(journal, "a") as f:
        f.write('{"index": 4, "file": "s-00')  # an append cut short by the kill: ignored
    assert [s["index"] for s in read_manifest(tmp_path / "manifest.json")["shards"]] == [0, 1, 2, 3]
    job, manifest = job_in(tmp_path), {"shards": [], "complete": False}
    computed = []
    todo = runner.start(job, manifest)
    assert todo == [4, 5, 6, 7]  # shard 4's file may be whole, but it was never named: it is written again

    def compute(j):
        computed.append(j)
        return bytes([j]) * 1000

    runner.run_shards(job, manifest, todo, compute, write(tmp_path), lambda j: 1, "test", "shard")
    runner.finish(job, manifest)
    final = json.loads((tmp_path / "manifest.json").read_text())
    assert computed == [4, 5, 6, 7] and final["complete"] and final["stats"] == {"shards": 8}
    assert [s["index"] for s in final["shards"]] == list(range(8)) and not journal.exists()
    assert all((tmp_path / f"s-{j:03d}.bin").read_bytes() == bytes([j]) * 1000 for j in range(8))
    assert not list(tmp_path.glob(".*.tmp"))


def test_journal_folding_rules():
    # a kill between the manifest's write and the journal's removal: a shard in both counts once
    folded = fold_journal({"shards": [{"index": 0}, {"index": 2}]}, [{"index": 2}, {"index": 1}])
    assert [s["index"] for s in folded["shards"]] == [0, 1, 2]
    assert parse_journal('{"index": 0}\n{"index": 1}\n{"ind') == [{"index": 0}, {"index": 1}]
    with pytest.raises(CacheError, match="line 1 is not JSON"):
        parse_journal('{"ind\n{"index": 1}\n')  # only the last line can be cut short


def test_array_job_owns_every_nth_shard(tmp_path):
    assert job_in(tmp_path, shards=10, num_jobs=3, index=1).owned == [1, 4, 7]
    assert job_in(tmp_path, shards=2, num_jobs=3, index=2).owned == []


def test_readers_fold_a_running_jobs_journal(tmp_path, hf_cache):
    """CacheReader (and so `distily inspect`) of a cache whose job is still running, or was killed."""
    c = tmp_path / "c"
    shutil.copytree(hf_cache, c)
    whole = json.loads((c / "manifest.json").read_text())
    head = {**whole, "shards": whole["shards"][:2], "complete": False}
    (c / "manifest.json").write_text(json.dumps(head))
    (c / "manifest.journal.jsonl").write_text("".join(json.dumps(s) + "\n" for s in whole["shards"][2:]))
    m = CacheReader(c).manifest
    assert m["shards"] == whole["shards"] and m["stats"]["tokens"] == whole["stats"]["tokens"] == 20 * 64
    assert_same_rows(read_all(c), read_all(hf_cache))


SHARD_BYTES = 100_000


def test_a_job_stops_before_its_shards_left_would_fill_the_disk_and_resumes_once_they_fit(tmp_path, monkeypatch):
    # a disk with 350 kB free: after its first 100 kB shard, a job of 6 shards needs 500 kB more and stops
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 350_000, 350_000))
    job, manifest = job_in(tmp_path, shards=6), {"shards": [], "complete": False}
    computed = []

    def compute(j):
        computed.append(j)
        return bytes([j]) * SHARD_BYTES

    with pytest.raises(CacheError, match=r"has 0.00 GB free, and this job's 5 shards still to write need about 0.00 GB "
                                         r"\(0.10 MB a shard, the mean of its last 1 written\)\. The shards written are kept"):
        runner.run_shards(job, manifest, runner.start(job, manifest), compute, write(tmp_path), lambda j: 1, "t", "s")
    assert computed == [0, 1]  # shard 1 was computed while shard 0 was written; then the check stopped the job
    assert [s["index"] for s in read_manifest(tmp_path / "manifest.json")["shards"]] == [0]
    # rerun as it was: refused at start, before anything is computed (capture starts its engine only after this)
    with pytest.raises(CacheError, match="this job's 5 shards still to write need about"):
        runner.start(job_in(tmp_path, shards=6), {"shards": []})
    # array job 0 of 2 (shards 0, 2, 4) in the same dir: its 2 shards left fit in 350 kB, and it finishes
    job, manifest = job_in(tmp_path, shards=6, num_jobs=2), {"shards": [], "complete": False}
    todo, computed = runner.start(job, manifest), []
    assert todo == [2, 4]
    runner.run_shards(job, manifest, todo, compute, write(tmp_path), lambda j: 1, "t", "s")
    runner.finish(job, manifest)
    assert computed == [2, 4] and [s["index"] for s in read_manifest(tmp_path / "manifest.json")["shards"]] == [0, 2, 4]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_mid_write_is_a_clear_error_and_the_finished_shards_resume(tmp_path):
    job, manifest = job_in(tmp_path, shards=4), {"shards": [], "complete": False}
    write_one = write(tmp_path)

    def write_or_fill(j: int, data: bytes) -> dict:
        if j == 2:
            with open("/dev/full", "wb") as f:  # a real ENOSPC from the kernel
                f.write(data)
        return write_one(j, data)

    with pytest.raises(CacheError, match=r"no space left in .*No space left on device.*The 2 shards finished are kept: "
                                         r"free space or move the dir elsewhere, then run the same command to resume"):
        runner.run_shards(job, manifest, runner.start(job, manifest), lambda j: bytes([j]) * 1000, write_or_fill,
                          lambda j: 1, "t", "s")
    assert [s["index"] for s in read_manifest(tmp_path / "manifest.json")["shards"]] == [0, 1]
    job, manifest = job_in(tmp_path, shards=4), {"shards": [], "complete": False}
    assert runner.start(job, manifest) == [2, 3]
