"""Stage two: train a student from a teacher cache (`distily train-student`). The whole loop is here.

Runs unchanged on one process or under `torchrun --nproc-per-node N` (DDP: NCCL on GPUs, gloo on CPU).
Layout of the output dir:

    run_config.json         every parameter, the student recipe and the cache manifest (written once)
    log.jsonl, tb/          metrics every --logging-steps (JSONL and TensorBoard)
    data-rank{r}.log        the cache sequences each rank trained on, a line per step
    checkpoints/step-N/     model, projectors, optimizer, scheduler, RNG, loader position
    final/                  the student as a plain HF save_pretrained dir with the tokenizer
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, DistilyError
from pipeline.manifest import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree, identity, targets_vocab
from pipeline.qkv import QKVRecorder, qkv_widths
from pipeline.resolve import resolve_model

from . import attention, chunked, cross_tokenizer, losses
from .bitnet import check_student_quant
from .data import CacheStream, auto_workers, make_loader, split_eval
from .hidden import Projectors, check_hidden_options
from .layer_map import MAPPERS, map_layers, required_teacher_layers
from .parallel import (FSDP_OPTIMIZERS, PARALLEL, full_state_dict, global_value, is_sharded, mean_over_ranks,
                       state_digest, wrap)
from .balance import BALANCES
from .step import AttnSpec, CachedTeacher, Distiller, OnlineTeacher, TeacherBatch, gradient_cosines, train_step
from .student import StudentForward, build_student, describe, student_depth

OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion8bit", "ao_adamw8bit", "adamw")
DIGEST_ENV = "DISTILY_STATE_DIGEST"  # set (tests): digest-rank{r}.log gets a sha256 of params + optimizer state per step


# ------------------------------------------------------------------------------------------- pieces


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "ao_adamw8bit":  # torchao's: its 8-bit state works on FSDP's DTensor shards
        logging.getLogger("torchao").setLevel(logging.ERROR)  # on CPU: "Failed to load ... _C_mxfp8" (CUDA kernels)
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
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress

    return f


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds (its shard under FSDP; the packed bytes of 8-bit state)."""
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def tensor_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao's 8-bit state)
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak: the CUDA allocator's, or on Linux this process's resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the CPU peak is the process's lifetime peak


def memory_mb(device: torch.device) -> tuple[float, float]:
    """(current, peak since the last reset) in MB: CUDA tensors allocated, or this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


CHECKPOINT_DONE = "trainer_state.json"


def complete_checkpoints(directory: Path) -> list[Path]:
    """checkpoints/step-N dirs whose write finished, oldest first (a partial write is never one of them)."""
    return sorted(p for p in directory.glob("step-??????") if (p / CHECKPOINT_DONE).exists() and (p / "state.pt").exists())


def cache_fingerprint(manifest: dict) -> str:
    """What a checkpoint remembers of its cache: the capture settings and every shard's checksum."""
    ident = {**identity(manifest), "shards": [(s["index"], s["sha256"], s.get("hidden_sha256")) for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_online_teacher(path: str, manifest: dict):
    """The --online-teacher reference model, after checking it speaks the cache's tokenizer and its head covers the
    cache's tokens (padding rows beyond them are cut from its logits in the loss, as the capture cut them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .student import check_head_rows, check_tokenizer

    local, _ = resolve_model(path)
    check_tokenizer(AutoTokenizer.from_pretrained(local), manifest, f"--online-teacher {path}")
    check_head_rows(AutoConfig.from_pretrained(local).vocab_size, manifest, f"--online-teacher {path}")
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def validate(cfg: TrainConfig) -> None:
    """Every name and number checked before the cache or a model is touched."""
    losses.check_loss_name(cfg.loss, cfg.tail)
    check_hidden_options(cfg.hs_loss, cfg.hs_norm, cfg.projector)
    for flag, mapper in (("--layer-mapper", cfg.layer_mapper), ("--attn-layer-mapper", cfg.attn_layer_mapper)):
        if mapper not in MAPPERS:
            raise ConfigError(f"{flag} {mapper!r} is unknown; choose one of {', '.join(MAPPERS)}")
    attention.check_attn_options(cfg.attn_loss, cfg.attn_relation_loss, cfg.relation_weights)
    check_student_quant(cfg.student_quant)
    if cfg.int8_training and cfg.student_quant != "none":
        raise ConfigError(f"--int8-training cannot run with --student-quant {cfg.student_quant}: those decoder linears "
                          "already quantise their own forward (ternary weights, int8 activations). Drop one of the two.")
    cross_tokenizer.check_cross_options(cfg)
    if cfg.attn_loss != "none" and cfg.gradient_checkpointing:
        raise ConfigError("--attn-loss reads the student's Q/K/V from its forward, which --gradient-checkpointing "
                          "recomputes without them: drop one of the two")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.embedding_noise < 0:
        raise ConfigError(f"--embedding-noise {cfg.embedding_noise} must be >= 0 (NEFTune's alpha; 0: off)")
    if cfg.gradient_noise < 0:
        raise ConfigError(f"--gradient-noise {cfg.gradient_noise} must be >= 0 (the noise's norm over the gradient's; 0: off)")
    if cfg.gradient_noise > 0 and cfg.parallel == "fsdp":
        raise ConfigError("--gradient-noise is not implemented for --parallel fsdp (each rank holds a shard of the gradient, "
                          "and the noise would have to be drawn per shard to equal one process's): use --parallel ddp")
    if cfg.loss_balance not in BALANCES:
        raise ConfigError(f"--loss-balance {cfg.loss_balance!r} is unknown; choose one of {', '.join(BALANCES)}")
    if cfg.loss_balance != "none" and not ((cfg.hs_weight > 0 or cfg.attn_loss != "none")
                                           and (cfg.kd_weight > 0 and cfg.loss != "ce" or cfg.ce_weight > 0 or cfg.loss == "ce")):
        raise ConfigError(f"--loss-balance {cfg.loss_balance} balances an auxiliary loss (--hs-weight > 0 or --attn-loss) "
                          "against the logit loss (KD or CE): this run lacks one of the two")
    if cfg.parallel not in PARALLEL:
        raise ConfigError(f"--parallel {cfg.parallel!r} is unknown; choose one of {', '.join(PARALLEL)}")
    if cfg.parallel == "fsdp" and cfg.optimizer not in FSDP_OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer} cannot run with --parallel fsdp: bitsandbytes' optimizers do not "
                          "accept FSDP's DTensor shards (they fail with 'mixed torch.Tensor and DTensor'). Use "
                          f"--optimizer {' or '.join(FSDP_OPTIMIZERS)} (torchao's 8-bit AdamW, sharded like the weights), "
                          "or --parallel ddp.")
    if cfg.lr_schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"--lr-schedule {cfg.lr_schedule!r} is unknown; choose cosine, linear or constant")
    if cfg.temperature <= 0:
        raise ConfigError("--temperature must be > 0")
    if not 0 <= cfg.beta <= 1:
        raise ConfigError(f"--beta {cfg.beta} must be in [0, 1] (JSD's mixture weight, skew KL's alpha)")
    if cfg.loss_chunk_size < 0:
        raise ConfigError("--loss-chunk-size must be >= 0 (0: the full-logits reference loss)")
    if cfg.kd_top_k is not None and cfg.kd_top_k < 1:
        raise ConfigError("--kd-top-k must be >= 1")
    if cfg.kd_targets not in ("auto", "topk", "sampled"):
        raise ConfigError(f"--kd-targets {cfg.kd_targets!r} is unknown; choose auto, topk or sampled")
    if cfg.online_teacher and (cfg.tail != "bucket" or cfg.kd_top_k):
        raise ConfigError("--online-teacher uses the full vocabulary: --tail and --kd-top-k do not apply")
    for name in ("batch_size", "grad_accum", "max_steps", "save_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


def resolve_kd_targets(cfg: TrainConfig, cached: str, kd: bool) -> str:
    """topk or sampled: what the KD loss reads from a cache holding `cached` (schema.TARGETS). Samples with exact
    probabilities (sampled-exact) are read as samples: the reader has turned them into weights."""
    want = cfg.kd_targets
    readable = {"topk": ("topk",), "sampled": ("sampled",), "both": ("topk", "sampled"), "sampled-exact": ("sampled",)}
    if cached not in readable:
        raise DistilyError(f"the cache holds {cached!r} targets, which this version of distily cannot train from (it "
                           f"reads {', '.join(readable)}): upgrade distily, or capture again with `distily teacher-cache "
                           "--targets sampled-exact` (or topk)")
    has = readable[cached]
    if want == "auto":
        want = "sampled" if "topk" not in has else "topk"
    if want not in has:
        raise DistilyError(f"--kd-targets {want}: the cache holds {cached} targets only. Use --kd-targets {has[0]}, or "
                           f"capture with `distily teacher-cache --targets {want}` (or both).")
    if want == "sampled" and kd and not cfg.online_teacher:
        if cfg.loss not in losses.SAMPLED_LOSSES:
            raise DistilyError(f"--loss {cfg.loss} is not defined on sampled targets (this cache: {cached}), whose estimate "
                               "is unbiased only for losses linear in the teacher's distribution: use --loss "
                               f"{' or '.join(losses.SAMPLED_LOSSES)}" + (", or --kd-targets topk" if cached == "both" else
                               ", or capture with `distily teacher-cache --targets topk`"))
        if cfg.temperature != 1.0 or cfg.kd_top_k:
            raise DistilyError("--temperature and --kd-top-k apply to top-k targets; sampled targets are drawn from the "
                               "teacher's distribution (set the draw temperature with teacher-cache --sample-temperature)")
    return want


def check_draws_per_epoch(cfg: TrainConfig, capture: dict) -> None:
    """--draws-per-epoch needs a sampled-exact cache drawn at t = 1, and fewer draws than it holds."""
    if not cfg.draws_per_epoch:
        return
    if capture.get("targets") != "sampled-exact" or float(capture.get("sample_temperature", 1.0)) != 1.0:
        raise DistilyError(f"--draws-per-epoch takes a subset of a sampled-exact cache's draws (at --sample-temperature 1); "
                           f"this cache holds {capture.get('targets', 'topk')} targets")
    if not 1 <= cfg.draws_per_epoch < int(capture["samples"]):
        raise DistilyError(f"--draws-per-epoch {cfg.draws_per_epoch} must be between 1 and the cache's {capture['samples']} "
                           "draws less one (0: every draw, every epoch)")


@contextmanager
def seeded(seed: int):
    """Draw initial weights from `seed`, leaving the process's RNG stream as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------ the loop


class Trainer:
    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg = cfg
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if cfg.loss_balance != "none" and self.world > 1:
            raise ConfigError(f"--loss-balance {cfg.loss_balance} runs on one process: its per-loss gradients bypass "
                              "DDP/FSDP's gradient reduction. Use --loss-balance none under torchrun.")
        self.out = Path(cfg.output)
        self.reader = CacheReader(cfg.cache)
        manifest = self.reader.manifest
        if not manifest.get("complete", True) or not manifest["shards"]:
            raise DistilyError(f"the cache {cfg.cache} is empty or unfinished; rerun `distily teacher-cache` to complete it")
        self.reader.check_files()
        self.manifest = manifest
        self.kd = cfg.loss != "ce" and cfg.kd_weight > 0
        self.kd_targets = resolve_kd_targets(cfg, self.reader.targets, self.kd)
        check_draws_per_epoch(cfg, manifest["capture"])
        if self.kd_targets == "topk":
            if cfg.kd_top_k and cfg.kd_top_k > self.reader.top_k:
                raise DistilyError(f"--kd-top-k {cfg.kd_top_k} is more than the cache holds (top-{self.reader.top_k})")
            k = cfg.kd_top_k or self.reader.top_k
            if cfg.temperature != 1.0 and cfg.tail == "bucket" and not cfg.online_teacher and cfg.loss != "ce" \
                    and k < targets_vocab(manifest):
                raise DistilyError(losses.TEMPERATURE_WITH_BUCKET)
        self.gamma = cfg.cakld_gamma if cfg.cakld_gamma is not None else manifest.get("stats", {}).get("mean_target_prob", 0.5)

        self.pairs = []
        copied = cfg.hs_weight > 0 and cfg.layer_mapper == "copied"
        if cfg.hs_weight > 0 and not copied:  # checked before any weights are loaded
            self.pairs = map_layers(cfg.layer_mapper, student_depth(cfg, self.reader),
                                    manifest["teacher"]["num_hidden_layers"], cfg.layer_mapper_k)
            self.check_cached_layers()
        self.attn_pairs = []
        attn_copied = cfg.attn_loss != "none" and cfg.attn_layer_mapper == "copied"
        if cfg.attn_loss != "none" and not attn_copied:
            self.attn_pairs = map_layers(cfg.attn_layer_mapper, student_depth(cfg, self.reader),
                                         manifest["teacher"]["num_hidden_layers"], cfg.layer_mapper_k)
            self.check_cached_qkv()
        self.online = load_online_teacher(cfg.online_teacher, manifest) if cfg.online_teacher else None
        self.model, self.tokenizer, self.student_info = build_student(cfg, self.reader)
        # another tokenizer than the cache's: the mapping and a pre-flight alignment, checked before training
        self.cross = (cross_tokenizer.for_run(cfg, self.reader, self.tokenizer,
                                              getattr(self.model.config, "max_position_embeddings", None))
                      if cfg.cross_tokenizer != "none" else None)
        n_student, n_teacher = self.model.config.num_hidden_layers, manifest["teacher"]["num_hidden_layers"]
        if copied:  # known once the layers are chosen
            self.pairs = map_layers("copied", n_student, n_teacher, copied_from=self.student_info.get("teacher_layers"))
            self.check_cached_layers()
        if attn_copied:
            self.attn_pairs = map_layers("copied", n_student, n_teacher, copied_from=self.student_info.get("teacher_layers"))
            self.check_cached_qkv()
        with seeded(cfg.seed):  # the same start on every rank and in every run of this seed, whatever the student
            self.setup_attention()
            self.projectors = Projectors(
                cfg.projector, [s for s, _ in self.pairs], self.model.config.hidden_size, manifest["teacher"]["hidden_size"]
            )
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.embedding_noise > 0:  # a forward hook on the input embeddings, active in train mode only
            from transformers.integrations.neftune import activate_neftune

            activate_neftune(self.model, cfg.embedding_noise)
        self.model.to(self.device)
        self.projectors.to(self.device)
        if self.online is not None:
            self.online.to(self.device)
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.device.type == "cuda"
        self.attn_maps.to(self.device)
        self.train_pairs, self.eval_pairs = split_eval(manifest["shards"], cfg.eval_sequences)
        self.step, self.tokens_seen = 0, 0
        self.window: dict | None = None  # sums over the current logging window
        self.loss_spec = chunked.LossSpec(
            kd=cfg.loss if self.kd else None, kd_weight=cfg.kd_weight, ce_weight=1.0 if cfg.loss == "ce" else cfg.ce_weight,
            temperature=cfg.temperature, tail=cfg.tail, beta=cfg.beta, gamma=self.gamma, vocab=targets_vocab(manifest))
        # the teacher: the cache, or the online reference model behind the same call
        self.cached = CachedTeacher(self.kd_targets, self.device, cfg.kd_top_k)
        self.teacher = self.cached if self.online is None else OnlineTeacher(
            self.online, required_teacher_layers(self.pairs), self.teacher_qkv, self.bf16)
        student_forward = StudentForward(self.model, fuse=cfg.loss_chunk_size > 0)
        if cfg.compile:
            student_forward.compile()  # in place: the state dict keeps its names
        attn = AttnSpec(cfg.attn_loss, self.attn_pairs, self.relation_heads, tuple(cfg.relation_weights),
                        cfg.attn_relation_loss)
        self.distiller = Distiller(student_forward, self.projectors, self.attn_maps, hs_pairs=self.pairs,
                                   hs_weight=cfg.hs_weight, hs_loss=cfg.hs_loss, hs_norm=cfg.hs_norm, attn=attn,
                                   attn_weight=cfg.attn_weight, student_qkv=self.student_qkv,
                                   chunk_size=cfg.loss_chunk_size, bf16=self.bf16)
        self.train_module = wrap(self.distiller, self.world, self.device,
                                 find_unused=not self.distiller.uses_every_parameter(self.loss_spec), kind=cfg.parallel,
                                 bf16=self.bf16)
        self.sharded = is_sharded(self.distiller)
        # grad/cos_hs, grad/norm_logit, ...: each logging window, on rank 0 (not under FSDP: a forward there is collective)
        self.measure_gradients = bool(self.pairs or self.attn_pairs) and self.rank == 0 and not self.sharded
        # after the wrap: under FSDP the optimizer holds (and shards its state like) the DTensor parameters.
        # Order: student, projectors, direct-MHA maps (the Distiller's), as checkpoints record them.
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))

    def check_cached_layers(self) -> None:
        cfg = self.cfg
        self.check_cached(self.pairs, self.reader.hidden_layers, f"--layer-mapper {cfg.layer_mapper} needs teacher hidden "
                          "layers", "--hidden-layers", "")

    def check_cached_qkv(self) -> None:
        cfg = self.cfg
        self.check_cached(self.attn_pairs, self.reader.qkv_layers, f"--attn-loss {cfg.attn_loss} with --attn-layer-mapper "
                          f"{cfg.attn_layer_mapper} needs the teacher's Q/K/V of layers", "--qkv-layers",
                          ", or pick another --attn-layer-mapper")

    def check_cached(self, pairs, cached: list[int], what: str, capture_flag: str, advice: str) -> None:
        """The teacher layers `pairs` map to are in the cache (or come from --online-teacher), else what to capture."""
        need = required_teacher_layers(pairs)
        missing = sorted(set(need) - set(cached))
        if missing and self.cfg.online_teacher is None:
            raise DistilyError(f"{what} {need}, but the cache holds {cached or 'none'} (missing {missing}). Capture them "
                               f"with `distily teacher-cache {capture_flag} {','.join(map(str, need))}`{advice}.")

    def cached_qkv_layers(self) -> list[int]:
        """Teacher Q/K/V layers the loss reads from the cache (none with --online-teacher: from its forward)."""
        return [] if self.online is not None else required_teacher_layers(self.attn_pairs)

    def setup_attention(self) -> None:
        """The student's Q/K/V hooks, the relation heads and direct_mha's maps (none without --attn-loss)."""
        cfg = self.cfg
        self.attn_maps = torch.nn.Module()
        self.student_qkv = self.teacher_qkv = None
        self.relation_heads = 0
        if not self.attn_pairs:
            return
        s_widths = qkv_widths(self.model.config)
        t_widths = self.manifest["capture"].get("qkv") or qkv_widths(self.online.config)
        self.student_qkv = QKVRecorder(self.model, [s for s, _ in self.attn_pairs])
        if self.online is not None:
            self.teacher_qkv = QKVRecorder(self.online, required_teacher_layers(self.attn_pairs), detach=True)
        self.relation_heads = cfg.relation_heads or attention.auto_relation_heads(s_widths, t_widths)
        if cfg.attn_loss == "mha_relation":
            attention.check_relation_heads(self.relation_heads, s_widths, t_widths)
        else:
            self.attn_maps = attention.AttnMaps([s for s, _ in self.attn_pairs], s_widths, t_widths)

    # --------------------------------------------------------------------------------------- losses

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The training loss on one micro-batch, through the same module and teacher as train_step."""
        ids = batch["input_ids"].to(self.device)
        return self.train_module(ids, self.teacher(batch, ids, kd=self.kd), self.loss_spec)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out KD and CE loss on the cache's last --eval-sequences sequences (same on every rank), by the
        training forward with the eval LossSpec: forward KL on all k cached targets (whatever --kd-top-k or
        --online-teacher) plus CE, and the attention loss when one is trained."""
        if not self.eval_pairs:
            return {}
        self.model.eval()
        stream = CacheStream(self.cfg.cache, self.eval_pairs, 1, 0, 1, epochs=1, qkv_layers=self.cached_qkv_layers(),
                             collate_fn=self.cross)
        spec = chunked.LossSpec(kd="forward_kl", ce_weight=1.0, vocab=targets_vocab(self.manifest))
        totals: dict[str, float] = {}
        n = 0
        for batch in stream:
            ids = batch["input_ids"].to(self.device)
            qkv = self.teacher(batch, ids, kd=False).qkv if self.attn_pairs else {}  # online: its forward
            parts = self.distiller(ids, TeacherBatch(targets=self.cached.targets(batch), qkv=qkv), spec)
            for k, name in (("attn", "eval/attn"), ("ce", "eval/ce"), ("kd", "eval/forward_kl")):
                if k in parts:
                    totals[name] = totals.get(name, 0.0) + parts[k].item()
            n += 1
        self.model.train()
        return {k: v / n for k, v in totals.items()}

    # ---------------------------------------------------------------------------------- checkpoints

    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def run_shape(self) -> dict:
        """What a resumed run must share with the checkpoint: the loader position and the data it walks
        must mean the same, and so must the loss it optimises."""
        cfg = self.cfg
        fields = ("student_quant", "batch_size", "grad_accum", "seed", "shuffle_buffer", "eval_sequences", "loss", "temperature", "tail",
                  "kd_top_k", "beta", "kd_weight", "ce_weight", "hs_weight", "hs_loss", "hs_norm", "layer_mapper",
                  "layer_mapper_k", "projector", "online_teacher", "attn_loss", "attn_weight", "attn_relation_loss",
                  "relation_weights", "attn_layer_mapper", "cross_tokenizer", "parallel", "loss_balance",
                  "embedding_noise", "gradient_noise", "draws_per_epoch")
        return {"world_size": self.world, **{f: getattr(cfg, f) for f in fields}, "kd_targets": self.kd_targets,
                "cakld_gamma": self.gamma, **({"relation_heads": self.relation_heads} if self.attn_pairs else {}),
                "cache_fingerprint": cache_fingerprint(self.manifest)}

    def save_checkpoint(self) -> None:
        """checkpoints/step-N/: written under a temporary name, fsynced, then renamed; the last two are kept.

        DDP and one process: rank 0 writes state.pt (every rank holds the same). FSDP: every rank writes its shards
        of the weights and optimizer state through torch.distributed.checkpoint (model/, optimizer/), rank 0 the
        scheduler and RNG state (state.pt) and, last, trainer_state.json; then rank 0 renames the whole dir."""
        final = self.checkpoint_dir() / f"step-{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        window = {**self.window, "losses": self.global_sums(self.window["losses"])}  # the open logging window
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        if self.world > 1:  # every rank's own stream (NEFTune's draws differ by rank): rank r resumes from its own
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, rng)
            rng = {**rng, "per_rank": per_rank}
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            dist.barrier()  # tmp exists
            model_state, optim_state = self.sharded_state()
            dcp.save(model_state, checkpoint_id=str(tmp / "model"))
            dcp.save(optim_state, checkpoint_id=str(tmp / "optimizer"))
            blob = {"sharded": True, "scheduler": self.scheduler.state_dict(), "rng": rng}
        else:
            blob = {"model": self.model.state_dict(), "projectors": self.projectors.state_dict(),
                    "attn_maps": self.attn_maps.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": rng}
        if self.rank == 0:
            torch.save(blob, tmp / "state.pt")
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "loader_micro_batch": self.step * self.cfg.grad_accum,
                     "log_window": window, **self.run_shape()}  # the open window: its means survive a resume
            (tmp / CHECKPOINT_DONE).write_text(json.dumps(state, indent=2))  # written last: marks a whole checkpoint
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(self.checkpoint_dir())
            for old in complete_checkpoints(self.checkpoint_dir())[:-2]:  # keep the last two
                trash = old.with_name(f".trash-{old.name}")
                os.replace(old, trash)  # out of sight before deletion, so a half-deleted dir is never a candidate
                shutil.rmtree(trash)
        if self.sharded:
            dist.barrier()  # no rank runs ahead into the next checkpoint before this one is whole

    def sharded_state(self) -> tuple[dict, dict]:
        """{"model": ...}, {"optimizer": ...}: this rank's shards, keyed as torch.distributed.checkpoint expects."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.distiller, self.optimizer)
        return {"model": model_state}, {"optimizer": optim_state}

    def load_checkpoint(self) -> bool:
        done = complete_checkpoints(self.checkpoint_dir())
        if not done:
            return False
        path = done[-1]
        state = json.loads((path / CHECKPOINT_DONE).read_text())
        for key, value in self.run_shape().items():
            if key in state and state[key] != value:
                flag = "the cache (--cache)" if key == "cache_fingerprint" else f"{key}={state[key]!r}"
                raise DistilyError(
                    f"cannot resume from {path}: it was trained with {flag}, this run has "
                    f"{value!r}. Resume with the same value, or start a new --output."
                )
        blob = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        if blob.get("sharded"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            model_state, optim_state = self.sharded_state()
            dcp.load(model_state, checkpoint_id=str(path / "model"))
            dcp.load(optim_state, checkpoint_id=str(path / "optimizer"))
            set_state_dict(self.distiller, self.optimizer, model_state_dict=model_state["model"],
                           optim_state_dict=optim_state["optimizer"])
        else:
            self.model.load_state_dict(blob["model"])
            self.projectors.load_state_dict(blob["projectors"])
            self.attn_maps.load_state_dict(blob.get("attn_maps", {}))
            self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.scheduler.lr_lambdas = [lr_lambda(self.cfg)]  # a later --max-steps extends the schedule
        rng = blob["rng"]
        if len(rng.get("per_rank") or []) == self.world:  # older checkpoints hold rank 0's alone
            rng = rng["per_rank"][self.rank]
        torch.set_rng_state(rng["torch"].cpu())  # RNG states are CPU byte tensors, whatever map_location moved
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.window = state.get("log_window")
        return True

    def truncate_logs(self) -> None:
        """After a resume: drop what the killed run logged past the checkpoint, so each step appears once."""
        files = [self.out / f"data-rank{self.rank}.log"] + ([self.out / "log.jsonl"] if self.rank == 0 else [])
        for path in files:
            if not path.exists():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:
                    step = json.loads(line)["step"] if path.suffix == ".jsonl" else int(line.split()[0])
                except (ValueError, KeyError, IndexError):
                    break  # a line cut short by the kill, and anything after it
                if step <= self.step:
                    keep.append(line + "\n")
            atomic_write_bytes(path, "".join(keep).encode())

    def save_final(self) -> Path:
        final = self.out / "final"
        cpu = torch.device("cpu")
        reset_peak_memory(cpu)
        rss_before = memory_mb(cpu)[0]
        # under FSDP the shards are gathered onto rank 0 (every rank takes part) and rank 0 saves one plain model dir
        model, projectors, attn_maps = ((full_state_dict(m) for m in (self.model, self.projectors, self.attn_maps))
                                        if self.sharded else (None, self.projectors.state_dict(), self.attn_maps.state_dict()))
        if self.rank == 0:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, safe_serialization=True, state_dict=model)
            self.tokenizer.save_pretrained(tmp)
            torch.save(projectors, tmp / "projectors.pt")
            if self.cfg.attn_loss == "direct_mha":
                torch.save(attn_maps, tmp / "attn_maps.pt")
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        del model, projectors, attn_maps
        # the host memory the save took on this rank (result.json lists every rank's: bench_fsdp.py reads it)
        self.save_memory = {"rank": self.rank, "rss_before_mb": rss_before, "peak_rss_mb": memory_mb(cpu)[1]}
        return final

    # ------------------------------------------------------------------------------------------ run

    def new_window(self) -> dict:
        """Sums over one logging window; the memory peak restarts with it."""
        reset_peak_memory(self.device)
        return {"time": 0.0, "data": 0.0, "tokens": 0, "steps": 0, "losses": {}, "peak": 0.0, "cross": [0.0, 0.0, 0.0]}

    def timed_evaluate(self, window: dict | None = None) -> dict:
        """evaluate() between garbage collections, with its own time and memory peak (kept out of the window's)."""
        if window is not None:
            window["peak"] = max(window["peak"], memory_mb(self.device)[1])
        gc.collect()
        reset_peak_memory(self.device)
        t0 = time.perf_counter()
        result = self.evaluate()
        if result:
            result["eval_time_s"] = time.perf_counter() - t0
            result["eval_peak_memory_mb"] = memory_mb(self.device)[1]
        gc.collect()
        reset_peak_memory(self.device)
        return result

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def begin(self) -> bool:
        """Resume from the latest checkpoint (--resume) or start afresh; open the logs. True when resumed."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and complete_checkpoints(self.checkpoint_dir()):
            raise DistilyError(
                f"{self.out} holds checkpoints of an earlier run: pass --resume to continue it, or use a new --output"
            )
        resumed = cfg.resume and self.load_checkpoint()
        if resumed:
            self.truncate_logs()
        else:
            if cfg.resume and self.rank == 0:
                print(f"--resume: no checkpoint in {self.checkpoint_dir()}, starting from step 0")
            (self.out / f"data-rank{self.rank}.log").unlink(missing_ok=True)
            (self.out / f"digest-rank{self.rank}.log").unlink(missing_ok=True)
            if self.rank == 0:
                (self.out / "log.jsonl").unlink(missing_ok=True)
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if resumed else None)
            run_config = {"config": asdict(cfg), "student": {**self.student_info, **describe(self.model)},
                          "layer_pairs": self.pairs, "attn_layer_pairs": self.attn_pairs, "cakld_gamma": self.gamma,
                          "world_size": self.world,
                          "cache_manifest": self.manifest, **({"cross_tokenizer": self.cross.info} if self.cross else {})}
            atomic_write_json(self.out / "run_config.json", json.loads(json.dumps(run_config, default=str)))
            if self.cross is not None:  # the mapping, stored with the run; the pre-flight alignment statistics logged
                self.cross.save(self.out)
                if not resumed:
                    self.log({"step": 0, **{f"cross/{k}": v for k, v in self.cross.info["preflight"].items()}})
            selection = self.student_info.get("layer_selection")
            if selection and not resumed:
                self.log({"step": 0, "init/selection_kl": selection["kl"], "init/evenly_kl": selection["evenly_kl"],
                          "init/selection_seconds": selection["seconds"], "init/teacher_layers": selection["layers"]})
        if not resumed or self.window is None:
            self.window = self.new_window()
        return resumed

    def train_stream(self) -> CacheStream:
        """This rank's training batches from the loader position of self.step."""
        cfg = self.cfg
        cached_hidden = [] if self.online is not None else required_teacher_layers(self.pairs)  # online: from its forward
        return CacheStream(cfg.cache, self.train_pairs, cfg.batch_size, cfg.seed, cfg.shuffle_buffer, self.rank,
                           self.world, start=self.step * cfg.grad_accum, hidden_layers=cached_hidden,
                           qkv_layers=self.cached_qkv_layers(), collate_fn=self.cross,
                           draws_per_epoch=cfg.draws_per_epoch)

    def account(self, stats: dict, step_tokens: int, seconds: float, wait: float, epoch: float) -> dict:
        """Add a finished step to the logging window; at a logging step, the window's means as a log record."""
        cfg, w = self.cfg, self.window
        self.tokens_seen += step_tokens
        w["time"] += seconds
        w["data"] += wait
        w["tokens"] += step_tokens
        w["steps"] += 1
        for k, v in stats["losses"].items():  # device tensors: read once per window, below
            name = f"loss/{k}" if k != "loss" else "loss"
            w["losses"][name] = w["losses"].get(name, 0.0) + v
        if not (self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps or self.step == 1):
            return {}
        current, peak = memory_mb(self.device)
        steps = w["steps"]
        record = {
            "step": self.step, **{k: v / steps for k, v in self.global_sums(w["losses"]).items()},  # window means
            "lr": stats["lr"], "grad_norm": float(global_value(stats["grad_norm"])), "tokens_seen": self.tokens_seen,
            "tokens_per_s": w["tokens"] / w["time"], "step_time_s": w["time"] / steps,
            "data_wait_s": w["data"] / steps, "memory_mb": current, "peak_memory_mb": max(peak, w["peak"]),
            "epoch": epoch, "window_steps": steps,
        }
        if w.get("cross", [0.0])[0] > 0:  # --cross-tokenizer: what the window's text cost (this rank's batches)
            text, unspelled, dropped = w["cross"]
            record.update({"cross/unspelled_share": unspelled / text, "cross/dropped_special_tokens": int(dropped)})
            if unspelled / text > cross_tokenizer.MAX_UNSPELLED:
                raise DistilyError(f"--cross-tokenizer: the student's tokenizer re-tokenised {unspelled / text:.1%} of the "
                                   f"text of steps {self.step - steps + 1}-{self.step} inexactly (more than "
                                   f"{cross_tokenizer.MAX_UNSPELLED:.0%}; those parts get CE only). The last checkpoint "
                                   "is kept; use a student tokenizer that encodes this text losslessly")
        if self.step == 1:
            record["optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)  # this rank's (its shards)
            record["parameter_bytes"] = sum(tensor_bytes(p) for p in self.distiller.parameters())
        return record

    def global_sums(self, sums: dict) -> dict[str, float]:
        """Per-rank sums (device tensors or floats) -> their means over the ranks, as floats: the whole global batch's,
        in one all-reduce and one read from the device."""
        if not sums:
            return {}
        names = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in names])
        return dict(zip(names, mean_over_ranks(values, self.world).tolist()))

    def run(self) -> dict:
        """The loop: fetch grad_accum micro-batches, train_step, log, evaluate, checkpoint; then final/."""
        cfg = self.cfg
        self.begin()
        stream = self.train_stream()
        workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(self.device.type)
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw leaves the training RNG stream (noise) as it was,
            batches = iter(make_loader(stream, workers))  # so a resumed run draws what the uninterrupted one drew
        data_log = open(self.out / f"data-rank{self.rank}.log", "a")
        # test hook: each rank writes a digest of its parameters and optimizer state after every step
        digest = open(self.out / f"digest-rank{self.rank}.log", "a") if os.environ.get(DIGEST_ENV) else None
        self.model.train()
        last: dict = {}
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            fetched = {"seqs": [], "wait": 0.0, "seq_len": 0}

            def micro_batches():  # one at a time: what the data log and the step's accounting need, kept aside
                for _ in range(cfg.grad_accum):
                    t = time.perf_counter()
                    batch = next(batches)
                    fetched["wait"] += time.perf_counter() - t
                    fetched["seqs"] += batch["seq_index"].tolist()
                    fetched["seq_len"] = batch["input_ids"].shape[1]
                    fetched["last"] = batch
                    if "cross" in batch:  # text bytes, inexactly re-tokenised bytes, dropped special tokens
                        self.window.setdefault("cross", [0.0, 0.0, 0.0])
                        self.window["cross"] = [a + float(b) for a, b in zip(self.window["cross"], batch["cross"]["counts"])]
                    yield batch

            stats = train_step(self.train_module, self.teacher, micro_batches(), cfg.grad_accum, self.loss_spec,
                               self.optimizer, self.scheduler, cfg.max_grad_norm, self.device, cfg.loss_balance,
                               gradient_noise=cfg.gradient_noise, seed=cfg.seed, step=self.step)
            wait = fetched["wait"]
            self.step += 1
            if digest:
                digest.write(f"{self.step} {state_digest(self.distiller, self.optimizer)}\n")
                digest.flush()
            seqs = fetched["seqs"]
            data_log.write(f"{self.step} {' '.join(map(str, seqs))}\n")
            step_tokens = len(seqs) * fetched["seq_len"] * self.world
            record = self.account(stats, step_tokens, time.perf_counter() - t0, wait,
                                  epoch=self.step * cfg.grad_accum / stream.per_epoch)
            last = {"step": self.step, **{f"loss/{k}" if k != "loss" else "loss": v for k, v in stats["losses"].items()}}
            if record and self.measure_gradients:  # the logit vs auxiliary gradients, on the step's last micro-batch;
                # its forward (train mode: NEFTune draws noise) must not move this rank's RNG stream
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    record.update(gradient_cosines(self.distiller, self.teacher, fetched["last"], self.loss_spec, self.device))
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step != cfg.max_steps:  # the end evaluates below
                record = {"step": self.step, **record, **self.timed_evaluate(self.window)}
            if record:
                self.log(record)
                if self.rank == 0:
                    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
            if "window_steps" in record:
                self.window = self.new_window()
            stopping = bool(cfg.stop_after_steps) and self.step >= cfg.stop_after_steps
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps or stopping:
                data_log.flush()  # the data log holds every step the checkpoint covers
                os.fsync(data_log.fileno())
                self.save_checkpoint()
            if stopping:
                break  # a time-limited job: the checkpoint above lets --resume continue
        data_log.close()
        if digest:
            digest.close()
        return self.finish(last)

    def finish(self, last: dict) -> dict:
        """After the loop: the final eval, final/ and result.json when max_steps is reached; close the group."""
        if self.world > 1:
            dist.barrier()
        last = {**{k: v for k, v in last.items() if k == "step"},
                **self.global_sums({k: v for k, v in last.items() if k != "step"})}  # the last step's, over all ranks
        result = {**last, "tokens_seen": self.tokens_seen, "finished": self.step >= self.cfg.max_steps}
        if result["finished"]:
            result.update(self.timed_evaluate())
            result["final"] = str(self.save_final())
            saves = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(saves, self.save_memory)
            result["final_save_memory"] = saves if self.world > 1 else [self.save_memory]
            if self.rank == 0:
                atomic_write_json(self.out / "result.json", result)
                self.log({"step": self.step, **{k: v for k, v in result.items() if k.startswith("eval/")}})
        if self.rank == 0:
            self.tb.close()
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return result


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()
