"""Stage-one throughput, side by side in one process, on the embedded default teacher (or --teacher):

  vllm prefill        vLLM prompt pass with no log-probs requested (max_tokens=1): the engine's ceiling
  vllm top-k          distily's capture (prompt_logprobs=k), Parquet writing included
  vllm top-k + hidden the same plus hidden states of --hidden-layers from the same pass
  hf top-k + hidden   the transformers reference backend, same outputs

and the cache's bytes per token for the logits part and per hidden layer. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--hidden-layers", default="10,20,30")
    ap.add_argument("--json", default="bench-results/capture.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(".cache/vllm").resolve()))

    from pipeline.config import CaptureConfig
    from stage_teacher.capture import capture_shards, make_backend, prepare
    from stage_teacher.vllm_backend import VLLMTeacher

    layers = [int(x) for x in args.hidden_layers.split(",") if x]
    tmp = Path(tempfile.mkdtemp(prefix="distily-bench-"))

    def cfg(name, backend, hidden):
        return CaptureConfig(output=str(tmp / name), teacher=args.teacher, max_tokens=args.tokens, max_seq_len=args.seq_len,
                             top_k=args.top_k, hidden_layers=hidden, backend=backend, sequences_per_shard=16)

    manifest, sequences, model_dir, _ = prepare(cfg("probe", "vllm", []))

    def run(c, teacher):
        """Capture and write every shard (what `distily teacher-cache` times), without the set-up."""
        out = Path(c.output)
        out.mkdir(parents=True)
        m = {**manifest, "shards": [], "capture": {**manifest["capture"], "hidden_layers": c.hidden_layers}}
        todo = list(range(-(-len(sequences) // c.sequences_per_shard)))
        capture_shards(c, teacher, sequences, todo, out, m, out / "manifest.json")
    n_layers = manifest["teacher"]["num_hidden_layers"]
    tokens = int(sequences.size)
    rows = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        rows[name] = {"seconds": time.perf_counter() - t0}
        rows[name]["tokens_per_s"] = tokens / rows[name]["seconds"]
        print(f"{name:<22} {rows[name]['tokens_per_s']:8.1f} tok/s", flush=True)

    engine = VLLMTeacher(model_dir, args.top_k, [], n_layers, args.seq_len, max_logprobs=args.top_k)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r.tolist()) for r in sequences]
    engine.llm.generate(prompts[:2], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)  # warm-up
    timed("vllm prefill", lambda: engine.llm.generate(prompts, SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False))
    timed("vllm top-k", lambda: run(cfg("vllm", "vllm", []), teacher=engine))
    engine.close()
    engine = VLLMTeacher(model_dir, args.top_k, layers, n_layers, args.seq_len, max_logprobs=args.top_k)
    engine(sequences[:2])  # warm-up
    timed("vllm top-k + hidden", lambda: run(cfg("vllm-hidden", "vllm", layers), teacher=engine))
    engine.close()
    hf_cfg = cfg("hf-hidden", "hf", layers)
    hf = make_backend(hf_cfg, model_dir, n_layers)
    timed("hf top-k + hidden", lambda: run(hf_cfg, teacher=hf))

    m = json.loads((tmp / "vllm-hidden" / "manifest.json").read_text())
    logit_bytes = sum(s["bytes"] for s in m["shards"]) / tokens
    hidden_bytes = sum(s["hidden_bytes"] for s in m["shards"]) / tokens / len(layers)
    result = {
        "teacher": manifest["teacher"]["source"], "tokens": tokens, "seq_len": args.seq_len, "top_k": args.top_k,
        "hidden_layers": layers, "hidden_dtype": m["capture"]["hidden_dtype"], "throughput": rows,
        "ratios": {
            "vllm_topk / hf": rows["vllm top-k + hidden"]["tokens_per_s"] / rows["hf top-k + hidden"]["tokens_per_s"],
            "vllm_topk / vllm_prefill": rows["vllm top-k"]["tokens_per_s"] / rows["vllm prefill"]["tokens_per_s"],
        },
        "bytes_per_token": {"logits (top-k ids + log-probs + target + tail, zstd)": logit_bytes,
                            f"hidden, per layer ({m['capture']['hidden_dtype']}, zstd)": hidden_bytes},
    }
    print("\n| measurement | value |\n|---|---|")
    for name, r in rows.items():
        print(f"| {name} tokens/s | {r['tokens_per_s']:.1f} |")
    for k, v in {**result["ratios"], **result["bytes_per_token"]}.items():
        print(f"| {k} | {v:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # vLLM's threads may abort a normal interpreter exit
