"""Reading and writing teacher-cache shards (the layout is in pipeline/schema.py).

Public API (used by the trainer, by users and by our checks)::

    from pipeline.cache import CacheReader
    reader = CacheReader("cache/")            # a local dir or any fsspec URL (s3://, gs://, file://, ...)
    reader.manifest                            # the parsed manifest dict
    for seq in reader.iter_sequences():        # one dict of numpy arrays per sequence
        seq["input_ids"], seq["topk_ids"], seq["topk_logprobs"], seq["target_logprob"],
        seq["tail_mass"], seq["hidden_states"]  # {layer: [T, H] float32}, when layers were captured
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from . import schema
from .manifest import CacheError, atomic_write_bytes, atomic_write_json, merge, read_json, sha256_file

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------- write


def write_shard(
    cache_dir: str | os.PathLike,
    index: int,
    seq_index: np.ndarray,  # [N]
    input_ids: np.ndarray,  # [N, T]
    topk_ids: np.ndarray,  # [N, T-1, k]
    topk_logprobs: np.ndarray,  # [N, T-1, k]
    target_logprob: np.ndarray,  # [N, T-1]
    hidden: dict[int, "torch.Tensor"] | None = None,  # {layer: [N, T, H]}
    hidden_dtype: str = "bfloat16",
) -> dict:
    """Write one shard pair atomically and return its manifest entry."""
    n, t = input_ids.shape
    k = topk_ids.shape[-1]
    topk_logprobs = topk_logprobs.astype(np.float32)
    tail = tail_mass(topk_logprobs)
    table = pa.table(
        {
            "seq_index": pa.array(seq_index.astype(np.int64)),
            "input_ids": _lists(input_ids.astype(np.int32), t),
            "topk_ids": _lists(topk_ids.astype(np.int32).reshape(n, -1), (t - 1) * k),
            "topk_logprobs": _lists(topk_logprobs.reshape(n, -1), (t - 1) * k),
            "target_logprob": _lists(target_logprob.astype(np.float32), t - 1),
            "tail_mass": _lists(tail, t - 1),
        },
        schema=schema.SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=schema.PARQUET_COMPRESSION, compression_level=schema.ZSTD_LEVEL)
    cache_dir = Path(cache_dir)
    parquet_bytes = buf.getvalue()
    entry = {
        "index": index,
        "file": schema.shard_name(index),
        "rows": int(n),
        "tokens": int(n * t),
        "first_seq": int(seq_index[0]),
        "positions": int(n * (t - 1)),
        "target_prob_sum": float(np.exp(target_logprob.astype(np.float64)).sum()),
        "tail_mass_sum": float(tail.astype(np.float64).sum()),
        "sha256": hashlib.sha256(parquet_bytes).hexdigest(),
        "bytes": len(parquet_bytes),
    }
    if hidden:
        import torch
        from safetensors.torch import save

        dtype = getattr(torch, hidden_dtype)
        tensors = {schema.hidden_key(l): h.to(dtype).contiguous() for l, h in sorted(hidden.items())}
        hidden_bytes = zstandard.ZstdCompressor(level=schema.ZSTD_LEVEL).compress(save(tensors))
        atomic_write_bytes(cache_dir / schema.hidden_name(index), hidden_bytes)
        entry.update(
            hidden_file=schema.hidden_name(index),
            hidden_sha256=hashlib.sha256(hidden_bytes).hexdigest(),
            hidden_bytes=len(hidden_bytes),
        )
    # The Parquet file is renamed into place last: a shard counts as present only when both files are.
    atomic_write_bytes(cache_dir / entry["file"], parquet_bytes)
    return entry


def tail_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """Probability outside the top-k, computed in float64 and clipped at 0 (fp rounding)."""
    return np.clip(1.0 - np.exp(topk_logprobs.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)


def _lists(values: np.ndarray, width: int) -> pa.ListArray:
    values = np.ascontiguousarray(values).reshape(-1)
    offsets = np.arange(0, values.size + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# ------------------------------------------------------------------------------------------------ read


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
        with self.fs.open(mpath, "r") as f:
            manifest = json.load(f)
        if manifest.get("format_version") != schema.FORMAT_VERSION:
            raise CacheError(
                f"{self.path}: cache format {manifest.get('format_version')} is not the format this distily "
                f"reads ({schema.FORMAT_VERSION}); rebuild the cache with this version."
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

    def read_shard(self, shard: dict, hidden: bool = True) -> dict:
        """One shard as batched arrays: input_ids [N,T], topk_* [N,T-1,k], ..., hidden_states {l: [N,T,H]}."""
        k = self.top_k
        try:
            with self.fs.open(self._join(shard["file"]), "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError as e:
            raise CacheError(f"{self.path}: shard {shard['file']} is missing; run `distily verify` or rebuild") from e
        except (pa.ArrowInvalid, OSError) as e:
            raise CacheError(f"{self.path}: shard {shard['file']} is corrupt ({e}); rebuild it by rerunning the capture") from e
        n = table.num_rows
        col = lambda name: table.column(name).combine_chunks().flatten().to_numpy()  # noqa: E731
        input_ids = col("input_ids").reshape(n, -1)
        t = input_ids.shape[1]
        out = {
            "seq_index": table.column("seq_index").to_numpy(),
            "input_ids": input_ids,
            "topk_ids": col("topk_ids").reshape(n, t - 1, k),
            "topk_logprobs": col("topk_logprobs").reshape(n, t - 1, k),
            "target_logprob": col("target_logprob").reshape(n, t - 1),
            "tail_mass": col("tail_mass").reshape(n, t - 1),
        }
        if hidden and shard.get("hidden_file"):
            out["hidden_states"] = self.read_hidden(shard)
        return out

    def read_hidden(self, shard: dict, layers: list[int] | None = None) -> dict[int, np.ndarray]:
        from safetensors.torch import load

        with self.fs.open(self._join(shard["hidden_file"]), "rb") as f:
            raw = zstandard.ZstdDecompressor().decompress(f.read())
        tensors = load(raw)
        layers = self.hidden_layers if layers is None else layers
        return {l: tensors[schema.hidden_key(l)].float().numpy() for l in layers}

    def iter_sequences(self, hidden: bool = True) -> Iterator[dict]:
        for shard in self.shards:
            batch = self.read_shard(shard, hidden=hidden)
            for i in range(len(batch["input_ids"])):
                seq = {k: v[i] for k, v in batch.items() if k != "hidden_states"}
                if "hidden_states" in batch:
                    seq["hidden_states"] = {l: h[i] for l, h in batch["hidden_states"].items()}
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
                if not file_schema.equals(schema.SCHEMA, check_metadata=False):
                    problems.append(f"{shard['file']}: schema differs from pipeline/schema.py")
                batch = self.read_shard(shard, hidden=True)
                if len(batch["input_ids"]) != shard["rows"]:
                    problems.append(f"{shard['file']}: {len(batch['input_ids'])} rows, manifest says {shard['rows']}")
                for l, h in batch.get("hidden_states", {}).items():
                    if h.shape[:2] != batch["input_ids"].shape:
                        problems.append(f"{shard['hidden_file']}: layer {l} has shape {h.shape}")
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


def merge_manifests(out: str, parts_dirs: list[str]) -> dict:
    """Join array-job outputs: part manifests in `out` (and shard files from `parts_dirs`) -> manifest.json."""
    out_path = Path(out)
    dirs = [out_path, *[Path(d) for d in parts_dirs]]
    part_files = [p for d in dirs for p in sorted(d.glob("manifest.part-*.json"))]
    if not part_files:
        raise CacheError(f"no manifest.part-*.json in {', '.join(map(str, dirs))}: nothing to merge")
    parts = []
    for pf in part_files:
        part = read_json(pf)
        if pf.parent != out_path:  # bring the shard files of jobs that wrote elsewhere
            for name in ("tokenizer", schema.TEACHER_CONFIG):
                src = pf.parent / name
                if src.exists() and not (out_path / name).exists():
                    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, out_path / name)
            for shard in part["shards"]:
                for key in ("file", "hidden_file"):
                    if shard.get(key):
                        shutil.copyfile(pf.parent / shard[key], out_path / shard[key])
        parts.append(part)
    merged = merge(parts)
    for shard in merged["shards"]:
        problem = verify_shard_files(out_path, shard)
        if problem:
            raise CacheError(f"merge: {problem}")
    atomic_write_json(out_path / schema.MANIFEST, merged)
    return merged
