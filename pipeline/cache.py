"""Reading and writing teacher-cache shards (the layout is in pipeline/schema.py).

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
                                               # teacher_entropy the matching estimate -sum w log p

    reader.read_hidden(shard, layers=[16], rows=slice(3, 4))  # {16: [1, T, H]}: reads and decodes only that
                                                               # (format 3; older files are decompressed whole)

Values come back decoded (int64 ids, float32 log-probs and hidden states) whatever the stored form and version.
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
from .manifest import (CacheError, atomic_write_bytes, atomic_write_json, merge, read_manifest, sha256_file,
                       stats_from_shards)

if TYPE_CHECKING:
    import torch

SAMPLE_KEYS = ("sample_ids", "sample_counts", "sample_weights", "sample_logprobs")  # [.., m] per-sample arrays
RAGGED = ("sample_ids", "sample_counts", "sample_iw", "sample_logprobs")  # columns of sum(m_t) entries per row

# ----------------------------------------------------------------------------------------------- write


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
    cap = manifest["capture"]
    file_schema = schema.parquet_schema(manifest)
    id_dtype = file_schema.field("input_ids").type.value_type.to_pandas_dtype()
    columns = {"seq_index": seq_index.astype(np.int64), "input_ids": input_ids.astype(id_dtype)}
    tail = None
    if "topk_ids" in file_schema.names:
        lp = np.maximum(targets["topk_logprobs"].astype(np.float32), LOGPROB_FLOOR)
        tail = tail_mass(lp)
        columns["topk_ids"] = targets["topk_ids"].astype(id_dtype)
        columns.update(encode_logprobs(lp, cap["logprob_dtype"]))
        columns["tail_mass"] = tail
    columns["target_logprob"] = targets["target_logprob"].astype(np.float32)
    if "sample_lengths" in file_schema.names:  # sampled kinds: ragged per-position entries (pipeline/schema.py)
        ids = targets["sample_ids"]
        valid = ids >= 0
        columns["sample_lengths"] = valid.sum(-1).astype(np.uint16)
        if "sample_logprobs" in file_schema.names:  # sampled-exact
            columns["sample_ids"] = delta_ids(ids[valid], columns["sample_lengths"]).astype(id_dtype)
            columns["sample_logprobs"] = encode_sample_logprobs(targets["sample_logprobs"][valid])
            if "sample_logq_norm" in file_schema.names:
                columns["sample_logq_norm"] = targets["sample_logq_norm"].astype(np.float32)
        else:  # sampled (RS-KD)
            columns["sample_ids"] = ids[valid].astype(id_dtype)
            columns["sample_counts"] = targets["sample_counts"][valid].astype(np.uint16)
            if "sample_iw" in file_schema.names:
                columns["sample_iw"] = targets["sample_iw"][valid].astype(np.float32)
            columns["teacher_entropy"] = targets["teacher_entropy"].astype(np.float32)
    table = pa.table({name: _column(columns[name], n, file_schema.field(name).type,
                                    ids_valid=columns.get("sample_lengths") if name in RAGGED else None)
                      for name in file_schema.names}, schema=file_schema)
    buf = io.BytesIO()
    # Parquet names a list column's values by their path, "NAME.list.element"
    split = [f"{n}.list.element" for n in schema.BYTE_STREAM_SPLIT if n in file_schema.names and cap.get("targets") == "sampled-exact"]
    pq.write_table(table, buf, compression=schema.PARQUET_COMPRESSION, compression_level=schema.ZSTD_LEVEL,
                   use_dictionary=not split,  # (with the split ids, plain values were smaller for every column)
                   column_encoding={n: "BYTE_STREAM_SPLIT" for n in split} or None)
    cache_dir = Path(cache_dir)
    parquet_bytes = buf.getvalue()
    target = columns["target_logprob"].astype(np.float64)
    entry = {
        "index": index,
        "file": schema.shard_name(index),
        "rows": int(n),
        "tokens": int(n * t),
        "first_seq": int(seq_index[0]),
        "positions": int(n * (t - 1)),
        "target_prob_sum": float(np.exp(target).sum()),
        "tail_mass_sum": float(tail.astype(np.float64).sum()) if tail is not None else None,
        "sha256": hashlib.sha256(parquet_bytes).hexdigest(),
        "bytes": len(parquet_bytes),
        "column_bytes": column_bytes(parquet_bytes),
    }
    if "sample_lengths" in columns:
        entry["sample_unique_sum"] = int(columns["sample_lengths"].astype(np.int64).sum())
    if hidden or qkv:
        tensors = encode_tensors(hidden, cap["hidden_dtype"], qkv)
        if manifest.get("format_version", 1) >= schema.ROW_FRAMES_VERSION:
            hidden_bytes = save_row_frames(tensors)
        else:  # the layout of versions 1 and 2: the whole safetensors file as one zstd frame
            hidden_bytes = zstandard.ZstdCompressor(level=schema.ZSTD_LEVEL).compress(save_tensors(tensors))
        atomic_write_bytes(cache_dir / schema.hidden_name(index), hidden_bytes)
        entry.update(
            hidden_file=schema.hidden_name(index),
            hidden_sha256=hashlib.sha256(hidden_bytes).hexdigest(),
            hidden_bytes=len(hidden_bytes),
        )
        if qkv:  # Q/K/V's share of the tensor bytes before compression (`distily inspect` splits the file by it)
            nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
            qkv_keys = {k for k in nbytes if k.split("_")[0] in schema.QKV}
            entry["qkv_share"] = sum(nbytes[k] for k in qkv_keys) / sum(nbytes.values())
    # The Parquet file is renamed into place last: a shard counts as present only when both files are.
    atomic_write_bytes(cache_dir / entry["file"], parquet_bytes)
    return entry


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


def undelta_ids(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The inverse of delta_ids: a running sum restarted at each position."""
    lengths = lengths.reshape(-1).astype(np.int64)
    total = np.cumsum(deltas.astype(np.int64))
    before = np.concatenate([[0], total])[np.cumsum(lengths) - lengths]
    return total - np.repeat(before, lengths)


def encode_sample_logprobs(lp: np.ndarray) -> np.ndarray:
    """sampled-exact log-probs -> uint8 codes c = round(-SAMPLE_LOGPROB_STEPS log p), clipped to 255 (schema.py)."""
    return np.clip(np.rint(-lp.astype(np.float64) * schema.SAMPLE_LOGPROB_STEPS), 0, 255).astype(np.uint8)


def decode_sample_logprobs(codes: np.ndarray) -> np.ndarray:
    return -codes.astype(np.float64) / schema.SAMPLE_LOGPROB_STEPS


def decode_logprobs(cols: dict) -> np.ndarray:
    lp = cols["topk_logprobs"]
    if "topk_lp_max" not in cols:
        return lp.astype(np.float32)
    return (cols["topk_lp_max"][..., None] - lp.astype(np.float32) * cols["topk_lp_step"][..., None]).astype(np.float32)


def encode_hidden(hidden: dict[int, "torch.Tensor"], dtype: str, qkv: dict | None = None) -> bytes:
    """{layer: [N, T, H]} (and {layer: {"q"|"k"|"v": [N, T, d]}}) -> safetensors bytes, layout in pipeline/schema.py."""
    return save_tensors(encode_tensors(hidden, dtype, qkv))


def encode_tensors(hidden: dict | None, dtype: str, qkv: dict | None = None) -> dict:
    """The hidden-state file's tensors by name, each in its stored form."""
    named = {schema.hidden_key(l): h for l, h in sorted((hidden or {}).items())}
    named.update({schema.qkv_key(kind, l): x for l, parts in sorted((qkv or {}).items()) for kind, x in parts.items()})
    tensors = {}
    for key, h in named.items():
        tensors.update(encode_tensor(key, h, dtype))
    return tensors


def save_tensors(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def save_row_frames(tensors: dict) -> bytes:
    """Stored tensors [N, ...] -> a version-3 hidden-state file: per tensor, each row one zstd frame (schema.py)."""
    from safetensors.numpy import save

    cctx = zstandard.ZstdCompressor(level=schema.ZSTD_LEVEL)
    blobs, index = {}, {}
    for key, t in tensors.items():
        raw, code = raw_view(t)
        frames = [cctx.compress(row) for row in raw.reshape(len(raw), -1)]
        index[key] = {"dtype": code, "shape": list(raw.shape), "frames": np.cumsum([0] + [len(f) for f in frames]).tolist()}
        blobs[key] = np.frombuffer(b"".join(frames), dtype=np.uint8)
    return save(blobs, metadata={schema.ROW_FRAMES_KEY: json.dumps(index)})


# A stored tensor as numpy: its elements with the same bit width (bfloat16, which numpy lacks, as uint16) and the
# safetensors code of its dtype.
SAFETENSORS_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I8": np.int8, "I16": np.int16}


def raw_view(t: "torch.Tensor") -> tuple[np.ndarray, str]:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "BF16"
    raw = t.contiguous().numpy()
    code = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items() if k != "BF16"}[raw.dtype]
    return raw, code


def as_float32(raw: np.ndarray, code: str) -> np.ndarray:
    """A stored tensor's values as a new float32 array (exact: every stored dtype fits in float32)."""
    if code == "BF16":  # bfloat16 is the top half of a float32 (numpy: 2.7x faster than torch's .float() here)
        bits = raw.astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32)
    return raw.astype(np.float32)


def decode_stored(read, key: str, keys) -> np.ndarray:
    """One tensor as float32 from its stored form; read(key) -> (raw, code) of a stored tensor (some of its rows)."""
    h = as_float32(*read(key))
    if f"{key}_scale" in keys:  # int8 codes x the per-token scale, then the exact outliers put back
        h *= as_float32(*read(f"{key}_scale"))[..., None]
        idx = read(f"{key}_outlier_idx")[0].astype(np.int64)
        np.put_along_axis(h, idx, as_float32(*read(f"{key}_outlier_val")), axis=-1)
    return h


def encode_tensor(key: str, h: "torch.Tensor", dtype: str) -> dict:
    """One [N, T, H] tensor in a stored dtype. int8: each token's few largest-magnitude values in bfloat16 with
    their channel, the rest as int8 codes with a per-token absmax scale."""
    import torch

    if dtype != "int8":
        return {key: h.to(getattr(torch, dtype)).contiguous()}
    h = h.float()
    idx = h.abs().topk(min(schema.HIDDEN_INT8_OUTLIERS, h.shape[-1]), dim=-1).indices
    rest = h.scatter(-1, idx, 0.0)
    scale = rest.abs().amax(-1).clamp_min(1e-12) / 127.0
    return {key: torch.round(rest / scale[..., None]).clamp(-127, 127).to(torch.int8).contiguous(),
            f"{key}_scale": scale.contiguous(),
            f"{key}_outlier_idx": idx.to(torch.int16).contiguous(),
            f"{key}_outlier_val": h.gather(-1, idx).to(torch.bfloat16).contiguous()}


def decode_hidden(tensors: dict, layer: int) -> "torch.Tensor":
    """One layer of a hidden-state file as float32 [N, T, H], whatever its stored dtype."""
    return decode_tensor(tensors, schema.hidden_key(layer))


def decode_tensor(tensors: dict, key: str) -> "torch.Tensor":
    import torch

    return torch.from_numpy(decode_stored(lambda k: raw_view(tensors[k]), key, tensors))


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


# ------------------------------------------------------------------------------------------------ read


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


def inclusion_probability(logq: np.ndarray, draws: int) -> np.ndarray:
    """pi = 1 - (1 - q)^draws: the chance that an id of probability q is drawn at least once in `draws` draws."""
    q = np.exp(np.minimum(logq, 0.0))
    return -np.expm1(draws * np.log1p(-np.minimum(q, 1 - 1e-16)))


def inclusion_weights(logp: np.ndarray, logq: np.ndarray, draws: int, certain: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Horvitz-Thompson weights p / pi of ids seen in `draws` draws from q (inclusion_probability); p itself where
    `certain` (the true next token, always kept), 0 where not `valid`."""
    pi = np.where(certain, 1.0, np.maximum(inclusion_probability(logq, draws), 1e-300))
    return np.where(valid, np.exp(logp) / pi, 0.0)


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
        if "topk_ids" in cols:
            k = self.top_k
            out["topk_ids"] = per_position(cols["topk_ids"].astype(np.int64), k)
            lp = {name: per_position(cols[name], *([k] if name == "topk_logprobs" else []))
                  for name in ("topk_logprobs", "topk_lp_max", "topk_lp_step") if name in cols}
            out["topk_logprobs"] = decode_logprobs(lp)
            out["tail_mass"] = per_position(cols["tail_mass"]).astype(np.float32)
        if "sample_logprobs" in cols:
            out.update(self._decode_exact_samples(cols, n, t, input_ids[:, 1:]))
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

    def _decode_exact_samples(self, cols: dict, n: int, t: int, next_ids: np.ndarray) -> dict:
        """sampled-exact columns -> padded [N, T-1, m] ids, exact log-probs and Horvitz-Thompson weights p / pi
        (pi = 1 - (1 - q)^N, 1 for the true next token), and teacher_entropy = -sum_i w_i log p_i, the matching
        estimate of H(p), so that the loss's value estimates the KL (stage_student/chunked.py sampled_chunk)."""
        padded = ragged_to_padded(cols["sample_lengths"], n, t)
        cap = self.manifest["capture"]
        ids = padded(undelta_ids(cols["sample_ids"], cols["sample_lengths"]), -1, np.int64)
        logp = padded(decode_sample_logprobs(cols["sample_logprobs"]), 0.0, np.float64)
        temperature = float(cap["sample_temperature"])
        logq = logp / temperature
        if "sample_logq_norm" in cols:
            logq = logq + cols["sample_logq_norm"].astype(np.float64).reshape(n, t - 1, 1)
        weights = inclusion_weights(logp, logq, int(cap["samples"]), ids == next_ids[..., None], ids >= 0)
        return {"sample_ids": ids, "sample_logprobs": logp.astype(np.float32), "sample_weights": weights.astype(np.float32),
                "teacher_entropy": -(weights * logp).sum(-1).astype(np.float32)}

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

    def read_qkv(self, shard: dict, layers: list[int] | None = None, rows: slice | None = None) -> dict[int, dict[str, np.ndarray]]:
        """{layer: {"q": [N, T, d_q], "k": [N, T, d_kv], "v": [N, T, d_kv]}} float32 (--qkv-layers captures)."""
        return self.read_extras(shard, [], self.qkv_layers if layers is None else layers, rows)[1]

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


def read_header(fetch) -> tuple[dict, int]:
    """A safetensors header and where its data starts; fetch(start, end) -> those bytes of the file."""
    size = int.from_bytes(fetch(0, 8), "little")
    return json.loads(fetch(8, 8 + size)), 8 + size


class HiddenFile:
    """One shard's hidden-state file, opened: `keys` are its stored tensors, read(key, rows) gives some rows of one
    in stored form, decode(key, rows) as float32."""

    keys: set[str]

    def read(self, key: str, rows: slice) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def decode(self, key: str, rows: slice) -> np.ndarray:
        return decode_stored(lambda k: self.read(k, rows), key, self.keys)


class RowFrames(HiddenFile):
    """A version-3 hidden-state file: reads the rows of one tensor with one range read and decompresses only them."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        header, self.data_start = read_header(lambda a, b: fs.cat_file(path, start=a, end=b))
        self.index = json.loads(header["__metadata__"][schema.ROW_FRAMES_KEY])
        self.begin = {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        self.keys = set(self.index)
        self.dctx = zstandard.ZstdDecompressor()

    def read(self, key: str, rows: slice) -> tuple[np.ndarray, str]:
        """Rows [start, stop) of a stored tensor: (raw [rows, ...], safetensors dtype code)."""
        info = self.index[key]
        start, stop, _ = rows.indices(info["shape"][0])
        frames = info["frames"][start : stop + 1]
        at = self.data_start + self.begin[key]
        blob = self.fs.cat_file(self.path, start=at + frames[0], end=at + frames[-1])
        view = memoryview(blob)
        parts = [self.dctx.decompress(view[a - frames[0] : b - frames[0]]) for a, b in zip(frames, frames[1:])]
        raw = np.frombuffer(parts[0] if len(parts) == 1 else b"".join(parts), dtype=SAFETENSORS_DTYPES[info["dtype"]])
        return raw.reshape(len(parts), *info["shape"][1:]), info["dtype"]


class WholeFile(HiddenFile):
    """A version-1/2 hidden-state file: the safetensors file is one zstd frame, decompressed once on opening; only
    the tensors of `names` (and their int8 parts) are kept, in their stored form."""

    def __init__(self, fs, path: str, names: list[str]):
        with fs.open(path, "rb") as f:
            blob = zstandard.ZstdDecompressor().decompress(f.read())
        header, start = read_header(lambda a, b: blob[a:b])
        self.keys = {k for k in header if k != "__metadata__"}
        wanted = {f"{n}{part}" for n in names for part in ("", "_scale", "_outlier_idx", "_outlier_val")}
        self.tensors = {}
        for k in self.keys & wanted:
            (a, b), code = header[k]["data_offsets"], header[k]["dtype"]
            raw = np.frombuffer(blob[start + a : start + b], SAFETENSORS_DTYPES[code])  # a copy: the blob is freed
            self.tensors[k] = raw.reshape(header[k]["shape"]), code

    def read(self, key: str, rows: slice) -> tuple[np.ndarray, str]:
        raw, code = self.tensors[key]
        return raw[rows], code


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
