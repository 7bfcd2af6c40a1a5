"""`make bench-fidelity`: how close each kind of cached target comes to online full-vocabulary KD, in minutes.

    python tests/bench/bench_fidelity.py [--batches 4] [--student DIR] [--kinds topk:64,sampled-exact:64,...]
                                         [--draws 4] [--hidden] [--json bench-results/fidelity.json]

On the same student and the same batches (the embedded SmolLM2-135M teacher, batches of 4 x 256 tokens of the
demo's training text), for each target kind it computes the gradient of the cache's forward-KL loss over every
student parameter and compares it with the gradient of online KD (the full teacher distribution, computed here
in the loop): the angle between the two (degrees) and the norm ratio |g_cache| / |g_online|. No training.
--hidden compares the gradients wrt the student's final hidden states instead: the noise that reaches the network
below the head, without the head's (tied embedding's) own rows, which dominate the parameters' gradient.

Each kind's targets are made by the capture's own code (stage_teacher/targets.py) from the teacher's logits,
written as a real shard (pipeline/cache.py write_shard, so the stored form and its rounding are what a cache
holds) and read back by CacheReader; the loss is stage two's fused head (stage_student/losses/chunked.py). Bytes per
token are the shard's Parquet bytes over its tokens (`distily inspect`'s "bytes/token targets"), and the
kind's own columns alone.

Exits 1 when the default kind (sampled-exact, 88 systematic draws) misses issue 27's targets on any student measured: angle
<= 8 degrees, norm ratio 0.9-1.1, <= 64 bytes per token of its own columns (`--bytes-only`: the bytes alone).

For sampled kinds it also reports the angle of the mean gradient over --draws independent draw seeds on the
first batch ("bias"): an unbiased kind's mean approaches the online gradient as draws are added (its angle
falls like 1/sqrt(draws)); a biased one's does not.

Students: the demo's init (15 teacher layers, 0-4 and 20-29: the layers `--init-layers auto` keeps) by default;
--student DIR adds a trained student (e.g. runs/demo/student-kd/final), where the remaining error is smaller and
the noise of a target matters more.

Kinds: topk:K (top-K + rest bucket), sampled:N (RS-KD counts of N draws), sampled-exact:N (N draws with exact
probabilities + the true token, Horvitz-Thompson weights), each optionally :tT for a draw temperature T and :sys for
systematic draws (`teacher-cache --sampling systematic`; iid otherwise). Systematic sampled-exact kinds at t = 1
are stored as the capture stores them: no log-prob for a drawn id below 1/N (it weighs 1/N), the exact entropy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_init import report_targets  # noqa: E402

from pipeline import schema  # noqa: E402
from stage_teacher.capture import DEFAULT_DRAWS  # noqa: E402

DEFAULT_KINDS = ("topk:16,topk:64,topk:256,sampled:16,sampled:64,sampled-exact:16,sampled-exact:24,sampled-exact:32,"
                 "sampled-exact:48,sampled-exact:56,sampled-exact:64,sampled-exact:128,sampled-exact:32:t1.5,"
                 "sampled-exact:32:sys,sampled-exact:40:sys,sampled-exact:48:sys,sampled-exact:56:sys,sampled-exact:64:sys,"
                 "sampled-exact:72:sys,sampled-exact:80:sys,sampled-exact:88:sys,sampled-exact:96:sys")
DEMO_LAYERS = [0, 1, 2, 3, 4, *range(20, 30)]


def parse_kind(kind: str) -> dict:
    parts = kind.split(":")
    out = {"targets": parts[0], "size": int(parts[1]), "temperature": 1.0, "sampling": "iid"}
    for p in parts[2:]:
        if p.startswith("t"):
            out["temperature"] = float(p[1:])
        if p == "sys":
            out["sampling"] = "systematic"
    return out


def cut_student(teacher, layers: list[int]):
    """A student of `layers` of the teacher's decoder layers (with its embeddings, final norm and head)."""
    import copy

    student = copy.deepcopy(teacher)
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in layers])
    student.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    return student


def manifest_for(kind: dict, vocab: int) -> dict:
    return {"format_version": 2, "teacher": {"vocab_size": vocab},
            "capture": {"targets": kind["targets"], "top_k": kind["size"], "logprob_dtype": "uint8",
                        "samples": kind["size"], "sample_temperature": kind["temperature"], "sampling": kind["sampling"],
                        "hidden_dtype": "bfloat16",
                        **({"tail_logprobs": False}
                           if schema.can_drop_tail_logprobs(kind["targets"], kind["sampling"], kind["temperature"]) else {})}}


def cached_targets(kind: dict, logits: list[torch.Tensor], ids: list[torch.Tensor], seed: int, work: Path) -> tuple[list, dict]:
    """Each batch's targets as stage two reads them (chunked.Targets fields), and the shard's bytes per token."""
    from pipeline.cache import CacheReader
    from pipeline.cache_write import write_shard
    from stage_student.training.step import CachedTeacher
    from stage_teacher.targets import TargetSpec, batch_targets, sequence_targets

    targets = "topk" if kind["targets"] == "topk" else kind["targets"]
    spec = TargetSpec(top_k=kind["size"], targets=targets, samples=kind["size"], sample_temperature=kind["temperature"],
                      sampling=kind["sampling"], seed=seed)
    manifest = manifest_for(kind, logits[0].shape[-1])
    reader = CacheReader(work)
    reader.__dict__["manifest"] = manifest
    teacher = CachedTeacher("topk" if targets == "topk" else "sampled", torch.device("cpu"))
    per_seq, first = [], []
    for b, (z, x) in enumerate(zip(logits, ids)):
        first.append(len(per_seq))
        per_seq += [sequence_targets(lambda s, e, zz=zz: zz[s:e].clone(), xx[1:], spec, b * 1000 + i)
                    for i, (zz, xx) in enumerate(zip(z, x))]
    # one shard of every sequence, as a cache of that many sequences per shard stores them
    entry = write_shard(work, 0, manifest, np.arange(len(per_seq)), torch.cat(ids).numpy(), batch_targets(per_seq))
    data = reader.read_shard(entry, hidden=False)
    out = []
    for b, x in enumerate(ids):
        rows = slice(first[b], first[b] + len(x))
        out.append(teacher.targets({k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in data.items()
                                    if isinstance(v, np.ndarray)}))
    tokens = entry["tokens"]
    parquet = entry["bytes"]
    own = sum(v for k, v in entry["column_bytes"].items() if k not in ("seq_index", "input_ids", "target_logprob"))
    return out, {"bytes_per_token": parquet / tokens, "kind_bytes_per_token": own / tokens}


def gradient(student, ids: torch.Tensor, targets: dict, hidden_only: bool = False) -> torch.Tensor:
    """The flattened gradient over every student parameter of the forward-KL loss on these targets (stage two's
    fused head and loss); with --hidden, its gradient wrt the final hidden states instead."""
    from stage_student.losses import chunked

    params = [p for p in student.parameters() if p.requires_grad]
    hidden = student.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, student.config.hidden_size)
    spec = chunked.LossSpec(kd="forward_kl", vocab=student.lm_head.weight.shape[0])
    t = chunked.Targets(labels=ids[:, 1:].reshape(-1), **targets)
    loss = chunked.head_losses(hidden, student.lm_head.weight, None, spec, t, 1024)["loss"]
    if hidden_only:
        return torch.autograd.grad(loss, hidden)[0].reshape(-1)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def compare(g: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = float(torch.dot(g.double(), ref.double()) / (g.double().norm() * ref.double().norm()))
    return {"angle_deg": float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))), "norm_ratio": float(g.norm() / ref.norm())}


def measure(student, name: str, kinds: list[str], ids: list[torch.Tensor], logits: list[torch.Tensor], draws: int,
            work: Path, hidden: bool = False) -> list[dict]:
    online = [gradient(student, x, {"teacher_logits": z.reshape(-1, z.shape[-1])}, hidden) for x, z in zip(ids, logits)]
    rows = []
    for kind_name in kinds:
        kind = parse_kind(kind_name)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=work) as d:
            targets, size = cached_targets(kind, logits, ids, 0, Path(d))
        per_batch = [compare(gradient(student, x, t, hidden), ref) for x, t, ref in zip(ids, targets, online)]
        row = {"student": name, "kind": kind_name, **size,
               "angle_deg": float(np.mean([r["angle_deg"] for r in per_batch])),
               "norm_ratio": float(np.mean([r["norm_ratio"] for r in per_batch])),
               "angle_deg_max": float(np.max([r["angle_deg"] for r in per_batch]))}
        if kind["targets"] != "topk" and draws > 1:  # the mean over independent draws: the bias, if any
            mean = torch.zeros_like(online[0])
            for seed in range(draws):
                with tempfile.TemporaryDirectory(dir=work) as d:
                    t, _ = cached_targets(kind, logits[:1], ids[:1], seed + 1, Path(d))
                mean += gradient(student, ids[0], t[0], hidden) / draws
            row[f"mean_of_{draws}_angle_deg"] = compare(mean, online[0])["angle_deg"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {name:>8} {kind_name:>22}: {row['angle_deg']:6.2f} deg (max {row['angle_deg_max']:5.2f}), norm ratio "
              f"{row['norm_ratio']:.3f}, {row['bytes_per_token']:6.1f} B/token ({row['kind_bytes_per_token']:.1f} the kind's), "
              f"mean-of-draws {row.get(f'mean_of_{draws}_angle_deg', float('nan')):.2f} deg, {row['seconds']:.0f} s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=4, help="batches of 4 x 256 tokens [4]")
    ap.add_argument("--kinds", default=DEFAULT_KINDS)
    ap.add_argument("--draws", type=int, default=4, help="draw seeds averaged for the bias column [4]")
    ap.add_argument("--student", default=None, help="also a trained student dir (an HF model of the teacher's tokenizer)")
    ap.add_argument("--bytes-only", action="store_true", help="only each kind's bytes per token (seconds)")
    ap.add_argument("--hidden", action="store_true", help="angles of the gradient wrt the final hidden states, not the "
                    "parameters: the noise the network below the head sees, without the head's own rows")
    ap.add_argument("--json", default="bench-results/fidelity.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.resolve import DEFAULT_DATASET, DatasetSpec, load_texts, pack, resolve_model

    teacher_dir, _ = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    seqs = torch.from_numpy(pack(tok, load_texts(DatasetSpec(DEFAULT_DATASET)), 256).astype(np.int64))
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))[: 4 * args.batches]
    ids = list(seqs[order].split(4))
    with torch.no_grad():
        logits = [teacher(input_ids=x).logits[:, :-1].float() for x in ids]
    students = {"init": cut_student(teacher, DEMO_LAYERS)}
    if args.student:
        students["trained"] = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    del teacher
    work = Path(tempfile.mkdtemp(prefix="distily-fidelity-"))
    kinds = args.kinds.split(",")
    if args.bytes_only:
        sizes = {}
        for kind in kinds:
            with tempfile.TemporaryDirectory(dir=work) as d:
                sizes[kind] = cached_targets(parse_kind(kind), logits, ids, 0, Path(d))[1]
            print(f"{kind:>24}: {sizes[kind]['bytes_per_token']:6.1f} B/token ({sizes[kind]['kind_bytes_per_token']:.1f} the kind's)")
        return report_targets({f"{DEFAULT_KIND}: the kind's columns <= 64 bytes/token":
                               DEFAULT_KIND in sizes and sizes[DEFAULT_KIND]["kind_bytes_per_token"] <= 64},
                              [{"kind": k, **v} for k, v in sizes.items()], Path(args.json))
    rows = []
    for name, student in students.items():
        student.eval()  # no dropout: the same function for every kind
        rows += measure(student, name, kinds, ids, logits, args.draws, work, args.hidden)
    lines = [f"Gradient{' wrt the final hidden states' if args.hidden else ''} of each cached target's forward-KL loss vs "
             f"online full-vocabulary KD, {args.batches} batches of "
             f"4 x 256 tokens; bias: the mean gradient of {args.draws} draw seeds on batch 1.", "",
             "| student | targets | angle (deg) | max | norm ratio | bias angle (deg) | bytes/token | the kind's columns |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bias = r.get(f"mean_of_{args.draws}_angle_deg")
        lines.append(f"| {r['student']} | {r['kind']} | {r['angle_deg']:.2f} | {r['angle_deg_max']:.2f} | {r['norm_ratio']:.3f} | "
                     f"{'-' if bias is None else f'{bias:.2f}'} | {r['bytes_per_token']:.1f} | {r['kind_bytes_per_token']:.1f} |")
    print("\n".join(lines))
    return report_targets(targets(rows, args.hidden), rows, Path(args.json))


DEFAULT_KIND = f"sampled-exact:{DEFAULT_DRAWS['sampled-exact']}:sys"  # the capture's default (--samples, --sampling)


def targets(rows: list[dict], hidden: bool = False) -> dict[str, bool]:
    """Issue 27's targets for the default kind, on every student measured: gradient angle to online KD <= 8 degrees,
    norm ratio within 0.9-1.1 (the parameters' gradient: not checked with --hidden), the kind's columns <= 64 bytes per
    token. Missing rows count as missed."""
    mine = [r for r in rows if r["kind"] == DEFAULT_KIND]
    size = {f"{DEFAULT_KIND}: the kind's columns <= 64 bytes/token": bool(mine) and all(r["kind_bytes_per_token"] <= 64 for r in mine)}
    if hidden:
        return size
    return {f"{DEFAULT_KIND}: gradient angle <= 8 degrees on every student": bool(mine) and all(r["angle_deg"] <= 8 for r in mine),
            f"{DEFAULT_KIND}: norm ratio within 0.9-1.1": bool(mine) and all(0.9 <= r["norm_ratio"] <= 1.1 for r in mine),
            **size}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
