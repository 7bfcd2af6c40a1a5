"""Stage-two costs, side by side in one run, on a teacher cache (default: the demo's runs/demo/cache):

  step time streaming from the cache (decoding inline, --num-workers 0, and in one DataLoader worker) vs the
  same batch again from memory, alternating step by step
  optimizer state bytes/param and peak RSS: AdamW8bit vs PagedAdamW8bit vs Lion8bit vs torch AdamW
  (each optimizer in its own process, so peak RSS is its own)

Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def trainer_for(cache: str, optimizer: str, layers: int, batch: int):
    from pipeline.config import TrainConfig
    from stage_student.train import Trainer

    cfg = TrainConfig(cache=cache, output=tempfile.mkdtemp(prefix="distily-bench-"), student_layers=layers, init_layers="evenly",
                      optimizer=optimizer, batch_size=batch, eval_sequences=0, num_workers=1, lr=1e-4)
    return Trainer(cfg)


def one_step(trainer, batch) -> None:
    ids = batch["input_ids"].to(trainer.device)
    trainer.train_module(ids, trainer.teacher(batch, ids, kd=trainer.plan.kd), trainer.loss_spec)["loss"].backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def step_times(cache: str, layers: int, batch: int, steps: int, workers: int) -> dict:
    """Steps fed by the cache loader vs steps on a batch already in memory, alternating (same noise for both)."""
    from stage_student.training.data import CacheStream, make_loader

    t = trainer_for(cache, "adamw8bit", layers, batch)
    stream = CacheStream(cache, t.plan.train_pairs, batch, 0, 256)
    loader = iter(make_loader(stream, workers))
    one_step(t, next(loader))  # warm-up (allocations, worker start)
    streamed, in_memory, wait = 0.0, 0.0, 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(loader)
        wait += time.perf_counter() - t0
        one_step(t, b)
        t1 = time.perf_counter()
        one_step(t, b)
        in_memory += time.perf_counter() - t1
        streamed += t1 - t0
    return {"num_workers": workers, "streamed_step_s": streamed / steps, "in_memory_step_s": in_memory / steps,
            "ratio": streamed / in_memory, "data_wait_per_step_s": wait / steps, "tokens_per_step": batch * b["input_ids"].shape[1]}


def optimizer_child(cache: str, optimizer: str, layers: int, batch: int) -> None:
    from stage_student.train import optimizer_state_bytes
    from stage_student.training.data import CacheStream

    t = trainer_for(cache, optimizer, layers, batch)
    batches = iter(CacheStream(cache, t.plan.train_pairs, batch, 0, 16))
    for _ in range(2):
        one_step(t, next(batches))
    params = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    print(json.dumps({"optimizer": optimizer, "params": params, "state_bytes": optimizer_state_bytes(t.optimizer),
                      "state_bytes_per_param": optimizer_state_bytes(t.optimizer) / params,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="runs/demo/cache")
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--json", default="bench-results/train.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return optimizer_child(args.cache, args.child, args.student_layers, args.batch_size)
    timing = [step_times(args.cache, args.student_layers, args.batch_size, args.steps, w) for w in (0, 1)]
    optim = []
    for name in ("adamw8bit", "paged_adamw8bit", "lion8bit", "adamw"):
        out = subprocess.run([sys.executable, __file__, "--cache", args.cache, "--student-layers", str(args.student_layers),
                              "--batch-size", str(args.batch_size), "--child", name], capture_output=True, text=True, check=True)
        optim.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"cache": args.cache, "student_layers": args.student_layers, "batch_size": args.batch_size, "steps": timing,
              "optimizers": optim}
    print("\n| measurement | value |\n|---|---|")
    for r in timing:
        print(f"| --num-workers {r['num_workers']}: step streamed / in memory (s) | {r['streamed_step_s']:.3f} / "
              f"{r['in_memory_step_s']:.3f} = {r['ratio']:.3f}; data wait {r['data_wait_per_step_s']:.4f} s |")
    print("\n| optimizer | state bytes/param | peak RSS (MB) |\n|---|---|---|")
    for o in optim:
        print(f"| {o['optimizer']} | {o['state_bytes_per_param']:.3f} | {o['peak_rss_mb']:.0f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
