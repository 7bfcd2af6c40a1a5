"""Memory and teacher bytes of `--init teacher-layers --init-layers auto` under torchrun, before and after the
lazy, once-per-job initialisation (issue 20, section 3).

    python tests/bench/bench_init.py [--before-tree /tmp/distily-before] [--student-layers 15] [--json out.json]

On the embedded SmolLM2-135M teacher (fp32) with a small top-64 cache (made once under .cache/bench-init with
the HF backend), it runs `build_student` on 2 gloo ranks (torchrun --nproc-per-node 2) for each tree: "before" is
a `git worktree` of HEAD, "after" this checkout. Per rank: peak RSS during initialisation (VmHWM reset just
before it, via /proc/self/clear_refs), what it added over the RSS before, teacher tensor bytes materialised,
and bytes read from storage (/proc/self/io; the teacher file's page cache dropped first). Prints a table,
writes JSON, exits 1 when a target is missed:
  rank 1 materialises no teacher bytes and its peak RSS is at most 0.3x rank 0's;
  rank 0 materialises the kept layers' bytes plus what the search streams, nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def teacher() -> Path:
    """The embedded teacher's converted dir (converted from its wheel on a fresh machine)."""
    from pipeline.resolve import resolve_model

    return Path(resolve_model(None)[0])

RANK_SCRIPT = r'''
import json, os, sys, time
import torch, torch.distributed as dist

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

def read_bytes():
    return int(next(l for l in open("/proc/self/io") if l.startswith("read_bytes")).split()[1])

dist.init_process_group("gloo")
rank = dist.get_rank()
cache, out, teacher, layers, select, result_dir = sys.argv[1:7]
from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
import stage_student.students.build as st
from transformers import AutoModelForCausalLM, AutoTokenizer  # imports are not initialisation memory
from transformers.models.llama import modeling_llama  # noqa: F401
seen = {}
load = st.load_teacher
st.load_teacher = lambda *a, **k: seen.setdefault("teacher", load(*a, **k))
chosen = st.chosen_layers
def chosen_and_count(cfg, reader, t, n):
    r = chosen(cfg, reader, t, n)
    seen["search_bytes"] = getattr(t, "bytes_read", 0)
    return r
st.chosen_layers = chosen_and_count
reader = CacheReader(cache)
reader.manifest
cfg = TrainConfig(cache=cache, output=out, student_layers=int(layers), init="teacher-layers", init_layers="auto",
                  select_sequences=int(select), teacher=teacher, eval_sequences=2)
fd = os.open(os.path.join(teacher, "model.safetensors"), os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
dist.barrier()
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here
rss0, io0, t0 = status("VmRSS"), read_bytes(), time.perf_counter()
model, _, info = st.build_student(cfg, reader)
seconds, peak, io = time.perf_counter() - t0, status("VmHWM"), read_bytes() - io0
t = seen.get("teacher")
if isinstance(t, torch.nn.Module):  # before: the whole teacher, loaded by from_pretrained
    unique = {v.untyped_storage().data_ptr(): v for v in t.state_dict().values()}.values()  # a tied head once
    teacher_bytes = search = sum(v.numel() * v.element_size() for v in unique)
else:
    teacher_bytes, search = (t.bytes_read, seen.get("search_bytes", 0)) if t is not None else (0, 0)
row = {"rank": rank, "seconds": seconds, "rss_before": rss0, "peak_rss": peak, "added_rss": peak - rss0,
       "teacher_bytes": teacher_bytes, "search_bytes": search, "copy_bytes": teacher_bytes - search,
       "storage_read_bytes": io, "layers": info["teacher_layers"],
       "student_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
       "added_over_student": peak - rss0 - sum(p.numel() * p.element_size() for p in model.parameters())}
if rank == 0 and not isinstance(t, torch.nn.Module):  # what the copy must read: the kept tensors, from the headers
    from stage_student.students.teacher_weights import copy_plan
    plan = copy_plan(model, list(t.keys()), info["teacher_layers"], cfg.copy_embeddings)
    import math
    row["kept_bytes"] = sum(math.prod(t.shape(n)) * 4 for n in set(plan.values()))
json.dump(row, open(os.path.join(result_dir, f"rank{rank}.json"), "w"))
dist.destroy_process_group()
'''


def report_targets(targets: dict[str, bool], rows, json_path: Path) -> int:
    """Print each target met or MISSED, write the rows and targets as JSON; the exit code: 1 when one is missed."""
    for what, ok in targets.items():
        print(f"{'met   ' if ok else 'MISSED'} {what}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"rows": rows, "targets": targets}, indent=1))
    return 0 if all(targets.values()) else 1


def ensure_cache(path: Path) -> Path:
    """A small top-64 cache of the embedded teacher ."""
    if (path / "manifest.json").exists():
        return path
    subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher-cache", "--teacher", str(teacher()), "--backend", "hf",
                    "--output", str(path), "--max-seq-len", "128", "--max-tokens", str(128 * 16), "--targets", "topk", "--top-k", "64"],
                   cwd=ROOT, check=True)
    return path


def ensure_before_tree(path: Path) -> Path:
    if not (path / "stage_student").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), "HEAD"], cwd=ROOT, check=True)
    return path


def run_tree(name: str, tree: Path, cache: Path, layers: int, select: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench-init-{name}-") as tmp:
        tmp = Path(tmp)
        script = tmp / "rank.py"
        script.write_text(RANK_SCRIPT)
        env = {**os.environ, "PYTHONPATH": str(tree), "DISTILY_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(cache),
                        str(tmp / "run"), str(teacher()), str(layers), str(select), str(tmp)], cwd=tree, env=env, check=True)
        return [{"tree": name, **json.loads((tmp / f"rank{r}.json").read_text())} for r in (0, 1)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before-tree", default="/tmp/distily-before")
    ap.add_argument("--student-layers", type=int, default=15)
    ap.add_argument("--select-sequences", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "bench_init.json"))
    args = ap.parse_args()
    cache = ensure_cache(ROOT / ".cache" / "bench-init" / "cache")
    rows = []
    for name, tree in (("before", ensure_before_tree(Path(args.before_tree))), ("after", ROOT)):
        rows += run_tree(name, tree, cache, args.student_layers, args.select_sequences)
    mb = lambda b: f"{b / 2**20:8.0f}"  # noqa: E731
    print(f"{'tree':<7}{'rank':>5}{'s':>7}{'RSS before':>11}{'peak RSS':>9}{'added':>9}{'teacher MB':>11}"
          f"{'search':>8}{'copy':>8}{'disk read':>10}{'student':>8}{'added-student':>14}  layers")
    for r in rows:
        print(f"{r['tree']:<7}{r['rank']:>5}{r['seconds']:7.1f}{mb(r['rss_before']):>11}{mb(r['peak_rss']):>9}"
              f"{mb(r['added_rss']):>9}{mb(r['teacher_bytes']):>11}{mb(r['search_bytes']):>8}{mb(r['copy_bytes']):>8}"
              f"{mb(r['storage_read_bytes']):>10}{mb(r['student_bytes']):>8}{mb(r['added_over_student']):>14}"
              f"  {','.join(map(str, r['layers']))}")
    r0, r1 = (next(r for r in rows if r["tree"] == "after" and r["rank"] == k) for k in (0, 1))
    targets = {
        "rank 1 materialises no teacher bytes": r1["teacher_bytes"] == 0,
        "rank 1 peak RSS <= 0.3x rank 0's": r1["peak_rss"] <= 0.3 * r0["peak_rss"],
        "rank 1 RSS added by init <= 0.3x rank 0's": r1["added_rss"] <= 0.3 * r0["added_rss"],
        "rank 0 copies only the kept layers' bytes": r0["copy_bytes"] == r0["kept_bytes"],
        "both ranks keep the same layers": r0["layers"] == r1["layers"],
    }
    return report_targets(targets, rows, Path(args.json))


if __name__ == "__main__":
    sys.exit(main())
