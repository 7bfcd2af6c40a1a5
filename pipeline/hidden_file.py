"""The hidden-state file of a cache shard (layout in pipeline/schema.py): hidden states and Q/K/V as safetensors
tensors in a stored dtype; from format 3 each tensor's rows are separate zstd frames, so that a reader fetches and
decompresses only the rows it wants.

Writing: encode_tensors (each tensor's stored form), then save_row_frames (format 3) or save_tensors (the whole
file, which versions 1 and 2 compress as one frame). Reading: RowFrames (format 3) and WholeFile (older), both
HiddenFiles whose decode(key, rows) gives float32.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import zstandard

from . import schema

if TYPE_CHECKING:
    import torch


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


def decode_tensor(tensors: dict, key: str) -> "torch.Tensor":
    import torch

    return torch.from_numpy(decode_stored(lambda k: raw_view(tensors[k]), key, tensors))


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
