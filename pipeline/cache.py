"""Reading teacher-cache shards (the layout is in pipeline/schema.py; pipeline/cache_write.py writes them).

Public API (used by the trainer, by users and by our checks)::

    from pipeline.cache import CacheReader
    reader = CacheReader("cache/")            # a local dir or any fsspec URL (s3://, gs://, file://, ...)
    reader.manifest                            # the parsed manifest dict
    for seq in reader.iter_sequences():        # one dict of numpy arrays per sequence
        seq["input_ids"], seq["topk_ids"], seq["topk_logprobs"], seq["target_logprob"],
        seq["tail_mass"], seq["hidden_states"]  # {layer: [T, H] float32}, when layers were captured
        seq["qkv"]                             # {layer: {"q": [T, d_q], "k": [T, d_kv], "v": [T, d_kv]}}, --qkv-layers
        seq["sample_ids"], seq["sample_counts"]  # RS-KD caches: [T-1, m], padding id -1 with count 0; also
        seq["sample_weights"], seq["teacher_entropy"]  # count / N (x p/q at t != 1); H(p) per position [T-1]
        seq["sample_logprobs"]                 # sampled-exact caches: exact log p of each id, weights p / pi,
                                               # teacher_entropy exact (systematic, t = 1) or the estimate -sum w log p;
                                               # an id below 1/N of a systematic cache reads log p = -log N (weight 1/N)

    reader.read_hidden(shard, layers=[16], rows=slice(3, 4))  # {16: [1, T, H]}: reads and decodes only that
                                                               # (format 3; older files are decompressed whole)

Values come back decoded (int64 ids, float32 log-probs and hidden states) whatever the stored form and version.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from . import schema
from .errors import CacheError
from .hidden_file import HiddenFile, RowFrames, WholeFile
from .manifest import read_manifest, sha256_file, stats_from_shards

SAMPLE_KEYS = ("sample_ids", "sample_counts", "sample_weights", "sample_logprobs")  # [.., m] per-sample arrays


def undelta_ids(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The inverse of delta_ids: a running sum restarted at each position."""
    lengths = lengths.reshape(-1).astype(np.int64)
    total = np.cumsum(deltas.astype(np.int64))
    before = np.concatenate([[0], total])[np.cumsum(lengths) - lengths]
    return total - np.repeat(before, lengths)


def decode_sample_logprobs(codes: np.ndarray) -> np.ndarray:
    return -codes.astype(np.float64) / schema.SAMPLE_LOGPROB_STEPS


def decode_logprobs(cols: dict) -> np.ndarray:
    lp = cols["topk_logprobs"]
    if "topk_lp_max" not in cols:
        return lp.astype(np.float32)
    return (cols["topk_lp_max"][..., None] - lp.astype(np.float32) * cols["topk_lp_step"][..., None]).astype(np.float32)


def ragged_to_padded(lengths: np.ndarray, n: int, t: int):
    """A function turning a ragged sample_* column (lengths[i] entries for position i) into [N, T-1, m] arrays."""
    lengths = lengths.astype(np.int64)
    m = max(int(lengths.max(initial=0)), 1)
    positions = np.repeat(np.arange(lengths.size), lengths)
    slot = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)

    def padded(values, fill, dtype):
        out = np.full((lengths.size, m), fill, dtype=dtype)
        out[positions, slot] = values
        return out.reshape(n, t - 1, m)

    return padded


def inclusion_probability(logq: np.ndarray, draws: int, sampling: str = "iid") -> np.ndarray:
    """The chance that an id of probability q is drawn at least once in `draws` draws: 1 - (1 - q)^draws for
    independent draws (iid), min(1, draws q) for systematic ones (stage_teacher/targets.py draw)."""
    q = np.exp(np.minimum(logq, 0.0))
    if sampling == "systematic":
        return np.minimum(1.0, draws * q)
    return -np.expm1(draws * np.log1p(-np.minimum(q, 1 - 1e-16)))


def inclusion_weights(logp: np.ndarray, logq: np.ndarray, draws: int, certain: np.ndarray, valid: np.ndarray,
                      sampling: str = "iid") -> np.ndarray:
    """Horvitz-Thompson weights p / pi of ids seen in `draws` draws from q (inclusion_probability); p itself where
    `certain` (the true next token, always kept), 0 where not `valid`."""
    pi = np.where(certain, 1.0, np.maximum(inclusion_probability(logq, draws, sampling), 1e-300))
    return np.where(valid, np.exp(logp) / pi, 0.0)


def decode_exact_samples(cols: dict, n: int, t: int, next_ids: np.ndarray, cap: dict) -> dict:
    """sampled-exact columns -> padded [N, T-1, m] ids, exact log-probs and Horvitz-Thompson weights p / pi
    (pi = 1 - (1 - q)^N iid, min(1, N q) systematic, 1 for the true next token), and teacher_entropy: the stored
    exact H(p), or else -sum_i w_i log p_i, the matching estimate of H(p), so that the loss's value estimates the KL
    (stage_student/losses/chunked.py sampled_chunk). A drawn id stored without its log-prob (SAMPLE_TAIL_CODE)
    reads as log p = -log N, the p that gives it its weight 1/N (and, under --draws-per-epoch, its share)."""
    padded = ragged_to_padded(cols["sample_lengths"], n, t)
    ids = padded(undelta_ids(cols["sample_ids"], cols["sample_lengths"]), -1, np.int64)
    codes = cols["sample_logprobs"]
    logp = decode_sample_logprobs(codes)
    if not schema.tail_logprobs_of(cap):
        logp[codes == schema.SAMPLE_TAIL_CODE] = -np.log(cap["samples"])
    logp = padded(logp, 0.0, np.float64)
    temperature = float(cap["sample_temperature"])
    logq = logp / temperature
    if "sample_logq_norm" in cols:
        logq = logq + cols["sample_logq_norm"].astype(np.float64).reshape(n, t - 1, 1)
    weights = inclusion_weights(logp, logq, int(cap["samples"]), ids == next_ids[..., None], ids >= 0,
                                schema.sampling_of(cap))
    entropy = (cols["teacher_entropy"].reshape(n, t - 1) if "teacher_entropy" in cols
               else -(weights * logp).sum(-1))
    return {"sample_ids": ids, "sample_logprobs": logp.astype(np.float32), "sample_weights": weights.astype(np.float32),
            "teacher_entropy": entropy.astype(np.float32)}


class CacheReader:
    """A read-only view of a finished cache, local or behind any fsspec URL."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.path)

    def _join(self, name: str) -> str:
        return f"{self.root}/{name}"

    @cached_property
    def manifest(self) -> dict:
        mpath = self._join(schema.MANIFEST)
        if not self.fs.exists(mpath):
            parts = self.fs.glob(self._join("manifest.part-*.json"))
            hint = (
                f" It holds {len(parts)} array-job part manifests: join them with `distily merge-manifests {self.path}`."
                if parts
                else " Make one with `distily teacher-cache --output DIR`."
            )
            raise CacheError(f"{self.path} is not a teacher cache: no {schema.MANIFEST}.{hint}")
        manifest = read_manifest(mpath, self.fs)  # a running job's journal folded in
        if not manifest.get("complete") and manifest["shards"]:
            manifest["stats"] = stats_from_shards(manifest["shards"])
        version = manifest.get("format_version")
        if version not in schema.READABLE_VERSIONS:
            newer = isinstance(version, int) and version > schema.FORMAT_VERSION
            raise CacheError(
                f"{self.path}: cache format version {version} is "
                + ("newer than this distily reads" if newer else "not one this distily reads")
                + f" (versions {', '.join(map(str, schema.READABLE_VERSIONS))}); "
                + ("upgrade distily (pip install -U distily)." if newer else "rebuild the cache with this version.")
            )
        return manifest

    @property
    def top_k(self) -> int:
        return int(self.manifest["capture"]["top_k"])

    @property
    def hidden_layers(self) -> list[int]:
        return list(self.manifest["capture"]["hidden_layers"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def num_sequences(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def targets(self) -> str:
        """topk | sampled | both (version-1 caches: topk)."""
        return self.manifest["capture"].get("targets", schema.DEFAULT_TARGETS)

    def read_shard(self, shard: dict, hidden: bool = True) -> dict:
        """One shard as batched, decoded arrays: input_ids [N,T] int64, target_logprob [N,T-1]; top-k caches
        topk_ids/topk_logprobs [N,T-1,k] and tail_mass [N,T-1]; sampled caches sample_ids/sample_counts/
        sample_weights [N,T-1,m] (m: the shard's most unique ids at a position; padding id -1, count and weight 0)
        and teacher_entropy [N,T-1]; hidden_states {l: [N,T,H] float32}."""
        try:
            with self.fs.open(self._join(shard["file"]), "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError as e:
            raise CacheError(f"{self.path}: shard {shard['file']} is missing; run `distily verify` or rebuild") from e
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(f"{self.path}: shard {shard['file']} is corrupt ({e}); rebuild it by rerunning the capture") from e
        n = table.num_rows
        cols = {name: table.column(name).combine_chunks().flatten().to_numpy() for name in table.column_names
                if name != "seq_index"}
        input_ids = cols["input_ids"].astype(np.int64).reshape(n, -1)
        t = input_ids.shape[1]
        per_position = lambda a, *rest: a.reshape(n, t - 1, *rest)  # noqa: E731
        out = {
            "seq_index": table.column("seq_index").to_numpy(),
            "input_ids": input_ids,
            "target_logprob": per_position(cols["target_logprob"]).astype(np.float32),
        }
        for name in ("loss_mask", "behaviour_logprob"):  # graded caches
            if name in cols:
                out[name] = per_position(cols[name])
        if "topk_ids" in cols:
            k = self.top_k
            out["topk_ids"] = per_position(cols["topk_ids"].astype(np.int64), k)
            lp = {name: per_position(cols[name], *([k] if name == "topk_logprobs" else []))
                  for name in ("topk_logprobs", "topk_lp_max", "topk_lp_step") if name in cols}
            out["topk_logprobs"] = decode_logprobs(lp)
            out["tail_mass"] = per_position(cols["tail_mass"]).astype(np.float32)
        if "sample_logprobs" in cols:
            out.update(decode_exact_samples(cols, n, t, input_ids[:, 1:], self.manifest["capture"]))
        elif "sample_ids" in cols:
            out.update(self._decode_samples(cols, n, t))
        if hidden and shard.get("hidden_file"):
            out["hidden_states"], qkv = self.read_extras(shard, self.hidden_layers, self.qkv_layers)
            if qkv:
                out["qkv"] = qkv
        return out

    def _decode_samples(self, cols: dict, n: int, t: int) -> dict:
        """Ragged sample_* columns -> padded [N, T-1, m] arrays, and the estimator's weights count / N * p / q."""
        padded = ragged_to_padded(cols["sample_lengths"], n, t)
        draws = int(self.manifest["capture"]["samples"])
        counts = padded(cols["sample_counts"], 0, np.int64)
        weights = counts / draws
        if "sample_iw" in cols:
            weights = weights * padded(cols["sample_iw"], 0, np.float64).reshape(weights.shape)
        return {
            "sample_ids": padded(cols["sample_ids"], -1, np.int64),
            "sample_counts": counts,
            "sample_weights": weights.astype(np.float32),
            "teacher_entropy": cols["teacher_entropy"].astype(np.float32).reshape(n, t - 1),
        }

    @property
    def qkv_layers(self) -> list[int]:
        return list(self.manifest["capture"].get("qkv_layers", []))

    def open_hidden(self, shard: dict, hidden_layers: list[int] | None = None,
                    qkv_layers: list[int] | None = None) -> HiddenFile:
        """The shard's hidden-state file, ready to read rows of these layers' tensors (default: all captured)."""
        hidden_layers = self.hidden_layers if hidden_layers is None else hidden_layers
        qkv_layers = self.qkv_layers if qkv_layers is None else qkv_layers
        names = [schema.hidden_key(l) for l in hidden_layers]
        names += [schema.qkv_key(kind, l) for l in qkv_layers for kind in schema.QKV]
        path = self._join(shard["hidden_file"])
        try:
            if self.manifest.get("format_version", 1) >= schema.ROW_FRAMES_VERSION:
                hfile = RowFrames(self.fs, path)
            else:
                hfile = WholeFile(self.fs, path, names)
        except FileNotFoundError as e:
            raise CacheError(f"{self.path}: {shard['hidden_file']} is missing; run `distily verify` or rebuild") from e
        except (ValueError, KeyError, zstandard.ZstdError) as e:
            raise CacheError(f"{self.path}: {shard['hidden_file']} is corrupt ({e}); rebuild it by rerunning the capture") from e
        missing = [n for n in names if n not in hfile.keys]
        if missing:
            raise CacheError(f"{self.path}: {shard['hidden_file']} holds no {', '.join(missing)}; the cache captured "
                             f"hidden layers {self.hidden_layers} and Q/K/V layers {self.qkv_layers}")
        return hfile

    def read_hidden(self, shard: dict, layers: list[int] | None = None, rows: slice | None = None) -> dict[int, np.ndarray]:
        """{layer: [N, T, H]} float32 (rows: only those); decodes only these layers."""
        return self.read_extras(shard, self.hidden_layers if layers is None else layers, [], rows)[0]

    def read_extras(self, shard: dict, hidden_layers: list[int], qkv_layers: list[int],
                    rows: slice | None = None) -> tuple[dict, dict]:
        """(hidden states, Q/K/V) of these layers (and rows, default all) from the shard's hidden-state file. A
        version-3 file reads and decompresses only these tensors' rows; an older one is decompressed whole."""
        hfile = self.open_hidden(shard, hidden_layers, qkv_layers)
        rows = slice(None) if rows is None else rows
        hidden = {l: hfile.decode(schema.hidden_key(l), rows) for l in hidden_layers}
        qkv = {l: {kind: hfile.decode(schema.qkv_key(kind, l), rows) for kind in schema.QKV} for l in qkv_layers}
        return hidden, qkv

    def iter_sequences(self, hidden: bool = True) -> Iterator[dict]:
        for shard in self.shards:
            batch = self.read_shard(shard, hidden=hidden)
            for i in range(len(batch["input_ids"])):
                seq = {k: v[i] for k, v in batch.items() if k not in ("hidden_states", "qkv")}
                if "sample_ids" in seq:  # this sequence's own m: the most unique ids at any of its positions
                    m = max(int((seq["sample_ids"] >= 0).sum(-1).max(initial=0)), 1)
                    seq.update({k: seq[k][:, :m] for k in SAMPLE_KEYS if k in seq})
                if "hidden_states" in batch:
                    seq["hidden_states"] = {l: h[i] for l, h in batch["hidden_states"].items()}
                if "qkv" in batch:
                    seq["qkv"] = {l: {kind: x[i] for kind, x in parts.items()} for l, parts in batch["qkv"].items()}
                yield seq

    def tokenizer_dir(self) -> str:
        """A local directory holding the cache's tokenizer (downloaded to a temp dir for remote caches)."""
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            return self._join(schema.TOKENIZER_DIR)
        local = tempfile.mkdtemp(prefix="distily-tokenizer-")
        self.fs.get(self._join(schema.TOKENIZER_DIR) + "/", local + "/", recursive=True)
        return local

    def teacher_config(self) -> dict:
        with self.fs.open(self._join(schema.TEACHER_CONFIG), "r") as f:
            return json.load(f)

    def check_files(self) -> None:
        """Cheap pre-flight check (one listing, no reads): every shard file exists with its recorded size."""
        sizes = {Path(e["name"]).name: e["size"] for e in self.fs.ls(self.root, detail=True)}
        for shard in self.shards:
            for key, size_key in (("file", "bytes"), ("hidden_file", "hidden_bytes")):
                name = shard.get(key)
                if name and name not in sizes:
                    raise CacheError(f"{self.path}: shard {name} is missing; rebuild it by rerunning the same teacher-cache command")
                if name and sizes[name] != shard[size_key]:
                    raise CacheError(
                        f"{self.path}: shard {name} has {sizes[name]} bytes, the manifest says {shard[size_key]} "
                        "(truncated or corrupt); run `distily verify` and rebuild it"
                    )

    def verify(self) -> list[str]:
        """Check every file's checksum and schema; return a list of problems (empty: the cache is good)."""
        problems: list[str] = []
        try:
            manifest = self.manifest
        except CacheError as e:
            return [str(e)]
        for sub in (schema.TEACHER_CONFIG, schema.TOKENIZER_DIR):
            if not self.fs.exists(self._join(sub)):
                problems.append(f"{sub} is missing")
        for shard in manifest["shards"]:
            problem = verify_shard_files(self.root, shard, self.fs)
            if problem:
                problems.append(problem)
                break
            try:
                with self.fs.open(self._join(shard["file"]), "rb") as f:
                    file_schema = pq.read_schema(f)
                if not file_schema.equals(schema.parquet_schema(manifest), check_metadata=False):
                    problems.append(f"{shard['file']}: schema differs from pipeline/schema.py")
                batch = self.read_shard(shard, hidden=True)
                if len(batch["input_ids"]) != shard["rows"]:
                    problems.append(f"{shard['file']}: {len(batch['input_ids'])} rows, manifest says {shard['rows']}")
                for l, h in batch.get("hidden_states", {}).items():
                    if h.shape[:2] != batch["input_ids"].shape:
                        problems.append(f"{shard['hidden_file']}: layer {l} has shape {h.shape}")
                for l, parts in batch.get("qkv", {}).items():
                    for kind, x in parts.items():
                        want = (*batch["input_ids"].shape, manifest["capture"]["qkv"][kind]["width"])
                        if x.shape != want:
                            problems.append(f"{shard['hidden_file']}: {kind}_{l} has shape {x.shape}, expected {want}")
            except CacheError as e:
                problems.append(str(e))
            if problems:
                break
        return problems


def verify_shard_files(cache_dir: str | os.PathLike, shard: dict, fs=None) -> str | None:
    """One finished shard: both files exist and match their checksums (None), or what is wrong."""
    fs = fs or fsspec.filesystem("file")
    for key, sha_key in (("file", "sha256"), ("hidden_file", "hidden_sha256")):
        if not shard.get(key):
            continue
        p = f"{cache_dir}/{shard[key]}"
        if not fs.exists(p):
            return f"{shard[key]} is listed in the manifest but missing"
        if sha256_file(p, fs) != shard[sha_key]:
            return f"{shard[key]} is corrupt or truncated (checksum mismatch)"
    return None
