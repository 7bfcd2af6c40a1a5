"""The Makefile as a newcomer meets it, read with `make -n` / `make -q` (nothing runs): setup's stamp names the
extra it installed, PIP_ARGS reaches every pip call, a missing CPU torch is retried on PyTorch's CPU index, and
targets refuse what they cannot do."""
from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def stamped(venv):
    """A venv dir whose CPU setup stamp is newer than pyproject.toml: `make setup VLLM_EXTRA=cpu` is up to date."""
    venv.mkdir()
    (venv / ".installed-cpu").touch()
    later = os.stat(ROOT / "pyproject.toml").st_mtime + 10
    os.utime(venv / ".installed-cpu", (later, later))
    return venv


def make(*args: str, venv) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args, f"VENV={venv}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_setup_passes_pip_args_to_every_pip_call_and_retries_the_cpu_index(tmp_path):
    r = make("-n", "setup", "VLLM_EXTRA=cpu", "PIP_ARGS=--no-cache-dir", venv=tmp_path / "v")
    installs = [l for l in r.stdout.splitlines() if "pip install" in l]
    assert r.returncode == 0 and len(installs) >= 2
    assert all("--no-cache-dir" in l for l in installs), installs
    assert any("--extra-index-url https://download.pytorch.org/whl/cpu" in l for l in installs)


def test_the_setup_stamp_names_its_extra(tmp_path):
    venv = stamped(tmp_path / "v")
    assert make("-q", "setup", "VLLM_EXTRA=cpu", venv=venv).returncode == 0  # up to date
    assert make("-q", "setup", "VLLM_EXTRA=gpu", venv=venv).returncode == 1  # the GPU extra is not installed yet
    assert "VLLM_EXTRA" in (ROOT / "Makefile").read_text() and "gpu-check" in (ROOT / "Makefile").read_text()


def test_eval_window_and_the_capture_memory_baseline(tmp_path):
    venv = stamped(tmp_path / "v")
    assert "--max-seq-len 512 " in make("-n", "eval", "VLLM_EXTRA=cpu", venv=venv).stdout
    assert "--max-seq-len 1024 " in make("-n", "eval", "VLLM_EXTRA=cpu", "EVAL_SEQ_LEN=1024", venv=venv).stdout
    r = make("-n", "bench-capture-memory", "VLLM_EXTRA=cpu", venv=venv)
    assert r.returncode != 0 and "compares against a baseline: name it" in r.stderr
    assert "--before v1" in make("-n", "bench-capture-memory", "VLLM_EXTRA=cpu", "BEFORE=v1", venv=venv).stdout
