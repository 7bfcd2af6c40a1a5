"""How fast one DataLoader worker turns a teacher cache into training batches, against what a GPU trains.

Writes synthetic caches of a 4,096-wide teacher with a 128,256-token vocabulary through the real writer
(pipeline.cache.write_shard: random tensors, Gaussian hidden states, which zstd compresses like real ones):
top-64 targets, sampled targets (64 draws a position), sampled-exact targets as the capture's default writes them
(its default draws, systematic, no log-prob below 1/N), and top-64 plus one bfloat16 hidden layer in the new
layout (format 3, row frames) and the old one (format 2, one zstd frame per file); and a file holding four
layers of which the loader reads one, both layouts. Then it times one worker's decoding, the trainer's own path
(CacheStream + collate, --num-workers 0), over every batch of an epoch, shard reads included.

Prints a table, writes JSON; under a minute on 2 cores (41 s). Exits 1 when one worker decodes fewer than 30,000
tokens/s (a GPU's rate) of any of the three caches without hidden states (issue 27's loader target).

    python tests/bench/bench_reader.py [--json bench-results/reader.json] [--seq-len 1024] [--shards 8]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from pipeline import schema  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.cache_write import write_shard  # noqa: E402
from pipeline.hidden_file import RowFrames  # noqa: E402
from pipeline.manifest import atomic_write_json, stats_from_shards  # noqa: E402
from stage_student.training.data import CacheStream  # noqa: E402
from stage_teacher.capture import DEFAULT_DRAWS  # noqa: E402

GPU_TOKENS_PER_S = 30_000  # a 1B student on one H100 (the figure)
GPUS_PER_NODE = 8
EXACT_DRAWS = DEFAULT_DRAWS["sampled-exact"]  # as teacher-cache writes it by default


def synthetic_manifest(version: int, targets: str, hidden_layers=(), hidden_dtype: str = "bfloat16", top_k: int = 64,
                       samples: int = 64, vocab: int = 128_256, width: int = 4096, qkv_layers=(), qkv_widths=None) -> dict:
    """The fields of a capture's manifest that the writer and the reader use."""
    capture = {"targets": targets, "top_k": top_k, "logprob_dtype": "uint8", "samples": samples, "sample_temperature": 1.0,
               "hidden_layers": sorted(hidden_layers), "hidden_dtype": hidden_dtype}
    if targets == "sampled-exact":  # as the capture's default writes it: systematic, no log-prob below 1/N
        capture.update(sampling="systematic", tail_logprobs=False)
    if qkv_layers:
        capture.update(qkv_layers=sorted(qkv_layers), qkv={k: {"width": w} for k, w in qkv_widths.items()})
    return {"format_version": version, "teacher": {"vocab_size": vocab, "hidden_size": width}, "capture": capture,
            "shards": [], "complete": True}


def synthetic_shard(rng, rows: int, seq_len: int, manifest: dict, width: int = 4096) -> dict:
    """write_shard's inputs for one shard: tokens, targets of the manifest's kind, hidden states, Q/K/V."""
    import torch

    cap, vocab = manifest["capture"], manifest["teacher"]["vocab_size"]
    p = seq_len - 1
    targets = {"target_logprob": -rng.exponential(2.0, (rows, p)).astype(np.float32)}
    if cap["targets"] in ("topk", "both"):
        k = cap["top_k"]
        probs = np.sort(rng.random((rows, p, k)) ** 4, axis=-1)[..., ::-1]
        probs = probs / probs.sum(-1, keepdims=True) * rng.uniform(0.5, 0.99, (rows, p, 1))
        targets["topk_ids"] = rng.integers(0, vocab, (rows, p, k))
        targets["topk_logprobs"] = np.log(probs).astype(np.float32)
    if cap["targets"] in ("sampled", "both"):  # N Zipf-distributed draws a position, reduced to unique ids + counts
        draws = rng.zipf(1.3, (rows * p, cap["samples"])) % vocab
        ids = np.full((rows * p, cap["samples"]), -1, np.int64)
        counts = np.zeros_like(ids)
        for i, d in enumerate(draws):
            u, c = np.unique(d, return_counts=True)
            ids[i, : len(u)], counts[i, : len(u)] = u, c
        m = int((ids >= 0).sum(-1).max())
        targets.update(sample_ids=ids[:, :m].reshape(rows, p, m), sample_counts=counts[:, :m].reshape(rows, p, m),
                       teacher_entropy=rng.uniform(0, 5, (rows, p)).astype(np.float32))
    if cap["targets"] == "sampled-exact":  # N Zipf draws and the true token, unique, with made-up exact log-probs
        draws = rng.zipf(1.3, (rows * p, cap["samples"])) % vocab
        ids = np.full((rows * p, cap["samples"] + 1), -1, np.int64)
        for i, d in enumerate(draws):
            u = np.unique(np.append(d, rng.integers(vocab)))
            ids[i, : len(u)] = u
        m = int((ids >= 0).sum(-1).max())
        targets.update(sample_ids=ids[:, :m].reshape(rows, p, m),
                       sample_logprobs=np.where(ids[:, :m] >= 0, -rng.exponential(4.0, ids[:, :m].shape), 0.0)
                       .astype(np.float32).reshape(rows, p, m),
                       teacher_entropy=rng.uniform(0, 5, (rows, p)).astype(np.float32))
    randn = lambda *shape: torch.randn(*shape, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))  # noqa: E731
    scale = torch.linspace(0.2, 3.0, width)  # channels of different scales, as residual streams have
    hidden = {l: randn(rows, seq_len, width) * scale for l in cap["hidden_layers"]}
    qkv = {l: {kind: randn(rows, seq_len, spec["width"]) for kind, spec in cap["qkv"].items()} for l in cap.get("qkv_layers", [])}
    return {"input_ids": rng.integers(0, vocab, (rows, seq_len)), "targets": targets, "hidden": hidden or None, "qkv": qkv or None}


def write_cache(path: Path, manifest: dict, shards: list[dict]) -> Path:
    """Each shard through write_shard, then the manifest (complete): a cache CacheReader and CacheStream read."""
    path.mkdir(parents=True, exist_ok=True)
    first = 0
    entries = []
    for i, s in enumerate(shards):
        n = len(s["input_ids"])
        entries.append(write_shard(path, i, manifest, np.arange(first, first + n), s["input_ids"], s["targets"],
                                   s["hidden"], s["qkv"]))
        first += n
    (path / schema.TOKENIZER_DIR).mkdir(exist_ok=True)  # no tokenizer or teacher: present for `verify` alone
    atomic_write_json(path / schema.TEACHER_CONFIG, {"hidden_size": manifest["teacher"]["hidden_size"]})
    atomic_write_json(path / schema.MANIFEST, {**manifest, "shards": entries, "stats": stats_from_shards(entries)})
    return path


def epoch_rate(cache: Path, batch_size: int, hidden_layers: list[int], repeats: int = 2) -> dict:
    """One worker (num_workers=0) decoding every batch of one epoch: tokens/s, shard reads included (the best of
    `repeats` epochs: the machine is shared; the files are in the page cache after the first)."""
    reader = CacheReader(cache)
    pairs = [(i, r) for i, s in enumerate(reader.shards) for r in range(s["rows"])]
    stream = CacheStream(str(cache), pairs, batch_size, seed=0, buffer=batch_size * 2, hidden_layers=hidden_layers, epochs=1)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = sum(batch["input_ids"].numel() for batch in stream)
        seconds = time.perf_counter() - t0
        best = min(best or seconds, seconds)
    return {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}


def bytes_read_per_token(cache: Path, hidden_layers: list[int]) -> dict:
    """Bytes of the files each token costs the loader: the Parquet shard, and the part of the hidden-state file
    it reads (format 3: the frames of the layers asked for; older formats: the whole file, decompressed)."""
    reader = CacheReader(cache)
    tokens = sum(s["tokens"] for s in reader.shards)
    out = {"parquet": sum(s["bytes"] for s in reader.shards) / tokens}
    if reader.shards[0].get("hidden_file"):
        out["hidden_file"] = sum(s["hidden_bytes"] for s in reader.shards) / tokens
        if reader.manifest["format_version"] >= schema.ROW_FRAMES_VERSION:
            read = 0
            for s in reader.shards:
                hfile = RowFrames(reader.fs, reader._join(s["hidden_file"]))
                read += sum(hfile.index[schema.hidden_key(l)]["frames"][-1] for l in hidden_layers)
            out["hidden_read"] = read / tokens
        else:
            out["hidden_read"] = out["hidden_file"]
    return out


def layout_choice(data: dict, layer: int, dir: Path) -> dict:
    """The choice of layout for one layer's rows: zstd row frames (format 3) against plain safetensors read by
    memory map (safe_open); bytes per token and rows decoded to float32 per second, one shard."""
    from safetensors import safe_open

    from pipeline.hidden_file import as_float32, encode_tensors, raw_view, save_row_frames, save_tensors

    tensors = encode_tensors({layer: data["hidden"][layer]}, "bfloat16")
    key = schema.hidden_key(layer)
    rows, seq_len = tensors[key].shape[:2]
    (dir / "frames.safetensors").write_bytes(save_row_frames(tensors))
    (dir / "plain.safetensors").write_bytes(save_tensors(tensors))
    frames = RowFrames(CacheReader(dir).fs, str(dir / "frames.safetensors"))
    out = {}
    for name, path in (("row frames (zstd)", "frames.safetensors"), ("plain safetensors, mmap", "plain.safetensors")):
        t0 = time.perf_counter()
        with safe_open(dir / "plain.safetensors", "pt") as plain:  # opened once, as a reader would keep it
            for r in range(rows):
                if path == "plain.safetensors":
                    as_float32(*raw_view(plain.get_slice(key)[r : r + 1]))
                else:
                    frames.decode(key, slice(r, r + 1))
        seconds = time.perf_counter() - t0
        out[name] = {"bytes_per_token": (dir / path).stat().st_size / (rows * seq_len), "tokens_per_s": rows * seq_len / seconds}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench-results/reader.json")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=16, help="sequences per shard")
    ap.add_argument("--shards", type=int, default=8, help="shards of the target-only caches")
    ap.add_argument("--hidden-shards", type=int, default=4, help="shards of the caches with hidden states")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="where to write the caches (default: a temporary dir)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="distily-bench-reader-"))
    rng = np.random.default_rng(0)
    layer = 16
    cases = [  # name, targets, stored layers, format, shards
        ("top-64", "topk", [], 3, args.shards),
        ("sampled (64 draws)", "sampled", [], 3, args.shards),
        (f"sampled-exact ({EXACT_DRAWS} systematic draws)", "sampled-exact", [], 3, args.shards),
        ("top-64 + 1 hidden layer, format 3 (row frames)", "topk", [layer], 3, args.hidden_shards),
        ("top-64 + 1 hidden layer, format 2 (whole-file zstd)", "topk", [layer], 2, args.hidden_shards),
        ("top-64 + 1 of 4 stored layers, format 3", "topk", [4, 8, 12, layer], 3, 2),
        ("top-64 + 1 of 4 stored layers, format 2", "topk", [4, 8, 12, layer], 2, 2),
    ]
    data: dict = {}
    rows = []
    for name, targets, stored, version, shards in cases:
        manifest = synthetic_manifest(version, targets, stored, width=args.width, samples=EXACT_DRAWS if targets == "sampled-exact" else 64)
        key = (targets, tuple(stored), shards)
        if key not in data:  # the two layouts of a case hold the same data
            t0 = time.perf_counter()
            data[key] = [synthetic_shard(rng, args.rows, args.seq_len, manifest, args.width) for _ in range(shards)]
            print(f"made {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        cache = write_cache(root / f"{targets}-{len(stored)}-v{version}", manifest, data[key])
        read = [layer] if stored else []
        rate = epoch_rate(cache, args.batch_size, read)
        rows.append({"case": name, **rate, "bytes_per_token": bytes_read_per_token(cache, read),
                     "workers_per_gpu": GPU_TOKENS_PER_S / rate["tokens_per_s"],
                     "workers_per_node": math.ceil(GPUS_PER_NODE * GPU_TOKENS_PER_S / rate["tokens_per_s"])})
        print(f"{name}: {rate['tokens_per_s']:,.0f} tokens/s", flush=True)
        if key[1] and version == 2:
            if len(stored) == 1:
                choice = layout_choice(data[key][0], layer, root)
            del data[key]
    print(f"\nOne worker (CacheStream + collate, num_workers=0), {args.width}-wide teacher, 128,256-token vocabulary, "
          f"batches of {args.batch_size} x {args.seq_len} tokens; a GPU trains {GPU_TOKENS_PER_S:,} tokens/s\n")
    print("| cache | tokens/s per worker | workers per GPU | workers per 8-GPU node | bytes/token: Parquet | "
          "hidden file | hidden read |\n|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bytes_per_token"]
        print(f"| {r['case']} | {r['tokens_per_s']:,.0f} | {r['workers_per_gpu']:.2f} | {r['workers_per_node']} | "
              f"{b['parquet']:.0f} | {b.get('hidden_file', 0):,.0f} | {b.get('hidden_read', 0):,.0f} |")
    print("\n| one layer's rows, bfloat16 | bytes/token | tokens/s decoded to float32 |\n|---|---|---|")
    for name, c in choice.items():
        print(f"| {name} | {c['bytes_per_token']:,.0f} | {c['tokens_per_s']:,.0f} |")
    targets = {f"{r['case']}: >= {GPU_TOKENS_PER_S:,} tokens/s per worker": r["tokens_per_s"] >= GPU_TOKENS_PER_S
               for r, (_, _, stored, _, _) in zip(rows, cases) if not stored}
    for what, ok in targets.items():
        print(f"{'met   ' if ok else 'MISSED'} {what}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"gpu_tokens_per_s": GPU_TOKENS_PER_S, "seq_len": args.seq_len,
                                           "batch_size": args.batch_size, "width": args.width, "rows": rows,
                                           "layout_choice": choice, "targets": targets}, indent=2))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
