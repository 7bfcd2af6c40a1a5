"""`make bench-scale`: memory and time of stage one's data preparation as the dataset grows (issue 19).

Text made here: words drawn (by frequency) from the embedded Lee corpus, as one-line documents of varied
lengths (log-normal, 5 to 2000 words), about --sizes tokens each (default 1M, 10M, 100M tokens of the
embedded teacher's tokenizer). For each size, every step in a fresh subprocess (peak RSS from getrusage):

  load         `datasets` turns the text into its Arrow cache (once per node, before any tokenising)
  tokenise P   the text tokenised into an empty token store with P processes (--processes, default 1,2)
  job 64k      one capture job's prepare() (--backend hf, embedded teacher) with --max-tokens 65536 reading
               the store: its sequences are a memory map, the fingerprint is hashed from the file
  job all      the same job capturing every token of the store
  old          (sizes up to --old-up-to) the code before the token store: every document as a Python string
               and the stream as one Python list, in one process

Targets (exit 1 when missed): a job's peak RSS grows at most 5 MB per million dataset tokens; tokenising time
per token at the largest size within 1.25x of the next smaller size (>= 10M tokens: linear); 2 processes at
least 1.6x as fast as 1 at the largest size. The stream equals the old one (same fingerprint) at sizes the old
code ran. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RSS_MB_PER_M_TOKENS = 5.0
LINEAR = 1.25
SPEEDUP = 1.6


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '500k' -> 500_000, '2000' -> 2000."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def peak_rss_mb() -> dict:
    """Peak RSS of this process and of its largest finished child (the tokenising pool), in MB."""
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# ------------------------------------------------------------------------------------- the text


def make_text(path: Path, tokens: int, tokenizer, seed: int = 0) -> None:
    """About `tokens` tokens of one-line documents of Lee-corpus words (drawn by frequency), varied lengths."""
    from pipeline.resolve import DatasetSpec, load_texts

    words = np.array(" ".join(load_texts(DatasetSpec("lee-background"))).split())
    rng = np.random.default_rng(seed)
    sample = " ".join(rng.choice(words, 20_000))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 20_000
    left = int(tokens / per_word)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while left > 0:
            lengths = np.clip(rng.lognormal(5.0, 0.9, 1000).astype(int), 5, 2000)
            ids = rng.integers(0, len(words), int(lengths.sum()))
            bounds = np.cumsum(lengths)[:-1]
            f.write("".join(" ".join(doc) + "\n" for doc in np.split(words[ids], bounds)))
            left -= int(lengths.sum())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- child processes


def child(args) -> None:
    """One measured step, alone in this process; prints its result as JSON on the last line."""
    from transformers import AutoTokenizer

    from pipeline.resolve import DatasetSpec, cut, load_text_dataset, load_texts, resolve_model, tokenise
    from pipeline.token_store import fingerprint_tokens

    spec = DatasetSpec(args.text)
    start = time.perf_counter()
    out: dict = {}
    if args.child == "load":
        out["rows"] = len(load_text_dataset(spec))
    elif args.child == "tokenise":
        from pipeline.resolve import packed_sequences

        tok = AutoTokenizer.from_pretrained(resolve_model(None)[0])
        start = time.perf_counter()
        seqs, _ = packed_sequences(tok, spec, args.seq_len, None, args.store, args.processes[0])
        out["seconds"] = time.perf_counter() - start
        meta = json.loads(next(Path(args.store).glob("*.json")).read_text())
        out.update(tokens=meta["tokens"], fingerprint=fingerprint_tokens(seqs))
    elif args.child == "job":
        from pipeline.config import CaptureConfig
        from stage_teacher.capture import prepare

        cfg = CaptureConfig(output=str(Path(args.store).parent / "cache"), dataset=args.text, backend="hf",
                            max_seq_len=args.seq_len, max_tokens=args.max_tokens or None, token_store=args.store)
        manifest, seqs, *_ = prepare(cfg)
        out.update(tokens=int(seqs.size), fingerprint=manifest["dataset"]["fingerprint"])
    elif args.child == "old":
        tok = AutoTokenizer.from_pretrained(resolve_model(None)[0])
        start = time.perf_counter()
        stream = tokenise(tok, load_texts(spec))[0]
        out["seconds"] = time.perf_counter() - start
        out.update(tokens=len(stream), fingerprint=fingerprint_tokens(cut(stream, args.seq_len)))
    out.setdefault("seconds", time.perf_counter() - start)
    print(json.dumps({**out, **peak_rss_mb()}))


def run_child(kind: str, text: Path, store: Path | None = None, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--text", str(text)]
    cmd += ["--store", str(store)] if store else []
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def measure(size: int, args, work: Path, tokenizer) -> dict:
    text = work / f"text-{size}.txt"
    if not text.exists():
        make_text(text, size, tokenizer)
    row: dict = {"size": size, "text_mb": text.stat().st_size / 2**20, "load": run_child("load", text)}
    for p in args.processes:
        store = work / f"store-{size}-p{p}"
        shutil.rmtree(store, ignore_errors=True)
        row[f"tokenise_p{p}"] = run_child("tokenise", text, store, processes=p, seq_len=args.seq_len)
    store = work / f"store-{size}-p{args.processes[0]}"
    row["tokens"] = row[f"tokenise_p{args.processes[0]}"]["tokens"]
    row["job_64k"] = run_child("job", text, store, seq_len=args.seq_len, max_tokens=args.max_tokens)
    row["job_all"] = run_child("job", text, store, seq_len=args.seq_len, max_tokens=0)
    if size <= args.old_up_to:
        row["old"] = run_child("old", text, seq_len=args.seq_len)
    for p in args.processes:
        shutil.rmtree(work / f"store-{size}-p{p}", ignore_errors=True)
    return row


def check(rows: list[dict], processes: list[int]) -> list[str]:
    """The issue's targets, as lines saying what was missed (none: all met)."""
    missed = []
    small, large = rows[0], rows[-1]
    dm = (large["tokens"] - small["tokens"]) / 1e6
    for job in ("job_64k", "job_all"):
        growth = (large[job]["rss_mb"] - small[job]["rss_mb"]) / dm if dm else 0.0
        if growth > RSS_MB_PER_M_TOKENS:
            missed.append(f"{job}: peak RSS grows {growth:.2f} MB per million tokens (target <= {RSS_MB_PER_M_TOKENS})")
    p0 = f"tokenise_p{processes[0]}"
    big = [r for r in rows if r["tokens"] >= 9e6]
    if len(big) >= 2:
        per = [r[p0]["seconds"] / r["tokens"] for r in big[-2:]]
        if per[1] > LINEAR * per[0]:
            missed.append(f"tokenise time per token grows {per[1] / per[0]:.2f}x from {big[-2]['size']:,} to "
                          f"{big[-1]['size']:,} tokens (target <= {LINEAR}x: linear)")
    if 1 in processes and 2 in processes:
        speedup = large["tokenise_p1"]["seconds"] / large["tokenise_p2"]["seconds"]
        if speedup < SPEEDUP:
            missed.append(f"2 processes tokenise {speedup:.2f}x as fast as 1 (target >= {SPEEDUP}x; "
                          f"{os.cpu_count()} cores here)")
    for r in rows:
        fps = {r[k]["fingerprint"] for k in r if k.startswith("tokenise_") or k in ("old", "job_all")}
        if len(fps) != 1:
            missed.append(f"{r['size']:,} tokens: the streams differ (fingerprints {sorted(fps)})")
    return missed


def table(rows: list[dict], processes: list[int]) -> str:
    lines = ["| dataset tokens | text MB | load s / MB | "
             + " | ".join(f"tokenise {p} proc: s, tok/s, RSS MB (pool)" for p in processes)
             + " | job 64k: RSS MB, s | job all: RSS MB, s | old: s, RSS MB |",
             "|" + "---|" * (6 + len(processes))]
    for r in rows:
        tok = [f"{r[f'tokenise_p{p}']['seconds']:.1f}, {r['tokens'] / r[f'tokenise_p{p}']['seconds'] / 1e3:.0f}k, "
               f"{r[f'tokenise_p{p}']['rss_mb']:.0f} ({r[f'tokenise_p{p}']['children_rss_mb']:.0f})" for p in processes]
        old = f"{r['old']['seconds']:.1f}, {r['old']['rss_mb']:.0f}" if "old" in r else "-"
        lines.append(f"| {r['tokens']:,} | {r['text_mb']:.0f} | {r['load']['seconds']:.1f} / {r['load']['rss_mb']:.0f} | "
                     + " | ".join(tok) + f" | {r['job_64k']['rss_mb']:.0f}, {r['job_64k']['seconds']:.1f} | "
                     f"{r['job_all']['rss_mb']:.0f}, {r['job_all']['seconds']:.1f} | {old} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1M,10M,100M", help="dataset sizes in tokens (about), comma-separated")
    ap.add_argument("--processes", default="1,2", help="tokenising processes to compare, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=65536, help="the limited job's --max-tokens")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--old-up-to", default="10M", help="run the old in-memory tokenise up to this size")
    ap.add_argument("--work", default="runs/bench-scale", help="texts, stores and the datasets cache")
    ap.add_argument("--json", default="bench-results/scale.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.processes = [int(p) for p in str(args.processes).split(",")]
    args.old_up_to = parse_size(str(args.old_up_to))
    if args.child:
        return child(args)
    from transformers import AutoTokenizer

    from pipeline.resolve import resolve_model

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "datasets-cache"))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process is one core
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None)[0])
    rows = []
    for size in sorted(parse_size(s) for s in args.sizes.split(",")):
        rows.append(measure(size, args, work, tokenizer))
        print(table(rows, args.processes), flush=True)
    missed = check(rows, args.processes)
    result = {"rows": rows, "targets": {"rss_mb_per_m_tokens": RSS_MB_PER_M_TOKENS, "linear": LINEAR, "speedup": SPEEDUP},
              "missed": missed, "cpu_count": os.cpu_count(), "max_tokens": args.max_tokens, "seq_len": args.seq_len}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print("\n" + table(rows, args.processes))
    print("\n".join(["", "targets missed:", *missed] if missed else ["", "all targets met"]))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
