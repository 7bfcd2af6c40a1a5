"""`make faults`: kill -9 the pipeline's jobs at random moments and check that nothing is lost or repeated.

1. Many writers, one dir: J concurrent array jobs (`--num-shards J`) capture into one directory, started
   staggered; each is SIGKILLed K times, each time at a random moment just after it made progress of its
   own (a write to its own shard, manifest or journal files: `own_files`), and restarted until it finishes.
   `merge-manifests` must then give a cache equal row for row, in every stored field (top-k, target
   log-probs, RS-KD samples and importance weights, entropy, hidden states, Q/K/V), to a single job's, with
   no row lost or duplicated.
2. Training: one `train-student` run is SIGKILLed K times at random moments (checkpoints every step, so
   many kills land in or next to a checkpoint write) and restarted with `--resume` each time. Its final
   weights and every logged loss must equal an uninterrupted run's, and log.jsonl, the data log and
   TensorBoard must hold each step once.
3. Tensor parallelism: one vLLM capture with `--tensor-parallel-size 2` (the hooks in both worker processes)
   is SIGKILLed with its workers (the whole process group) after its own progress, rerun until done, and
   must equal an uninterrupted run of the same command in every stored field.

The script exits 1 (naming each failed check) when any of this does not hold.

Every job is the real CLI (`python -m pipeline.cli`) in its own process, on a tiny random Llama with a
locally trained tokenizer (the array-job capture uses the HF backend: the writing, resuming and merging
under test are the same code for both backends; the tensor-parallel one uses vLLM). Prints a table, writes JSON. Small versions run in `make test`
(tests/test_faults.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

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


def run_with_kills(cmd: list[str], kills: int, rng: random.Random, watch, env: dict, timeout: float = 900,
                   max_delay: float = 0.2) -> dict:
    """Run cmd to completion, SIGKILLing it up to `kills` times, each a random 0..max_delay s after it next made
    progress in the files `watch()` lists (an attempt that finishes within that delay escapes its kill; the
    count says how many landed)."""
    killed, attempts, t0 = 0, 0, time.time()
    while True:
        attempts += 1
        # its own process group: a kill takes the job with any worker processes it started (vLLM's TP workers)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                                start_new_session=True)
        if killed < kills:
            start = progress(watch())
            while proc.poll() is None and progress(watch()) == start and time.time() - t0 < timeout:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, max_delay))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                proc.stderr.close()
                killed += 1
                continue
        err = proc.communicate(timeout=timeout)[1].decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed after {killed} kills (rc {proc.returncode}):\n{err[-3000:]}")
        return {"kills": killed, "attempts": attempts, "seconds": time.time() - t0}


def own_files(shared: Path, job: int, jobs: int) -> list[Path]:
    """Array job `job`'s own files in a shared cache dir: its shards (j % jobs == job), its part manifest and
    journal, and the temporaries of their writes. Another job's writes never count as this job's progress."""
    mine = []
    for f in shared.iterdir() if shared.exists() else []:
        if f.name.endswith(".lock"):  # taken before the engine starts: no write progress
            continue
        m = re.match(r"(shard|manifest\.part)-(\d+)", f.name.lstrip("."))
        if m and (int(m[2]) % jobs if m[1] == "shard" else int(m[2])) == job:
            mine.append(f)
    return mine


def rows_differ(a: dict, b: dict) -> bool:
    """Whether two sequences read from caches differ in any stored field (nested: hidden states, Q/K/V)."""
    if set(a) != set(b):
        return True
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not isinstance(y, dict) or rows_differ(x, y):
                return True
        elif not np.array_equal(np.asarray(x), np.asarray(y)):
            return True
    return False


def env_for(home: Path) -> dict:
    return {**os.environ, "DISTILY_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- capture


def capture_faults(teacher: Path, text: Path, work: Path, jobs: int, kills: int, seed: int, tokens: int) -> dict:
    from conftest import read_all

    from pipeline.cache import CacheReader
    from pipeline.config import CaptureConfig
    from stage_teacher.capture import run

    # every stored field: top-k and RS-KD samples (at t != 1, so importance weights too), hidden states, Q/K/V
    common = ["--teacher", str(teacher), "--dataset", str(text), "--max-seq-len", "32", "--max-tokens", str(tokens),
              "--top-k", "8", "--targets", "both", "--samples", "16", "--sample-temperature", "1.5",
              "--hidden-layers", "1,2", "--qkv-layers", "1,2", "--hidden-dtype", "float32", "--sequences-per-shard", "1",
              "--backend", "hf"]
    reference = work / "reference"
    run(CaptureConfig(output=str(reference), teacher=str(teacher), dataset=str(text), max_seq_len=32, max_tokens=tokens,
                      top_k=8, targets="both", samples=16, sample_temperature=1.5, hidden_layers=[1, 2], qkv_layers=[1, 2],
                      hidden_dtype="float32", sequences_per_shard=1, backend="hf"))
    shared = work / "shared"
    shared.mkdir()
    rng = random.Random(seed)
    results: list[dict | Exception] = [None] * jobs

    def job(i: int) -> None:
        time.sleep(i * 0.5)  # staggered starts
        cmd = cli("teacher-cache", "-o", str(shared), *common, "--num-shards", str(jobs), "--shard-index", str(i))
        try:
            # a job writes a shard every few tens of ms once its engine is up: kill within 50 ms of its progress
            results[i] = run_with_kills(cmd, kills, random.Random(rng.random()), lambda: own_files(shared, i, jobs),
                                        env_for(work / "home"), max_delay=0.05)
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
    by_id = {int(r["seq_index"]): r for r in got}
    differing = sum(1 for r in want if int(r["seq_index"]) in by_id and rows_differ(r, by_id[int(r["seq_index"])]))
    return {"jobs": jobs, "fields_compared": sorted(want[0]) if want else [], "kills": sum(r["kills"] for r in results), "attempts": sum(r["attempts"] for r in results),
            "rows": len(want_ids), "rows_lost": len(lost), "rows_duplicated": duplicated, "rows_differing": differing,
            "verify_problems": len(CacheReader(shared).verify()),
            "stray_temps": len([p for p in shared.rglob("*.tmp")]), "seconds": max(r["seconds"] for r in results)}


def tensor_parallel_faults(teacher: Path, text: Path, work: Path, kills: int, seed: int, tokens: int, tp: int = 2) -> dict:
    """One vLLM capture with --tensor-parallel-size tp (hooks in every worker), SIGKILLed with its workers `kills`
    times after its own progress and rerun until done; it must equal an uninterrupted run of the same command."""
    from conftest import read_all

    common = ["--teacher", str(teacher), "--dataset", str(text), "--max-seq-len", "32", "--max-tokens", str(tokens),
              "--top-k", "8", "--targets", "both", "--samples", "16", "--hidden-layers", "1,2", "--qkv-layers", "1,2",
              "--hidden-dtype", "float32", "--logprob-dtype", "float32", "--sequences-per-shard", "2",
              "--backend", "vllm", "--tensor-parallel-size", str(tp), "--vllm-max-logprobs", "8"]
    env = env_for(work / "home")
    reference, killed = work / "reference", work / "killed"
    run_with_kills(cli("teacher-cache", "-o", str(reference), *common), 0, random.Random(seed), lambda: [], env)
    killed.mkdir(parents=True)
    r = run_with_kills(cli("teacher-cache", "-o", str(killed), *common), kills, random.Random(seed),
                       lambda: list(killed.iterdir()), env, max_delay=0.5)
    got, want = read_all(killed), read_all(reference)
    got_ids = [int(x["seq_index"]) for x in got]
    by_id = {int(x["seq_index"]): x for x in got}
    return {"tensor_parallel_size": tp, "kills": r["kills"], "attempts": r["attempts"], "rows": len(want),
            "rows_lost": len({int(x["seq_index"]) for x in want} - set(got_ids)),
            "rows_duplicated": len(got_ids) - len(set(got_ids)),
            "rows_differing": sum(1 for x in want if int(x["seq_index"]) in by_id and rows_differ(x, by_id[int(x["seq_index"])])),
            "stray_temps": len(list(killed.rglob("*.tmp"))), "seconds": r["seconds"]}


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
    ap.add_argument("--tp-kills", type=int, default=2, help="kills of the tensor-parallel capture (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench-results/faults.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distily-faults-") as tmp:
        work = Path(tmp)
        teacher, text = make_fixtures(work)
        cap = capture_faults(teacher, text, work / "capture", args.jobs, args.capture_kills, args.seed, args.tokens)
        tr = train_faults(work / "capture" / "shared", work / "train", args.train_kills, args.seed, args.train_steps)
        tp = (tensor_parallel_faults(teacher, text, work / "tp", args.tp_kills, args.seed, args.tokens)
              if args.tp_kills else None)
    result = {"capture": cap, "train": tr, "tensor_parallel": tp}
    lines = ["| fault run | jobs | kills | lost | duplicated / repeated | other checks |", "|---|---|---|---|---|---|",
             f"| capture, {cap['jobs']} array jobs into one dir | {cap['jobs']} | {cap['kills']} | {cap['rows_lost']} rows | "
             f"{cap['rows_duplicated']} rows | {cap['rows_differing']} rows differ from a single job's; verify problems "
             f"{cap['verify_problems']}; stray temps {cap['stray_temps']} |",
             f"| train-student --resume after each kill | 1 | {tr['kills']} | {tr['steps_missing']} steps | "
             f"{tr['steps_repeated']} steps (TensorBoard {tr['tensorboard_repeated']}) | max loss diff "
             f"{tr['max_loss_difference']:.2g}, max weight diff {tr['max_weight_difference']:.2g}, data log equal: "
             f"{tr['data_log_equal']} |"]
    if tp:
        lines.insert(3, f"| capture, --tensor-parallel-size {tp['tensor_parallel_size']} (vLLM workers killed too) | 1 | "
                        f"{tp['kills']} | {tp['rows_lost']} rows | {tp['rows_duplicated']} rows | {tp['rows_differing']} "
                        f"rows differ from an uninterrupted run's; stray temps {tp['stray_temps']} |")
    result["table"] = lines
    result["failures"] = failures(result)
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    for failure in result["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    return result


def failures(result: dict) -> list[str]:
    """Every check of a fault run that did not hold (empty: all held)."""
    cap, tr = result["capture"], result["train"]
    checks = [
        (cap["rows"] > 0, f"the capture holds {cap['rows']} rows"),
        (cap["rows_lost"] == 0, f"capture: {cap['rows_lost']} rows lost"),
        (cap["rows_duplicated"] == 0, f"capture: {cap['rows_duplicated']} rows duplicated"),
        (cap["rows_differing"] == 0, f"capture: {cap['rows_differing']} rows differ from a single job's"),
        (cap["verify_problems"] == 0, f"capture: distily verify found {cap['verify_problems']} problems"),
        (cap["stray_temps"] == 0, f"capture: {cap['stray_temps']} temporaries left behind"),
        (tr["steps_repeated"] == 0 and tr["tensorboard_repeated"] == 0,
         f"train: {tr['steps_repeated']} steps repeated in log.jsonl, {tr['tensorboard_repeated']} in TensorBoard"),
        (tr["steps_missing"] == 0, f"train: {tr['steps_missing']} steps missing"),
        (tr["max_loss_difference"] <= 1e-6, f"train: losses differ by up to {tr['max_loss_difference']:.3g}"),
        (tr["max_weight_difference"] <= 1e-6, f"train: final weights differ by up to {tr['max_weight_difference']:.3g}"),
        (tr["data_log_equal"], "train: the data log differs from an uninterrupted run's"),
    ]
    tp = result.get("tensor_parallel")
    if tp:
        checks += [
            (tp["rows"] > 0 and tp["kills"] >= 1, f"tensor-parallel capture: {tp['rows']} rows, {tp['kills']} kills landed"),
            (tp["rows_lost"] == tp["rows_duplicated"] == 0,
             f"tensor-parallel capture: {tp['rows_lost']} rows lost, {tp['rows_duplicated']} duplicated"),
            (tp["rows_differing"] == 0, f"tensor-parallel capture: {tp['rows_differing']} rows differ"),
            (tp["stray_temps"] == 0, f"tensor-parallel capture: {tp['stray_temps']} temporaries left behind"),
        ]
    return [message for ok, message in checks if not ok]


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
