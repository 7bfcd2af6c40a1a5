"""What a run saves: checkpoints/step-N/, written whole or not at all and read back by --resume, and final/.

    state.pt              model, projectors, attention maps, optimizer, scheduler, RNG (FSDP: scheduler and RNG)
    model/, optimizer/    FSDP only: each rank's shards, through torch.distributed.checkpoint
    trainer_state.json    step, tokens, loader position, the open logging window and the run's shape; written last

A checkpoint is written under step-N.tmp, fsynced and renamed; the last two are kept. A resumed run must have the
checkpoint's shape (run_shape): the same data order, loss and cache, else it is refused with the difference named.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.cache import CacheReader
from pipeline.errors import DistilyError
from pipeline.manifest import atomic_write_bytes, fsync_dir, fsync_tree, identity, read_json
from stage_student.training.metrics import memory_mb, reset_peak_memory
from stage_student.training.parallel import full_state_dict

DONE = "trainer_state.json"
# what a resumed run must share with its checkpoint: the loader position and the data it walks must mean the same,
# and so must the loss it optimises
SHAPE_FIELDS = ("student_quant", "batch_size", "grad_accum", "seed", "shuffle_buffer", "eval_sequences", "loss",
                "temperature", "tail", "kd_top_k", "beta", "kd_weight", "ce_weight", "hs_weight", "hs_loss", "hs_norm",
                "layer_mapper", "layer_mapper_k", "projector", "online_teacher", "attn_loss", "attn_weight",
                "attn_relation_loss", "relation_weights", "attn_layer_mapper", "cross_tokenizer", "parallel",
                "loss_balance", "embedding_noise", "gradient_noise", "draws_per_epoch")


# settings a finished run may be asked for again with other values and still be that run (see finished_result)
RUN_MECHANICS = ("output", "cache", "resume", "max_steps", "stop_after_steps", "save_steps", "logging_steps",
                 "eval_steps", "num_workers", "loss_chunk_size", "gradient_checkpointing", "compile")


def complete_checkpoints(directory: Path) -> list[Path]:
    """checkpoints/step-N dirs whose write finished, oldest first (a partial write is never one of them)."""
    return sorted(p for p in directory.glob("step-??????") if (p / DONE).exists() and (p / "state.pt").exists())


def cache_fingerprint(manifest: dict) -> str:
    """What a checkpoint remembers of its cache: the capture settings and every shard's checksum."""
    ident = {**identity(manifest), "shards": [(s["index"], s["sha256"], s.get("hidden_sha256")) for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_shape(plan) -> dict:
    """The values a checkpoint and the run resuming from it must share (see SHAPE_FIELDS)."""
    return {"world_size": plan.world, **{f: getattr(plan.cfg, f) for f in SHAPE_FIELDS}, "kd_targets": plan.kd_targets,
            "cakld_gamma": plan.gamma, **({"relation_heads": plan.relation_heads} if plan.attn_pairs else {}),
            "cache_fingerprint": cache_fingerprint(plan.manifest)}


def rng_state(world: int) -> dict:
    """This process's RNG streams; under torchrun every rank's too (rank r resumes from its own)."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    if world > 1:  # NEFTune's draws differ by rank
        per_rank = [None] * world
        dist.all_gather_object(per_rank, rng)
        rng = {**rng, "per_rank": per_rank}
    return rng


def set_rng_state(rng: dict, rank: int, world: int) -> None:
    if len(rng.get("per_rank") or []) == world:  # older checkpoints hold rank 0's alone
        rng = rng["per_rank"][rank]
    torch.set_rng_state(rng["torch"].cpu())  # RNG states are CPU byte tensors, whatever map_location moved
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def sharded_state(module, optimizer) -> tuple[dict, dict]:
    """{"model": ...}, {"optimizer": ...}: this rank's shards, keyed as torch.distributed.checkpoint expects."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    return {"model": model_state}, {"optimizer": optim_state}


# how a failed write reads where it is not an OSError: torch.save's C++ writer, safetensors' Rust one, and
# torch.distributed.checkpoint's CheckpointException (a BaseException), which carries each rank's traceback
WRITE_FAILURES = ("iostream error", "unexpected pos", "PytorchStreamWriter", "file write failed", "IoError",
                  "No space left", "Disk quota", "Errno 28", "Errno 122")


def write_failed(error: BaseException) -> bool:
    """Whether `error` is a failed write (full disk, quota, unwritable dir); anything else is raised unchanged."""
    return isinstance(error, OSError) or any(sign in str(error) for sign in WRITE_FAILURES)


def writing_error(t, what: str, error: BaseException) -> DistilyError:
    """A failed write of `what`, said with the free space and the checkpoint a --resume would start from."""
    kept = complete_checkpoints(t.out / "checkpoints")
    free = shutil.disk_usage(t.out).free / 1e9
    since = f"the last whole checkpoint, {kept[-1].name}, is kept" if kept else "no checkpoint was written before it"
    return DistilyError(f"could not write {what} in {t.out} ({type(error).__name__}: {error}); {free:.2f} GB free "
                        "there (a full disk reads as torch.save's 'iostream error' or 'unexpected pos'). The run "
                        f"stopped; {since}. Free space or fix the dir, then run the same command with --resume.")


@contextmanager
def stops_on_failed_write(t, what: str, tmp: Path):
    """A failed write in the block removes its temporary `tmp` and stops the run with the space left and the
    checkpoint kept (writing_error); any other error passes unchanged."""
    try:
        yield
    except BaseException as e:
        if not write_failed(e):
            raise
        if t.plan.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise writing_error(t, what, e) from e


def save(t, window: dict) -> None:
    """checkpoints/step-N/ of the Trainer `t` (every rank calls it). DDP and one process: rank 0 writes state.pt (every
    rank holds the same). FSDP: every rank writes its shards through torch.distributed.checkpoint, rank 0 the
    scheduler and RNG state and, last, trainer_state.json; then rank 0 renames the whole dir. A failed write stops
    the run (stops_on_failed_write)."""
    tmp = t.out / "checkpoints" / f"step-{t.step:06d}.tmp"
    with stops_on_failed_write(t, f"checkpoint {tmp.stem}", tmp):
        write_checkpoint(t, window)


def write_checkpoint(t, window: dict) -> None:
    """The writes of save()."""
    plan = t.plan
    directory = t.out / "checkpoints"
    final = directory / f"step-{t.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if plan.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rng = rng_state(plan.world)
    if t.sharded:
        import torch.distributed.checkpoint as dcp

        dist.barrier()  # tmp exists
        model_state, optim_state = sharded_state(t.distiller, t.optimizer)
        dcp.save(model_state, checkpoint_id=str(tmp / "model"))
        dcp.save(optim_state, checkpoint_id=str(tmp / "optimizer"))
        blob = {"sharded": True, "scheduler": t.scheduler.state_dict(), "rng": rng}
    else:
        blob = {"model": t.model.state_dict(), "projectors": t.projectors.state_dict(),
                "attn_maps": t.attn_maps.state_dict(), "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(), "rng": rng}
    if plan.rank == 0:
        torch.save(blob, tmp / "state.pt")
        state = {"step": t.step, "tokens_seen": t.tokens_seen, "loader_micro_batch": t.step * plan.cfg.grad_accum,
                 "log_window": window, **run_shape(plan)}
        (tmp / DONE).write_text(json.dumps(state, indent=2))  # written last: marks a whole checkpoint
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(directory)
        for old in complete_checkpoints(directory)[:-2]:  # keep the last two
            trash = old.with_name(f".trash-{old.name}")
            os.replace(old, trash)  # out of sight before deletion, so a half-deleted dir is never a candidate
            shutil.rmtree(trash)
    if t.sharded:
        dist.barrier()  # no rank runs ahead into the next checkpoint before this one is whole


def load(t) -> dict | None:
    """Restore the Trainer `t` from its latest complete checkpoint; its trainer_state.json, or None when none."""
    done = complete_checkpoints(t.out / "checkpoints")
    if not done:
        return None
    path, plan = done[-1], t.plan
    state = json.loads((path / DONE).read_text())
    for key, value in run_shape(plan).items():
        if key in state and state[key] != value:
            flag = "the cache (--cache)" if key == "cache_fingerprint" else f"{key}={state[key]!r}"
            raise DistilyError(f"cannot resume from {path}: it was trained with {flag}, this run has {value!r}. Resume "
                               "with the same value, or start a new --output.")
    blob = torch.load(path / "state.pt", map_location=plan.device, weights_only=False)
    if blob.get("sharded"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optim_state = sharded_state(t.distiller, t.optimizer)
        dcp.load(model_state, checkpoint_id=str(path / "model"))
        dcp.load(optim_state, checkpoint_id=str(path / "optimizer"))
        set_state_dict(t.distiller, t.optimizer, model_state_dict=model_state["model"],
                       optim_state_dict=optim_state["optimizer"])
    else:
        t.model.load_state_dict(blob["model"])
        t.projectors.load_state_dict(blob["projectors"])
        t.attn_maps.load_state_dict(blob.get("attn_maps", {}))
        t.optimizer.load_state_dict(blob["optimizer"])
    lambdas = t.scheduler.lr_lambdas
    t.scheduler.load_state_dict(blob["scheduler"])
    t.scheduler.lr_lambdas = lambdas  # a later --max-steps extends the schedule
    set_rng_state(blob["rng"], plan.rank, plan.world)
    return state


def finished_result(cfg) -> dict | None:
    """--resume of a run that already reached --max-steps: its result.json, and nothing to train (final/, the result
    and the logs stay as they are). None when there is something to train. A finished run asked for again with other
    settings (or another cache) is refused, before any model is built: they are not its settings."""
    out = Path(cfg.output)
    done = complete_checkpoints(out / "checkpoints")
    paths = (out / "result.json", out / "run_config.json", out / "final" / "config.json")
    if not (cfg.resume and done and all(p.exists() for p in paths)):
        return None
    result, run = read_json(paths[0]), read_json(paths[1])
    if not (result.get("finished") and result.get("step") == read_json(done[-1] / DONE)["step"] >= cfg.max_steps):
        return None
    asked = json.loads(json.dumps(asdict(cfg), default=str))
    changed = [f"{k}={v!r} (now {asked.get(k)!r})" for k, v in run["config"].items()
               if k not in RUN_MECHANICS and asked.get(k) != v]
    if cache_fingerprint(run["cache_manifest"]) != cache_fingerprint(CacheReader(cfg.cache).manifest):
        changed.append(f"the cache {run['config']['cache']} (now {cfg.cache}, with other contents)")
    if changed:
        raise DistilyError(f"{out} holds a finished run trained with {', '.join(changed)}: pass a new --output for "
                           "these settings (make demo: RUNS=another-dir), or the finished run's settings")
    if os.environ.get("RANK", "0") == "0":
        print(f"{out} finished at step {result['step']} already (--max-steps {cfg.max_steps}): nothing to train, its "
              "final/ is in place; a larger --max-steps extends the run")
    return result


def clear_logs(out: Path, rank: int) -> None:
    """Before a fresh start: drop every log of an earlier run, TensorBoard's too (a run killed before its first
    checkpoint left events that no purge step covers)."""
    for name in (f"data-rank{rank}.log", f"digest-rank{rank}.log", *(["log.jsonl"] if rank == 0 else [])):
        (out / name).unlink(missing_ok=True)
    if rank == 0:
        shutil.rmtree(out / "tb", ignore_errors=True)


def truncate_logs(out: Path, rank: int, step: int) -> None:
    """After a resume: drop what the killed run logged past the checkpoint, so each step appears once."""
    for path in [out / f"data-rank{rank}.log"] + ([out / "log.jsonl"] if rank == 0 else []):
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines():
            try:
                logged = json.loads(line)["step"] if path.suffix == ".jsonl" else int(line.split()[0])
            except (ValueError, KeyError, IndexError):
                break  # a line cut short by the kill, and anything after it
            if logged <= step:
                keep.append(line + "\n")
        atomic_write_bytes(path, "".join(keep).encode())


def save_final(t) -> tuple[Path, dict]:
    """final/: the student as a plain HF dir (FSDP: the shards gathered onto rank 0, which saves it), and the host
    memory the save took on this rank (result.json lists every rank's: bench_fsdp.py reads it). A failed write
    stops the run as save() does."""
    with stops_on_failed_write(t, "final/", t.out / "final.tmp"):
        return write_final(t)


def write_final(t) -> tuple[Path, dict]:
    final, cpu = t.out / "final", torch.device("cpu")
    reset_peak_memory(cpu)
    rss_before = memory_mb(cpu)[0]
    model, projectors, attn_maps = ((full_state_dict(m) for m in (t.model, t.projectors, t.attn_maps))
                                    if t.sharded else (None, t.projectors.state_dict(), t.attn_maps.state_dict()))
    if t.plan.rank == 0:
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t.model.save_pretrained(tmp, safe_serialization=True, state_dict=model)
        t.tokenizer.save_pretrained(tmp)
        torch.save(projectors, tmp / "projectors.pt")
        if t.cfg.attn_loss == "direct_mha":
            torch.save(attn_maps, tmp / "attn_maps.pt")
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    del model, projectors, attn_maps
    return final, {"rank": t.plan.rank, "rss_before_mb": rss_before, "peak_rss_mb": memory_mb(cpu)[1]}
