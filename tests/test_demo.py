"""`make demo`, the README's first command, end to end with tiny sizes: real vLLM capture (CLI), two
students, eval report. Slow (about a minute), and part of `make test`."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_make_demo_tiny(tmp_path, tiny_teacher, text_file):
    runs = tmp_path / "demo"
    args = [f"RUNS={runs}", f"TEACHER={tiny_teacher}", f"DATASET={text_file}", "TOKENS=2048", "SEQ_LEN=64",
            "TOP_K=8", "STUDENT_LAYERS=2", "STEPS=4", "BATCH=2", "EVAL_LIMIT=3", "LR=3e-3"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    demo = lambda: subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "demo", *args],  # noqa: E731
                                  capture_output=True, text=True, env=env, timeout=1200)
    r = demo()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo finished" in r.stdout and f"{runs}/eval/eval.md" in r.stdout
    manifest = json.loads((runs / "cache" / "manifest.json").read_text())
    assert manifest["capture"]["backend"] == "vllm" and manifest["stats"]["tokens"] == 2048
    cap = manifest["capture"]
    assert (cap["targets"], cap["samples"], cap["sampling"], cap["tail_logprobs"]) == ("sampled-exact", 88, "systematic", False)  # the default
    summary = json.loads((runs / "eval" / "eval.json").read_text())
    assert list(summary["models"]) == ["teacher", "student-kd", "student-ce"]
    for name in ("student-kd", "student-ce"):
        assert summary["models"][name]["metrics"]["heldout/perplexity"] > 1
        assert (runs / name / "final" / "model.safetensors").exists()
    assert "| heldout/bits_per_byte |" in r.stdout  # the table is printed
    assert (runs / "student-kd" / "final" / "README.md").exists()
    # a second `make demo` (a newcomer's rerun, or after a kill) captures and trains nothing again
    weights = {n: (runs / n / "final" / "model.safetensors").read_bytes() for n in ("student-kd", "student-ce")}
    r = demo()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("finished at step 4 already") == 2
    assert re.search(r"(\d+) shards for this job, \1 already done", r.stdout)
    assert weights == {n: (runs / n / "final" / "model.safetensors").read_bytes() for n in weights}
    assert "demo finished" in r.stdout


@pytest.mark.slow
def test_trained_student_loads_in_vllm(tmp_path, hf_cache):
    """The final student dir is a plain HF dir that vLLM serves (own process: the test session holds an engine)."""
    import sys

    from test_train_student import cfg_for

    from stage_student.train import train

    train(cfg_for(hf_cache, tmp_path, max_steps=2))
    code = (
        "import os, sys\n"
        "os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')\n"
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(tmp_path / 'final')!r}, dtype='float32', enforce_eager=True, max_model_len=128)\n"
        "out = llm.generate(['The minister said'], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)\n"
        "print('GENERATED', len(out[0].outputs[0].token_ids), flush=True)\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "GENERATED 5" in r.stdout, r.stderr[-3000:]
