"""Stage one, side by side in one process, on the embedded default teacher (or --teacher).

Throughput (tokens/s, --rounds interleaved rounds, median), every path over the same packed sequences:

  bare prefill          vLLM prompt pass, max_tokens=1, no log-probs: the LM head runs at the last position only
  floor                 bare prefill + the LM head at every position (hooks, logits made and dropped)
  hooks top-k           the new path (--targets-from hooks): top-k + target from the LM head in the hooks
  hooks top-k, written  the same with Parquet shards written (what `distily teacher-cache` does)
  hooks both, written   + RS-KD samples (--targets both, N = --samples)
  engine top-k, written the old path (--targets-from engine: vLLM's prompt log-probs)
  hf top-k, written     the transformers reference backend

Sizes and precision, on the same sequences: bytes/token of the targets part in format 1 (int32 ids, float32
log-probs) and format 2 (uint16 ids, uint8 or float16 log-probs), of the sampled targets and their unique ids
per position; KL(stored || exact) per position of the quantised top-k; hidden-state bytes/token/layer and
cosine to float32 for bfloat16, float16 and int8. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def v1_bytes(input_ids, targets) -> int:
    """The targets part as format 1 stored it (int32 ids, float32 log-probs, zstd 3)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import schema
    from pipeline.cache_write import _column, tail_mass

    n = len(input_ids)
    cols = {"seq_index": np.arange(n), "input_ids": input_ids.astype(np.int32), "topk_ids": targets["topk_ids"].astype(np.int32),
            "topk_logprobs": targets["topk_logprobs"].astype(np.float32),
            "target_logprob": targets["target_logprob"].astype(np.float32), "tail_mass": tail_mass(targets["topk_logprobs"])}
    table = pa.table({k: _column(cols[k], n, schema.SCHEMA_V1.field(k).type) for k in schema.SCHEMA_V1.names}, schema=schema.SCHEMA_V1)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3)
    return len(buf.getvalue())


def stored_kl(lp: np.ndarray, dtype: str) -> float:
    """Mean over positions of KL(stored || exact) on the k+1 buckets (top-k + tail), stored = decode(encode)."""
    from pipeline.cache import decode_logprobs
    from pipeline.cache_write import LOGPROB_FLOOR, encode_logprobs, tail_mass

    lp = np.maximum(lp.astype(np.float32), LOGPROB_FLOOR)
    tail = tail_mass(lp).astype(np.float64)
    dec = decode_logprobs(encode_logprobs(lp, dtype)).astype(np.float64)
    p = np.concatenate([np.exp(lp.astype(np.float64)), tail[..., None]], -1)
    q = np.concatenate([np.exp(dec), tail[..., None]], -1)
    q /= q.sum(-1, keepdims=True)
    return float((q * (np.log(np.maximum(q, 1e-300)) - np.log(np.maximum(p, 1e-300)))).sum(-1).mean())


def hidden_table(model_dir: str, sequences: np.ndarray, layers: list[int]) -> dict:
    """Hidden states of a few sequences (HF, float32): bytes/token/layer (zstd) and cosine to float32 per dtype."""
    import torch
    import zstandard
    from safetensors.torch import load
    from transformers import AutoModelForCausalLM

    from pipeline import schema
    from pipeline.hidden_file import decode_tensor, encode_tensors, save_tensors

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(sequences.astype(np.int64)), output_hidden_states=True)
    hidden = {l: out.hidden_states[l].float() for l in layers}
    tokens = sequences.size
    rows = {}
    for dtype in ("float32", "bfloat16", "float16", "int8"):
        raw = save_tensors(encode_tensors(hidden, dtype))
        size = len(zstandard.ZstdCompressor(level=schema.ZSTD_LEVEL).compress(raw)) / tokens / len(layers)
        back = load(raw)
        cos = []
        for l in layers:
            h = decode_tensor(back, schema.hidden_key(l))
            cos.append(torch.nn.functional.cosine_similarity(h, hidden[l], dim=-1))
        cos = torch.cat([c.flatten() for c in cos])
        rows[dtype] = {"bytes_per_token_per_layer": size, "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}
    return rows


def lm_head_pass(worker, chunk_positions: int) -> None:
    """Runs where the model lives (collective_rpc): the LM head over the recorded final states, chunk by chunk."""
    import torch

    from stage_teacher import vllm_hooks

    r = vllm_hooks._RECORDER
    device = next(r.model.parameters()).device
    with torch.no_grad():
        for h in r.final[0]:
            for a in range(0, h.shape[0] - 1, chunk_positions):
                r.model.compute_logits(h[a : min(h.shape[0] - 1, a + chunk_positions)].to(device))
    r.sequences = None


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden-layers", default="10,20,30")
    ap.add_argument("--paths", default="", help="comma-separated substrings: time only the matching paths")
    ap.add_argument("--json", default="bench-results/capture.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))

    from pipeline.config import CaptureConfig
    from stage_teacher.capture import capture_shards, make_backend, prepare, target_spec
    from stage_teacher.vllm_backend import VLLMTeacher

    layers = [int(x) for x in args.hidden_layers.split(",") if x]
    tmp = Path(tempfile.mkdtemp(prefix="distily-bench-"))

    def cfg(name, backend="vllm", **kw):
        return CaptureConfig(output=str(tmp / name), teacher=args.teacher, max_tokens=args.tokens, max_seq_len=args.seq_len,
                             top_k=args.top_k, samples=args.samples, backend=backend, sequences_per_shard=16, **kw)

    manifest, sequences, model_dir, _ = prepare(cfg("probe"))
    n_layers = manifest["teacher"]["num_hidden_layers"]
    tokens = int(sequences.size)
    count = {"n": 0}

    def write(c, teacher, targets_from):
        """Capture and write every shard (what `distily teacher-cache` times), without the set-up."""
        count["n"] += 1
        out = Path(c.output + f"-{count['n']}")
        out.mkdir(parents=True)
        m = {**manifest, "shards": [], "capture": {**manifest["capture"], "targets": c.targets, "targets_from": targets_from}}
        teacher.configure(target_spec(c), targets_from)
        todo = list(range(-(-len(sequences) // c.sequences_per_shard)))
        capture_shards(c, teacher, sequences, todo, out, m, out / "manifest.json")
        return out

    def call(teacher, c, targets_from):
        teacher.configure(target_spec(c), targets_from)
        for i in range(0, len(sequences), 16):
            teacher(sequences[i : i + 16], np.arange(i, min(len(sequences), i + 16)))

    def head_floor(teacher, c):
        """Prefill + the LM head at every position, logits dropped: the cost a cache cannot go below."""
        teacher.configure(target_spec(c), "hooks")
        for i in range(0, len(sequences), 16):
            teacher.run_pass(sequences[i : i + 16])
            teacher.llm.collective_rpc(lm_head_pass, args=(target_spec(c).chunk_positions,))

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.tolist()) for r in sequences]
    bare = SamplingParams(max_tokens=1, detokenize=False)
    import torch

    share = {"gpu_memory_utilization": 0.3} if torch.cuda.is_available() else {}  # two engines on one GPU
    plain = VLLMTeacher(model_dir, target_spec(cfg("x")), [], n_layers, args.seq_len, max_logprobs=args.top_k,
                        targets_from="engine", engine_kwargs=share)  # no hooks installed: the bare engine
    hooked = VLLMTeacher(model_dir, target_spec(cfg("x")), [], n_layers, args.seq_len, max_logprobs=args.top_k,
                         targets_from="hooks", engine_kwargs=share)
    hf = make_backend(cfg("hf", "hf"), model_dir, n_layers, "hf")
    paths = {
        "bare prefill": lambda: plain.llm.generate(prompts, bare, use_tqdm=False),
        "floor (prefill + LM head everywhere)": lambda: head_floor(hooked, cfg("x")),
        "hooks top-k": lambda: call(hooked, cfg("x"), "hooks"),
        "hooks top-k, written": lambda: write(cfg("hooks"), hooked, "hooks"),
        "hooks both, written": lambda: write(cfg("both", targets="both"), hooked, "hooks"),
        "engine top-k, written": lambda: write(cfg("engine"), plain, "engine"),
        "hf top-k, written": lambda: write(cfg("hf", "hf"), hf, "hf"),
    }
    if args.paths:
        paths = {k: v for k, v in paths.items() if any(p in k for p in args.paths.split(","))}
    plain.llm.generate(prompts[:4], bare, use_tqdm=False)  # warm-up
    call(hooked, cfg("x"), "hooks")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, fn in (paths.items() if r % 2 == 0 else reversed(paths.items())):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r}: {name:<38} {tokens / times[name][-1]:8.1f} tok/s", flush=True)
    rows = {name: {"tokens_per_s": tokens / statistics.median(t), "seconds": t} for name, t in times.items()}
    tps = {name: r["tokens_per_s"] for name, r in rows.items()}
    floor = "floor (prefill + LM head everywhere)"
    pairs = [("hooks top-k", floor), ("hooks top-k, written", floor), ("hooks both, written", floor),
             ("engine top-k, written", floor), ("hooks top-k, written", "engine top-k, written"), (floor, "bare prefill"),
             ("hooks top-k, written", "hf top-k, written")]
    ratios = {f"{a} / {b.split(' (')[0]}": tps[a] / tps[b] for a, b in pairs if a in tps and b in tps}
    if args.paths:  # a partial run: throughput only
        print(json.dumps({"tokens_per_s": tps, "ratios": ratios}, indent=2))
        return {}

    # ---------------------------------------------------------------------------- sizes and precision
    from pipeline.cache import CacheReader

    both = CacheReader(sorted(tmp.glob("both-*"))[0])
    sizes: dict[str, float] = {}
    cols: dict[str, int] = {}
    for s in both.manifest["shards"]:
        for c, b in s["column_bytes"].items():
            cols[c] = cols.get(c, 0) + b
    topk_cols = ("input_ids", "seq_index", "topk_ids", "topk_logprobs", "topk_lp_max", "topk_lp_step", "tail_mass", "target_logprob")
    sizes["top-k part, format 2 (uint16 ids, uint8 log-probs)"] = sum(cols[c] for c in topk_cols if c in cols) / tokens
    sizes["sampled part, format 2 (N=%d)" % args.samples] = sum(b for c, b in cols.items() if c.startswith("sample_")) / tokens
    sizes["sampled + tokens + target (a --targets sampled cache)"] = (
        sizes["sampled part, format 2 (N=%d)" % args.samples] + sum(cols[c] for c in ("input_ids", "seq_index", "target_logprob")) / tokens)
    rows_all = [both.read_shard(s, hidden=False) for s in both.shards]
    hooked.configure(target_spec(cfg("x")), "hooks")
    full = [hooked(sequences[i : i + 16], np.arange(i, min(len(sequences), i + 16)))["targets"]  # exact, unstored
            for i in range(0, len(sequences), 16)]
    exact = {k: np.concatenate([f[k] for f in full]) for k in full[0]}
    sizes["top-k part, format 1 (int32 ids, float32 log-probs)"] = v1_bytes(sequences, exact) / tokens
    unique = float(np.mean([(r["sample_ids"] >= 0).sum(-1).mean() for r in rows_all]))
    kl = {dtype: stored_kl(exact["topk_logprobs"], dtype) for dtype in ("uint8", "float16")}
    plain.close()
    hooked.close()
    hidden = hidden_table(model_dir, sequences[:8], layers)

    result = {
        "teacher": manifest["teacher"]["source"], "tokens": tokens, "seq_len": args.seq_len, "top_k": args.top_k,
        "samples": args.samples, "rounds": args.rounds, "throughput": rows, "ratios": ratios,
        "bytes_per_token": sizes, "sample_unique_ids_per_position": unique, "kl_stored_vs_exact": kl,
        "hidden_layers": layers, "hidden": hidden,
    }
    print("\n| measurement | value |\n|---|---|")
    for name, r in rows.items():
        print(f"| {name} tokens/s | {r['tokens_per_s']:.1f} |")
    for k, v in {**ratios, **sizes}.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| sampled: unique ids per position (mean) | {unique:.2f} |")
    for dtype, v in kl.items():
        print(f"| KL(stored || exact) per position, {dtype} log-probs | {v:.2e} |")
    for dtype, h in hidden.items():
        print(f"| hidden {dtype}: bytes/token/layer, cosine mean / min | {h['bytes_per_token_per_layer']:.1f}, "
              f"{h['cosine_mean']:.6f} / {h['cosine_min']:.6f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # vLLM's threads may abort a normal interpreter exit
