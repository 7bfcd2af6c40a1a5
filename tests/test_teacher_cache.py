"""Stage one against real engines: vLLM vs the HF reference, resume, array jobs, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_HIDDEN_LAYERS, TINY_K, assert_same_rows, capture_cfg, read_all

from pipeline.cache import CacheReader
from pipeline.cache_write import merge_manifests
from pipeline.errors import CacheError, ConfigError, DistilyError
from stage_teacher.capture import run


def test_vllm_cache_matches_hf_backend(tmp_path, tiny_teacher, text_file, vllm_engine, hf_cache):
    run(capture_cfg(tiny_teacher, text_file, tmp_path, backend="vllm"), teacher=vllm_engine)
    v, h = read_all(tmp_path), read_all(hf_cache)
    assert len(v) == len(h) == 20
    checked_ids = 0
    for a, b in zip(v, h):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        # the README's "within 1e-4" (measured on the tiny float32 teacher: 2.9e-6 for the log-probs, 3.6e-7 tail mass)
        np.testing.assert_allclose(a["target_logprob"], b["target_logprob"], atol=1e-4)
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(a["tail_mass"], b["tail_mass"], atol=1e-4)
        # ids must agree wherever the log-prob is not tied with a neighbour (ties may come in any order)
        lp = b["topk_logprobs"]
        gaps = np.diff(lp, axis=-1)
        untied = np.ones_like(lp, dtype=bool)
        untied[..., 1:] &= np.abs(gaps) > 1e-4
        untied[..., :-1] &= np.abs(gaps) > 1e-4
        untied[..., -1] = False  # the k-th entry may tie with the (k+1)-th, which we do not see
        np.testing.assert_array_equal(a["topk_ids"][untied], b["topk_ids"][untied])
        checked_ids += untied.sum()
        for l in TINY_HIDDEN_LAYERS:
            cos = torch.nn.functional.cosine_similarity(
                torch.from_numpy(a["hidden_states"][l]), torch.from_numpy(b["hidden_states"][l]), dim=-1
            )
            assert cos.min() >= 0.9999, (l, cos.min())
    assert checked_ids > 0.8 * len(v) * 63 * TINY_K


def test_cache_matches_independent_hf_forward(tiny_teacher, hf_cache):
    """Row t is the teacher's distribution of input_ids[t+1]; hidden states follow output_hidden_states."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    seqs = read_all(hf_cache)[:3]
    ids = torch.tensor(np.stack([s["input_ids"] for s in seqs]).astype(np.int64))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits.double(), -1)
    for i, s in enumerate(seqs):
        for t in (0, 17, 62):
            full = logp[i, t]
            assert s["target_logprob"][t] == pytest.approx(full[ids[i, t + 1]].item(), abs=1e-4)
            top = full.topk(TINY_K)
            np.testing.assert_allclose(s["topk_logprobs"][t], top.values.numpy(), atol=1e-4)
            assert s["tail_mass"][t] == pytest.approx(1 - top.values.exp().sum().item(), abs=1e-5)
        for l in TINY_HIDDEN_LAYERS:
            np.testing.assert_allclose(s["hidden_states"][l], out.hidden_states[l][i].numpy(), atol=1e-4)
    m = CacheReader(hf_cache).manifest
    assert m["stats"]["tokens"] == 20 * 64 and m["complete"]
    assert 0 < m["stats"]["mean_target_prob"] < 1


class Interrupt(Exception):
    pass


class CrashAfter:
    """A real HF teacher that dies after n shards, as a killed job would."""

    def __init__(self, cfg, n):
        from stage_teacher.capture import make_backend

        self.inner = make_backend(cfg, cfg.teacher, 4, "hf")
        self.top_k, self.hidden_layers, self.n = self.inner.top_k, self.inner.hidden_layers, n

    def configure(self, spec, targets_from, qkv_layers=()):
        self.inner.configure(spec, targets_from, qkv_layers)

    def __call__(self, seqs, seq_index=None):
        if self.n == 0:
            raise Interrupt
        self.n -= 1
        return self.inner(seqs, seq_index)


def test_resume_equals_uninterrupted_run(tmp_path, tiny_teacher, text_file, hf_cache):
    cfg = capture_cfg(tiny_teacher, text_file, tmp_path)
    with pytest.raises(Interrupt):
        run(cfg, teacher=CrashAfter(cfg, 3))
    partial = json.loads((tmp_path / "manifest.json").read_text())
    assert not partial["complete"] and 1 <= len(partial["shards"]) <= 3
    (tmp_path / ".shard-00004.parquet.123.tmp").write_bytes(b"half a file")  # a write cut short
    counting = CrashAfter(cfg, 99)
    run(cfg, teacher=counting)
    assert 99 - counting.n == 5 - len(partial["shards"])  # only the missing shards were captured again
    assert not list(tmp_path.glob(".*.tmp"))
    assert_same_rows(read_all(tmp_path), read_all(hf_cache))
    run(cfg, teacher=CrashAfter(cfg, 0))  # a finished cache: nothing to do, nothing re-run


def test_array_jobs_merged_equal_single_run(tmp_path, tiny_teacher, text_file, hf_cache):
    shared, elsewhere = tmp_path / "shared", tmp_path / "node2"
    for i in range(3):  # job 2 writes to another disk, as on a cluster without a shared FS
        run(capture_cfg(tiny_teacher, text_file, elsewhere if i == 2 else shared, num_shards=3, shard_index=i))
    with pytest.raises(CacheError, match="merge-manifests"):
        CacheReader(shared).manifest
    merged = merge_manifests(str(shared), [str(elsewhere)])
    assert [s["index"] for s in merged["shards"]] == [0, 1, 2, 3, 4]
    assert_same_rows(read_all(shared), read_all(hf_cache))
    assert CacheReader(shared).verify() == []


def test_merge_refuses_missing_parts(tmp_path, tiny_teacher, text_file):
    run(capture_cfg(tiny_teacher, text_file, tmp_path, num_shards=2, shard_index=0))
    with pytest.raises(CacheError, match=r"parts \[1\] of 2 are missing"):
        merge_manifests(str(tmp_path), [])


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dataset": "/no/such/file.txt"}, "no such file"),
        ({"teacher": "/no/such/model"}, "no such directory"),
        ({"hidden_layers": [0, 5]}, r"out of range.*0 \(embeddings\) \.\. 4"),
        ({"top_k": 9, "backend": "vllm", "targets_from": "engine"}, "--vllm-max-logprobs 9"),
        ({"top_k": 100000}, "vocab size"),
        ({"backend": "sglang"}, "unknown"),
        ({"targets": "sampled-exact", "sampling": "stratified"}, "--sampling 'stratified' is unknown"),
        ({"output": "s3://bucket/cache"}, "not to a URL"),
    ],
)
def test_bad_input_fails_before_the_engine(tmp_path, tiny_teacher, text_file, kw, message):
    with pytest.raises(DistilyError, match=message) as e:
        run(capture_cfg(tiny_teacher, text_file, tmp_path, **kw))
    assert not list(tmp_path.glob("shard-*")) and not os.path.exists("s3:")
    # options that are wrong in themselves are config errors; a missing file or model is not
    assert isinstance(e.value, ConfigError) == (set(kw) - {"teacher", "dataset"} != set())


def test_empty_dataset(tmp_path, tiny_teacher):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(CacheError, match="holds no text"):
        run(capture_cfg(tiny_teacher, empty, tmp_path / "out"))


@pytest.mark.parametrize("kw, field", [({"top_k": 4}, "capture.top_k"), ({"max_seq_len": 32}, "capture.max_seq_len")])
def test_output_dir_of_another_cache(tmp_path, tiny_teacher, text_file, hf_cache, kw, field):
    shutil.copytree(hf_cache, tmp_path / "c")
    with pytest.raises(CacheError, match=f"different settings.*{field}"):
        run(capture_cfg(tiny_teacher, text_file, tmp_path / "c", **kw))


def test_output_dir_of_another_teacher(tmp_path, other_teacher, text_file, hf_cache):
    shutil.copytree(hf_cache, tmp_path / "c")
    with pytest.raises(CacheError, match="weights_sha256"):
        run(capture_cfg(other_teacher, text_file, tmp_path / "c"))


def test_corrupt_shard_on_resume_and_verify(tmp_path, tiny_teacher, text_file, hf_cache):
    c = tmp_path / "c"
    shutil.copytree(hf_cache, c)
    data = (c / "shard-00002.parquet").read_bytes()
    (c / "shard-00002.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="shard-00002.parquet is corrupt or truncated"):
        run(capture_cfg(tiny_teacher, text_file, c))
    problems = CacheReader(c).verify()
    assert problems and "shard-00002.parquet" in problems[0]


def test_cli_inspect_verify_and_yaml(tmp_path, tiny_teacher, text_file, hf_cache):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"teacher_cache:\n  teacher: {tiny_teacher}\n  dataset: {text_file}\n  max_seq_len: 32\n"
        f"  max_tokens: 256\n  top_k: 4\n  backend: hf\n  hidden_layers: [4]\n"
    )
    cli = [sys.executable, "-m", "pipeline.cli"]
    r = subprocess.run([*cli, "teacher-cache", "--config", str(cfg), "-o", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = CacheReader(tmp_path / "c").manifest
    assert m["capture"]["top_k"] == 4 and m["capture"]["hidden_layers"] == [4] and m["stats"]["tokens"] == 256
    r = subprocess.run([*cli, "inspect", str(hf_cache)], capture_output=True, text=True)
    assert r.returncode == 0 and "bytes/token targets" in r.stdout and "[0, 2, 4]" in r.stdout
    r = subprocess.run([*cli, "verify", f"file://{hf_cache}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "c" / "shard-00000.hidden.safetensors.zst").write_bytes(b"junk")
    r = subprocess.run([*cli, "verify", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 1 and "shard-00000.hidden.safetensors.zst" in r.stderr
    r = subprocess.run([*cli, "teacher-cache", "--teacher", "/nope", "-o", str(tmp_path / "d")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such directory" in r.stderr


def test_hard_wrapped_prose_stays_whole_paragraphs(tmp_path, tiny_teacher):
    import textwrap

    from transformers import AutoTokenizer

    from pipeline.resolve import DatasetSpec, load_texts, pack

    paragraphs = [" ".join(f"word{i}{j} and more words to wrap" for j in range(12)) for i in range(3)]
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(textwrap.fill(p, 40) for p in paragraphs) + "\n")
    lines = [l for l in book.read_text().splitlines() if l.strip()]
    auto = load_texts(DatasetSpec(str(book)))
    assert len(auto) == 3 and all(p.replace("\n", " ").strip() == q for p, q in zip(auto, paragraphs))
    assert len(load_texts(DatasetSpec(str(book), sample_by="line"))) == len(lines) > 9
    assert len(load_texts(DatasetSpec(str(book), sample_by="document"))) == 1
    assert len(load_texts(DatasetSpec("lee"))) == 50  # one document per line, no blank lines: lines
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    stream = pack(tok, auto, 1)  # [tokens, 1]: every token kept
    assert (stream == tok.eos_token_id).sum() == 3  # an EOS after each paragraph, none at line breaks
    with pytest.raises(CacheError, match="--sample-by 'sentence' is unknown"):
        load_texts(DatasetSpec(str(book), sample_by="sentence"))


def test_dataset_files_names_a_local_datasets_files_or_refuses_it(tmp_path):
    """The cheap check capture runs before it loads the teacher: a local path's files, [] for a hub id."""
    from pipeline.resolve import DatasetSpec, dataset_files

    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    assert dataset_files(DatasetSpec(str(tmp_path / "*.txt"))) == ([str(tmp_path / "a.txt")], {})
    assert dataset_files(DatasetSpec("org/name")) == ([], {})
    files, kwargs = dataset_files(DatasetSpec("lee"))
    assert len(files) == 1 and files[0].endswith("lee.cor") and kwargs == {"encoding": "latin-1"}
    with pytest.raises(CacheError, match=r"mixes file types \['.jsonl', '.txt'\]; use one kind"):
        dataset_files(DatasetSpec(str(tmp_path)))
    for missing in (str(tmp_path / "c.txt"), str(tmp_path / "*.parquet"), "./data"):
        with pytest.raises(CacheError, match="no such file or directory"):
            dataset_files(DatasetSpec(missing))
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generated.part-00000.json").write_text("{}")  # a generate job that has written no shard yet
    with pytest.raises(CacheError, match="a generated dataset with no finished shard yet; finish it"):
        dataset_files(DatasetSpec(str(tmp_path / "gen")))


def test_a_cache_from_before_sample_by_keeps_its_identity(hf_cache):
    from pipeline.manifest import identity

    manifest = CacheReader(hf_cache).manifest
    old = json.loads(json.dumps(manifest))
    del old["dataset"]["spec"]["sample_by"]  # as written before the option existed
    assert identity(old) == identity(manifest)
    old["dataset"]["spec"]["sample_by"] = "line"
    assert identity(old) != identity(manifest)


def test_weights_are_hashed_once_per_output_dir(tmp_path, tiny_teacher, text_file, monkeypatch):
    """The first job hashes the teacher's weights and stores the hash; the next job (another array job, a resume)
    reads no weight file while their names, sizes and mtimes are unchanged; a touched weight file is hashed again."""
    from pathlib import Path

    from pipeline import resolve

    reads, real_open = [], open

    def counting_open(path, *a, **k):
        if str(path).endswith((".safetensors", ".bin")):
            reads.append(Path(path).name)
        return real_open(path, *a, **k)

    monkeypatch.setattr(resolve, "open", counting_open, raising=False)
    out = tmp_path / "c"
    job0 = capture_cfg(tiny_teacher, text_file, out, num_shards=2, shard_index=0, max_tokens=64 * 8)
    first = run(job0)
    sha = first["teacher"]["weights_sha256"]
    assert first["teacher"]["weights_sha256_source"] == "hashed" and reads
    assert json.loads((out / "teacher-weights.json").read_text())["sha256"] == sha
    reads.clear()
    second = run(capture_cfg(tiny_teacher, text_file, out, num_shards=2, shard_index=1, max_tokens=64 * 8))
    assert second["teacher"]["weights_sha256_source"] == "reused" and reads == []
    assert second["teacher"]["weights_sha256"] == sha
    merged = merge_manifests(str(out), [])  # how each job got the hash is not part of the cache's identity
    assert len(merged["shards"]) == 2 and CacheReader(out).verify() == []
    weights = sorted(Path(tiny_teacher).glob("*.safetensors"))[0]
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        third = run(job0)  # job 0 again (nothing left to do) after the weights were touched
        assert third["teacher"]["weights_sha256_source"] == "hashed" and reads and third["teacher"]["weights_sha256"] == sha
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
