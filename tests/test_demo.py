"""`make demo`, the README's first command, end to end with tiny sizes: real vLLM capture (CLI), two
students, eval report. Slow (about a minute), and part of `make test`."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_make_demo_tiny(tmp_path, tiny_teacher, text_file):
    runs = tmp_path / "demo"
    args = [f"RUNS={runs}", f"TEACHER={tiny_teacher}", f"DATASET={text_file}", "TOKENS=2048", "SEQ_LEN=64",
            "TOP_K=8", "STUDENT_LAYERS=2", "STEPS=4", "BATCH=2", "EVAL_LIMIT=3", "LR=3e-3"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "demo", *args], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo finished" in r.stdout and f"{runs}/eval/eval.md" in r.stdout
    manifest = json.loads((runs / "cache" / "manifest.json").read_text())
    assert manifest["capture"]["backend"] == "vllm" and manifest["stats"]["tokens"] == 2048
    summary = json.loads((runs / "eval" / "eval.json").read_text())
    assert list(summary["models"]) == ["teacher", "student-kd", "student-ce"]
    for name in ("student-kd", "student-ce"):
        assert summary["models"][name]["metrics"]["heldout/perplexity"] > 1
        assert (runs / name / "final" / "model.safetensors").exists()
    assert "| heldout/bits_per_byte |" in r.stdout  # the table is printed
    assert (runs / "student-kd" / "final" / "README.md").exists()
