"""KD temperature with a top-k cache: how wrong is the teacher's tempered tail, and the KL built on it?

On the real teacher (the embedded SmolLM2-135M by default) over real text, against its full-vocabulary
logits: for k in (8, 64) and T in (2, 4), the tempered forward KL (x T^2) between the teacher and an
untrained depth-pruned student (the teacher without layers 5..19, a realistic early student) computed

  full       on the whole vocabulary (the reference);
  uniform    on the k+1 buckets, the tail spread evenly over the V-k other tokens (distily 0.1);
  power      on the k+1 buckets, the tail a power law continuing from p_k that sums to the tail mass
             (the best estimate tried);
  oracle     on the k+1 buckets with the exact tempered tail (the floor for any tail estimate: the
             buckets still lump the tail together).

Also the error of the teacher's tempered "rest" bucket itself, and T=1 for reference. The result: even the
oracle misses most of the tempered KL, so distily refuses T != 1 with --tail bucket. Prints a table,
writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.resolve import DatasetSpec, load_texts, pack, resolve_model  # noqa: E402
from stage_student.losses import kd as losses  # noqa: E402
from stage_student.students.select_layers import PrunedForward  # noqa: E402


def _log_power_sum(alpha, k: int, vocab_size: int):
    """log sum_{r=k+1}^{V} (r/k)^-alpha, by the midpoint integral (exact to O(alpha/k^2) per term)."""
    lo, hi = math.log((k + 0.5) / k), math.log((vocab_size + 0.5) / k)
    b = 1 - alpha  # integral of u^-alpha over [e^lo, e^hi] = (e^(b hi) - e^(b lo)) / b
    small = b.abs() < 1e-6
    ratio = torch.where(small, torch.full_like(b, hi - lo), torch.expm1(b * (hi - lo)) / torch.where(small, 1.0, b))
    return math.log(k) + b * lo + torch.log(ratio)


def log_tempered_tail(topk_logprobs, tail_mass, vocab_size: int, temperature: float = 1.0):
    """[N] log sum over the tail tokens of p^(1/T), from the cached top-k and tail mass alone.

    The tail (ranks k+1..V) is modelled as a power law that continues from the k-th cached probability,
    p_r = p_k (r/k)^-alpha, with alpha chosen so that the tail sums to the cached tail mass (bisection). Then
    sum p_r^(1/T) = p_k^(1/T) sum (r/k)^(-alpha/T). A tail too heavy for any decay (mass >= (V-k) p_k) is flat.
    At T=1 this is the tail mass itself. Spreading the tail evenly instead gives the largest possible
    tempered tail (Jensen) and overstates it.
    """
    log_m = torch.log(tail_mass.clamp_min(1e-30))
    if temperature == 1.0:
        return log_m
    k = topk_logprobs.shape[-1]
    log_pk = topk_logprobs[..., -1]
    target = log_m - log_pk  # log of the tail's size in units of p_k
    lo, hi = torch.zeros_like(log_m), torch.full_like(log_m, 1e4)
    for _ in range(60):  # the power sum falls as alpha grows
        mid = (lo + hi) / 2
        heavier = _log_power_sum(mid, k, vocab_size) > target
        lo, hi = torch.where(heavier, mid, lo), torch.where(heavier, hi, mid)
    alpha = (lo + hi) / 2
    log_sum = log_pk / temperature + _log_power_sum(alpha / temperature, k, vocab_size)
    flat = math.log(vocab_size - k) + (log_m - math.log(vocab_size - k)) / temperature
    return torch.where(target >= math.log(vocab_size - k), flat, log_sum)


def bucket_kl(student_logits, ids, topk_lp, log_rest, T):
    logp = torch.log_softmax(torch.cat([topk_lp / T, log_rest[:, None]], -1), -1)
    logq = losses.student_log_probs(student_logits, ids, T, "bucket")
    return T * T * losses.forward_kl(logp, logq)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default="bench-results/temperature.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = resolve_model(args.teacher)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.from_numpy(pack(tok, load_texts(DatasetSpec("lee")), args.seq_len)[: args.sequences]).long()
    n = model.config.num_hidden_layers
    t0 = time.perf_counter()
    with torch.inference_mode():
        teacher = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size).float()
        drop = range(n // 6, n // 6 + n // 2)  # 5..19 of 30
        pf = PrunedForward(model, ids, (torch.zeros(1, 1).long(), torch.zeros(1, 1), torch.zeros(1)))
        kept = [l for l in range(n) if l not in drop]
        student = pf.logits(kept)[0][:, :-1].reshape(-1, model.config.vocab_size).float()
    V = teacher.shape[-1]
    logp_full = torch.log_softmax(teacher, -1)
    rows = []
    for k in (8, 64):
        top_lp, top_ids = logp_full.topk(k, -1)
        tail = (1 - top_lp.double().exp().sum(-1)).clamp(0, 1).float()
        rest_mask = torch.ones_like(logp_full, dtype=torch.bool).scatter(-1, top_ids, False)
        for T in (1.0, 2.0, 4.0):
            full = (T * T * losses.forward_kl(torch.log_softmax(teacher / T, -1), torch.log_softmax(student / T, -1)))
            exact_rest = torch.logsumexp(torch.where(rest_mask, logp_full / T, float("-inf")), -1)
            uniform_rest = math.log(V - k) + (torch.log(tail.clamp_min(1e-30)) - math.log(V - k)) / T
            power_rest = log_tempered_tail(top_lp, tail, V, T)

            def rest_share(log_rest):  # the teacher's tempered probability of the rest bucket
                return torch.softmax(torch.cat([top_lp / T, log_rest[:, None]], -1), -1)[:, -1]

            exact_share = rest_share(exact_rest)
            row = {"k": k, "T": T, "full_kl": full.mean().item(), "exact_rest_share": exact_share.mean().item()}
            for name, log_rest in (("uniform", uniform_rest), ("power", power_rest), ("oracle", exact_rest)):
                kl = bucket_kl(student, top_ids, top_lp, log_rest, T)
                row[f"{name}_kl"] = kl.mean().item()
                row[f"{name}_kl_rel_err"] = (kl.mean() / full.mean() - 1).item()
                row[f"{name}_kl_abs_err_per_pos"] = (kl - full).abs().mean().item()
                row[f"{name}_rest_share"] = rest_share(log_rest).mean().item()
                row[f"{name}_rest_abs_err"] = (rest_share(log_rest) - exact_share).abs().mean().item()
            rows.append(row)
    result = {"teacher": path, "positions": int(teacher.shape[0]), "vocab": V, "seconds": time.perf_counter() - t0, "rows": rows}
    lines = ["| k | T | full KL | uniform KL (err) | power KL (err) | oracle KL (err) | rest share exact / uniform / power |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['k']} | {r['T']:g} | {r['full_kl']:.4f} | {r['uniform_kl']:.4f} ({r['uniform_kl_rel_err']:+.1%}) | "
            f"{r['power_kl']:.4f} ({r['power_kl_rel_err']:+.1%}) | {r['oracle_kl']:.4f} ({r['oracle_kl_rel_err']:+.1%}) | "
            f"{r['exact_rest_share']:.3f} / {r['uniform_rest_share']:.3f} / {r['power_rest_share']:.3f} |"
        )
    print("\n".join(lines))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({**result, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
