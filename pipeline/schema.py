"""The teacher-cache schema: the one file that says what a cache directory holds.

A cache directory looks like this::

    manifest.json                      # see pipeline/manifest.py; written last, atomically
    tokenizer/                         # the teacher's tokenizer (save_pretrained), so students need no teacher
    teacher_config.json                # the teacher's HF config, for student recipes
    shard-00000.parquet                # tokens and logits of sequences [0, N)  (zstd Parquet)
    shard-00000.hidden.safetensors.zst # hidden states of the same sequences (zstd-compressed safetensors)
    shard-00001.parquet ...

Parquet rows are sequences. Per-position columns are flattened row-major lists so that Arrow stores
them as one contiguous buffer; the reader reshapes them with ``top_k`` from the manifest. For a
sequence of length T:

    seq_index       int64            global index of the packed sequence in the dataset
    input_ids       list<int32>[T]
    topk_ids        list<int32>[(T-1)*k]   row t: teacher's top-k ids for input_ids[t+1] given input_ids[:t+1]
    topk_logprobs   list<float32>[(T-1)*k] raw (temperature 1) log-probs, descending
    target_logprob  list<float32>[T-1]     log-prob of the actual next token input_ids[t+1]
    tail_mass       list<float32>[T-1]     1 - sum(exp(topk_logprobs[t])): probability outside the top-k

The hidden-state file holds one tensor per captured layer, ``layer_{i}`` of shape [rows, T, H], in row
order of the Parquet file. Layer i follows HF ``output_hidden_states``: 0 = embeddings, L = after the
final norm.
"""
from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TEACHER_CONFIG = "teacher_config.json"
PARQUET_COMPRESSION = "zstd"
ZSTD_LEVEL = 3

SCHEMA = pa.schema(
    [
        ("seq_index", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float32())),
        ("target_logprob", pa.list_(pa.float32())),
        ("tail_mass", pa.list_(pa.float32())),
    ]
)

HIDDEN_DTYPES = ("float32", "float16", "bfloat16")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def hidden_name(index: int) -> str:
    return f"shard-{index:05d}.hidden.safetensors.zst"


def hidden_key(layer: int) -> str:
    return f"layer_{layer}"


def part_manifest_name(shard_index: int, num_shards: int) -> str:
    """Manifest of one array job (``--num-shards N --shard-index I``); merged by ``merge-manifests``."""
    return f"manifest.part-{shard_index:05d}-of-{num_shards:05d}.json"
