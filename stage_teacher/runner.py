"""The array-job loop of stage one, shared by `distily teacher-cache` (capture.py) and `distily generate`.

A dataset is cut into shards 0..S-1; array job I of N owns the shards j with j % N == I. A job:

1. reads its own manifest (and the journal of a killed run: pipeline/manifest.py) and checks every finished
   shard's files, so a resumed job does only the shards still missing (`start`);
2. removes the temporaries its own interrupted writes left (other jobs in the same dir keep theirs);
3. computes shard j+1 while shard j is written in a background thread, and names a shard in its journal only
   after the shard's files are whole (`run_shards`): a kill -9 at any moment never loses a finished shard and
   never names an unfinished one;
4. stops with a clear error, its finished shards kept, when its shards still to write would not fit the output
   dir's free space at the mean size of those it wrote (`check_space`: before the engine starts on a resume,
   and after each shard), or when a write finds the disk or the quota full;
5. writes its whole manifest at the end, marked complete (`finish`).

What a shard is (its computation, its files, its manifest record, the stats) is the caller's: see `Job`.
"""
from __future__ import annotations

import errno
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from pipeline.cache import verify_shard_files
from pipeline.errors import CacheError
from pipeline.manifest import append_journal, atomic_write_json, journal_path, read_manifest, stale_temps
from pipeline.run_lock import run_lock

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


@dataclass
class Job:
    out: Path  # the output dir, local or on a shared filesystem (many jobs may write into it)
    manifest_file: Path  # this job's manifest: the single manifest, or its part of an array job
    num_dataset_shards: int  # shards in the whole dataset
    num_jobs: int  # --num-shards
    job_index: int  # --shard-index
    files: Callable[[int], list[str]]  # the names of the files shard j writes
    stats: Callable[[list[dict]], dict]  # the manifest's stats from its shard records

    @property
    def owned(self) -> list[int]:
        return [j for j in range(self.num_dataset_shards) if j % self.num_jobs == self.job_index]

    @property
    def journal(self) -> Path:
        return journal_path(self.manifest_file)


def hold(job: Job, command: str):
    """This job's lock for the with-block (pipeline/run_lock.py): a second copy of the same array job into the same
    dir is refused while this one runs."""
    return run_lock(job.out / f".{job.manifest_file.name}.lock",
                    f"{command} job {job.job_index} of {job.num_jobs} into {job.out}")


def finished_shards(job: Job) -> list[dict]:
    """The records of this job's finished shards (manifest and journal), each shard's files checked."""
    if not job.manifest_file.exists():
        return []
    done = read_manifest(job.manifest_file)["shards"]
    for shard in done:
        problem = verify_shard_files(job.out, shard)
        if problem:
            raise CacheError(
                f"cannot resume in {job.out}: {problem}. Delete that file and remove it from {job.manifest_file.name} "
                f"(and {job.journal.name}, if there is one), or start a new --output dir, then rerun."
            )
    return done


def start(job: Job, manifest: dict) -> list[int]:
    """Put this job's finished shards in `manifest`, remove its own stale temporaries; the shards still to do."""
    done = finished_shards(job)
    manifest["shards"] = sorted(done, key=lambda s: s["index"])
    names = [job.manifest_file.name, *(name for j in job.owned for name in job.files(j))]
    for stale in (t for name in names for t in stale_temps(job.out, name)):
        stale.unlink(missing_ok=True)
    finished = {s["index"] for s in done}
    check_space(job, manifest["shards"])
    return [j for j in job.owned if j not in finished]


def check_space(job: Job, done: list[dict]) -> None:
    """Refuse to go on when this job's shards still to write need more than the output dir's free space, at the
    mean size of the last (at most 8) of its finished shards `done` (their records): a few stats a shard, whatever
    the dataset's size. Array jobs sharing a dir each check their own share."""
    sizes = []
    for shard in done[-8:]:
        paths = [job.out / name for name in job.files(shard["index"])]
        if paths[0].exists():  # else written elsewhere (merge-manifests joins such dirs): nothing to measure here
            sizes.append(sum(p.stat().st_size for p in paths if p.exists()))
    if not sizes:
        return
    per_shard, left = sum(sizes) / len(sizes), len(job.owned) - len(done)
    need, free = per_shard * left, shutil.disk_usage(job.out).free
    if need > free:
        raise CacheError(
            f"{job.out} has {free / 1e9:.2f} GB free, and this job's {left} shards still to write need about "
            f"{need / 1e9:.2f} GB ({per_shard / 1e6:.2f} MB a shard, the mean of its last {len(sizes)} written). The "
            "shards written are kept: free space or move the dir elsewhere, then run the same command to resume.")


def save(job: Job, manifest: dict) -> None:
    """The whole manifest, atomically; then the journal it now contains is dropped."""
    manifest["shards"].sort(key=lambda s: s["index"])
    manifest["stats"] = job.stats(manifest["shards"])
    atomic_write_json(job.manifest_file, manifest)
    job.journal.unlink(missing_ok=True)


def run_shards(job: Job, manifest: dict, todo: list[int], compute: Callable[[int], Any],
               write: Callable[[int, Any], dict], units: Callable[[int], int], desc: str, unit: str) -> None:
    """compute(j) on this thread, write(j, computed) -> shard record in a background thread, one shard apart.

    The manifest is written whole before the first shard (the journal of a killed run folded in); each written
    shard is then one journal line. On an error (not a kill) the shards already written are saved whole too."""
    if not todo:
        return
    save(job, manifest)
    pending: Future | None = None

    def record(future: Future, check: bool = True) -> None:
        entry = future.result()
        manifest["shards"].append(entry)
        append_journal(job.journal, entry)  # the journal names a shard only after write() made it whole
        if check:
            check_space(job, manifest["shards"])

    try:
        with ThreadPoolExecutor(1) as writer, tqdm(total=sum(map(units, todo)), unit=unit, unit_scale=True,
                                                   desc=desc) as bar:
            for j in todo:
                computed = compute(j)
                if pending is not None:
                    written, pending = pending, None
                    record(written)
                pending = writer.submit(write, j, computed)
                bar.update(units(j))
            if pending is not None:
                written, pending = pending, None
                record(written)
    except BaseException as error:
        saving = None
        try:
            if pending is not None and pending.done() and pending.exception() is None:
                record(pending, check=False)  # the executor's exit waited for it: its shard is whole
            save(job, manifest)
        except OSError as e:  # a full disk fails the manifest too; the journal keeps the finished shards
            saving = e
        if full_disk(saving) and not full_disk(error):
            error = saving
        if full_disk(error):
            raise CacheError(f"no space left in {job.out} ({error}). The {len(manifest['shards'])} shards finished "
                             "are kept: free space or move the dir elsewhere, then run the same command to resume.") from error
        raise error


def full_disk(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def finish(job: Job, manifest: dict) -> None:
    """Mark the job complete: its whole manifest, every shard named, the journal folded in and removed."""
    manifest["complete"] = True
    save(job, manifest)
