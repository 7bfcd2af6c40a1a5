"""`distily generate`: the teacher writes a dataset under vLLM; teacher-cache reads its ids as they are."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import build_tokenizer, capture_cfg, read_all

from pipeline.config import GenerateConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.generated import read_generated
from pipeline.resolve import DatasetSpec, cut, join_ids, packed_sequences
from stage_teacher import generate
from stage_teacher.capture import run as capture


def gen_cfg(tiny_teacher, text_file, out, **kw) -> GenerateConfig:
    base = dict(output=str(out), teacher=str(tiny_teacher), prompts=str(text_file), num_sequences=10, max_seq_len=48,
                sequences_per_shard=4, prefix_tokens=8)
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture(scope="module")
def generated_mix(tmp_path_factory, tiny_teacher, text_file, vllm_engine):
    out = tmp_path_factory.mktemp("gen-mix")
    generate.run(gen_cfg(tiny_teacher, text_file, out), engine=vllm_engine)
    return out


def test_generated_rows_are_the_prompts_continued(generated_mix, tiny_teacher, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = sorted((r for f in sorted(generated_mix.glob("gen-*.parquet")) for r in pq.read_table(f).to_pylist()),
                  key=lambda r: r["seq_index"])
    assert [r["seq_index"] for r in rows] == list(range(10)) and len(list(generated_mix.glob("gen-*"))) == 3
    _, ctx, _ = generate.prepare(gen_cfg(tiny_teacher, text_file, generated_mix))
    want = generate.requests(ctx, np.arange(10))
    assert {r["generator"] for r in rows} <= {"prefix", "random", "shuffled", "structured"}
    for r, w in zip(rows, want):
        assert r["generator"] == w.generator and r["input_ids"][: len(w.prompt)] == w.prompt
        assert r["prompt_tokens"] == len(w.prompt) < len(r["input_ids"]) <= 48
        assert r["text"] == tok.decode(r["input_ids"])
        assert (r["finish"] == "stop") == (r["input_ids"][-1] == tok.eos_token_id) or r["finish"] == "length"
        if w.generator == "prefix":  # the first --prefix-tokens of a --prompts document
            assert any(w.prompt == d[:8] for d in ctx.documents)
    m, docs = read_generated(generated_mix)
    assert [list(d) for d in docs] == [r["input_ids"] for r in rows]
    from pipeline.resolve import load_texts  # its text column serves eval --dataset and other tools

    assert load_texts(DatasetSpec(str(generated_mix))) == [r["text"] for r in rows if r["text"].strip()]
    assert m["stats"]["sequences"] == 10 and sum(m["stats"]["generators"].values()) == 10


def test_cache_of_generated_set_equals_teacher_forced_capture(tmp_path, generated_mix, tiny_teacher, vllm_engine):
    """teacher-cache --dataset GEN packs the stored ids (no re-tokenisation) and its targets are those of a
    teacher-forced pass over the same tokens."""
    cfg = capture_cfg(tiny_teacher, generated_mix, tmp_path / "c", backend="vllm", max_seq_len=32, max_tokens=None)
    manifest = capture(cfg, teacher=vllm_engine)
    assert manifest["dataset"]["generated"]["generator"] == "mix"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 0 and "by `distily generate --generator mix`, seed 0" in r.stdout, r.stderr
    from transformers import AutoTokenizer

    _, docs = read_generated(generated_mix)
    expected = cut(join_ids(docs, AutoTokenizer.from_pretrained(tiny_teacher).eos_token_id), 32)
    rows = read_all(tmp_path / "c")
    np.testing.assert_array_equal(np.stack([r["input_ids"] for r in rows]), expected)
    forced = vllm_engine(expected[:4], np.arange(4))["targets"]  # the same tokens, teacher-forced directly
    for i, r in enumerate(rows[:4]):
        np.testing.assert_array_equal(r["topk_ids"], forced["topk_ids"][i])
        np.testing.assert_allclose(r["topk_logprobs"], forced["topk_logprobs"][i], atol=1e-5)
        np.testing.assert_allclose(r["target_logprob"], forced["target_logprob"][i], atol=1e-5)


def test_array_jobs_and_resume_write_the_same_sequences(tmp_path, generated_mix, tiny_teacher, text_file, vllm_engine):
    split = tmp_path / "split"
    for i in range(2):
        generate.run(gen_cfg(tiny_teacher, text_file, split, num_shards=2, shard_index=i), engine=vllm_engine)
    _, one = read_generated(generated_mix)
    _, two = read_generated(split)
    assert [list(d) for d in two] == [list(d) for d in one]
    # an interrupted single job: its last shard never made it into the manifest
    resumed = tmp_path / "resumed"
    shutil.copytree(generated_mix, resumed)
    m = __import__("json").loads((resumed / "generated.json").read_text())
    m["shards"], m["complete"] = m["shards"][:2], False
    (resumed / "generated.json").write_text(__import__("json").dumps(m))
    (resumed / "gen-00002.parquet").unlink()
    (resumed / ".gen-00002.parquet.123.tmp").write_bytes(b"half")  # the killed write's temporary
    kept = os.stat(resumed / "gen-00000.parquet").st_mtime_ns
    generate.run(gen_cfg(tiny_teacher, text_file, resumed), engine=vllm_engine)
    _, again = read_generated(resumed)
    assert [list(d) for d in again] == [list(d) for d in one]
    assert os.stat(resumed / "gen-00000.parquet").st_mtime_ns == kept and not list(resumed.glob(".*.tmp"))


def test_an_unfinished_or_different_run_is_refused(tmp_path, tiny_teacher, text_file, vllm_engine):
    out = tmp_path / "g"
    generate.run(gen_cfg(tiny_teacher, text_file, out, num_sequences=4, num_shards=2, shard_index=0,
                         generator="structured"), engine=vllm_engine)
    with pytest.raises(CacheError, match=r"not finished: array job\(s\) \[1\] of 2"):
        read_generated(out)
    with pytest.raises(CacheError, match="other settings.*generator"):
        generate.run(gen_cfg(tiny_teacher, text_file, out, num_sequences=4, num_shards=2, shard_index=1,
                             generator="random"), engine=vllm_engine)


class NoEngine:
    def generate(self, *a, **k):
        raise AssertionError("the engine was used before the bad input was caught")


@pytest.mark.parametrize("kw, message", [
    ({"generator": "poetry"}, "unknown; choose one of random, prefix, shuffled, structured, mix"),
    ({"num_sequences": 0}, "at least one sequence"),
    ({"temperature": -0.5}, "--temperature -0.5 is out of range"),
    ({"top_p": 0.0}, r"--top-p 0.0 is out of range \(0, 1\]"),
    ({"top_p": 1.5}, "--top-p 1.5 is out of range"),
    ({"mix": "prefix=1,poetry=2"}, "'poetry=2'.*NAME one of"),
    ({"mix": "prefix=-1"}, "weights must be >= 0"),
    ({"prefix_tokens": 48}, "--prefix-tokens 48 must be between 1 and"),
    ({"max_seq_len": 4096}, "exceeds the teacher's"),
    ({"prompts": "EMPTY", "generator": "prefix"}, r"--prompts .*\(prefix prompts\).*holds no text"),
    ({"prompts": "/no/such/prompts.txt", "generator": "shuffled"}, "no such file"),
])
def test_bad_input_fails_before_the_engine(tmp_path, tiny_teacher, text_file, kw, message):
    if kw.get("prompts") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
        kw = {**kw, "prompts": str(tmp_path / "empty.jsonl")}
    with pytest.raises(ConfigError, match=message):
        generate.run(gen_cfg(tiny_teacher, text_file, tmp_path / "out", **kw), engine=NoEngine())
    assert not list((tmp_path / "out").glob("gen-*")) if (tmp_path / "out").exists() else True


def test_a_tokenizer_that_cannot_decode_the_samples_is_named(tmp_path, tiny_teacher, text_file, texts, vllm_engine):
    """A tokenizer smaller than the teacher's output vocabulary: the sequence with an undecodable id is named."""
    small = build_tokenizer(texts, tmp_path / "small-tok", vocab_size=300)
    _, ctx, _ = generate.prepare(gen_cfg(tiny_teacher, text_file, tmp_path / "g", generator="random", temperature=2.0))
    ctx.tokenizer, ctx.vocab_ids = small, np.arange(3, 300)
    with pytest.raises(CacheError, match=r"sequence \d+ \(random\): the teacher's tokenizer cannot decode .* outside its 300"):
        generate.generate_rows(vllm_engine, ctx, np.arange(4))


def test_generated_set_of_another_tokenizer_is_refused(tmp_path, generated_mix, texts):
    small = build_tokenizer(texts, tmp_path / "small-tok", vocab_size=300)
    with pytest.raises(CacheError, match="generated with another tokenizer"):
        packed_sequences(small, DatasetSpec(str(generated_mix)), 32)


def test_text_is_tokenised_once_and_reused(tmp_path, tiny_teacher, monkeypatch):
    """A second capture of the same text (another job, a rerun, another --max-seq-len, fewer --max-tokens) reuses
    the token stream under $DISTILY_HOME/tokens; changed text is tokenised again."""
    from transformers import AutoTokenizer

    import pipeline.resolve as R

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)))
    import pipeline.token_store as S

    calls = []
    real = S.tokenise_into_store
    monkeypatch.setattr(S, "tokenise_into_store", lambda *a, **k: calls.append(a[5]) or real(*a, **k))  # a[5]: max_tokens
    spec = DatasetSpec(str(data))
    first, note = packed_sequences(tok, spec, 32)
    assert calls == [None] and "tokenised" in note["note"]
    again, note = packed_sequences(tok, spec, 32)
    np.testing.assert_array_equal(again, first)
    assert calls == [None] and "reused" in note["note"]
    other = packed_sequences(tok, spec, 16, max_tokens=160)[0]
    np.testing.assert_array_equal(other, R.pack(tok, R.load_texts(spec), 16, 160))  # same as tokenising afresh
    assert calls == [None]
    data.write_text(data.read_text() + "\none more document")
    packed_sequences(tok, spec, 32)
    assert len(calls) == 2


def test_cli_generate_errors_and_help(tmp_path):
    cli = [sys.executable, "-m", "pipeline.cli", "generate"]
    r = subprocess.run([*cli, "--generator", "poetry", "-o", str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 2 and "--generator 'poetry' is unknown" in r.stderr
    r = subprocess.run([*cli, "--num-sequences", "0", "-o", str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 2 and "at least one sequence" in r.stderr
