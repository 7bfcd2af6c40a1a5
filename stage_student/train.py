"""Stage two's recipe: train a student from a teacher cache (`distily train-student`), read top to bottom.

    plan = plan_run(cfg)      # plan.py: every option checked, targets, student shape, layer pairs decided
    build the student         # students/: a recipe or a model dir, teacher layers copied, BitNet or int8
    build the training        # losses/ and training/: the teacher, the Distiller, DDP/FSDP, the optimizer
    begin                     # --resume from the latest checkpoint, or start; open the logs
    loop                      # training/step.py train_step, log, evaluate, checkpoint
    finish                    # final evaluation, final/, result.json

Runs unchanged on one process or under `torchrun --nproc-per-node N` (DDP or FSDP: training/parallel.py).
Layout of the output dir:

    run_config.json         every parameter, the student recipe and the cache manifest (written once)
    log.jsonl, tb/          metrics every --logging-steps (JSONL and TensorBoard)
    data-rank{r}.log        the cache sequences each rank trained on, a line per step
    checkpoints/step-N/     model, projectors, optimizer, scheduler, RNG, loader position (training/checkpoint.py)
    final/                  the student as a plain HF save_pretrained dir with the tokenizer
    .train.lock             held by rank 0 while a run writes here: a second run into the dir is refused
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.errors import DistilyError
from pipeline.manifest import atomic_write_json, targets_vocab
from pipeline.qkv import QKVRecorder, qkv_widths
from pipeline.resolve import resolve_model
from pipeline.run_lock import run_lock
from stage_student.losses import attention, chunked
from stage_student.losses.hidden import Projectors
from stage_student.plan import plan_run, teacher_qkv_widths
from stage_student.students.build import StudentForward, build_student, describe
from stage_student.students.layer_map import required_teacher_layers
from stage_student.training import checkpoint, cross_tokenizer
from stage_student.training.data import CacheStream, auto_workers, make_loader
from stage_student.training.evaluate import timed_evaluate
from stage_student.training.metrics import (
    RunLog,
    Window,
    global_sums,
    memory_mb,
    new_window,
    optimizer_state_bytes,
    tensor_bytes,
)
from stage_student.training.optim import make_optimizer, make_scheduler
from stage_student.training.parallel import global_value, is_sharded, state_digest, wrap
from stage_student.training.step import AttnSpec, CachedTeacher, Distiller, OnlineTeacher, gradient_cosines, train_step

DIGEST_ENV = "DISTILY_STATE_DIGEST"  # set (tests): digest-rank{r}.log gets a sha256 of params + optimizer state per step


@contextmanager
def seeded(seed: int):
    """Draw initial weights from `seed`, leaving the process's RNG stream as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Trainer:
    """One `train-student` run: the plan and the parts built from it; run() trains and finishes."""

    def __init__(self, cfg: TrainConfig):
        self.plan = plan = plan_run(cfg)
        self.cfg, self.out, self.device = cfg, Path(cfg.output), plan.device
        self.build_student()
        self.build_training()
        self.step, self.tokens_seen, self.window, self.log = 0, 0, None, None

    def build_student(self) -> None:
        """The student (and the online teacher, loaded first), its attention hooks, projectors and noise."""
        plan, cfg = self.plan, self.cfg
        self.online = None
        if cfg.online_teacher:  # before the student: what its loading draws does not move the student's init
            from transformers import AutoModelForCausalLM

            self.online = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.online_teacher)[0], dtype=torch.float32).eval()
            self.online.requires_grad_(False)
        self.model, self.tokenizer, self.student_info = build_student(cfg, plan.reader, plan.student)
        # another tokenizer than the cache's: the mapping and a pre-flight alignment, checked before training
        self.cross = (cross_tokenizer.for_run(cfg, plan.reader, self.tokenizer,
                                              getattr(self.model.config, "max_position_embeddings", None))
                      if cfg.cross_tokenizer != "none" else None)
        with seeded(cfg.seed):  # the same start on every rank and in every run of this seed, whatever the student
            self.setup_attention()
            self.projectors = Projectors(cfg.projector, [s for s, _ in plan.pairs], self.model.config.hidden_size,
                                         plan.manifest["teacher"]["hidden_size"])
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if cfg.embedding_noise > 0:  # a forward hook on the input embeddings, active in train mode only
            from transformers.integrations.neftune import activate_neftune

            activate_neftune(self.model, cfg.embedding_noise)
        for module in (self.model, self.projectors, self.online, self.attn_maps):
            if module is not None:
                module.to(self.device)

    def setup_attention(self) -> None:
        """The student's Q/K/V hooks and direct_mha's maps (none without --attn-loss)."""
        plan = self.plan
        self.attn_maps, self.student_qkv, self.teacher_qkv = torch.nn.Module(), None, None
        if not plan.attn_pairs:
            return
        self.student_qkv = QKVRecorder(self.model, [s for s, _ in plan.attn_pairs])
        if self.online is not None:
            self.teacher_qkv = QKVRecorder(self.online, required_teacher_layers(plan.attn_pairs), detach=True)
        if self.cfg.attn_loss == "direct_mha":
            self.attn_maps = attention.AttnMaps([s for s, _ in plan.attn_pairs], qkv_widths(self.model.config),
                                                teacher_qkv_widths(self.cfg, plan.manifest))

    def build_training(self) -> None:
        """The loss, the teacher (the cache or the online model behind one call), the Distiller and its wrap, the
        optimizer and schedule."""
        plan, cfg = self.plan, self.cfg
        self.loss_spec = chunked.LossSpec(
            kd=cfg.loss if plan.kd else None, kd_weight=cfg.kd_weight, ce_weight=1.0 if cfg.loss == "ce" else cfg.ce_weight,
            temperature=cfg.temperature, tail=cfg.tail, beta=cfg.beta, gamma=plan.gamma, vocab=targets_vocab(plan.manifest))
        self.cached = CachedTeacher(plan.kd_targets, self.device, cfg.kd_top_k)
        self.teacher = self.cached if self.online is None else OnlineTeacher(
            self.online, required_teacher_layers(plan.pairs), self.teacher_qkv, plan.bf16)
        student_forward = StudentForward(self.model, fuse=cfg.loss_chunk_size > 0)
        if cfg.compile:
            student_forward.compile()  # in place: the state dict keeps its names
        attn = AttnSpec(cfg.attn_loss, plan.attn_pairs, plan.relation_heads, tuple(cfg.relation_weights), cfg.attn_relation_loss)
        self.distiller = Distiller(student_forward, self.projectors, self.attn_maps, hs_pairs=plan.pairs,
                                   hs_weight=cfg.hs_weight, hs_loss=cfg.hs_loss, hs_norm=cfg.hs_norm, attn=attn,
                                   attn_weight=cfg.attn_weight, student_qkv=self.student_qkv,
                                   chunk_size=cfg.loss_chunk_size, bf16=plan.bf16)
        self.train_module = wrap(self.distiller, plan.world, self.device, kind=cfg.parallel, bf16=plan.bf16,
                                 find_unused=not self.distiller.uses_every_parameter(self.loss_spec))
        self.sharded = is_sharded(self.distiller)
        # grad/cos_hs, grad/norm_logit, ...: each logging window, on rank 0 (not under FSDP: a forward there is collective)
        self.measure_gradients = bool(plan.pairs or plan.attn_pairs) and plan.rank == 0 and not self.sharded
        # after the wrap: under FSDP the optimizer holds (and shards its state like) the DTensor parameters.
        # Order: student, projectors, direct-MHA maps (the Distiller's), as checkpoints record them.
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def cached_qkv_layers(self) -> list[int]:
        """Teacher Q/K/V layers the loss reads from the cache (none with --online-teacher: from its forward)."""
        return [] if self.online is not None else required_teacher_layers(self.plan.attn_pairs)

    def train_stream(self) -> CacheStream:
        """This rank's training batches from the loader position of self.step."""
        cfg, plan = self.cfg, self.plan
        cached_hidden = [] if self.online is not None else required_teacher_layers(plan.pairs)  # online: from its forward
        return CacheStream(cfg.cache, plan.train_pairs, cfg.batch_size, cfg.seed, cfg.shuffle_buffer, plan.rank,
                           plan.world, start=self.step * cfg.grad_accum, hidden_layers=cached_hidden,
                           qkv_layers=self.cached_qkv_layers(), collate_fn=self.cross,
                           draws_per_epoch=cfg.draws_per_epoch)

    def begin(self) -> bool:
        """Resume from the latest checkpoint (--resume) or start afresh; open the logs. True when resumed."""
        cfg, rank = self.cfg, self.plan.rank
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and checkpoint.complete_checkpoints(self.out / "checkpoints"):
            raise DistilyError(f"{self.out} holds checkpoints of an earlier run: pass --resume to continue it, or use a "
                               "new --output")
        state = checkpoint.load(self) if cfg.resume else None
        if state:
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.window = Window(**state["log_window"]) if state.get("log_window") else None
            checkpoint.truncate_logs(self.out, rank, self.step)
        else:
            if cfg.resume and rank == 0:
                print(f"starting from step 0 (--resume: no checkpoint in {self.out / 'checkpoints'} yet)")
            checkpoint.clear_logs(self.out, rank)
        self.log = RunLog(self.out, rank, purge_step=self.step + 1 if state else None)
        if rank == 0:
            self.write_run_config(first=not state)
        self.window = self.window or new_window(self.device)
        return bool(state)

    def write_run_config(self, first: bool) -> None:
        """run_config.json; on a first start, the pre-flight numbers (cross-tokenizer, layer selection) at step 0."""
        plan = self.plan
        run_config = {"config": asdict(self.cfg), "student": {**self.student_info, **describe(self.model)},
                      "layer_pairs": plan.pairs, "attn_layer_pairs": plan.attn_pairs, "cakld_gamma": plan.gamma,
                      "world_size": plan.world, "cache_manifest": plan.manifest,
                      **({"cross_tokenizer": self.cross.info} if self.cross else {})}
        atomic_write_json(self.out / "run_config.json", json.loads(json.dumps(run_config, default=str)))
        if self.cross is not None:  # the mapping, stored with the run; the pre-flight alignment statistics logged
            self.cross.save(self.out)
            if first:
                self.log({"step": 0, **{f"cross/{k}": v for k, v in self.cross.info["preflight"].items()}})
        selection = self.student_info.get("layer_selection")
        if selection and first:
            self.log({"step": 0, "init/selection_kl": selection["kl"], "init/evenly_kl": selection["evenly_kl"],
                      "init/selection_seconds": selection["seconds"], "init/teacher_layers": selection["layers"]})

    def run(self) -> dict:
        """The loop: fetch grad_accum micro-batches, train_step, log, evaluate, checkpoint; then final/."""
        cfg, rank = self.cfg, self.plan.rank
        self.begin()
        stream = self.train_stream()
        workers = cfg.num_workers if cfg.num_workers is not None else auto_workers(self.device.type)
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw leaves the training RNG stream (noise) as it was,
            batches = iter(make_loader(stream, workers))  # so a resumed run draws what the uninterrupted one drew
        data_log = open(self.out / f"data-rank{rank}.log", "a")
        # test hook: each rank writes a digest of its parameters and optimizer state after every step
        digest = open(self.out / f"digest-rank{rank}.log", "a") if os.environ.get(DIGEST_ENV) else None
        self.model.train()
        last: dict = {}
        while self.step < cfg.max_steps:
            last, fetched = self.one_step(batches, stream.per_epoch, data_log)
            if digest:
                digest.write(f"{self.step} {state_digest(self.distiller, self.optimizer)}\n")
                digest.flush()
            self.report(fetched)
            stopping = bool(cfg.stop_after_steps) and self.step >= cfg.stop_after_steps
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps or stopping:
                data_log.flush()  # the data log holds every step the checkpoint covers
                os.fsync(data_log.fileno())
                window = {**asdict(self.window), "losses": global_sums(self.window.losses, self.device, self.plan.world)}
                checkpoint.save(self, window)
            if stopping:
                break  # a time-limited job: the checkpoint above lets --resume continue
        data_log.close()
        if digest:
            digest.close()
        return self.finish(last)

    def one_step(self, batches, per_epoch: int, data_log) -> tuple[dict, dict]:
        """One optimizer step over grad_accum micro-batches, added to the logging window; (its losses, what it read)."""
        cfg, w = self.cfg, self.window
        t0 = time.perf_counter()
        fetched = {"seqs": [], "wait": 0.0, "seq_len": 0}

        def micro_batches():  # one at a time: what the data log and the step's accounting need, kept aside
            for _ in range(cfg.grad_accum):
                t = time.perf_counter()
                batch = next(batches)
                fetched.update(wait=fetched["wait"] + time.perf_counter() - t, seq_len=batch["input_ids"].shape[1], last=batch)
                fetched["seqs"] += batch["seq_index"].tolist()
                if "cross" in batch:  # text bytes, inexactly re-tokenised bytes, dropped special tokens
                    w.cross = [a + float(b) for a, b in zip(w.cross, batch["cross"]["counts"])]
                yield batch

        stats = train_step(self.train_module, self.teacher, micro_batches(), cfg.grad_accum, self.loss_spec,
                           self.optimizer, self.scheduler, cfg.max_grad_norm, self.device, cfg.loss_balance,
                           gradient_noise=cfg.gradient_noise, seed=cfg.seed, step=self.step)
        self.step += 1
        data_log.write(f"{self.step} {' '.join(map(str, fetched['seqs']))}\n")
        step_tokens = len(fetched["seqs"]) * fetched["seq_len"] * self.plan.world
        self.tokens_seen += step_tokens
        w.add(stats["losses"], step_tokens, time.perf_counter() - t0, fetched["wait"])
        fetched.update(stats=stats, epoch=self.step * cfg.grad_accum / per_epoch)
        return {"step": self.step, **{f"loss/{k}" if k != "loss" else "loss": v for k, v in stats["losses"].items()}}, fetched

    def report(self, fetched: dict) -> None:
        """At a logging step: the window's record (plus gradient cosines and an evaluation when due), logged and
        printed; then a new window."""
        cfg = self.cfg
        logging = self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps or self.step == 1
        record = self.window_record(fetched["stats"], fetched["epoch"]) if logging else {}
        if record and self.measure_gradients:  # the logit vs auxiliary gradients, on the step's last micro-batch;
            # its forward (train mode: NEFTune draws noise) must not move this rank's RNG stream
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                record.update(gradient_cosines(self.distiller, self.teacher, fetched["last"], self.loss_spec, self.device))
        if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step != cfg.max_steps:  # the end evaluates later
            record = {"step": self.step, **record, **timed_evaluate(self, self.window)}
        if record:
            self.log(record)
            if self.plan.rank == 0:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        if "window_steps" in record:
            self.window = new_window(self.device)

    def window_record(self, stats: dict, epoch: float) -> dict:
        """The logging window's means as a log record (and the cross-tokenizer's stop rule)."""
        w, plan = self.window, self.plan
        current, peak = memory_mb(self.device)
        record = {"step": self.step, **w.means(self.device, plan.world), "lr": stats["lr"],
                  "grad_norm": float(global_value(stats["grad_norm"])), "tokens_seen": self.tokens_seen,
                  "memory_mb": current, "peak_memory_mb": max(peak, w.peak), "epoch": epoch, "window_steps": w.steps}
        if self.cross is not None:  # --cross-tokenizer: the window's text, summed over the ranks (all decide alike)
            summed = global_sums(dict(enumerate(w.cross)), self.device, plan.world).values()
            counts = w.cross if plan.world == 1 else [v * plan.world for v in summed]
            record.update(cross_tokenizer.window_counts(counts, self.step - w.steps + 1, self.step))
        if self.step == 1:
            record["optimizer_state_bytes"] = optimizer_state_bytes(self.optimizer)  # this rank's (its shards)
            record["parameter_bytes"] = sum(tensor_bytes(p) for p in self.distiller.parameters())
        return record

    def finish(self, last: dict) -> dict:
        """After the loop: the final eval, final/ and result.json when max_steps is reached; close the group."""
        plan = self.plan
        if plan.world > 1:
            dist.barrier()
        last = {**{k: v for k, v in last.items() if k == "step"},
                **global_sums({k: v for k, v in last.items() if k != "step"}, self.device, plan.world)}  # the last step's, over all ranks
        result = {**last, "tokens_seen": self.tokens_seen, "finished": self.step >= self.cfg.max_steps}
        if result["finished"]:
            result.update(timed_evaluate(self))
            final, save_memory = checkpoint.save_final(self)
            saves = [save_memory] * plan.world
            if plan.world > 1:
                dist.all_gather_object(saves, save_memory)
            result.update(final=str(final), final_save_memory=saves)
            if plan.rank == 0:
                atomic_write_json(self.out / "result.json", result)
                self.log({"step": self.step, **{k: v for k, v in result.items() if k.startswith("eval/")}})
        self.log.close()
        if plan.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return result


def train(cfg: TrainConfig) -> dict:
    """Train (or resume, or return the result of a finished run); rank 0 holds the output dir's lock meanwhile, so
    a second run into the same --output is refused before any work (pipeline/run_lock.py)."""
    lock = (run_lock(Path(cfg.output) / ".train.lock", f"train-student into {cfg.output}")
            if os.environ.get("RANK", "0") == "0" else nullcontext())
    with lock:
        return checkpoint.finished_result(cfg) or Trainer(cfg).run()
