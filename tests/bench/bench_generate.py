"""`make study-generate`: students trained on data the teacher wrote, against the corpus, at equal tokens and steps.

For each data source: `distily generate` (except the corpus row) under vLLM, `distily teacher-cache` over it
(--max-tokens TOKENS, the same for every row), then the study's student (15 of 30 layers, auto init, AdamW8bit,
lr 1e-3, --steps steps of 4 x 256 tokens) and its perplexity on the 50 held-out Lee articles (text neither the
corpus row nor any --prompts source holds: prompts come from the Lee training text), and on 48 held-out sequences
the teacher wrote (`mix`, another seed: the text the OOD generators aim at). Prints a table, writes
OUT/generate.json and OUT/generate.md; rows already in the JSON are skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import BASE, ROOT, distily, perplexity  # noqa: E402

# row name: (generator, extra generate flags); the corpus row captures the Lee training text itself
ROWS = {"corpus": (None, []), "prefix": ("prefix", []), "random": ("random", []), "shuffled": ("shuffled", []),
        "structured": ("structured", []), "mix": ("mix", []), "prefix-t0.7": ("prefix", ["--temperature", "0.7"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-results/generate")
    ap.add_argument("--runs", default="runs/generate")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=36864, help="cache tokens per row (144 sequences of 256)")
    ap.add_argument("--num-sequences", type=int, default=176, help="generated sequences per row (<= 256 tokens each)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline.resolve import DatasetSpec, load_texts, resolve_model

    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "generate.json"
    res = json.loads(jpath.read_text()) if jpath.exists() else {"rows": {}}
    res.update(steps=args.steps, tokens=args.tokens, num_sequences=args.num_sequences)
    save = lambda: jpath.write_text(json.dumps(res, indent=2))  # noqa: E731
    texts = load_texts(DatasetSpec("lee"))
    if "teacher" not in res:
        res["teacher"] = perplexity(resolve_model(None)[0], texts)
        save()
    for name in args.rows.split(","):
        if name in res["rows"]:
            continue
        row: dict = {}
        data = runs / f"data-{name}"
        generator, extra = ROWS[name]
        if generator:
            row["generate_s"] = distily("generate", "-o", str(data), "--generator", generator, "--num-sequences",
                                        str(args.num_sequences), "--max-seq-len", "256", "--sequences-per-shard", "88",
                                        *extra)
            stats = json.loads((data / "generated.json").read_text())["stats"]
            row.update(gen_tokens_per_s=stats["generated_tokens_per_s"], gen_tokens=stats["tokens"],
                       mean_tokens=stats["mean_tokens"], stopped_fraction=stats["stopped_fraction"],
                       retokenise_differs_fraction=stats["retokenise_differs_fraction"], generators=stats["generators"])
        cache = runs / f"cache-{name}"
        row["capture_s"] = distily("teacher-cache", "-o", str(cache), "--max-tokens", str(args.tokens), "--max-seq-len",
                                   "256", "--top-k", "64", *(["--dataset", str(data)] if generator else []))
        row["cache_sequences"] = json.loads((cache / "manifest.json").read_text())["dataset"]["num_sequences"]
        run_dir = runs / f"student-{name}"
        steps = str(args.steps)
        row["train_s"] = distily("train-student", "--cache", str(cache), "-o", str(run_dir), *BASE, "--lr", "1e-3",
                                 "--max-steps", steps, "--save-steps", steps,
                                 *(["--resume"] if (run_dir / "checkpoints").exists() else []))
        result = json.loads((run_dir / "result.json").read_text())
        row.update(perplexity(str(run_dir / "final"), texts), tokens_seen=result["tokens_seen"],
                   cache_eval_forward_kl=result.get("eval/forward_kl"))
        res["rows"][name] = row
        save()
    # A second held-out text: what the teacher writes (mix, another seed), where the OOD generators should help.
    held = runs / "heldout-mix"
    if not (held / "generated.json").exists():
        distily("generate", "-o", str(held), "--generator", "mix", "--num-sequences", "48", "--max-seq-len", "256",
                "--seed", "987", "--sequences-per-shard", "48")
    gen_texts = load_texts(DatasetSpec(str(held)))
    if "teacher_on_generated" not in res:
        res["teacher_on_generated"] = perplexity(resolve_model(None)[0], gen_texts)
    for name, row in res["rows"].items():
        if "generated_perplexity" not in row:
            row["generated_perplexity"] = perplexity(str(runs / f"student-{name}" / "final"), gen_texts)["perplexity"]
    save()
    report(res, out)


def report(res: dict, out: Path) -> None:
    t = res["teacher"]["perplexity"]
    rows = res["rows"]
    base = rows.get("corpus", {}).get("perplexity")
    tg = res.get("teacher_on_generated", {}).get("perplexity")
    lines = [f"{res['steps']} steps of 4 x 256 tokens, caches of {res['tokens']} tokens. Held-out Lee perplexity (teacher "
             f"{t:.2f}); teacher-written held-out text (48 `mix` sequences, seed 987; teacher {tg or float('nan'):.2f}).", "",
             "| data | held-out Lee ppl | / teacher | / corpus | teacher-written ppl | / teacher | gen tok/s | tokens/seq "
             "| ended by EOS | re-tokenises differently | cache seqs | generate s | capture s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        if name not in rows:
            continue
        r = rows[name]
        g = lambda k, f: f.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        lines.append("| " + " | ".join([name, f"{r['perplexity']:.2f}", f"{r['perplexity'] / t:.2f}",
                                        f"{r['perplexity'] / base:.3f}" if base else "-", g("generated_perplexity", "{:.2f}"),
                                        f"{r['generated_perplexity'] / tg:.2f}" if tg and r.get("generated_perplexity") else "-",
                                        g("gen_tokens_per_s", "{:.0f}"),
                                        g("mean_tokens", "{:.0f}"), g("stopped_fraction", "{:.0%}"),
                                        g("retokenise_differs_fraction", "{:.0%}"), str(r["cache_sequences"]),
                                        g("generate_s", "{:.0f}"), g("capture_s", "{:.0f}")]) + " |")
    (out / "generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
