"""Run configuration: one dataclass per command, filled from a YAML file with CLI overrides on top.

A YAML file may hold the options of one command flat, or of several under their command names::

    teacher_cache: {top_k: 64, hidden_layers: [10, 20, 30]}
    train_student: {loss: forward_kl, max_steps: 200}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .manifest import CacheError


@dataclass
class CaptureConfig:
    output: str = "runs/cache"
    teacher: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dataset: str | None = None  # None: the embedded Lee news corpus
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    max_seq_len: int = 512
    max_tokens: int | None = None
    top_k: int = 64
    hidden_layers: list[int] = field(default_factory=list)
    hidden_dtype: str = "bfloat16"
    backend: str = "vllm"  # vllm | hf
    dtype: str = "float32"  # teacher compute dtype; float32 on CPUs without native bf16
    sequences_per_shard: int = 64
    num_shards: int = 1  # array jobs: how many
    shard_index: int = 0  # array jobs: which one this is
    vllm_max_logprobs: int = 128
    enforce_eager: bool = True
    hf_batch_size: int = 4
    seed: int = 0


@dataclass
class TrainConfig:
    cache: str = "runs/cache"
    output: str = "runs/student"
    student: str | None = None  # HF model dir/id; None: a recipe derived from the cache's teacher config
    student_layers: int | None = None
    student_config: dict = field(default_factory=dict)  # overrides for the recipe (hidden_size, ...)
    init: str = "teacher-layers"  # random | teacher-layers
    init_layers: list[int] | str = "auto"  # auto (chosen from the cache) | evenly | teacher layers to copy (0-based)
    select_sequences: int = 2  # --init-layers auto: cached sequences the candidates are scored on
    teacher: str | None = None  # weights for init teacher-layers; default: the path in the manifest
    online_teacher: str | None = None  # reference: run this teacher in the loop, full-vocabulary targets
    copy_embeddings: bool = True
    freeze_embeddings: bool = False
    loss: str = "forward_kl"
    temperature: float = 1.0
    kd_top_k: int | None = None  # use only the teacher's top N of the cached k (tail mass recomputed)
    tail: str = "bucket"  # bucket | renormalize
    loss_chunk_size: int = 1024  # positions per chunk of the fused LM head + loss; 0: full logits (the reference)
    beta: float = 0.5  # JSD beta; skew alpha
    cakld_gamma: float | None = None  # None: the teacher's mean confidence from the manifest
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    hs_weight: float = 0.0
    hs_loss: str = "mse"  # mse | cosine
    hs_norm: str = "none"  # none | layernorm | teacher_layernorm
    layer_mapper: str = "last"
    layer_mapper_k: int = 4
    projector: str = "auto"  # auto | none | linear | orthogonal
    optimizer: str = "adamw8bit"
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 100
    save_steps: int = 50
    logging_steps: int = 10
    eval_steps: int = 0
    eval_sequences: int = 16  # held-out cache sequences (the cache's last ones) for eval loss; 0: none
    seed: int = 0
    shuffle_buffer: int = 256
    num_workers: int | None = None  # DataLoader workers; None: 1 on GPUs, 0 on CPUs without a spare core
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the student's forward (inductor; CPU needs a C compiler)
    bf16: bool | None = None  # None: on when CUDA is available
    resume: bool = False
    stop_after_steps: int | None = None  # leave after this step (checkpointed), e.g. at a job's time limit


@dataclass
class EvalConfig:
    model: str = "runs/student/final"
    teacher: str | None = None
    baseline: list[str] = field(default_factory=list)  # more models for the table (e.g. a CE-only student)
    dataset: str | None = None  # None: the embedded held-out Lee text
    text_column: str = "text"
    split: str = "test"
    max_documents: int | None = None
    max_seq_len: int = 512
    stride: int = 256
    batch_size: int = 4
    tasks: list[str] = field(default_factory=lambda: ["distily_offline"])
    limit: int | None = None
    output: str = "runs/eval"
    training_log: str | None = None


SECTIONS = ("teacher_cache", "train_student", "eval")


def load(cls, yaml_path: str | None, section: str, overrides: dict):
    """Build `cls` from YAML (the section or the flat file) and non-None CLI overrides."""
    values: dict = {}
    if yaml_path:
        if not Path(yaml_path).exists():
            raise CacheError(f"--config {yaml_path}: no such file")
        data = {k.replace("-", "_"): v for k, v in (yaml.safe_load(Path(yaml_path).read_text()) or {}).items()}
        values = data[section] if isinstance(data.get(section), dict) else {k: v for k, v in data.items() if k not in SECTIONS}
        values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CacheError(f"unknown option(s) {unknown} for {section}; known: {sorted(names)}")
    return cls(**values)


def parse_int_list(text: str | list | None, keywords: tuple[str, ...] = ()) -> list[int] | str | None:
    if text is None or isinstance(text, list) or text in keywords:
        return text
    text = text.strip()
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise CacheError(f"expected a comma-separated list of integers, got {text!r}") from e
