"""Peak memory and speed of one capture job that stores hidden states, side by side: this checkout (at one or more
tensor-parallel sizes) and, with --before REF, the code of another git ref (e.g. the commit before a change).

Each capture is the real CLI (`python -m pipeline.cli teacher-cache`, the embedded teacher by default, four
--hidden-layers, the vLLM hooks path) in a fresh process; its peak RSS is the kernel's (ru_maxrss from wait4: the
job's own process, which holds the shard's hidden states, and any worker it reaped). Prints a table, writes JSON.
Exits non-zero when a capture fails or when this checkout's one-device job peaks higher than --before's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def capture(code_dir: Path, out: Path, args, tp: int) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli", "teacher-cache", "-o", str(out), "--max-tokens", str(args.tokens),
           "--max-seq-len", str(args.seq_len), "--hidden-layers", args.hidden_layers, "--top-k", "64",
           "--sequences-per-shard", str(args.sequences_per_shard), "--logprob-dtype", "float32"]
    if args.teacher:
        cmd += ["--teacher", args.teacher]
    if tp > 1:
        cmd += ["--tensor-parallel-size", str(tp)]
    env = {**os.environ, "PYTHONPATH": f"{code_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"capture in {code_dir} (TP={tp}) failed ({code}):\n{err[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds, "tokens": manifest["stats"]["tokens"]}


def compare_caches(a_dir: Path, b_dir: Path) -> dict:
    """Largest target/top-k log-prob difference, top-1 agreement and smallest hidden-state cosine of two caches."""
    import numpy as np

    from pipeline.cache import CacheReader

    lp, cos, agree, n = 0.0, 1.0, 0, 0
    for a, b in zip(CacheReader(a_dir).iter_sequences(), CacheReader(b_dir).iter_sequences()):
        assert np.array_equal(a["input_ids"], b["input_ids"])
        lp = max(lp, float(np.abs(a["target_logprob"] - b["target_logprob"]).max()),
                 float(np.abs(a["topk_logprobs"] - b["topk_logprobs"]).max()))
        agree, n = agree + int((a["topk_ids"][:, 0] == b["topk_ids"][:, 0]).sum()), n + len(a["topk_ids"])
        for l, x in a["hidden_states"].items():
            y = b["hidden_states"][l]
            c = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
            cos = min(cos, float(c.min()))
    return {"max_logprob_diff": lp, "top1_agreement": agree / n, "min_hidden_cosine": cos}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sequences-per-shard", type=int, default=64)
    ap.add_argument("--hidden-layers", default="6,12,18,24")
    ap.add_argument("--tensor-parallel", default="1", help="comma-separated sizes for this checkout, e.g. 1,3")
    ap.add_argument("--before", default=None, help="a git ref to measure too (its code in a temporary worktree)")
    ap.add_argument("--json", default="bench-results/capture_memory.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="distily-capmem-"))
    sys.path.insert(0, str(ROOT))
    from transformers import AutoConfig

    from pipeline.resolve import resolve_model

    model_dir, _ = resolve_model(args.teacher)  # the embedded teacher converted once, before any job is measured
    hidden_size = AutoConfig.from_pretrained(model_dir).hidden_size
    rows = {}
    if args.before:
        tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows[f"before ({args.before}), TP=1"] = capture(tree, tmp / "cache-before", args, 1)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    for tp in (int(x) for x in args.tensor_parallel.split(",")):
        rows[f"now, TP={tp}"] = capture(ROOT, tmp / f"cache-tp{tp}", args, tp)
    hidden_mb = args.tokens * hidden_size * 4 * len(args.hidden_layers.split(",")) / 2**20  # as float32
    print(f"\ncapture of {args.tokens} tokens, {args.seq_len} per sequence, {args.sequences_per_shard} sequences per "
          f"shard, hidden layers {args.hidden_layers} (one shard of them in float32: "
          f"{hidden_mb * args.sequences_per_shard * args.seq_len / args.tokens:.0f} MB)")
    print(f"{'job':<28} {'peak RSS MB':>12} {'seconds':>9} {'tokens/s':>9}")
    for name, r in rows.items():
        print(f"{name:<28} {r['peak_rss_mb']:>12.0f} {r['seconds']:>9.1f} {r['tokens'] / r['seconds']:>9.0f}")
    result = {"rows": rows, "args": vars(args)}
    before = next((r for n, r in rows.items() if n.startswith("before")), None)
    now = rows.get("now, TP=1")
    if before and now:
        result["peak_rss_saved_mb"] = before["peak_rss_mb"] - now["peak_rss_mb"]
        print(f"peak RSS saved by this checkout: {result['peak_rss_saved_mb']:.0f} MB")
    sizes = [int(x) for x in args.tensor_parallel.split(",")]
    for tp in sizes[1:]:  # every stored field of a tensor-parallel capture against the first size's
        diff = compare_caches(tmp / f"cache-tp{sizes[0]}", tmp / f"cache-tp{tp}")
        result[f"TP={tp} vs TP={sizes[0]}"] = diff
        print(f"TP={tp} vs TP={sizes[0]}: " + ", ".join(f"{k} {v:.3g}" for k, v in diff.items()))
        if diff["max_logprob_diff"] > 1e-3 or diff["min_hidden_cosine"] < 0.9999:
            raise SystemExit(f"the TP={tp} cache differs from TP={sizes[0]}'s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    if before and now and now["peak_rss_mb"] > before["peak_rss_mb"]:
        raise SystemExit("this checkout's capture peaks higher than --before's")
    return result


if __name__ == "__main__":
    main()
