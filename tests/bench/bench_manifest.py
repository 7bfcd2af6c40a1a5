"""What naming finished shards costs one stage-one job: the manifest rewritten after every shard (before) against
one journal line per shard and the whole manifest at the start and end (stage_teacher/runner.py, now).

No teacher runs: each shard is a synthetic record shaped like a real capture's (`write_shard`'s: checksums,
sizes, per-column bytes, the stats sums), so the time is the manifest bookkeeping alone, fsyncs included, on
the disk under --dir. Prints a table, writes JSON.

    python tests/bench/bench_manifest.py --shards 10000 [--before-shards 1000,2000,4000] [--dir /tmp]

The old loop is quadratic (about 20 minutes at 10,000 shards on a 2-core machine), so by default it runs at
smaller sizes and its 10,000-shard time is a fit a*n^2 + b*n through them (the row says "fit"); pass
--before-shards 10000 to time it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from pipeline.manifest import atomic_write_json, stats_from_shards  # noqa: E402
from stage_teacher import runner  # noqa: E402

COLUMNS = ("seq_index", "input_ids", "topk_ids", "topk_logprobs", "topk_lp_max", "topk_lp_step", "tail_mass",
           "target_logprob", "sample_lengths", "sample_ids", "sample_counts", "teacher_entropy")


def shard_record(j: int) -> dict:
    """A record of the size and shape `pipeline.cache.write_shard` returns for a 16 x 512-token shard."""
    return {"index": j, "file": f"shard-{j:05d}.parquet", "rows": 16, "tokens": 8192, "first_seq": 16 * j,
            "positions": 8176, "target_prob_sum": 3141.5926 + j, "tail_mass_sum": 271.828 + j,
            "sha256": f"{j:064x}", "bytes": 7_340_032 + j, "column_bytes": {c: 100_000 + j for c in COLUMNS},
            "sample_unique_sum": 98_765 + j, "hidden_file": f"shard-{j:05d}.hidden.safetensors.zst",
            "hidden_sha256": f"{j + 1:064x}", "hidden_bytes": 50_331_648 + j}


def skeleton() -> dict:
    return {"format_version": 4, "teacher": {"weights_sha256": "0" * 64}, "capture": {"top_k": 64},
            "job": {"num_shards": 1, "shard_index": 0}, "shards": [], "complete": False}


def before(out: Path, shards: int) -> float:
    """The loop as it was: after each shard, sort, recompute the stats and rewrite the whole manifest."""
    manifest, path = skeleton(), out / "manifest.json"
    t0 = time.perf_counter()
    for j in range(shards):
        manifest["shards"].append(shard_record(j))
        manifest["shards"].sort(key=lambda s: s["index"])
        manifest["stats"] = stats_from_shards(manifest["shards"])
        atomic_write_json(path, manifest)
    manifest["complete"] = True
    atomic_write_json(path, manifest)
    return time.perf_counter() - t0


def now(out: Path, shards: int) -> float:
    """The runner's loop (its background writer thread included), each shard's 'write' just its record."""
    job = runner.Job(out=out, manifest_file=out / "manifest.json", num_dataset_shards=shards, num_jobs=1,
                     job_index=0, files=lambda j: [f"shard-{j:05d}.parquet"], stats=stats_from_shards)
    manifest = skeleton()
    t0 = time.perf_counter()
    todo = runner.start(job, manifest)
    runner.run_shards(job, manifest, todo, lambda j: None, lambda j, _: shard_record(j), lambda j: 1, "manifest",
                      "shard")
    runner.finish(job, manifest)
    return time.perf_counter() - t0


def quadratic_fit(rows: list[dict], n: int) -> dict:
    """The old loop's time at n shards from a least-squares fit t = a*n^2 + b*n (each write costs its size)."""
    import numpy as np

    x = np.array([r["shards"] for r in rows], dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([x * x, x], 1), np.array([r["seconds"] for r in rows]), rcond=None)
    seconds = float(a * n * n + b * n)
    return {"method": "manifest rewritten per shard (before, fit)", "shards": n, "seconds": seconds,
            "ms_per_shard": 1000 * seconds / n, "fit": {"a": float(a), "b": float(b)}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--before-shards", default="1000,2000,4000", help="sizes for the old loop (quadratic: slow)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    ap.add_argument("--json", default="bench-results/manifest.json")
    args = ap.parse_args(argv)
    rows = []
    runs = [("journal line per shard (now)", now, args.shards)]
    runs += [("manifest rewritten per shard (before)", before, int(n)) for n in args.before_shards.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="distily-bench-manifest-") as tmp:
        for k, (name, fn, n) in enumerate(runs):
            out = Path(tmp) / str(k)
            out.mkdir()
            seconds = fn(out, n)
            rows.append({"method": name, "shards": n, "seconds": seconds, "ms_per_shard": 1000 * seconds / n,
                         "manifest_bytes": (out / "manifest.json").stat().st_size})
    old = [r for r in rows if "before" in r["method"]]
    if args.shards not in [r["shards"] for r in old] and len(old) >= 2:
        rows.append(quadratic_fit(old, args.shards))
    lines = ["| manifest writing | shards | total s | ms/shard | final manifest |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['shards']} | {r['seconds']:.1f} | {r['ms_per_shard']:.2f} | "
              + (f"{r['manifest_bytes'] / 1e6:.1f} MB |" if r.get("manifest_bytes") else "|") for r in rows]
    print("\n".join(lines))
    result = {"rows": rows, "table": lines}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
