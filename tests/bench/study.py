"""`make study`: which recipe gives the best student at the demo's budget? Sets `make demo`'s defaults.

Every row trains the demo's student (15 of the embedded teacher's 30 layers, AdamW8bit, batches of 4 x 256
tokens from the demo's cache in the same order, --steps steps: 30, the demo's budget) with one thing changed, then measures perplexity
on the 50 held-out Lee articles (text no row trained on). Rows run one after another, each a
`distily train-student` process; a row whose result is already in the JSON is skipped, so an interrupted
study resumes. Prints a markdown table and writes `OUT/study.json` and `OUT/study.md`.

Also measured in the same run: the wall time of three students from one cache (capture included) against
three online-KD runs (one measured; the online runs share nothing, so three take three times as long).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The demo's budget (Makefile: TOKENS, SEQ_LEN, TOP_K, STUDENT_LAYERS, STEPS, BATCH).
CACHE_ARGS = ["--max-tokens", "65536", "--max-seq-len", "256", "--targets", "topk", "--top-k", "64"]


def cache_args(targets: str) -> list[str]:
    """CACHE_ARGS with another --targets."""
    return [targets if a == "topk" else a for a in CACHE_ARGS]

# Regime (i) of issue 27: one pass over fresh tokens, 200 steps x 4 x 256 (+ 16 held-out sequences), from Wikipedia
# articles (the gensim wheel's shortened enwiki dump) instead of the Lee corpus; held-out ppl stays on Lee's 50.
FRESH_TOKENS = str((200 * 4 + 16) * 256)
BASE = ["--student-layers", "15", "--init", "teacher-layers", "--optimizer", "adamw8bit", "--batch-size", "4",
        "--logging-steps", "5", "--eval-sequences", "16"]  # --warmup-steps: per row, scaled with its batch
DEMO_LR = "3e-4"  # the demo's learning rate before this study

# caches made on first use: placeholder -> (directory under the study's runs, teacher-cache arguments); a row's
# argument equal to a placeholder becomes the directory ({fresh_text} in the arguments: the regime (i) text, made
# once). The iid caches name --sampling and --samples: the defaults changed.
IID = ["--sampling", "iid"]
SYSTEMATIC = ["--sampling", "systematic", "--samples", "48"]  # the default since issue 27's systematic draws
FRESH = ["--dataset", "{fresh_text}", "--max-tokens", FRESH_TOKENS, "--max-seq-len", "256"]
CACHES = {"{both_cache}": ("cache-both", cache_args("both")),
          "{exact_cache}": ("cache-exact", [*cache_args("sampled-exact"), *IID, "--samples", "56"]),
          "{exact256_cache}": ("cache-exact256", [*cache_args("sampled-exact"), *IID, "--samples", "256"]),
          "{sys_cache}": ("cache-sys", [*cache_args("sampled-exact"), *SYSTEMATIC]),
          "{fresh_cache}": ("cache-fresh", [*FRESH, "--targets", "sampled-exact", *IID, "--samples", "56"]),
          "{fresh_topk_cache}": ("cache-fresh-topk", [*FRESH, "--targets", "topk"]),
          "{fresh_sys_cache}": ("cache-fresh-sys", [*FRESH, "--targets", "sampled-exact", *SYSTEMATIC]),
          "{sys72_cache}": ("cache-sys72", [*cache_args("sampled-exact"), "--sampling", "systematic", "--samples", "72"]),
          "{fresh_sys72_cache}": ("cache-fresh-sys72", [*FRESH, "--targets", "sampled-exact", "--sampling", "systematic",
                                                        "--samples", "72"]),
          "{sys88_cache}": ("cache-sys88", [*cache_args("sampled-exact"), "--sampling", "systematic", "--samples", "88"]),
          "{fresh_sys88_cache}": ("cache-fresh-sys88", [*FRESH, "--targets", "sampled-exact", "--sampling", "systematic",
                                                        "--samples", "88"]),
          "{sys128_cache}": ("cache-sys128", [*cache_args("sampled-exact"), "--sampling", "systematic", "--samples", "128"]),
          "{attn_last_cache}": ("cache-attn-last", [*CACHE_ARGS, "--qkv-layers", "30"])}

# name, what it tests, extra arguments ({teacher} and {hs_cache} are filled in)
ROWS = [
    ("ce", "CE only, auto init", ["--loss", "ce", "--lr", DEMO_LR]),
    ("kd-evenly-k64", "top-64 KD, evenly spaced init", ["--init-layers", "evenly", "--lr", DEMO_LR]),
    ("kd-auto-k64", "top-64 KD, auto init", ["--lr", DEMO_LR]),
    ("kd-auto-k8", "top-8 KD (first 8 of the cached 64), auto init", ["--kd-top-k", "8", "--lr", DEMO_LR]),
    ("online-auto", "online full-vocabulary KD (reference), auto init", ["--online-teacher", "{teacher}", "--lr", DEMO_LR]),
    ("kd-auto-k64-T2", "top-64 KD, T=2 on the renormalised top-k, auto init",
     ["--temperature", "2", "--tail", "renormalize", "--lr", DEMO_LR]),
    ("kd-auto-k64-lr1e-3", "top-64 KD, auto init, lr 1e-3", ["--lr", "1e-3"]),
    ("kd-auto-k64-lr3e-3", "top-64 KD, auto init, lr 3e-3", ["--lr", "3e-3"]),
    ("kd-auto-k64-v2", "top-64 KD from a format-2 cache (uint8 log-probs, hooks), auto init, lr 1e-3",
     ["--cache", "{both_cache}", "--kd-targets", "topk", "--lr", "1e-3"]),
    ("kd-auto-sampled64", "RS-KD: 64 sampled draws per position (same cache), auto init, lr 1e-3",
     ["--cache", "{both_cache}", "--kd-targets", "sampled", "--lr", "1e-3"]),
    # issue 27: samples with exact probabilities (Horvitz-Thompson weights, the true token always in), the default
    ("kd-auto-exact", "sampled-exact (the default): 56 draws with exact log-probs + the true token, auto init, lr 1e-3",
     ["--cache", "{exact_cache}", "--lr", "1e-3"]),
    ("kd-auto-exact256", "sampled-exact, 256 draws (4.6x the default's), lr 1e-3: how much of the gap is the draws' noise",
     ["--cache", "{exact256_cache}", "--lr", "1e-3"]),
    ("kd-auto-sys", "sampled-exact, 48 systematic draws (the default), lr 1e-3",
     ["--cache", "{sys_cache}", "--lr", "1e-3"]),
    ("kd-auto-exact-dpe28", "sampled-exact, 56 draws, each epoch a seeded subset worth 28 (--draws-per-epoch 28), lr 1e-3",
     ["--cache", "{exact_cache}", "--lr", "1e-3", "--draws-per-epoch", "28"]),
    ("fresh-online", "regime (i), one pass over fresh Wikipedia tokens: online full-vocabulary KD, lr 1e-3",
     ["--cache", "{fresh_cache}", "--online-teacher", "{teacher}", "--lr", "1e-3"]),
    ("fresh-exact", "regime (i), one pass over fresh Wikipedia tokens: sampled-exact, 56 draws, lr 1e-3",
     ["--cache", "{fresh_cache}", "--lr", "1e-3"]),
    ("fresh-k64", "regime (i), one pass over fresh Wikipedia tokens: top-64 + rest bucket, lr 1e-3",
     ["--cache", "{fresh_topk_cache}", "--lr", "1e-3"]),
    ("fresh-sys", "regime (i): sampled-exact, 48 systematic draws (the default), lr 1e-3",
     ["--cache", "{fresh_sys_cache}", "--lr", "1e-3"]),
    ("kd-auto-sys72", "sampled-exact, 72 systematic draws, lr 1e-3", ["--cache", "{sys72_cache}", "--lr", "1e-3"]),
    ("fresh-sys72", "regime (i): sampled-exact, 72 systematic draws, lr 1e-3", ["--cache", "{fresh_sys72_cache}", "--lr", "1e-3"]),
    ("kd-auto-sys88", "sampled-exact, 88 systematic draws, lr 1e-3", ["--cache", "{sys88_cache}", "--lr", "1e-3"]),
    ("fresh-sys88", "regime (i): sampled-exact, 88 systematic draws, lr 1e-3", ["--cache", "{fresh_sys88_cache}", "--lr", "1e-3"]),
    ("kd-auto-sys128", "sampled-exact, 128 systematic draws (over the 64-byte budget), lr 1e-3",
     ["--cache", "{sys128_cache}", "--lr", "1e-3"]),
    ("kd-auto-sys88-lr1.5e-3", "sampled-exact, 88 systematic draws, lr 1.5e-3", ["--cache", "{sys88_cache}", "--lr", "1.5e-3"]),
    ("kd-auto-sys88-lr7e-4", "sampled-exact, 88 systematic draws, lr 7e-4", ["--cache", "{sys88_cache}", "--lr", "7e-4"]),
    ("online-auto-lr7e-4", "online full-vocabulary KD (reference), auto init, lr 7e-4",
     ["--online-teacher", "{teacher}", "--lr", "7e-4"]),
    ("kd-auto-sys88-gn0.5", "sampled-exact, 88 systematic draws, lr 1e-3, gradient noise 0.5",
     ["--cache", "{sys88_cache}", "--lr", "1e-3", "--gradient-noise", "0.5"]),
    ("kd-auto-sys88-gn0.5-dpe66", "sampled-exact, 88 systematic draws, a fresh 66-draw subset each epoch, lr 1e-3, "
     "gradient noise 0.5", ["--cache", "{sys88_cache}", "--lr", "1e-3", "--gradient-noise", "0.5", "--draws-per-epoch", "66"]),
    ("online-auto-lr1e-3-gn0.5", "online full-vocabulary KD (reference), auto init, lr 1e-3, gradient noise 0.5",
     ["--online-teacher", "{teacher}", "--lr", "1e-3", "--gradient-noise", "0.5"]),
    # a noise level tuned for the cache students: twice the default's, and online KD at the same level (like for like)
    ("kd-auto-sys88-gn1.0", "sampled-exact, 88 systematic draws, lr 1e-3, gradient noise 1.0",
     ["--cache", "{sys88_cache}", "--lr", "1e-3", "--gradient-noise", "1.0"]),
    ("online-auto-lr1e-3-gn1.0", "online full-vocabulary KD (reference), auto init, lr 1e-3, gradient noise 1.0",
     ["--online-teacher", "{teacher}", "--lr", "1e-3", "--gradient-noise", "1.0"]),
    ("fresh-sys88-gn0.5", "regime (i): sampled-exact, 88 systematic draws, lr 1e-3, gradient noise 0.5",
     ["--cache", "{fresh_sys88_cache}", "--lr", "1e-3", "--gradient-noise", "0.5"]),
    ("fresh-online-gn0.5", "regime (i): online full-vocabulary KD, lr 1e-3, gradient noise 0.5",
     ["--cache", "{fresh_cache}", "--online-teacher", "{teacher}", "--lr", "1e-3", "--gradient-noise", "0.5"]),
    ("kd-auto-k64-hs", "top-64 KD + hidden MSE (layernormed) on the copied layers, auto init",
     ["--cache", "{hs_cache}", "--hs-weight", "1", "--layer-mapper", "copied", "--hs-norm", "layernorm", "--lr", DEMO_LR]),
    # 2310.08797's losses at equal tokens, side by side on one cache holding teacher layer 27's hidden state and Q/K/V
    ("attn-kd", "top-64 KD alone, lr 1e-3 (cache with layer 27's Q/K/V and hidden state)",
     ["--cache", "{attn_cache}", "--lr", "1e-3"]),
    ("attn-kd-relation", "KD + MiniLMv2 Q/K/V relation KL, student last <- teacher 27 (upper-middle)",
     ["--cache", "{attn_cache}", "--lr", "1e-3", "--attn-loss", "mha_relation"]),
    ("attn-kd-relation-w0.1", "KD + 0.1 x the relation KL (as above)",
     ["--cache", "{attn_cache}", "--lr", "1e-3", "--attn-loss", "mha_relation", "--attn-weight", "0.1"]),
    ("attn-kd-relation-last", "KD + the relation KL, student last <- teacher 30 (the layer it was copied from)",
     ["--cache", "{attn_last_cache}", "--lr", "1e-3", "--attn-loss", "mha_relation", "--attn-layer-mapper", "last"]),
    ("attn-kd-hidden", "KD + hidden MSE (layernormed), student last <- teacher 27 (upper-middle)",
     ["--cache", "{attn_cache}", "--lr", "1e-3", "--hs-weight", "1", "--layer-mapper", "upper-middle", "--hs-norm", "layernorm"]),
]
ROWS += [
    # 1.58-bit students (--student-quant bitnet): ternary decoder linears, teacher-initialised, exported packed
    ("bitnet-30", "1.58-bit student of the teacher's shape (all 30 layers), top-64 KD, lr 1e-3",
     ["--student-quant", "bitnet", "--student-layers", "30", "--lr", "1e-3"]),
    ("bitnet-15", "1.58-bit 15-layer student, top-64 KD, auto init, lr 1e-3",
     ["--student-quant", "bitnet", "--lr", "1e-3"]),
]
ROWS += [
    # the losses of issue 22 section 3, each against its row above: sinkhorn vs kd-auto-k64-lr1e-3, the two hidden
    # losses vs kd-auto-k64-hs (the same run with --hs-loss mse); sinkhorn first, as the hidden rows need an auto row
    ("sinkhorn", "top-64 Sinkhorn divergence (discrete cost, eps 0.1) instead of the forward KL, auto init, lr 1e-3",
     ["--loss", "sinkhorn", "--lr", "1e-3"]),
    ("kd-auto-k64-hs-mi", "top-64 KD + hidden -InfoNCE (layernormed, t 0.1) on the copied layers, auto init",
     ["--cache", "{hs_cache}", "--hs-weight", "1", "--layer-mapper", "copied", "--hs-norm", "layernorm",
      "--hs-loss", "mutual_information", "--lr", DEMO_LR]),
    ("kd-auto-k64-hs-logsum", "top-64 KD + hidden logsum (Distily's, alpha 4; layernormed) on the copied layers, auto init",
     ["--cache", "{hs_cache}", "--hs-weight", "1", "--layer-mapper", "copied", "--hs-norm", "layernorm",
      "--hs-loss", "logsum", "--lr", DEMO_LR]),
]
ROWS += [
    # issue 22 section 4: int8 forward and backward matmuls (float latent weights), against kd-auto-k64-lr1e-3
    ("int8-backward", "top-64 KD, auto init, lr 1e-3, decoder matmuls in int8 (--int8-training)",
     ["--lr", "1e-3", "--int8-training"]),
]
ROWS += [
    # issue 22 section 1: the logit and hidden-state gradients combined by PCGrad / fixed-ratio GradNorm, against
    # kd-auto-k64-hs (their plain sum); each row's mean logged cosine between the two is in study.json
    ("kd-auto-k64-hs-pcgrad", "top-64 KD + hidden MSE (layernormed) on the copied layers, PCGrad, auto init",
     ["--cache", "{hs_cache}", "--hs-weight", "1", "--layer-mapper", "copied", "--hs-norm", "layernorm",
      "--loss-balance", "pcgrad", "--lr", DEMO_LR]),
    ("kd-auto-k64-hs-gradnorm", "top-64 KD + hidden MSE (layernormed), hidden gradient at 0.3x the logit one's norm",
     ["--cache", "{hs_cache}", "--hs-weight", "0.3", "--layer-mapper", "copied", "--hs-norm", "layernorm",
      "--loss-balance", "gradnorm", "--lr", DEMO_LR]),
]
ROWS += [
    # issue 22 section 2: embedding noise (NEFTune) and gradient noise against kd-auto-k64-lr1e-3 (and its seeds,
    # kd-auto-k64-lr1e-3-seed1, to read differences against)
    ("kd-auto-k64-neftune5", "top-64 KD, auto init, lr 1e-3, NEFTune embedding noise alpha 5",
     ["--lr", "1e-3", "--embedding-noise", "5"]),
    ("kd-auto-k64-gradnoise0.5", "top-64 KD, auto init, lr 1e-3, gradient noise of 0.5x the gradient's norm (annealed)",
     ["--lr", "1e-3", "--gradient-noise", "0.5"]),
    # issue 22 section 6: the online reference at the lr of the top-64 and RS-KD rows it is read against
    ("online-auto-lr1e-3", "online full-vocabulary KD (reference), auto init, lr 1e-3",
     ["--online-teacher", "{teacher}", "--lr", "1e-3"]),
]
ROWS += [
    # issue 22 section 2: "smaller batch performs so much better"? Equal tokens (steps x batch = the base row's,
    # warm-up scaled alike), lr scaled with the square root of the batch (Adam's usual rule) from the base row's
    # 1e-3 at batch 4; against kd-auto-k64-lr1e-3 and its second seed
    *[(f"kd-auto-k64-b{b}", f"top-64 KD, auto init, batch {b}, lr {lr} (sqrt-scaled), {4 // b if b < 4 else '1/2'}x the steps",
       ["--batch-size", str(b), "--lr", lr]) for b, lr in ((1, "5e-4"), (2, "7e-4"), (8, "1.4e-3"))],
]
# The rows a longer budget (--steps other than 30) runs unless --rows says otherwise (issue 22 section 6): KD vs CE
# and a second seed, top-64 vs RS-KD vs online, the balancing and noise rows, the 1.58-bit same-shape student
LONG_ROWS = ["kd-auto-k64-lr1e-3", "ce", "bitnet-30", "kd-auto-k64-lr1e-3-seed1", "kd-auto-sampled64", "online-auto-lr1e-3",
             "kd-auto-k64-hs", "kd-auto-k64-hs-pcgrad", "kd-auto-k64-hs-gradnorm", "kd-auto-k64-neftune5",
             "kd-auto-k64-gradnoise0.5"]
ATTN_LAYER = "27"  # upper-middle of the teacher's 30: the layer 2310.08797 and MiniLMv2 transfer from


def split_seed(name: str) -> tuple[str, int | None]:
    """("NAME", N) for "NAME-seedN"; (name, None) for any other name."""
    base, sep, seed = name.rpartition("-seed")
    return (base, int(seed)) if sep and seed.isdigit() else (name, None)


def find_row(name: str) -> tuple[str, str, list[str]] | None:
    """A row of ROWS by name; NAME-seedN is row NAME with --seed N (init and data order), for any N."""
    row = next((r for r in ROWS if r[0] == name), None)
    base, seed = split_seed(name)
    if row is None and seed is not None and (b := find_row(base)) and "--seed" not in b[2]:
        row = (name, f"{b[1]}, --seed {seed}", [*b[2], "--seed", str(seed)])
    return row


def distily(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "distily"), *args], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def fresh_text(runs: Path) -> Path:
    """runs/fresh.jsonl: the prose of the articles in the gensim wheel's shortened English Wikipedia dump (markup,
    templates, tables and references stripped; paragraphs of at least 200 characters), made once."""
    import bz2
    import re

    out = runs / "fresh.jsonl"
    if out.exists():
        return out
    from pipeline.resolve import _package_dir

    dump = _package_dir("gensim", "pip install --no-deps gensim") / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    xml = bz2.decompress(dump.read_bytes()).decode("utf-8")
    docs = []
    for text in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        text = re.sub(r"&lt;", "<", re.sub(r"&gt;", ">", re.sub(r"&amp;", "&", re.sub(r"&quot;", '"', text))))
        for _ in range(3):  # nested templates and tables
            text = re.sub(r"\{\{[^{}]*\}\}|\{\|.*?\|\}", "", text, flags=re.S)
        text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->|<[^>]+>", "", text, flags=re.S)
        text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
        text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
        text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
        text = re.sub(r"'{2,}", "", text)
        paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) >= 200 and not p.lstrip().startswith(("=", "*", "|", "!", "#"))]
        if paragraphs:
            docs.append("\n".join(paragraphs))
    runs.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return out


def perplexity(model_dir: str, texts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.perplexity import evaluate_perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    r = evaluate_perplexity(model, AutoTokenizer.from_pretrained(model_dir), texts, 512, 256, 4)
    return {"perplexity": r["perplexity"], "bits_per_byte": r["bits_per_byte"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/study")
    ap.add_argument("--runs", default="runs/study")
    ap.add_argument("--rows", default="", help="comma-separated row names, run in this order; NAME-seedN runs row "
                    "NAME with --seed N (default: all; at --steps other than 30, LONG_ROWS)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per row [30, the demo's]")
    args = ap.parse_args()
    names = args.rows.split(",") if args.rows else LONG_ROWS if args.steps != 30 else [r[0] for r in ROWS]
    unknown = sorted(n for n in names if find_row(n) is None)
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {unknown}; the rows are {', '.join(r[0] for r in ROWS)}")
    from pipeline.resolve import DatasetSpec, load_texts, resolve_model

    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "study.json"
    study = json.loads(jpath.read_text()) if jpath.exists() else {"rows": {}}
    if study.get("steps", args.steps) != args.steps:
        raise SystemExit(f"{jpath} holds rows of {study['steps']} steps; use another --out for --steps {args.steps}")
    study["steps"] = args.steps
    save = lambda: jpath.write_text(json.dumps(study, indent=2))  # noqa: E731
    texts = load_texts(DatasetSpec("lee"))
    teacher, _ = resolve_model(None)
    cache = runs / "cache"
    if "capture_s" not in study:
        study["capture_s"] = distily("teacher-cache", "-o", str(cache), *CACHE_ARGS)
        save()
    if "teacher" not in study:
        study["teacher"] = perplexity(teacher, texts)
        save()
    for name, what, extra in map(find_row, dict.fromkeys(names)):  # in the order asked
        if name in study["rows"]:
            continue
        hs_cache = runs / "cache-hs"
        if "{hs_cache}" in extra and not (hs_cache / "manifest.json").exists():
            # the layers the auto-init student copied, in HF hidden-state numbering (layer i's output = i + 1)
            auto = next(r for r in study["rows"].values() if r.get("teacher_layers") and r["init"] == "auto")
            layers = ",".join(str(l + 1) for l in auto["teacher_layers"])
            study["hs_capture_s"] = distily("teacher-cache", "-o", str(hs_cache), *CACHE_ARGS, "--hidden-layers", layers)
        for key, (dirname, cache_extra) in CACHES.items():
            if key in extra and not (runs / dirname / "manifest.json").exists():
                cache_extra = [str(fresh_text(runs)) if a == "{fresh_text}" else a for a in cache_extra]
                study[f"{dirname}_capture_s"] = distily("teacher-cache", "-o", str(runs / dirname), *cache_extra)
        attn_cache = runs / "cache-attn"
        if "{attn_cache}" in extra and not (attn_cache / "manifest.json").exists():
            study["attn_capture_s"] = distily("teacher-cache", "-o", str(attn_cache), *CACHE_ARGS, "--hidden-layers",
                                              ATTN_LAYER, "--qkv-layers", ATTN_LAYER)
        if "{attn_cache}" in extra and "qkv_bytes_per_token_layer" not in study:
            shards = json.loads((attn_cache / "manifest.json").read_text())["shards"]
            tokens = sum(s["tokens"] for s in shards)
            study["qkv_bytes_per_token_layer"] = sum(s["hidden_bytes"] * s["qkv_share"] for s in shards) / tokens
        extra = [str(runs / CACHES[a][0]) if a in CACHES else a.replace("{attn_cache}", str(attn_cache))
                 .replace("{teacher}", teacher).replace("{hs_cache}", str(hs_cache)) for a in extra]
        if "--gradient-noise" not in extra:  # rows from before the noise was the default keep meaning what they measured
            extra = [*extra, "--gradient-noise", "0"]
        run_dir = runs / name
        # a row with its own --batch-size sees the same tokens: steps and warm-up scale inversely with the batch
        batch = int(extra[extra.index("--batch-size") + 1]) if "--batch-size" in extra else 4
        steps = str(args.steps * 4 // batch)
        args_ = ["train-student", "--cache", str(cache), "-o", str(run_dir), *BASE, "--max-steps", steps, "--save-steps", steps,
                 "--warmup-steps", str(max(1, 5 * 4 // batch)), *extra]
        print(f"== {name}: {what}\n   distily {' '.join(args_)}", flush=True)
        if (run_dir / "checkpoints").exists():
            args_.append("--resume")
        wall = distily(*args_)
        result = json.loads((run_dir / "result.json").read_text())
        run_config = json.loads((run_dir / "run_config.json").read_text())
        student = run_config["student"]
        study["rows"][name] = {
            "what": what, "args": extra, "train_wall_s": wall, **perplexity(str(run_dir / "final"), texts),
            "cache_eval_forward_kl": result.get("eval/forward_kl"), "cache_eval_ce": result.get("eval/ce"),
            "tokens_seen": result["tokens_seen"], "teacher_layers": student.get("teacher_layers"),
            "init": "auto" if student.get("layer_selection") else "evenly" if "evenly" in extra else "given",
            "selection": {k: student["layer_selection"][k] for k in ("layers", "kl", "evenly_kl", "method", "seconds", "scored")}
            if student.get("layer_selection") and "reused" not in student["layer_selection"] else None,
        }
        logged = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if '"step_time_s"' in l]
        if logged:  # step time (median over the logging windows) and the training's peak memory
            times = sorted(r["step_time_s"] for r in logged)
            study["rows"][name].update(step_time_s=times[len(times) // 2],
                                       peak_memory_mb=max(r["peak_memory_mb"] for r in logged))
            cosines = [r["grad/cos_hs"] for r in logged if "grad/cos_hs" in r]
            if cosines:  # the logit vs hidden-state gradient cosine, logged every window (stage_student/losses/balance.py)
                study["rows"][name].update(grad_cos_hs_mean=sum(cosines) / len(cosines), grad_cos_hs_min=min(cosines))
        if "--student-quant" in extra:  # the packed export's size on disk
            distily("export", str(run_dir), str(run_dir / "export"))
            study["rows"][name]["export"] = json.loads((run_dir / "export" / "export.json").read_text())
        save()
    report(study, out)


# Each seeded reference (online KD) and the cache rows read against it, seed by seed (the same seed is the same init
# and data order on both sides); issue 27 regime (ii) over the demo text and regime (i) over fresh text
SEEDED = {"online-auto-lr1e-3": ("kd-auto-sys128", "kd-auto-sys88", "kd-auto-sys88-gn0.5", "online-auto-lr1e-3-gn0.5",
                                 "kd-auto-sys72", "kd-auto-sys", "kd-auto-exact", "kd-auto-k64-lr1e-3"),
          # like for like: the cache students with the default gradient noise against online KD with it (and, at
          # twice the noise, against online KD with the default: the recipe each would use)
          "online-auto-lr1e-3-gn0.5": ("kd-auto-sys88-gn0.5", "kd-auto-sys88-gn0.5-dpe66", "kd-auto-sys88-gn1.0"),
          "online-auto-lr1e-3-gn1.0": ("kd-auto-sys88-gn1.0",),
          "fresh-online-gn0.5": ("fresh-sys88-gn0.5",),
          "fresh-online": ("fresh-sys88", "fresh-sys88-gn0.5", "fresh-sys72", "fresh-sys", "fresh-exact", "fresh-k64")}


def by_seed(rows: dict, base: str) -> dict[int, float]:
    """{seed: held-out perplexity} of row `base` (seed 0) and its `base-seedN` rows."""
    seeds = {0: rows[base]["perplexity"]} if base in rows else {}
    seeds.update({seed: r["perplexity"] for n, r in rows.items() for b, seed in [split_seed(n)] if b == base and seed is not None})
    return dict(sorted(seeds.items()))


def seed_lines(rows: dict) -> tuple[list[str], dict]:
    """Per seeded group: mean and spread of its seeds; against its reference, the ratio of the means and the paired
    ratio (each seed against the reference's same seed) with a 95% t-interval over the seeds both have."""
    from scipy.stats import t as student_t  # scipy: lm-eval's scikit-learn brings it
    lines = ["", "| rows | seeds | mean ppl | sd / mean | / reference: ratio of means (common seeds) | paired: mean ratio [95% interval] |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for ref, others in SEEDED.items():
        r = by_seed(rows, ref)
        for name in (ref, *others):
            s = by_seed(rows, name)
            if len(s) < 2:
                continue
            v = list(s.values())
            mean = sum(v) / len(v)
            sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
            entry = {"seeds": s, "mean": mean, "sd_over_mean": sd / mean}
            cols = [name, ",".join(map(str, s)), f"{mean:.2f}", f"{sd / mean:.1%}", "1", "-"]
            common = [k for k in s if k in r]
            if name != ref and len(common) >= 2:
                logs = [math.log(s[k] / r[k]) for k in common]
                m = sum(logs) / len(logs)
                half = student_t.ppf(0.975, len(logs) - 1) * (sum((x - m) ** 2 for x in logs) / (len(logs) - 1) / len(logs)) ** 0.5
                ratio = sum(s[k] for k in common) / sum(r[k] for k in common)
                entry.update(ratio_of_means=ratio, paired_ratio=math.exp(m), paired_95=[math.exp(m - half), math.exp(m + half)])
                cols[4:] = [f"{ratio:.3f}x", f"{math.exp(m):.3f}x [{math.exp(m - half):.3f}, {math.exp(m + half):.3f}] over {len(common)}"]
            lines.append("| " + " | ".join(cols) + " |")
            summary[name] = entry
    return (lines, {"seeds": summary}) if summary else ([], {})


def report(study: dict, out: Path) -> None:
    t = study["teacher"]["perplexity"]
    rows = study["rows"]
    ce = rows.get("ce", {}).get("perplexity")
    lines = [f"{study['steps']} steps of 4 x 256 tokens per row (rows with another batch: the same tokens). Teacher held-out perplexity {t:.2f} "
             f"(bits/byte {study['teacher']['bits_per_byte']:.3f}).", "",
             "| row | what | held-out ppl | / teacher | / CE only | bits/byte | cache eval KL | train wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["perplexity"]):
        kl = r.get("cache_eval_forward_kl")
        cols = [name, r["what"], f"{r['perplexity']:.2f}", f"{r['perplexity'] / t:.2f}",
                f"{r['perplexity'] / ce:.3f}" if ce else "-", f"{r['bits_per_byte']:.3f}",
                f"{kl:.4f}" if kl is not None else "-", f"{r['train_wall_s']:.0f}"]
        lines.append("| " + " | ".join(cols) + " |")
    summary = {}
    if "kd-auto-sampled64" in rows and "kd-auto-k64-v2" in rows:
        summary["sampled_over_topk64_ppl"] = rows["kd-auto-sampled64"]["perplexity"] / rows["kd-auto-k64-v2"]["perplexity"]
    if "kd-auto-k64" in rows and "online-auto" in rows:
        summary["topk64_over_online_ppl"] = rows["kd-auto-k64"]["perplexity"] / rows["online-auto"]["perplexity"]
    three = [n for n in ("kd-auto-k64", "kd-auto-k8", "kd-auto-k64-T2") if n in rows]
    if len(three) == 3 and "online-auto" in rows:
        cached = study["capture_s"] + sum(rows[n]["train_wall_s"] for n in three)
        online = 3 * rows["online-auto"]["train_wall_s"]
        summary.update(three_cached_s=cached, three_online_s=online, three_cached_over_online=cached / online)
    if "attn-kd" in rows:
        for name in ("attn-kd-relation", "attn-kd-relation-w0.1", "attn-kd-relation-last", "attn-kd-hidden"):
            if name in rows:
                summary[f"{name}_over_kd_ppl"] = rows[name]["perplexity"] / rows["attn-kd"]["perplexity"]
        summary["qkv_bytes_per_token_layer"] = study.get("qkv_bytes_per_token_layer")
    for name, base in (("sinkhorn", "kd-auto-k64-lr1e-3"), ("kd-auto-k64-hs-mi", "kd-auto-k64-hs"),
                       ("kd-auto-k64-hs-logsum", "kd-auto-k64-hs"), ("kd-auto-k64-hs-pcgrad", "kd-auto-k64-hs"),
                       ("kd-auto-k64-hs-gradnorm", "kd-auto-k64-hs")):
        if name in rows and base in rows:
            summary[f"{name}_over_{base}_ppl"] = rows[name]["perplexity"] / rows[base]["perplexity"]
    base = rows.get("kd-auto-k64-lr1e-3")
    if base:  # a second seed; each batch size, noise and the other targets against the batch-4 top-64 row
        for name in ("kd-auto-k64-lr1e-3-seed1", "kd-auto-k64-neftune5", "kd-auto-k64-gradnoise0.5", "kd-auto-k64-b1",
                     "kd-auto-k64-b2", "kd-auto-k64-b8", "kd-auto-sampled64", "online-auto-lr1e-3", "ce"):
            if name in rows:
                summary[f"{name}_over_kd-auto-k64-lr1e-3_ppl"] = rows[name]["perplexity"] / base["perplexity"]
    if "int8-backward" in rows and "kd-auto-k64-lr1e-3" in rows:
        i8, f = rows["int8-backward"], rows["kd-auto-k64-lr1e-3"]
        summary["int8_over_float"] = {k: i8[k] / f[k] for k in ("perplexity", "step_time_s", "peak_memory_mb") if k in i8 and k in f}
    for name in ("bitnet-30", "bitnet-15"):
        if name in rows and rows[name].get("export"):
            e = rows[name]["export"]
            summary[f"{name}_export"] = {k: e.get(k) for k in ("total_bytes", "packed_linear_bytes", "bits_per_linear_param",
                                                               "full_precision_bytes")}
    sel = next((r["selection"] for r in rows.values() if r.get("selection")), None)
    if sel:
        summary["selection"] = sel
    more, seeded = seed_lines(rows)
    lines += more
    study["summary"] = summary = {**summary, **seeded}
    if summary:
        lines += [""] + [f"- {k}: {json.dumps(v) if isinstance(v, dict) else (f'{v:.3f}' if isinstance(v, float) else v)}"
                         for k, v in summary.items() if k != "seeds"]  # the seeds: the table above
    (out / "study.json").write_text(json.dumps(study, indent=2))
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
