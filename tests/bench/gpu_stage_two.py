"""Stage two on a GPU, without vLLM (whose wheel cannot travel to an offline GPU machine): the same 30 steps of a
2-layer student from a tiny sampled-exact cache on CUDA in bf16 (the default there), CUDA float32, CUDA bf16 with
--compile, and the CPU in float32 (a subprocess without CUDA). Prints eval KL/CE, last loss, s/step, peak memory.

    python tests/bench/gpu_stage_two.py make-cache     # here: runs/gpu-stage-two/cache (a tiny teacher, HF backend)
    python tests/bench/gpu_stage_two.py                # there, with runs/gpu-stage-two carried, torch + CUDA present
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def make_cache() -> None:
    from conftest import build_llama, build_tokenizer, capture_cfg

    from pipeline.resolve import DatasetSpec, load_texts, pack
    from stage_teacher.capture import run

    texts = load_texts(DatasetSpec("lee-background"))
    root = ROOT / "runs" / "gpu-stage-two"
    teacher = root / "teacher"
    tok = build_tokenizer(texts, teacher)
    build_llama(teacher, len(tok), layers=4, hidden=128, pretrain_on=pack(tok, texts[150:], 64), steps=100)
    (root / "docs.txt").write_text("\n".join(texts[:120]) + "\n")
    run(capture_cfg(teacher, root / "docs.txt", root / "cache", max_seq_len=128, max_tokens=128 * 48, hidden_layers=[],
                    targets="sampled-exact", samples=32))


if sys.argv[1:] == ["make-cache"]:
    make_cache()
    sys.exit()

import torch  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from stage_student.train import train  # noqa: E402

out = os.environ.get("OUT", "/tmp")
rows = {}


def one(name, **extra):
    run_dir = tempfile.mkdtemp(prefix=f"distily-gpu-{name}-")
    cfg = TrainConfig(cache=str(ROOT / "runs" / "gpu-stage-two" / "cache"), output=run_dir, student_layers=2, init="random", max_steps=30,
                      batch_size=8, optimizer="adamw", lr=1e-3, eval_sequences=4, logging_steps=10, save_steps=30,
                      num_workers=1, **extra)
    t0 = time.time()
    r = train(cfg)
    log = [json.loads(l) for l in open(f"{run_dir}/log.jsonl") if '"step_time_s"' in l]
    rows[name] = {"eval_forward_kl": r.get("eval/forward_kl"), "eval_ce": r.get("eval/ce"), "last_loss": r.get("loss"),
                  "step_time_s": log[-1]["step_time_s"], "peak_memory_mb": max(x["peak_memory_mb"] for x in log),
                  "wall_s": time.time() - t0, "finished": r["finished"]}
    print(name, rows[name], flush=True)


if sys.argv[1:] == ["cpu"]:
    one("cpu-fp32")
    json.dump(rows, open("/tmp/cpu.json", "w"))
    sys.exit()
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
for name, extra in [("cuda-bf16", {}), ("cuda-fp32", {"bf16": False}), ("cuda-bf16-compile", {"compile": True})]:
    try:
        one(name, **extra)
    except Exception as e:  # noqa: BLE001
        rows[name] = {"error": repr(e)[:500]}
        print(name, "FAILED", repr(e)[:500], flush=True)
env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
subprocess.run([sys.executable, __file__, "cpu"], env=env, check=False)
if os.path.exists("/tmp/cpu.json"):
    rows.update(json.load(open("/tmp/cpu.json")))
json.dump(rows, open(os.path.join(out, "gpu_train.json"), "w"), indent=2)
print("| run | eval forward KL | eval CE | last loss | s/step | peak MB |")
for k, v in rows.items():
    if "error" in v:
        print(f"| {k} | FAILED {v['error'][:80]} |")
    else:
        print(f"| {k} | {v['eval_forward_kl']:.4f} | {v['eval_ce']:.4f} | {v['last_loss']:.4f} | {v['step_time_s']:.3f} | {v['peak_memory_mb']:.0f} |")
