"""Writing teacher-cache shards (the layout is in pipeline/schema.py; pipeline/cache.py reads them back).

write_shard turns one shard's teacher outputs into its Parquet file (the per-position targets) and, with hidden
layers or Q/K/V captured, its hidden-state file; merge_manifests joins the part manifests of array jobs.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from . import schema
from .cache import verify_shard_files
from .errors import CacheError
from .hidden_file import encode_tensors, save_row_frames, save_tensors
from .manifest import atomic_write_bytes, atomic_write_json, merge, read_manifest

if TYPE_CHECKING:
    import torch

RAGGED = ("sample_ids", "sample_counts", "sample_iw", "sample_logprobs")  # columns of sum(m_t) entries per row


def write_shard(
    cache_dir: str | os.PathLike,
    index: int,
    manifest: dict,  # the cache's manifest: format version, capture settings (targets, dtypes), vocab size
    seq_index: np.ndarray,  # [N]
    input_ids: np.ndarray,  # [N, T]
    targets: dict,  # stage_teacher/targets.py: target_logprob [N, T-1], topk_* [N, T-1, k], sample_* [N, T-1, m]
    hidden: dict[int, "torch.Tensor"] | None = None,  # {layer: [N, T, H]}
    qkv: dict[int, dict[str, "torch.Tensor"]] | None = None,  # {layer: {"q": [N, T, d_q], "k"/"v": [N, T, d_kv]}}
) -> dict:
    """Write one shard pair atomically (in the layout of pipeline/schema.py) and return its manifest entry."""
    n, t = input_ids.shape
    file_schema = schema.parquet_schema(manifest)
    columns = shard_columns(manifest, file_schema, seq_index, input_ids, targets)
    parquet_bytes = parquet_file(columns, n, file_schema, manifest["capture"])
    entry = shard_entry(index, columns, n, t, parquet_bytes)
    cache_dir = Path(cache_dir)
    if hidden or qkv:
        entry.update(write_tensor_file(cache_dir, index, manifest, hidden, qkv))
    # The Parquet file is renamed into place last: a shard counts as present only when both files are.
    atomic_write_bytes(cache_dir / entry["file"], parquet_bytes)
    return entry


def shard_columns(manifest: dict, file_schema: pa.Schema, seq_index: np.ndarray, input_ids: np.ndarray,
                  targets: dict) -> dict:
    """One shard's Parquet columns by name, in their stored dtypes: [N, ...] arrays, or flat ragged sample_*."""
    id_dtype = file_schema.field("input_ids").type.value_type.to_pandas_dtype()
    columns = {"seq_index": seq_index.astype(np.int64), "input_ids": input_ids.astype(id_dtype)}
    if "topk_ids" in file_schema.names:
        columns.update(topk_columns(targets, id_dtype, manifest["capture"]["logprob_dtype"]))
    columns["target_logprob"] = targets["target_logprob"].astype(np.float32)
    if "loss_mask" in file_schema.names:
        columns["loss_mask"] = targets["loss_mask"].astype(np.uint8)
    if "behaviour_logprob" in file_schema.names:
        columns["behaviour_logprob"] = targets["behaviour_logprob"].astype(np.float32)
    if "sample_lengths" not in file_schema.names:
        return columns
    if "sample_logprobs" in file_schema.names:  # sampled kinds: ragged per-position entries (pipeline/schema.py)
        columns.update(exact_sample_columns(targets, file_schema.names, id_dtype, manifest["capture"], input_ids[:, 1:]))
    else:
        columns.update(rskd_sample_columns(targets, file_schema.names, id_dtype))
    return columns


def topk_columns(targets: dict, id_dtype, logprob_dtype: str) -> dict:
    """topk_ids, the top-k log-probs in their stored form (floored at LOGPROB_FLOOR) and tail_mass."""
    lp = np.maximum(targets["topk_logprobs"].astype(np.float32), LOGPROB_FLOOR)
    return {"topk_ids": targets["topk_ids"].astype(id_dtype), **encode_logprobs(lp, logprob_dtype), "tail_mass": tail_mass(lp)}


def exact_sample_columns(targets: dict, names: list[str], id_dtype, cap: dict, next_ids: np.ndarray) -> dict:
    """sampled-exact: per-position lengths, delta-coded ids, uint8 log-prob codes (and the proposal's log-norm).
    Without tail log-probs (schema.tail_logprobs_of): a drawn id below 1/N other than the true next token gets
    SAMPLE_TAIL_CODE, every other id its code (at most SAMPLE_TAIL_CODE - 1), and H(p) is stored per position."""
    ids = targets["sample_ids"]
    valid = ids >= 0
    lengths = valid.sum(-1).astype(np.uint16)
    codes = encode_sample_logprobs(targets["sample_logprobs"])
    if not schema.tail_logprobs_of(cap):
        tail = (targets["sample_logprobs"] < -np.log(cap["samples"])) & (ids != next_ids[..., None])
        codes = np.where(tail, schema.SAMPLE_TAIL_CODE, np.minimum(codes, schema.SAMPLE_TAIL_CODE - 1)).astype(np.uint8)
    columns = {"sample_lengths": lengths, "sample_ids": delta_ids(ids[valid], lengths).astype(id_dtype),
               "sample_logprobs": codes[valid]}
    if "sample_logq_norm" in names:
        columns["sample_logq_norm"] = targets["sample_logq_norm"].astype(np.float32)
    if "teacher_entropy" in names:
        columns["teacher_entropy"] = targets["teacher_entropy"].astype(np.float16)
    return columns


def rskd_sample_columns(targets: dict, names: list[str], id_dtype) -> dict:
    """sampled (RS-KD): per-position lengths, the drawn ids, their counts (and importance weights), H(p)."""
    ids = targets["sample_ids"]
    valid = ids >= 0
    columns = {"sample_lengths": valid.sum(-1).astype(np.uint16), "sample_ids": ids[valid].astype(id_dtype),
               "sample_counts": targets["sample_counts"][valid].astype(np.uint16)}
    if "sample_iw" in names:
        columns["sample_iw"] = targets["sample_iw"][valid].astype(np.float32)
    columns["teacher_entropy"] = targets["teacher_entropy"].astype(np.float32)
    return columns


def parquet_file(columns: dict, n: int, file_schema: pa.Schema, cap: dict) -> bytes:
    """The shard's Parquet file: one row per sequence, the schema's columns, compressed as pipeline/schema.py says."""
    table = pa.table({name: _column(columns[name], n, file_schema.field(name).type,
                                    ids_valid=columns.get("sample_lengths") if name in RAGGED else None)
                      for name in file_schema.names}, schema=file_schema)
    buf = io.BytesIO()
    # Parquet names a list column's values by their path, "NAME.list.element"
    split = [f"{n}.list.element" for n in schema.BYTE_STREAM_SPLIT if n in file_schema.names and cap.get("targets") == "sampled-exact"]
    pq.write_table(table, buf, compression=schema.PARQUET_COMPRESSION, compression_level=schema.ZSTD_LEVEL,
                   use_dictionary=not split,  # (byte-stream split beat a dictionary on every column, the codes' too)
                   column_encoding={n: "BYTE_STREAM_SPLIT" for n in split} or None)
    return buf.getvalue()


def shard_entry(index: int, columns: dict, n: int, t: int, parquet_bytes: bytes) -> dict:
    """The manifest entry of a shard's Parquet file: its rows, sums the stats are made of, checksum and sizes."""
    target = columns["target_logprob"].astype(np.float64)
    tail = columns.get("tail_mass")
    entry = {
        "index": index,
        "file": schema.shard_name(index),
        "rows": int(n),
        "tokens": int(n * t),
        "first_seq": int(columns["seq_index"][0]),
        "positions": int(n * (t - 1)),
        "target_prob_sum": float(np.exp(target).sum()),
        "tail_mass_sum": float(tail.astype(np.float64).sum()) if tail is not None else None,
        "sha256": hashlib.sha256(parquet_bytes).hexdigest(),
        "bytes": len(parquet_bytes),
        "column_bytes": column_bytes(parquet_bytes),
    }
    if "sample_lengths" in columns:
        entry["sample_unique_sum"] = int(columns["sample_lengths"].astype(np.int64).sum())
    return entry


def write_tensor_file(cache_dir: Path, index: int, manifest: dict, hidden: dict | None, qkv: dict | None) -> dict:
    """Write the shard's hidden-state file atomically; return its fields of the shard's manifest entry."""
    tensors = encode_tensors(hidden, manifest["capture"]["hidden_dtype"], qkv)
    if manifest.get("format_version", 1) >= schema.ROW_FRAMES_VERSION:
        hidden_bytes = save_row_frames(tensors)
    else:  # the layout of versions 1 and 2: the whole safetensors file as one zstd frame
        hidden_bytes = zstandard.ZstdCompressor(level=schema.ZSTD_LEVEL).compress(save_tensors(tensors))
    atomic_write_bytes(cache_dir / schema.hidden_name(index), hidden_bytes)
    fields = {"hidden_file": schema.hidden_name(index), "hidden_sha256": hashlib.sha256(hidden_bytes).hexdigest(),
              "hidden_bytes": len(hidden_bytes)}
    if qkv:  # Q/K/V's share of the tensor bytes before compression (`distily inspect` splits the file by it)
        nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
        qkv_keys = {k for k in nbytes if k.split("_")[0] in schema.QKV}
        fields["qkv_share"] = sum(nbytes[k] for k in qkv_keys) / sum(nbytes.values())
    return fields


LOGPROB_FLOOR = -100.0  # log-probs below this (e^-100) are stored as it: keeps the uint8 scale finite


def encode_logprobs(lp: np.ndarray, dtype: str) -> dict:
    """[N, T-1, k] float32 log-probs -> the topk_logprobs column (and, for uint8, its per-position scale)."""
    if dtype == "float32":
        return {"topk_logprobs": lp}
    if dtype == "float16":
        return {"topk_logprobs": lp.astype(np.float16)}
    hi, lo = lp.max(-1), lp.min(-1)
    step = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint((hi[..., None] - lp) / step[..., None]), 0, 255).astype(np.uint8)
    return {"topk_logprobs": codes, "topk_lp_max": hi.astype(np.float32), "topk_lp_step": step}


def delta_ids(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """sampled-exact: each position's ascending ids as its first id, then the differences (small numbers, which
    with BYTE_STREAM_SPLIT compress to about 1.5 bytes an id instead of 2)."""
    out = ids.astype(np.int64).copy()
    out[1:] -= ids[:-1]
    starts = np.cumsum(lengths.reshape(-1).astype(np.int64)) - lengths.reshape(-1)
    starts = starts[lengths.reshape(-1) > 0]
    out[starts] = ids[starts]
    return out


def encode_sample_logprobs(lp: np.ndarray) -> np.ndarray:
    """sampled-exact log-probs -> uint8 codes c = round(-SAMPLE_LOGPROB_STEPS log p), clipped to 255 (schema.py)."""
    return np.clip(np.rint(-lp.astype(np.float64) * schema.SAMPLE_LOGPROB_STEPS), 0, 255).astype(np.uint8)


def column_bytes(parquet_bytes: bytes) -> dict[str, int]:
    """Compressed bytes of each column of a Parquet file (for `distily inspect`)."""
    meta = pq.ParquetFile(io.BytesIO(parquet_bytes)).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def tail_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """Probability outside the top-k, computed in float64 and clipped at 0 (fp rounding)."""
    return np.clip(1.0 - np.exp(topk_logprobs.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)


def _column(values: np.ndarray, n: int, list_type, ids_valid=None):
    """A per-row list column: values [N, ...] (equal lengths per row), or flat ragged values with per-position
    lengths (the sample_* columns: row i holds the entries of its positions)."""
    if not pa.types.is_list(list_type):
        return pa.array(values, type=list_type)
    values = np.ascontiguousarray(values)
    if values.ndim >= 2:
        width = int(np.prod(values.shape[1:]))
        offsets = np.arange(0, n * width + 1, width, dtype=np.int32) if n else np.zeros(1, np.int32)
    else:  # ragged: sample_* values, split into rows by the lengths of each row's positions
        per_row = ids_valid.astype(np.int64).sum(-1)
        offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1), type=list_type.value_type))


def merge_manifests(out: str, parts_dirs: list[str]) -> dict:
    """Join array-job outputs: part manifests in `out` (and shard files from `parts_dirs`) -> manifest.json."""
    out_path = Path(out)
    dirs = [out_path, *[Path(d) for d in parts_dirs]]
    part_files = [p for d in dirs for p in sorted(d.glob("manifest.part-*.json"))]
    if not part_files:
        raise CacheError(f"no manifest.part-*.json in {', '.join(map(str, dirs))}: nothing to merge")
    parts = []
    for pf in part_files:
        part = read_manifest(pf)
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
