"""Held-out evaluation during and after training: the training forward on the cache's last --eval-sequences
sequences, with the eval LossSpec (forward KL on every cached target, plus CE), and its own time and memory peak.

`t` is the running Trainer (train.py): its model, teacher, Distiller and plan.
"""
from __future__ import annotations

import gc
import time

import torch

from pipeline.manifest import targets_vocab
from stage_student.losses import chunked
from stage_student.training.data import CacheStream
from stage_student.training.metrics import Window, memory_mb, reset_peak_memory
from stage_student.training.step import CachedTeacher, TeacherBatch, graded_positions


@torch.no_grad()
def evaluate(t) -> dict[str, float]:
    """Held-out KD and CE loss on the cache's last --eval-sequences sequences (same on every rank), by the
    training forward with the eval LossSpec: forward KL on all k cached targets (whatever --kd-top-k or
    --online-teacher) plus CE, and the attention loss when one is trained."""
    plan = t.plan
    if not plan.eval_pairs:
        return {}
    t.model.eval()
    stream = CacheStream(t.cfg.cache, plan.eval_pairs, 1, 0, 1, epochs=1, qkv_layers=t.cached_qkv_layers(),
                         collate_fn=t.cross)
    spec = chunked.LossSpec(kd="forward_kl", ce_weight=1.0, vocab=targets_vocab(plan.manifest))
    cached = t.cached
    if cached.kind == "token":  # --loss token_reverse_kl trains on one log-prob per token; eval reads the distributions
        cached = CachedTeacher("topk" if plan.reader.targets in ("topk", "both") else "sampled", t.device)
    totals: dict[str, float] = {}
    n = 0
    for batch in stream:
        ids = batch["input_ids"].to(t.device)
        qkv = t.teacher(batch, ids, kd=False).qkv if plan.attn_pairs else {}  # online: its forward
        teacher = TeacherBatch(targets=cached.targets(batch), qkv=qkv, positions=graded_positions(batch, t.device))
        parts = t.distiller(ids, teacher, spec)
        for k, name in (("attn", "eval/attn"), ("ce", "eval/ce"), ("kd", "eval/forward_kl")):
            if k in parts:
                totals[name] = totals.get(name, 0.0) + parts[k].item()
        n += 1
    t.model.train()
    return {k: v / n for k, v in totals.items()}


def timed_evaluate(t, window: Window | None = None) -> dict:
    """evaluate() between garbage collections, with its own time and memory peak (kept out of the window's)."""
    if window is not None:
        window.peak = max(window.peak, memory_mb(t.device)[1])
    gc.collect()
    reset_peak_memory(t.device)
    t0 = time.perf_counter()
    result = evaluate(t)
    if result:
        result.update(eval_time_s=time.perf_counter() - t0, eval_peak_memory_mb=memory_mb(t.device)[1])
    gc.collect()
    reset_peak_memory(t.device)
    return result
