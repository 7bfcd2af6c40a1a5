"""Peak memory of the MiniLMv2 relation loss (--attn-loss mha_relation) at T=2048, before (all query rows at once:
[B, A, T, T] tensors) and after (chunks of query rows under checkpointing), forward + backward (issue 20, section 5).

    python tests/bench/bench_relation_memory.py [--before-tree /tmp/distily-before] [--json out.json]

Each variant runs in its own process (B=1, T=2048, Q/K/V width 576 as SmolLM2-135M's, 9 relation heads, KL);
peak RSS is VmHWM after the backward minus the RSS before the loss (glibc told to mmap every block over 64 KiB,
so freed tensors leave the RSS and the peak is that of live tensors). Prints a table, writes JSON, exits 1 when the
chunked loss does not use less than a quarter of the unchunked one's memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ONE = r'''
import json, sys, time
import torch
from stage_student.losses import attention
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
t, width, heads, chunk = (int(a) for a in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
x = [torch.randn(1, t, width, generator=g).requires_grad_() for _ in range(6)]
s, te = dict(zip("qkv", x[:3])), dict(zip("qkv", x[3:]))
kw = {} if chunk < 0 else {"chunk_rows": chunk}
attention.mha_relation_loss(dict(zip("qkv", [y[:, :64] for y in x[:3]])), dict(zip("qkv", [y[:, :64] for y in x[3:]])), heads, **kw)
open("/proc/self/clear_refs", "w").write("5")
rss0, t0 = status("VmRSS"), time.perf_counter()
loss = attention.mha_relation_loss(s, te, heads, **kw)
loss.backward()
print(json.dumps({"peak_added": status("VmHWM") - rss0, "seconds": time.perf_counter() - t0, "loss": loss.item()}))
'''


def run(tree: Path, t: int, width: int, heads: int, chunk: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed = returned
    out = subprocess.run([sys.executable, "-c", ONE, str(t), str(width), str(heads), str(chunk)], cwd=tree, env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before-tree", default="/tmp/distily-before")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "bench_relation_memory.json"))
    args = ap.parse_args()
    t, width, heads = args.seq_len, 576, 9
    rows = []
    variants = [("before (HEAD, unchunked)", Path(args.before_tree), -1), ("after, chunk_rows=0", ROOT, 0),
                ("after, chunk_rows=256 (default)", ROOT, -1), ("after, chunk_rows=128", ROOT, 128)]
    for name, tree, chunk in variants:
        if tree.exists():
            rows.append({"variant": name, **run(tree, t, width, heads, chunk)})
    print(f"relation loss (KL, Q-Q + K-K + V-V), B=1, T={t}, width {width}, {heads} heads, forward + backward")
    print(f"{'variant':<34}{'peak MB':>9}{'seconds':>9}{'loss':>12}")
    for r in rows:
        print(f"{r['variant']:<34}{r['peak_added'] / 2**20:9.0f}{r['seconds']:9.2f}{r['loss']:12.6f}")
    whole = next(r for r in rows if "chunk_rows=0" in r["variant"])
    chunked = next(r for r in rows if "default" in r["variant"])
    ok = chunked["peak_added"] < whole["peak_added"] / 4 and abs(chunked["loss"] - whole["loss"]) < 1e-4 * abs(whole["loss"])
    print(f"{'met   ' if ok else 'MISSED'} chunked peak < 1/4 of unchunked, same loss")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "met": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
