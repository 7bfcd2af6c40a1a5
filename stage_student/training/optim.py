"""The optimizer and the learning-rate schedule of `train-student`.

The 8-bit optimizers come from bitsandbytes (adamw8bit, paged_adamw8bit, lion8bit) or torchao (ao_adamw8bit, whose
state FSDP can shard); adamw is torch's. The schedule: linear warm-up from lr/warmup_steps at the first step (never a
step at lr 0), then cosine, linear or constant to --max-steps.
"""
from __future__ import annotations

import logging
import math
import warnings

import torch

from pipeline.config import TrainConfig
from pipeline.errors import DistilyError

OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion8bit", "ao_adamw8bit", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "ao_adamw8bit":  # torchao's: its 8-bit state works on FSDP's DTensor shards
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")  # its compiled step, harmless
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    # Before the import, which is when it warns: on CPUs with AVX512-BF16 bitsandbytes tries to fetch a 4-bit
    # inference GEMM from the hub's `kernels` package ("Failed to load CPU gemm_4bit_forward ..."); its 8-bit
    # optimizers, all distily uses, never call that kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit, "lion8bit": bnb.optim.Lion8bit}
    if name not in cls:
        raise DistilyError(f"--optimizer {name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    return cls[name](params, lr=lr, weight_decay=weight_decay)


def lr_lambda(cfg: TrainConfig):
    """The multiplier of --lr at each step. transformers' get_*_schedule_with_warmup would give step 0 a learning
    rate of 0 (its warm-up starts at 0/warmup_steps); this one starts at 1/warmup_steps and is otherwise theirs."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress

    return f


def make_scheduler(optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
