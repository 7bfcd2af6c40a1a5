"""The cost of KD over plain CE training, side by side in one run (issue 9). Prints tables, writes JSON.

1. Step time on a teacher cache (default: the demo's runs/demo/cache, the demo's 15-layer student, batch 4):
   KD (forward KL on the cached top-k) vs CE-only steps, the same student and batches, interleaved
   KD, CE, KD, CE, ... so that machine noise hits both alike; with the full-logits reference loss
   (--loss-chunk-size 0), the fused chunked loss, and the chunked loss with --compile.
2. Peak memory of one KD step (forward, backward, optimizer) for a tiny student with Qwen's 151,936-token
   vocabulary at 4 x 1024 tokens: the reference loss vs the chunked one at several chunk sizes, each in its
   own process (peak resident set above the process's state before the step).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def trainer_for(cache: str, layers: int, batch: int, **kw):
    from pipeline.config import TrainConfig
    from stage_student.train import Trainer

    cfg = TrainConfig(cache=cache, output=tempfile.mkdtemp(prefix="distily-bench-"), student_layers=layers, init_layers="evenly",
                      batch_size=batch, eval_sequences=0, lr=1e-5, **kw)
    return Trainer(cfg)


def set_loss(trainer, loss: str) -> None:
    """Switch one trainer between KD and CE-only steps (same model, same batches)."""
    from stage_student.losses import chunked

    trainer.plan.kd = loss != "ce"
    trainer.loss_spec = chunked.LossSpec(kd=None, ce_weight=1.0) if loss == "ce" else chunked.LossSpec(kd=loss)


def one_step(trainer, batch) -> None:
    ids = batch["input_ids"].to(trainer.device)
    trainer.train_module(ids, trainer.teacher(batch, ids, kd=trainer.plan.kd), trainer.loss_spec)["loss"].backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def timed(trainer, batch) -> float:
    t0 = time.perf_counter()
    one_step(trainer, batch)
    return time.perf_counter() - t0


def kd_vs_ce(cache: str, layers: int, batch: int, steps: int, chunk: int, compile: bool) -> dict:
    from stage_student.training.data import CacheStream

    t = trainer_for(cache, layers, batch, loss_chunk_size=chunk, compile=compile)
    batches = iter(CacheStream(cache, t.plan.train_pairs, batch, 0, 16))
    data = [next(batches) for _ in range(steps + 1)]
    warm = {}
    for loss in ("forward_kl", "ce"):  # warm-up (allocations; compilation with --compile)
        set_loss(t, loss)
        t0 = time.perf_counter()
        one_step(t, data[0])
        warm[loss] = time.perf_counter() - t0
    times = {"forward_kl": [], "ce": []}
    for b in data[1:]:
        for loss in ("forward_kl", "ce"):
            set_loss(t, loss)
            times[loss].append(timed(t, b))
    kd, ce = (sorted(times[l])[len(times[l]) // 2] for l in ("forward_kl", "ce"))  # medians
    return {"loss_chunk_size": chunk, "compile": compile, "kd_step_s": kd, "ce_step_s": ce, "kd_over_ce": kd / ce,
            "first_step_s": warm, "all_s": times}


def targets_step(topk_cache: str, exact_cache: str, layers: int, batch: int, steps: int) -> dict:
    """The KD step on a sampled-exact cache against one on a top-64 cache of the same text: two students from the
    same init, their steps interleaved (top-k, exact, top-k, ...), medians."""
    from stage_student.training.data import CacheStream

    trainers = {name: trainer_for(cache, layers, batch) for name, cache in (("topk", topk_cache), ("sampled-exact", exact_cache))}
    data = {name: [b for _, b in zip(range(steps + 1), CacheStream(t.cfg.cache, t.plan.train_pairs, batch, 0, 16))]
            for name, t in trainers.items()}
    times = {name: [] for name in trainers}
    for i in range(steps + 1):
        for name, t in trainers.items():
            seconds = timed(t, data[name][i])
            if i:  # the first step of each is warm-up
                times[name].append(seconds)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    return {"topk_step_s": med["topk"], "exact_step_s": med["sampled-exact"],
            "exact_over_topk": med["sampled-exact"] / med["topk"], "all_s": times}


def memory_child(chunk: int, vocab: int, batch: int, seq: int, k: int) -> None:
    """One KD step of a tiny Llama at a large vocabulary; prints its peak RSS above the state before it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage_student.losses import chunked
    from stage_student.losses import kd as losses
    from stage_student.students.build import StudentForward
    from stage_student.training.metrics import memory_mb, reset_peak_memory

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    n = batch * (seq - 1)
    teacher = torch.randn(n, k).log_softmax(-1) - 0.1  # top-k log-probs leaving ~10% tail mass
    targets = chunked.Targets(labels=ids[:, 1:].reshape(-1), topk_ids=torch.randint(0, vocab, (n, k)), topk_logprobs=teacher,
                              tail_mass=1 - teacher.exp().sum(-1))
    forward = StudentForward(model, fuse=chunk > 0)

    def step():
        out, _ = forward(ids)
        out = out[:, :-1].reshape(-1, out.shape[-1])
        if chunk:
            w, b = forward.head()
            loss = chunked.head_losses(out, w, b, chunked.LossSpec(kd="forward_kl"), targets, chunk)["loss"]
        else:
            loss = losses.kd_loss("forward_kl", out, targets.topk_ids, targets.topk_logprobs, targets.tail_mass)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.item()

    step()  # the optimizer state and gradient buffers exist from here on
    before = memory_mb(torch.device("cpu"))[0]
    reset_peak_memory(torch.device("cpu"))
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = memory_mb(torch.device("cpu"))[1]
    print(json.dumps({"loss_chunk_size": chunk, "before_mb": before, "peak_mb": peak, "step_peak_mb": peak - before,
                      "seconds": seconds, "loss": loss}))


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="runs/demo/cache")
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--chunk-sizes", default="256,1024,4096", help="chunk sizes for the memory table")
    ap.add_argument("--no-compile", action="store_true", help="skip the --compile timing")
    ap.add_argument("--exact-cache", default=None, help="a sampled-exact cache of --cache's text: time its KD step "
                    "against --cache's top-k one, and only that")
    ap.add_argument("--json", default="bench-results/kd_step.json")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    vocab, batch, seq, k = 151_936, 4, 1024, 64
    if args.memory_child is not None:
        return memory_child(args.memory_child, vocab, batch, seq, k)
    if args.exact_cache:
        r = targets_step(args.cache, args.exact_cache, args.student_layers, args.batch_size, args.steps)
        print(f"KD step, median of {args.steps} interleaved: top-k cache {r['topk_step_s']:.2f} s, sampled-exact cache "
              f"{r['exact_step_s']:.2f} s: {r['exact_over_topk']:.3f}x")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2))
        return r

    memory = []
    for chunk in [0, *map(int, args.chunk_sizes.split(","))]:
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(chunk)], capture_output=True, text=True, check=True)
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
    steps = [kd_vs_ce(args.cache, args.student_layers, args.batch_size, args.steps, chunk, False) for chunk in (0, 1024)]
    if not args.no_compile:
        steps.append(kd_vs_ce(args.cache, args.student_layers, args.batch_size, args.steps, 1024, True))
    result = {"cache": args.cache, "student_layers": args.student_layers, "batch_size": args.batch_size, "steps": steps,
              "memory": {"vocab_size": vocab, "tokens": batch * seq, "top_k": k, "runs": memory}}
    ref = memory[0]["step_peak_mb"]
    lines = ["| loss | compile | KD step (s) | CE step (s) | KD / CE |", "|---|---|---|---|---|"]
    for r in steps:
        name = "full logits (reference)" if r["loss_chunk_size"] == 0 else f"chunked, {r['loss_chunk_size']} positions"
        lines.append(f"| {name} | {'yes' if r['compile'] else 'no'} | {r['kd_step_s']:.2f} | {r['ce_step_s']:.2f} | {r['kd_over_ce']:.3f} |")
    lines += ["", f"Peak memory of one KD step, tiny student, vocabulary {vocab:,}, {batch} x {seq} tokens:", "",
              "| loss | step peak above state (MB) | / reference | step time (s) |", "|---|---|---|---|"]
    for r in memory:
        name = "full logits (reference)" if r["loss_chunk_size"] == 0 else f"chunked, {r['loss_chunk_size']} positions"
        lines.append(f"| {name} | {r['step_peak_mb']:.0f} | {r['step_peak_mb'] / ref:.3f} | {r['seconds']:.2f} |")
    result["table"] = lines
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
