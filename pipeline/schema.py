"""The teacher-cache schema: the one file that says what a cache directory holds.

A cache directory looks like this::

    manifest.json                      # see pipeline/manifest.py; written last, atomically
    tokenizer/                         # the teacher's tokenizer (save_pretrained), so students need no teacher
    teacher_config.json                # the teacher's HF config, for student recipes
    shard-00000.parquet                # tokens and teacher targets of sequences [0, N)  (zstd Parquet)
    shard-00000.hidden.safetensors.zst # hidden states of the same sequences (safetensors of zstd frames, below)
    shard-00001.parquet ...

Parquet rows are sequences. Per-position columns are flattened row-major lists so that Arrow stores them as
one contiguous buffer; the reader reshapes them with the manifest's ``top_k``. For a sequence of length T
(row t of a per-position column is about predicting input_ids[t+1] from input_ids[:t+1]):

    seq_index          int64
    input_ids          list<ID>[T]             ID = uint16 when the vocabulary fits (< 65,536), else int32
  top-k targets (--targets topk | both):
    topk_ids           list<ID>[(T-1)*k]       the teacher's top-k ids, by descending log-prob
    topk_logprobs      list<LP>[(T-1)*k]       raw (temperature 1) natural-log probs, in one of three forms
                                               (--logprob-dtype): float32; float16; or uint8 codes c with
                                               logprob = topk_lp_max[t] - c * topk_lp_step[t]  (8 bits in
                                               log space with a per-position scale: KL(stored||exact) ~1e-5)
    topk_lp_max        list<float32>[T-1]      uint8 form only: the position's top log-prob
    topk_lp_step       list<float32>[T-1]      uint8 form only: (max - min) / 255 over the position's top-k
    tail_mass          list<float32>[T-1]      1 - sum(exp(exact top-k log-probs)): probability outside the top-k
  always:
    target_logprob     list<float32>[T-1]      log-prob of the actual next token
  graded caches (--graded: a generated dataset, one sequence per row, EOS-padded; on-policy KD):
    loss_mask          list<uint8>[T-1]        1 where the generator wrote the next token (0: its prompt, padding)
    behaviour_logprob  list<float32>[T-1]      the generator's log-prob of the next token when it wrote it (0 where
                                               masked); only when the generated dataset recorded them
  sampled targets (RS-KD, --targets sampled | both): N draws per position from the teacher's distribution
  (softmax(z / t) at --sample-temperature t), reduced to the unique ids and their counts; the m_t unique
  entries of all positions are concatenated:
    sample_lengths     list<uint16>[T-1]       m_t
    sample_ids         list<ID>[sum m_t]
    sample_counts      list<uint16>[sum m_t]   draws of each id; they sum to N at every position
    sample_iw          list<float32>[sum m_t]  t != 1 only: importance weight p/q of each id
    teacher_entropy    list<float32>[T-1]      H(p) of the full teacher distribution (temperature 1)
  exact-probability samples (--targets sampled-exact, the default): N draws per position from softmax(z / t),
  reduced to the unique ids, joined with the true next token; each id with its exact teacher log-prob, no counts:
    sample_lengths     list<uint16>[T-1]       m_t
    sample_ids         list<ID>[sum m_t]       ascending per position, stored as the first id then differences
    sample_logprobs    list<uint8>[sum m_t]    log p of each id (temperature 1) as a code c: log p = -c / 16
                                               (SAMPLE_LOGPROB_STEPS per nat, down to -15.94; one rounding of at most
                                               1/32 nat, 3% of p, against a sampling noise of sqrt(p (1 - p) / N))
    sample_logq_norm   list<float32>[T-1]      t != 1 only: c, with log q_i = log p_i / t + c
    teacher_entropy    list<float16>[T-1]      systematic draws at t = 1 only: H(p) of the full teacher distribution
  The reader weights id i by p_i / pi_i, pi_i = 1 - (1 - q_i)^N iid, min(1, N q_i) systematic (1 for the true next
  token): a Horvitz-Thompson estimate of p, unbiased, exact on every token drawn almost surely (pi_i ~ 1); see
  stage_teacher/targets.py. Systematic draws at t = 1 (the default; the manifest's capture.tail_logprobs is false)
  keep no log-prob for a drawn id below 1/N: its weight is p / (N p) = 1/N whatever p is, so its code is
  SAMPLE_TAIL_CODE, and the entropy column gives the loss's value its exact H(p). The true next token and every id of
  p >= 1/N keep their codes (at most SAMPLE_TAIL_CODE - 1). This makes the log-prob column about 60% smaller.

``CacheReader`` returns the decoded values (float32 log-probs, int64-safe ids, padded [T-1, m] sample arrays and
their estimator weights)
whatever the stored form, for version-1 caches too.

The hidden-state file holds one tensor per captured layer, ``layer_{i}`` of shape [rows, T, H], in row order of
the Parquet file. With ``--hidden-dtype int8`` each token keeps its HIDDEN_INT8_OUTLIERS largest-magnitude values
exactly (``layer_{i}_outlier_idx`` int16 and ``layer_{i}_outlier_val`` bfloat16, [rows, T, 4]: LLM residual streams
carry a few huge channels) and the rest as int8 codes with a per-token absmax scale (``layer_{i}_scale`` [rows, T]
float32, value = code * scale). Layer i follows HF ``output_hidden_states``: 0 = embeddings, L = after the final norm.

With ``--qkv-layers`` the same file also holds, for each listed decoder layer l (1 = the first layer, L = the
last), the outputs of its attention's query, key and value projections: ``q_{l}`` [rows, T, d_q] and ``k_{l}``,
``v_{l}`` [rows, T, d_kv], taken before rotary embeddings (and before any q/k norm), the heads concatenated in the
model's order (d_q = heads x head_dim, d_kv = key-value heads x head_dim: grouped-query widths as the model has
them), stored like the hidden states (``--hidden-dtype``). The manifest's ``capture.qkv`` gives the widths.

The hidden-state file (version 3) is a safetensors file whose tensors are zstd frames, one per row: tensor
``layer_{i}`` holds the N frames of the stored ``layer_{i}`` one after the other (uint8), and the header's
metadata key ROW_FRAMES_KEY holds, per tensor, its stored dtype (a safetensors code: BF16, F16, F32, I8, I16),
its shape [N, T, ...] and the N + 1 offsets of its frames. A reader fetches one tensor's rows (one range read
of the file) and decompresses only them. Versions 1 and 2 zstd-compress the whole safetensors file as one frame.

Version history: 1 = int32 ids, float32 log-probs, top-k only; 2 = narrow ids, quantised log-probs, sampled
targets, int8 hidden states; 3 = the hidden-state file as row frames (the Parquet shards are those of 2). A cache
without hidden states or Q/K/V is written as version 2 (format_version()): nothing in it changed, so its
identity stays that of caches written before. Readers read every version in READABLE_VERSIONS.
"""
from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ROW_FRAMES_VERSION = 3  # from this version on the hidden-state file is row frames
ROW_FRAMES_KEY = "distily_row_frames"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TEACHER_CONFIG = "teacher_config.json"
PARQUET_COMPRESSION = "zstd"
ZSTD_LEVEL = 3

TARGETS = ("sampled-exact", "topk", "sampled", "both")
SAMPLINGS = ("iid", "systematic")  # --sampling: how a sampled kind's draws are made (a manifest without it: iid)


def sampling_of(capture: dict) -> str:
    """A manifest's capture.sampling; caches written before --sampling existed (and top-k caches) drew iid."""
    return capture.get("sampling", SAMPLINGS[0])


def tail_logprobs_of(capture: dict) -> bool:
    """Whether a sampled-exact cache stores the log-prob of every drawn id (caches written before the tail rule: yes)."""
    return capture.get("tail_logprobs", True)


def can_drop_tail_logprobs(targets: str, sampling: str, temperature: float) -> bool:
    """Only sampled-exact with systematic draws at t = 1 weighs every drawn id below 1/N by 1/N alone, whatever its
    log-prob: only there does the capture drop those log-probs (unless --tail-logprobs)."""
    return targets == "sampled-exact" and sampling == "systematic" and temperature == 1.0


DEFAULT_TARGETS = "topk"  # what a manifest without a "targets" entry (version 1) holds
LOGPROB_DTYPES = ("uint8", "float16", "float32")
HIDDEN_DTYPES = ("float32", "float16", "bfloat16", "int8")
# sampled-exact's list columns are written with Parquet's BYTE_STREAM_SPLIT encoding (each byte of the values in
# its own stream before zstd; Parquet holds uint8 and uint16 as 4-byte INT32, whose zero bytes then compress
# away): the ids 23% and the log-prob codes 29% fewer bytes than plain on the embedded teacher's draws. Any
# Parquet reader decodes it.
BYTE_STREAM_SPLIT = ("input_ids", "target_logprob", "sample_lengths", "sample_ids", "sample_logprobs", "teacher_entropy")
SAMPLE_LOGPROB_STEPS = 16  # sampled-exact: log p stored as uint8 c = round(-16 log p), log p = -c / 16
SAMPLE_TAIL_CODE = 255  # sampled-exact without tail log-probs: a drawn id below 1/N, weight 1/N, log-prob not stored
HIDDEN_INT8_OUTLIERS = 4  # int8 hidden states: each token's 4 largest-magnitude values are kept in bfloat16

SCHEMA_V1 = pa.schema(
    [
        ("seq_index", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float32())),
        ("target_logprob", pa.list_(pa.float32())),
        ("tail_mass", pa.list_(pa.float32())),
    ]
)


def id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65536 else pa.int32()


def parquet_schema(manifest: dict) -> pa.Schema:
    """The Parquet schema of a cache's shards, from its manifest (version 1 caches: SCHEMA_V1)."""
    if manifest.get("format_version", 1) == 1:
        return SCHEMA_V1
    cap = manifest["capture"]
    ids = id_type(manifest["teacher"]["vocab_size"])
    fields = [("seq_index", pa.int64()), ("input_ids", pa.list_(ids))]
    if cap["targets"] in ("topk", "both"):
        lp = {"uint8": pa.uint8(), "float16": pa.float16(), "float32": pa.float32()}[cap["logprob_dtype"]]
        fields += [("topk_ids", pa.list_(ids)), ("topk_logprobs", pa.list_(lp))]
        if cap["logprob_dtype"] == "uint8":
            fields += [("topk_lp_max", pa.list_(pa.float32())), ("topk_lp_step", pa.list_(pa.float32()))]
        fields += [("tail_mass", pa.list_(pa.float32()))]
    fields += [("target_logprob", pa.list_(pa.float32()))]
    if cap.get("graded"):  # --graded: on-policy data (pipeline/resolve.py graded_rows)
        fields += [("loss_mask", pa.list_(pa.uint8()))]
        fields += [("behaviour_logprob", pa.list_(pa.float32()))] if cap["behaviour_logprobs"] else []
    if cap["targets"] in ("sampled", "both", "sampled-exact"):
        fields += [("sample_lengths", pa.list_(pa.uint16())), ("sample_ids", pa.list_(ids))]
        tempered = cap["sample_temperature"] != 1.0
        if cap["targets"] == "sampled-exact":
            fields += [("sample_logprobs", pa.list_(pa.uint8()))]
            fields += [("sample_logq_norm", pa.list_(pa.float32()))] if tempered else []
            fields += [] if tail_logprobs_of(cap) else [("teacher_entropy", pa.list_(pa.float16()))]
        else:
            fields += [("sample_counts", pa.list_(pa.uint16()))]
            fields += [("sample_iw", pa.list_(pa.float32()))] if tempered else []
            fields += [("teacher_entropy", pa.list_(pa.float32()))]
    return pa.schema(fields)


def format_version(hidden_layers, qkv_layers) -> int:
    """The version a new cache is written in: FORMAT_VERSION when it has a hidden-state file, else 2."""
    return FORMAT_VERSION if hidden_layers or qkv_layers else 2


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def hidden_name(index: int) -> str:
    return f"shard-{index:05d}.hidden.safetensors.zst"


def hidden_key(layer: int) -> str:
    return f"layer_{layer}"


def qkv_key(kind: str, layer: int) -> str:
    """``q_{l}``, ``k_{l}`` or ``v_{l}``: a projection of decoder layer l (1-based) in the hidden-state file."""
    return f"{kind}_{layer}"


QKV = ("q", "k", "v")


def part_manifest_name(shard_index: int, num_shards: int) -> str:
    """Manifest of one array job (``--num-shards N --shard-index I``); merged by ``merge-manifests``."""
    return f"manifest.part-{shard_index:05d}-of-{num_shards:05d}.json"
