"""Tensor-parallel teachers: the capture hooks run in every vLLM worker and bring back one copy of each tensor.

A real engine with two tensor-parallel CPU workers (`mp` executor, gloo) on the tiny teacher (2 attention heads,
1 key/value head: each rank holds one query head and a replica of the key/value head), run as a user runs it
(`distily teacher-cache --tensor-parallel-size 2` in its own process: vLLM's parallel state is per process),
against the session's one-device engine: every stored field must agree."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import TINY_HIDDEN_LAYERS, capture_cfg, read_all

from pipeline.cache import CacheReader
from pipeline.errors import ConfigError, DistilyError
from stage_teacher.capture import run
from stage_teacher.vllm_backend import check_vllm_version, cpu_thread_binding

QKV = [1, 3]
EVERY_TARGET = dict(backend="vllm", targets="both", hidden_layers=TINY_HIDDEN_LAYERS, qkv_layers=QKV,
                    logprob_dtype="float32", hidden_dtype="float32")


def untied(lp: np.ndarray) -> np.ndarray:
    """Positions of a sorted top-k whose log-prob is not tied (1e-4) with a neighbour: their ids must agree."""
    gaps = np.abs(np.diff(lp, axis=-1)) > 1e-4
    keep = np.ones_like(lp, dtype=bool)
    keep[..., 1:] &= gaps
    keep[..., :-1] &= gaps
    keep[..., -1] = False  # the k-th may tie with the unseen (k+1)-th
    return keep


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, tiny_teacher, text_file, vllm_engine):
    out = tmp_path_factory.mktemp("tp1")
    run(capture_cfg(tiny_teacher, text_file, out, **EVERY_TARGET), teacher=vllm_engine)
    vllm_engine.configure(vllm_engine.spec, "hooks", [])  # the shared engine back to no Q/K/V
    return out


def cli_capture(cfg, tmp_path) -> subprocess.CompletedProcess:
    """`distily teacher-cache` in its own process, with cfg's options as a YAML file."""
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump({"teacher_cache": dataclasses.asdict(cfg)}))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher-cache", "--config", str(path)],
                          capture_output=True, text=True, timeout=600)


def test_tensor_parallel_capture_equals_one_device(tmp_path, tiny_teacher, text_file, one_device):
    out = tmp_path / "tp2"
    r = cli_capture(capture_cfg(tiny_teacher, text_file, out, tensor_parallel_size=2, **EVERY_TARGET), tmp_path)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "Error" in l or "error" in l)[-4000:]
    tmp_path = out
    m = CacheReader(tmp_path).manifest
    assert m["job"]["tensor_parallel_size"] == 2 and m["capture"]["targets_from"] == "hooks"
    a_rows, b_rows = read_all(one_device), read_all(tmp_path)
    assert len(a_rows) == len(b_rows) == 20
    same_samples = total = 0
    for a, b in zip(a_rows, b_rows):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        for key in ("target_logprob", "topk_logprobs", "tail_mass"):
            np.testing.assert_allclose(b[key], a[key], atol=1e-4, err_msg=key)
        keep = untied(a["topk_logprobs"])
        np.testing.assert_array_equal(b["topk_ids"][keep], a["topk_ids"][keep])
        np.testing.assert_allclose(b["teacher_entropy"], a["teacher_entropy"], rtol=1e-5)
        rows_equal = (a["sample_ids"] == b["sample_ids"]).all(-1) & (a["sample_counts"] == b["sample_counts"]).all(-1) \
            if a["sample_ids"].shape == b["sample_ids"].shape else np.zeros(len(a["sample_ids"]), bool)
        same_samples, total = same_samples + rows_equal.sum(), total + len(rows_equal)
        for l in TINY_HIDDEN_LAYERS:
            np.testing.assert_allclose(b["hidden_states"][l], a["hidden_states"][l], atol=1e-4, err_msg=f"hidden {l}")
        for l in QKV:
            for kind in "qkv":  # full width: both ranks' query heads, the replicated key/value head once
                x, y = a["qkv"][l][kind], b["qkv"][l][kind]
                assert x.shape == y.shape
                np.testing.assert_allclose(y, x, atol=1e-4, err_msg=f"{kind}_{l}")
    assert same_samples >= 0.98 * total, (same_samples, total)  # same logits to ~1e-6, same seeded draws


@pytest.fixture(scope="module")
def gqa_teacher(tmp_path_factory, tiny_teacher, texts):
    """The tiny teacher's tokenizer with 4 attention heads and 2 key/value heads: at TP=2 each rank holds 2 query
    heads and its own key/value head, so the full-width K and V join two partitions (not one replicated head)."""
    import shutil

    from conftest import build_llama
    from transformers import AutoTokenizer

    from pipeline.resolve import pack

    out = tmp_path_factory.mktemp("gqa-teacher")
    for f in tiny_teacher.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    build_llama(out, len(tok), pretrain_on=pack(tok, texts[150:], 64), heads=4, kv_heads=2, steps=60)
    return out


def test_tensor_parallel_capture_joins_several_kv_heads(tmp_path, gqa_teacher, text_file):
    """4 heads / 2 key/value heads at TP=2 against the HF backend's one-device capture (the reference): log-probs,
    hidden states and full-width Q/K/V within 1e-4, top-k ids where not tied, the same seeded draws on >= 98% of
    positions for RS-KD and the default sampled-exact targets."""
    for targets in ("both", "sampled-exact"):
        kw = {**EVERY_TARGET, "targets": targets}
        tp = tmp_path / f"tp2-{targets}"
        r = cli_capture(capture_cfg(gqa_teacher, text_file, tp, tensor_parallel_size=2, max_tokens=64 * 8, **kw), tmp_path)
        assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "rror" in l)[-4000:]
        ref = tmp_path / f"hf-{targets}"
        run(capture_cfg(gqa_teacher, text_file, ref, max_tokens=64 * 8, **{**kw, "backend": "hf"}))
        same = total = 0
        for a, b in zip(read_all(ref), read_all(tp), strict=True):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
            np.testing.assert_allclose(b["target_logprob"], a["target_logprob"], atol=1e-4)
            if targets == "both":
                np.testing.assert_allclose(b["topk_logprobs"], a["topk_logprobs"], atol=1e-4)
                keep = untied(a["topk_logprobs"])
                np.testing.assert_array_equal(b["topk_ids"][keep], a["topk_ids"][keep])
            for l in TINY_HIDDEN_LAYERS:
                np.testing.assert_allclose(b["hidden_states"][l], a["hidden_states"][l], atol=1e-4, err_msg=f"hidden {l}")
            for l in QKV:
                for kind in "qkv":
                    x, y = a["qkv"][l][kind], b["qkv"][l][kind]
                    assert x.shape == y.shape == (64, 128 if kind == "q" else 64)
                    np.testing.assert_allclose(y, x, atol=1e-4, err_msg=f"{kind}_{l}")
            m = min(a["sample_ids"].shape[-1], b["sample_ids"].shape[-1])
            same += int((a["sample_ids"][:, :m] == b["sample_ids"][:, :m]).all(-1).sum())
            total += len(a["sample_ids"])
        assert same >= 0.98 * total, (targets, same, total)


@pytest.mark.parametrize("kw, match", [
    (dict(tensor_parallel_size=3), r"2 attention heads .* cannot be split over --tensor-parallel-size 3: use one of \[1, 2\]"),
    (dict(pipeline_parallel_size=2), "does not run on vLLM's CPU backend"),
    (dict(tensor_parallel_size=2, backend="hf"), "--backend hf runs the teacher on one device"),
    (dict(tensor_parallel_size=0), "must be at least 1"),
    (dict(dtype="fp8"), "--dtype 'fp8' is unknown"),
])
def test_parallel_layouts_the_machine_cannot_serve_fail_before_the_engine(tmp_path, tiny_teacher, text_file, kw, match):
    cfg = capture_cfg(tiny_teacher, text_file, tmp_path, **{"backend": "vllm", **kw})
    with pytest.raises(ConfigError, match=match):
        run(cfg)
    assert not list(tmp_path.glob("shard-*"))


def test_auto_dtype_is_float32_on_cpu_and_recorded(tmp_path, tiny_teacher, text_file, hf_cache):
    assert CacheReader(hf_cache).manifest["capture"]["dtype"] == "float32"  # the fixture's dtype is auto


def test_thread_binding_for_more_workers_than_numa_nodes():
    cores = sorted(os.sched_getaffinity(0))
    for workers in (2, 3, 5):
        lists = [[int(c) for c in part.split(",")] for part in cpu_thread_binding(workers).split("|")]
        assert len(lists) == workers and all(set(l) <= set(cores) and l for l in lists)
        used = [c for l in lists for c in l]
        if workers <= len(cores):
            assert len(used) == len(set(used))  # disjoint cores per worker
        else:
            assert set(used) == set(cores)  # round-robin over every core
    if len(cores) == 2:
        assert cpu_thread_binding(3) == f"{cores[0]}|{cores[1]}|{cores[0]}"


def test_unsupported_vllm_release_is_refused_at_start_up():
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.1+cpu") == "0.32.1+cpu"
    with pytest.raises(DistilyError, match=r"follow vLLM 0\.32\.x internals"):
        check_vllm_version("0.33.0")


def test_generate_refuses_a_split_the_teacher_cannot_take(tmp_path, tiny_teacher):
    from pipeline.config import GenerateConfig
    from stage_teacher.generate import run as generate

    cfg = GenerateConfig(output=str(tmp_path / "gen"), teacher=str(tiny_teacher), generator="random", num_sequences=2,
                         max_seq_len=32, tensor_parallel_size=3)
    with pytest.raises(ConfigError, match=r"cannot be split over --tensor-parallel-size 3"):
        generate(cfg)
