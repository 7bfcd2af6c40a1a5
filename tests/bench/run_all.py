"""`make bench`: run the stage benchmarks and the KD-vs-CE comparison; write one JSON and a markdown table.

KD vs CE uses the demo's two students (same student, same cache tokens, different loss): run `make demo`
first, or this script trains them with the demo's settings.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--runs", default="runs/demo")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs)
    py = sys.executable
    subprocess.run([py, HERE / "bench_capture.py", "--json", out / "capture.json"], check=True, cwd=ROOT)
    subprocess.run([py, HERE / "bench_temperature.py", "--json", out / "temperature.json"], check=True, cwd=ROOT)
    subprocess.run([py, HERE / "bench_manifest.py", "--json", out / "manifest.json"], check=True, cwd=ROOT)
    if not (runs / "cache" / "manifest.json").exists():
        subprocess.run(["make", "--no-print-directory", "teacher-cache", f"RUNS={runs}"], check=True, cwd=ROOT)
    subprocess.run([py, HERE / "bench_train.py", "--cache", runs / "cache", "--json", out / "train.json"], check=True, cwd=ROOT)
    subprocess.run([py, HERE / "bench_kd_step.py", "--cache", runs / "cache", "--json", out / "kd_step.json"], check=True, cwd=ROOT)
    for target, name in (("train-student", "student-kd"), ("train-student-ce", "student-ce")):
        if not (runs / name / "result.json").exists():
            subprocess.run(["make", "--no-print-directory", target, f"RUNS={runs}"], check=True, cwd=ROOT)
    kd_vs_ce = {name: json.loads((runs / name / "result.json").read_text()) for name in ("student-kd", "student-ce")}
    result = {
        "capture": json.loads((out / "capture.json").read_text()),
        "train": json.loads((out / "train.json").read_text()),
        "temperature": json.loads((out / "temperature.json").read_text()),
        "kd_step": json.loads((out / "kd_step.json").read_text()),
        "kd_vs_ce": {n: {k: v for k, v in r.items() if k.startswith("eval/") or k == "tokens_seen"} for n, r in kd_vs_ce.items()},
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    lines = ["| benchmark | value |", "|---|---|"]
    for name, r in result["capture"]["throughput"].items():
        lines.append(f"| capture: {name} (tokens/s) | {r['tokens_per_s']:.1f} |")
    for k, v in {**result["capture"]["ratios"], **result["capture"]["bytes_per_token"]}.items():
        lines.append(f"| capture: {k} | {v:.3f} |")
    cap = result["capture"]
    lines.append(f"| capture: sampled, unique ids per position | {cap['sample_unique_ids_per_position']:.2f} |")
    for dtype, v in cap["kl_stored_vs_exact"].items():
        lines.append(f"| capture: KL(stored || exact) per position, {dtype} log-probs | {v:.2e} |")
    for dtype, h in cap["hidden"].items():
        lines.append(f"| capture: hidden {dtype}, bytes/token/layer, cosine mean / min | {h['bytes_per_token_per_layer']:.1f}, "
                     f"{h['cosine_mean']:.6f} / {h['cosine_min']:.6f} |")
    for step in result["train"]["steps"]:
        lines.append(f"| train: step streamed / in memory, --num-workers {step['num_workers']} | {step['ratio']:.3f} "
                     f"({step['streamed_step_s']:.2f} s vs {step['in_memory_step_s']:.2f} s) |")
    for o in result["train"]["optimizers"]:
        lines.append(f"| train: {o['optimizer']} state bytes/param, peak RSS | {o['state_bytes_per_param']:.3f}, {o['peak_rss_mb']:.0f} MB |")
    for n, r in result["kd_vs_ce"].items():
        lines.append(f"| {n}: held-out CE / forward KL ({r.get('tokens_seen')} tokens) | {r['eval/ce']:.4f} / {r['eval/forward_kl']:.4f} |")
    table = "\n".join(lines + ["", "KD step vs CE step, peak KD-step memory at a 151,936-token vocabulary:", "",
                               *result["kd_step"]["table"], "", "KD temperature with a top-k cache (bucket KL vs full-vocabulary tempered KL):", "",
                               *result["temperature"]["table"]])
    (out / "bench.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
