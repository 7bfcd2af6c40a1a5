"""The cache manifest: what a cache holds and everything needed to trust and reuse it.

A manifest is a plain JSON dict::

    format_version, distily_version, created, software{torch, transformers, vllm, pyarrow}
    teacher{source, path, weights_sha256, weights_sha256_source, revision, num_hidden_layers, hidden_size,
            vocab_size}                     # weights_sha256_source: hashed | reused (pipeline/resolve.py)
    tokenizer{sha256, vocab_size, eos_token_id, bos_token_id, pad_token_id}
    capture{backend, targets_from, targets, top_k, logprob_dtype, samples, sample_temperature, sampling, sample_seed,
            hidden_layers, hidden_dtype, logprobs, max_seq_len, sequences_per_shard,
            targets_vocab}                  # only when the head is padded: see targets_vocab() below
    dataset{spec, fingerprint, num_sequences, num_tokens}
    job{num_shards, shard_index}            # the array-job split this manifest covers
    shards[{index, file, hidden_file, rows, tokens, sha256, hidden_sha256, bytes, column_bytes, hidden_bytes}]
    stats{sequences, tokens, positions, mean_target_prob, mean_tail_mass, mean_unique_samples}
    complete                                # every shard of this job is written

``identity(manifest)`` is the part that must match for two runs to write into the same cache. While a job
runs, the shards it finished since it last wrote its manifest are in its journal (NAME.journal.jsonl beside
NAME.json, below); ``read_manifest`` folds them in.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from . import schema
from .errors import CacheError


def sha256_file(path: str | os.PathLike, fs=None) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename: never a half-written file.

    The temporary name is `.NAME.<unique>.tmp` (unique per writer), so writers of different files, or
    several jobs in one directory, never touch each other's temporaries; `stale_temps(dir, NAME)` finds them.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (Linux: read from /proc, which leaves it untouched; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """tempfile.mkdtemp, but with the mode mkdir would give (0755 under umask 022, not mkdtemp's 0700): a dir
    renamed into a shared cache must be readable by the group's other users."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under a directory, then the directories (before renaming the tree into place)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def stale_temps(directory: str | os.PathLike, name: str) -> list[Path]:
    """Temporaries left by interrupted atomic writes of `directory/name`."""
    return sorted(Path(directory).glob(f".{glob.escape(name)}.*.tmp"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


# A running job names each finished shard in a journal beside its manifest, one fsynced JSON line per shard
# (constant work per shard; rewriting the manifest after every shard was quadratic in the job's shards). The
# manifest is written whole when the job starts work and when it ends (or stops on an error); a job killed
# in between leaves its journal, which resume and readers fold in. The manifest alone is always a valid,
# older view: it never names a shard whose files are not whole.


def journal_path(manifest_path: str | os.PathLike) -> Path:
    """manifest.json -> manifest.journal.jsonl (the manifest globs, `manifest.part-*.json`, never match it)."""
    p = Path(manifest_path)
    return p.with_name(p.name.removesuffix(".json") + ".journal.jsonl")


def append_journal(path: str | os.PathLike, record: dict) -> None:
    """Append one finished shard's record as one JSON line, fsynced before the job goes on."""
    new = not os.path.exists(path)
    with open(path, "ab") as f:
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_dir(Path(path).parent)


def parse_journal(text: str, where: str = "journal") -> list[dict]:
    """The records of a journal; a last line cut short by a kill (not valid JSON) is ignored."""
    lines = text.splitlines()
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # the append the kill interrupted: its shard is simply captured again
            raise CacheError(f"{where}: line {n + 1} is not JSON (only the last line can be cut short)") from None
    return records


def fold_journal(manifest: dict, records: list[dict]) -> dict:
    """The manifest with the journal's shards added (a shard in both, after a kill between the manifest write
    and the journal's removal, counts once)."""
    by_index = {s["index"]: s for s in manifest["shards"]}
    by_index.update((r["index"], r) for r in records)
    return {**manifest, "shards": sorted(by_index.values(), key=lambda s: s["index"])}


def read_manifest(path: str | os.PathLike, fs=None) -> dict:
    """A job's manifest as of its last finished shard: the manifest file with its journal folded in.

    A complete manifest already names every shard, so only an unfinished one (a running or killed job) looks
    for a journal. `fs`: an fsspec filesystem for paths behind URLs (default: local files)."""
    opener = fs.open if fs is not None else open
    with opener(path, "r") as f:
        manifest = json.load(f)
    if manifest.get("complete"):
        return manifest
    journal = str(journal_path(path)) if fs is None else f"{str(path).removesuffix('.json')}.journal.jsonl"
    if not (fs.exists(journal) if fs is not None else os.path.exists(journal)):
        return manifest
    with opener(journal, "r") as f:
        return fold_journal(manifest, parse_journal(f.read(), journal))


def targets_vocab(manifest: dict) -> int:
    """How many token ids the cached targets range over: capture.targets_vocab (len(tokenizer)) when the teacher's
    head has padding rows the capture cut off, else (no field: every older cache) the teacher's whole head."""
    return manifest["capture"].get("targets_vocab", manifest["teacher"]["vocab_size"])


IDENTITY_KEYS = ("format_version", "teacher", "tokenizer", "capture", "dataset")


def identity(manifest: dict) -> dict:
    """The fields two captures must share to be parts of one cache (everything but shards, time, job)."""
    ident = {k: manifest.get(k) for k in IDENTITY_KEYS}
    # path: where this job found the weights; weights_sha256_source: whether it hashed them or reused a stored
    # hash (a resumed job reuses the first job's): neither is what the cache holds
    ident["teacher"] = {k: v for k, v in (ident["teacher"] or {}).items() if k not in ("path", "weights_sha256_source")}
    if ident.get("dataset"):  # caches written before --sample-by existed read text files as `auto` does
        ident["dataset"] = {**ident["dataset"], "spec": {"sample_by": "auto", **ident["dataset"].get("spec", {})}}
    if ident.get("capture"):  # caches written before --sampling existed drew iid and kept every log-prob
        cap = ident["capture"]
        ident["capture"] = {**cap, "sampling": schema.sampling_of(cap), "tail_logprobs": schema.tail_logprobs_of(cap)}
    return ident


def describe_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first field where two (nested) dicts differ, as 'key: a != b'."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diff = describe_difference(va, vb, f"{prefix}{key}.")
            if diff:
                return diff
        elif va != vb:
            return f"{prefix}{key}: {va!r} != {vb!r}"
    return ""


# how to resume a cache written before a default changed, by the field that differs
RESUME_OLDER = {"capture.samples": "--samples with the cache's number (the first above) resumes it; the default was 72 "
                                   "before 2026-12-06",
                "capture.sampling": "--sampling iid --samples 56 resumes a cache written before --sampling",
                "capture.tail_logprobs": "--tail-logprobs --samples 48 resumes a systematic cache written before the tail "
                                         "rule"}


def check_same_cache(existing: dict, wanted: dict, where: str) -> None:
    a, b = identity(existing), identity(wanted)
    if a != b:
        diff = describe_difference(a, b)
        hint = RESUME_OLDER.get(diff.split(":")[0])
        raise CacheError(
            f"{where} already holds a cache made with different settings "
            f"({diff}). Use a new --output directory, or delete the old cache{'; ' + hint if hint else ''}."
        )


def merge(parts: Iterable[dict]) -> dict:
    """Join the manifests of array jobs (--num-shards N, --shard-index 0..N-1) into one manifest."""
    parts = sorted(parts, key=lambda m: m["job"]["shard_index"])
    if not parts:
        raise CacheError("no part manifests to merge")
    first = parts[0]
    n = first["job"]["num_shards"]
    for p in parts[1:]:
        if identity(p) != identity(first):
            raise CacheError(
                f"part {p['job']['shard_index']} was made with other settings than part "
                f"{first['job']['shard_index']}: {describe_difference(identity(first), identity(p))}"
            )
    have = [p["job"]["shard_index"] for p in parts]
    missing = sorted(set(range(n)) - set(have))
    if missing or len(have) != len(set(have)):
        raise CacheError(f"array job parts {missing} of {n} are missing (or duplicated: {have}); run them first")
    for p in parts:
        if not p.get("complete"):
            raise CacheError(f"array job part {p['job']['shard_index']} is not finished; rerun it to resume")
    merged = {k: v for k, v in first.items() if k not in ("shards", "stats", "job")}
    merged["shards"] = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["index"])
    merged["job"] = {"num_shards": 1, "shard_index": 0, "merged_from": n}
    merged["stats"] = stats_from_shards(merged["shards"])
    merged["complete"] = True
    return merged


def stats_from_shards(shards: list[dict]) -> dict:
    """Token counts and the teacher's mean confidence (CAKLD's gamma) over the shards."""
    positions = sum(s["positions"] for s in shards)
    return {
        "sequences": sum(s["rows"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "positions": positions,
        "mean_target_prob": sum(s["target_prob_sum"] for s in shards) / max(positions, 1),
        "mean_tail_mass": (sum(s["tail_mass_sum"] for s in shards) / max(positions, 1)
                           if all(s.get("tail_mass_sum") is not None for s in shards) else None),
        **({"mean_unique_samples": sum(s["sample_unique_sum"] for s in shards) / max(positions, 1)}
           if shards and all("sample_unique_sum" in s for s in shards) else {}),
    }
