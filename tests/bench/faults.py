"""`make faults`: kill -9 the pipeline's jobs at random moments and check that nothing is lost or repeated.

1. Many writers, one dir: J concurrent array jobs (`--num-shards J`) capture into one directory, started
   staggered; each is SIGKILLed K times, each time at a random moment just after it made progress (a
   shard or manifest write), and restarted until it finishes. `merge-manifests` must then give a cache
   equal row for row to a single job's, with no row lost or duplicated.
2. Training: one `train-student` run is SIGKILLed K times at random moments (checkpoints every step, so
   many kills land in or next to a checkpoint write) and restarted with `--resume` each time. Its final
   weights and every logged loss must equal an uninterrupted run's, and log.jsonl, the data log and
   TensorBoard must hold each step once.

Every job is the real CLI (`python -m pipeline.cli`) in its own process, on a tiny random Llama with a
locally trained tokenizer (the capture uses the HF backend: the writing, resuming and merging under test
are the same code for both backends). Prints a table, writes JSON. Small versions run in `make test`
(tests/test_faults.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def progress(paths) -> int:
    """A number that grows whenever a job writes something (files and their sizes)."""
    total = 0
    for p in paths:
        p = Path(p)
        for f in (p.rglob("*") if p.is_dir() else [p]):
            try:
                total += 1 + f.stat().st_size if f.is_file() else 0
            except FileNotFoundError:
                pass
    return total


def run_with_kills(cmd: list[str], kills: int, rng: random.Random, watch, env: dict, timeout: float = 900) -> dict:
    """Run cmd to completion, SIGKILLing it up to `kills` times, each a random 0-0.2 s after it next made
    progress (an attempt that finishes within that delay escapes its kill; the count says how many landed)."""
    killed, attempts, t0 = 0, 0, time.time()
    while True:
        attempts += 1
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        if killed < kills:
            start = progress(watch())
            while proc.poll() is None and progress(watch()) == start and time.time() - t0 < timeout:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.2))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc.stderr.close()
                killed += 1
                continue
        err = proc.communicate(timeout=timeout)[1].decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed after {killed} kills (rc {proc.returncode}):\n{err[-3000:]}")
        return {"kills": killed, "attempts": attempts, "seconds": time.time() - t0}


def env_for(home: Path) -> dict:
    return {**os.environ, "DISTILY_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- capture


def capture_faults(teacher: Path, text: Path, work: Path, jobs: int, kills: int, seed: int, tokens: int) -> dict:
    from conftest import read_all
    from pipeline.cache import CacheReader
    from pipeline.config import CaptureConfig
    from stage_teacher.capture import run

    common = ["--teacher", str(teacher), "--dataset", str(text), "--max-seq-len", "32", "--max-tokens", str(tokens),
              "--top-k", "8", "--hidden-layers", "1,2", "--hidden-dtype", "float32", "--sequences-per-shard", "1",
              "--backend", "hf"]
    reference = work / "reference"
    run(CaptureConfig(output=str(reference), teacher=str(teacher), dataset=str(text), max_seq_len=32, max_tokens=tokens,
                      top_k=8, hidden_layers=[1, 2], hidden_dtype="float32", sequences_per_shard=1, backend="hf"))
    shared = work / "shared"
    shared.mkdir()
    rng = random.Random(seed)
    results: list[dict | Exception] = [None] * jobs

    def job(i: int) -> None:
        time.sleep(i * 0.5)  # staggered starts
        cmd = cli("teacher-cache", "-o", str(shared), *common, "--num-shards", str(jobs), "--shard-index", str(i))
        try:
            results[i] = run_with_kills(cmd, kills, random.Random(rng.random()), lambda: [shared], env_for(work / "home"))
        except Exception as e:  # noqa: BLE001  (reported below)
            results[i] = e

    threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    merge = subprocess.run(cli("merge-manifests", str(shared)), capture_output=True, text=True, cwd=ROOT, env=env_for(work / "home"))
    if merge.returncode != 0:
        raise RuntimeError(merge.stderr)
    got, want = read_all(shared), read_all(reference)
    got_ids = [int(r["seq_index"]) for r in got]
    want_ids = [int(r["seq_index"]) for r in want]
    lost = sorted(set(want_ids) - set(got_ids))
    duplicated = len(got_ids) - len(set(got_ids))
    import numpy as np

    by_id = {int(r["seq_index"]): r for r in got}
    differing = sum(
        1 for r in want if int(r["seq_index"]) in by_id and not all(
            np.array_equal(r[k], by_id[int(r["seq_index"])][k]) for k in ("input_ids", "topk_ids", "topk_logprobs", "tail_mass"))
    )
    return {"jobs": jobs, "kills": sum(r["kills"] for r in results), "attempts": sum(r["attempts"] for r in results),
            "rows": len(want_ids), "rows_lost": len(lost), "rows_duplicated": duplicated, "rows_differing": differing,
            "verify_problems": len(CacheReader(shared).verify()),
            "stray_temps": len([p for p in shared.rglob("*.tmp")]), "seconds": max(r["seconds"] for r in results)}


# ------------------------------------------------------------------------------------------ training


def train_faults(cache: Path, work: Path, kills: int, seed: int, steps: int) -> dict:
    from safetensors.torch import load_file

    args = ["--cache", str(cache), "--student-layers", "2", "--init", "random", "--student-config",
            '{"hidden_size": 64, "head_dim": 32, "intermediate_size": 128}', "--batch-size", "2", "--max-steps", str(steps),
            "--save-steps", "1", "--logging-steps", "1", "--eval-sequences", "4", "--lr", "3e-3", "--warmup-steps", "2",
            "--ce-weight", "0.3", "--optimizer", "adamw", "--num-workers", "0"]
    env = env_for(work / "home")
    ref = subprocess.run(cli("train-student", "-o", str(work / "uninterrupted"), *args), capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if ref.returncode != 0:
        raise RuntimeError(ref.stderr[-3000:])
    out = work / "killed"
    stats = run_with_kills(cli("train-student", "-o", str(out), *args, "--resume"), kills, random.Random(seed),
                           lambda: [out / "log.jsonl", out / "checkpoints"], env)

    def records(d: Path) -> list[dict]:
        return [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines() if '"loss"' in l]

    a, b = records(work / "uninterrupted"), records(out)
    steps_logged = [r["step"] for r in b]
    repeated = len(steps_logged) - len(set(steps_logged))
    worst = max((abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "loss/kd", "loss/ce")), default=float("inf"))
    wa = load_file(str(work / "uninterrupted" / "final" / "model.safetensors"))
    wb = load_file(str(out / "final" / "model.safetensors"))
    weight_diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    data_a = (work / "uninterrupted" / "data-rank0.log").read_text()
    data_b = (out / "data-rank0.log").read_text()
    tb_steps = tensorboard_steps(out / "tb", "loss")
    return {**stats, "steps": steps, "steps_logged": len(steps_logged), "steps_repeated": repeated,
            "steps_missing": len(set(range(1, steps + 1)) - set(steps_logged)),
            "max_loss_difference": worst, "max_weight_difference": weight_diff, "data_log_equal": data_a == data_b,
            "tensorboard_steps": len(tb_steps), "tensorboard_repeated": len(tb_steps) - len(set(tb_steps))}


def tensorboard_steps(tb_dir: Path, tag: str) -> list[int]:
    """Every step at which TensorBoard (its reader applies the writer's purge_step) holds a scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


# --------------------------------------------------------------------------------------------- main


def make_fixtures(work: Path) -> tuple[Path, Path]:
    """A tiny random Llama teacher with a tokenizer trained on the embedded text, and a text file to capture."""
    from conftest import build_llama, build_tokenizer
    from pipeline.resolve import DatasetSpec, load_texts

    texts = load_texts(DatasetSpec("lee-background"))
    text = work / "docs.txt"
    text.write_text("\n".join(texts[:120]) + "\n")
    teacher = work / "teacher"
    tok = build_tokenizer(texts, teacher)
    build_llama(teacher, len(tok), layers=2, hidden=64)
    return teacher, text


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--capture-kills", type=int, default=3, help="kills per capture job")
    ap.add_argument("--train-kills", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32 * 24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench-results/faults.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distily-faults-") as tmp:
        work = Path(tmp)
        teacher, text = make_fixtures(work)
        cap = capture_faults(teacher, text, work / "capture", args.jobs, args.capture_kills, args.seed, args.tokens)
        tr = train_faults(work / "capture" / "shared", work / "train", args.train_kills, args.seed, args.train_steps)
    result = {"capture": cap, "train": tr}
    lines = ["| fault run | jobs | kills | lost | duplicated / repeated | other checks |", "|---|---|---|---|---|---|",
             f"| capture, {cap['jobs']} array jobs into one dir | {cap['jobs']} | {cap['kills']} | {cap['rows_lost']} rows | "
             f"{cap['rows_duplicated']} rows | {cap['rows_differing']} rows differ from a single job's; verify problems "
             f"{cap['verify_problems']}; stray temps {cap['stray_temps']} |",
             f"| train-student --resume after each kill | 1 | {tr['kills']} | {tr['steps_missing']} steps | "
             f"{tr['steps_repeated']} steps (TensorBoard {tr['tensorboard_repeated']}) | max loss diff "
             f"{tr['max_loss_difference']:.2g}, max weight diff {tr['max_weight_difference']:.2g}, data log equal: "
             f"{tr['data_log_equal']} |"]
    result["table"] = lines
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
