"""On-policy rounds against more off-policy KD, from the same starting student, at equal student steps and equal
teacher tokens (`make bench-on-policy`): prints a table and writes JSON.

Arms, each from --start (the demo's KD student by default):
  off-policy  train-student on the off-policy cache (--cache, teacher-graded text) for rounds x steps steps
  on-policy   `distily on-policy` (--loss, --mix) for --rounds rounds of --steps steps, --num-sequences x --max-seq-len tokens each
              (rounds x sequences x length = the off-policy cache's tokens by default: equal teacher tokens)

Measured on prompts the students never trained on: the first --prompt-tokens tokens of the held-out Lee articles
(the eval text), continued by each student (temperature 1, --new-tokens tokens, a fixed seed per prompt):
  teacher NLL   the teacher's mean per-token negative log-likelihood of the student's continuations (lower: the
                teacher would have written them)
  reverse KL    the exact KL(student || teacher) over the vocabulary at those positions, averaged
  held-out ppl  perplexity on the Lee articles (eval/perplexity.py, 512-token windows)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *cmd], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def held_out_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    from pipeline.resolve import DEFAULT_EVAL_DATASET, DatasetSpec, load_texts

    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in load_texts(DatasetSpec(DEFAULT_EVAL_DATASET))]
    return [d[:length] for d in docs if len(d) >= length][:n]


@torch.no_grad()
def on_prompts(student_dir: str, teacher, prompts: list[list[int]], new_tokens: int, seed: int) -> dict:
    """The student's continuations of the prompts: the teacher's NLL of them and the exact reverse KL there."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    torch.manual_seed(seed)
    out = student.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=student.config.eos_token_id)
    k = ids.shape[1]
    logq = torch.log_softmax(student(out).logits[:, k - 1 : -1].float(), -1)
    logp = torch.log_softmax(teacher(out).logits[:, k - 1 : -1].float(), -1)
    written = out[:, k:]
    nll = -logp.gather(-1, written[..., None])[..., 0]
    rkl = (logq.exp() * (logq - logp)).sum(-1)
    return {"teacher_nll": nll.mean().item(), "reverse_kl": rkl.mean().item(), "continuations": out[:3, k:].tolist()}


def perplexity(model_dir: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.perplexity import evaluate_perplexity
    from pipeline.resolve import DEFAULT_EVAL_DATASET, DatasetSpec, load_texts

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_perplexity(model, tok, load_texts(DatasetSpec(DEFAULT_EVAL_DATASET)), 512, 256)["perplexity"]


def train_arms(a, out: Path) -> dict:
    steps = a.rounds * a.steps
    seconds = {}
    off = out / f"off-policy-seed{a.seed}"
    if not (off / "final" / "config.json").exists():
        seconds["off-policy"] = run(["train-student", "--cache", a.cache, "--student", a.start, "-o", str(off),
                                     "--loss", "forward_kl", "--max-steps", str(steps), "--lr", str(a.lr),
                                     "--lr-schedule", "constant", "--warmup-steps", "3", "--batch-size", "4",
                                     "--eval-sequences", "8", "--seed", str(a.seed), "--save-steps", str(steps),
                                     "--logging-steps", "10", "--resume"])
    tag = ("" if a.loss == "token_reverse_kl" else f"-{a.loss}") + ("" if a.mix == 1 else f"-mix{a.mix}")
    on = out / f"on-policy{tag}-seed{a.seed}"
    seconds["on-policy"] = run(["on-policy", "-o", str(on), "--loss", a.loss, "--mix", str(a.mix), "--student", a.start, "--rounds", str(a.rounds), "--steps",
                                str(a.steps), "--num-sequences", str(a.num_sequences), "--max-seq-len", str(a.max_seq_len),
                                "--prefix-tokens", "32", "--lr", str(a.lr), "--seed", str(a.seed)])
    rounds = json.loads((on / "rounds.json").read_text())["rounds"]
    arms = {"start": a.start, "off-policy": str(off / "final")}
    mix = "" if a.mix == 1 else f", mix {a.mix}"
    arms |= {f"on-policy ({a.loss}{mix}) round {e['round']}": e["student_out"] for e in rounds}
    return {"arms": arms, "seconds": seconds, "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", default="runs/demo/student-kd/final")
    p.add_argument("--cache", default="runs/demo/cache", help="the off-policy arm's cache (the start's own)")
    p.add_argument("--out", default="runs/bench-on-policy")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--num-sequences", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="token_reverse_kl", help="the on-policy arm's train-student --loss")
    p.add_argument("--mix", type=float, default=1.0, help="the on-policy arm's --mix (GKD's lambda)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--json", default="bench-results/on_policy.json")
    a = p.parse_args()
    os.chdir(ROOT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.resolve import resolve_model

    out = Path(a.out)
    trained = train_arms(a, out)
    teacher_dir, _ = resolve_model(None)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = held_out_prompts(tok, a.prompts, a.prompt_tokens)
    rows = {}
    for name, path in trained["arms"].items():
        rows[name] = on_prompts(path, teacher, prompts, a.new_tokens, a.seed) | {"ppl": perplexity(path)}
        rows[name]["text"] = [tok.decode(c) for c in rows[name].pop("continuations")]
        print(name, {k: v for k, v in rows[name].items() if k != "text"}, flush=True)
    off = rows["off-policy"]
    print(f"\n| student (seed {a.seed}) | teacher NLL of its continuations | / off-policy | reverse KL | held-out ppl | / off-policy |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['teacher_nll']:.3f} | {r['teacher_nll'] / off['teacher_nll']:.3f} | {r['reverse_kl']:.3f} "
              f"| {r['ppl']:.2f} | {r['ppl'] / off['ppl']:.3f} |")
    overhead = [e["seconds"].get("outside_stages", 0) / max(sum(e["seconds"].values()), 1e-9) for e in trained["rounds"]]
    print(f"\norchestrator's own time per round: {', '.join(f'{o:.2%}' for o in overhead)} of the round")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"args": vars(a), **trained, "rows": rows, "overhead_share": overhead}, indent=1))


if __name__ == "__main__":
    main()
