"""`make study` (cross-tokenizer rows): does distilling the embedded teacher into a student with ANOTHER tokenizer
help, at equal tokens and steps? Measured in held-out bits per byte (perplexity is not comparable across tokenizers).

The student: a byte-level BPE of --vocab tokens trained on the cache's training text (the Lee background corpus),
and a small Llama (--layers x --hidden) initialised at random with that tokenizer. Every row trains it from the
same cache (the demo's: 65,536 tokens of the embedded SmolLM2-135M teacher, top-64), re-tokenised for the student
(`--cross-tokenizer`), with the same seed, batches and steps; the rows differ only in the loss:

    ce       CE on the student's own next tokens only (the baseline: the same cached text in the student's tokens)
    bucket   + forward KL at byte-aligned positions over the byte-identical tokens, a span bucket and a rest bucket
    gold     bucket + ULD on the unmapped mass
    uld      ULD alone (sorted probabilities, no mapping) + CE

Then bits per byte on the 50 held-out Lee articles (text no row trained on) for the teacher and every student. The
target (issue 21): the KD student's gap to the teacher <= 0.8 x the CE-only student's gap. Rows already in the JSON
are skipped (resumable). Prints a markdown table; writes OUT/cross_tokenizer.json and OUT/cross_tokenizer.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CACHE_ARGS = ["--max-tokens", "65536", "--max-seq-len", "256", "--targets", "topk", "--top-k", "64"]  # the demo's size, top-k targets (--cross-tokenizer reads the top-k)
ROWS = [  # name, what, extra arguments (--cross-tokenizer METHOD among them)
    ("ce", "CE only (the student's own tokens)", ["--cross-tokenizer", "bucket", "--loss", "ce"]),
    ("bucket", "forward KL on mapped + span + rest buckets, + CE", ["--cross-tokenizer", "bucket", "--ce-weight", "1"]),
    ("gold", "bucket + ULD on the unmapped mass, + CE", ["--cross-tokenizer", "gold", "--ce-weight", "1"]),
    ("uld", "ULD alone (no mapping), + CE", ["--cross-tokenizer", "uld", "--ce-weight", "1"]),
    ("bucket-kd-only", "forward KL on the buckets alone (no CE)", ["--cross-tokenizer", "bucket", "--ce-weight", "0"]),
]


def distily(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "distily"), *args], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def make_student(out: Path, texts: list[str], vocab: int, layers: int, hidden: int) -> Path:
    """A byte-level BPE of `vocab` tokens trained on `texts`, and a random Llama of that vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def bits_per_byte(model_dir: str, texts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.perplexity import evaluate_perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    r = evaluate_perplexity(model, AutoTokenizer.from_pretrained(model_dir), texts, 512, 256, 4)
    return {"bits_per_byte": r["bits_per_byte"], "perplexity": r["perplexity"], "tokens": r["tokens"], "bytes": r["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/cross-tokenizer")
    ap.add_argument("--runs", default="runs/study-cross")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", default="2e-3")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    from pipeline.resolve import DatasetSpec, load_texts, resolve_model

    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "cross_tokenizer.json"
    shape = {k: getattr(args, k) for k in ("steps", "batch", "lr", "vocab", "layers", "hidden")}
    study = json.loads(jpath.read_text()) if jpath.exists() else {"rows": {}}
    if study.get("shape", shape) != shape:
        raise SystemExit(f"{jpath} holds rows of {study['shape']}; use another --out for {shape}")
    study["shape"] = shape
    save = lambda: jpath.write_text(json.dumps(study, indent=2))  # noqa: E731
    heldout = load_texts(DatasetSpec("lee"))
    cache = runs / "cache"
    if not (cache / "manifest.json").exists():
        study["capture_s"] = distily("teacher-cache", "-o", str(cache), *CACHE_ARGS)
        save()
    student = make_student(runs / f"student-bpe{args.vocab}", load_texts(DatasetSpec("lee-background")), args.vocab,
                           args.layers, args.hidden)
    if "teacher" not in study:
        study["teacher"] = bits_per_byte(resolve_model(None)[0], heldout)
        save()
    for name, what, extra in [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]:
        if name in study["rows"]:
            continue
        run_dir = runs / name
        steps = str(args.steps)
        cmd = ["train-student", "--cache", str(cache), "-o", str(run_dir), "--student", str(student),
               "--optimizer", "adamw", "--batch-size", str(args.batch), "--lr", args.lr,
               "--warmup-steps", "10", "--max-steps", steps, "--save-steps", steps, "--logging-steps", "20",
               "--eval-sequences", "16", *extra]
        print(f"== {name}: {what}\n   distily {' '.join(cmd)}", flush=True)
        if (run_dir / "checkpoints").exists():
            cmd.append("--resume")
        wall = distily(*cmd)
        result = json.loads((run_dir / "result.json").read_text())
        cross = json.loads((run_dir / "run_config.json").read_text())["cross_tokenizer"]
        study["rows"][name] = {"what": what, "args": extra, "train_wall_s": wall, "tokens_seen": result["tokens_seen"],
                               "cache_eval_ce": result.get("eval/ce"), "preflight": cross["preflight"],
                               **bits_per_byte(str(run_dir / "final"), heldout)}
        save()
    report(study, out)


def report(study: dict, out: Path) -> None:
    t = study["teacher"]["bits_per_byte"]
    rows = study["rows"]
    ce_gap = rows["ce"]["bits_per_byte"] - t if "ce" in rows else None
    s = study["shape"]
    lines = [f"Student: random Llama {s['layers']} x {s['hidden']}, byte-level BPE of {s['vocab']} tokens trained on the "
             f"training text; {s['steps']} steps of {s['batch']} cached sequences (lr {s['lr']}, AdamW). "
             f"Teacher (SmolLM2-135M) held-out bits/byte {t:.3f}.", "",
             "| row | what | held-out bits/byte | gap to teacher | gap / CE-only gap | train wall (s) |", "|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["bits_per_byte"]):
        gap = r["bits_per_byte"] - t
        lines.append(f"| {name} | {r['what']} | {r['bits_per_byte']:.3f} | {gap:.3f} | "
                     f"{gap / ce_gap:.3f} | {r['train_wall_s']:.0f} |" if ce_gap else f"| {name} | {r['what']} | "
                     f"{r['bits_per_byte']:.3f} | {gap:.3f} | - | {r['train_wall_s']:.0f} |")
    pre = (rows.get("bucket") or next(iter(rows.values())))["preflight"] if rows else None
    if pre:
        lines += ["", "Alignment on the first 64 cached sequences: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in pre.items())]
    kd = [n for n in rows if n != "ce"]
    if ce_gap and kd:
        best = min(kd, key=lambda n: rows[n]["bits_per_byte"])
        ratio = (rows[best]["bits_per_byte"] - t) / ce_gap
        study["summary"] = {"best": best, "gap_ratio": ratio, "target": 0.8, "met": ratio <= 0.8}
        lines += ["", f"Best KD row `{best}`: gap ratio {ratio:.3f} (target <= 0.8: {'met' if ratio <= 0.8 else 'not met'})."]
    (out / "cross_tokenizer.json").write_text(json.dumps(study, indent=2))
    (out / "cross_tokenizer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
