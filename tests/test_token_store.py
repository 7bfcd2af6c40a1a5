"""The token store (pipeline/token_store.py): text tokenised once with `datasets` into a flat int32 stream that
equals the old in-memory `tokenise()`, read back as a memory map, fingerprinted by streaming reads."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import build_llama, build_tokenizer, capture_cfg

import pipeline.token_store as S
from pipeline.errors import ConfigError
from pipeline.resolve import DatasetSpec, cut, load_texts, packed_sequences, tokenise
from pipeline.token_store import fingerprint_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory, texts):
    return build_tokenizer(texts, tmp_path_factory.mktemp("store-tok"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tok):
    """An untrained tiny Llama with the tokenizer: prepare() needs a model dir, never its predictions here."""
    out = tmp_path_factory.mktemp("store-teacher")
    tok.save_pretrained(out)
    return build_llama(out, len(tok), layers=2, hidden=64)


@pytest.fixture
def counted(monkeypatch):
    """The number of rows of each chunk tokenised."""
    calls = []
    real = S.append_chunk
    monkeypatch.setattr(S, "append_chunk", lambda t, rows, *a, **k: calls.append(len(rows)) or real(t, rows, *a, **k))
    return calls


def old_stream(tok, spec: DatasetSpec) -> np.ndarray:
    """The stream as captures made it before the token store: every text document in memory, `tokenise()`."""
    return tokenise(tok, load_texts(spec))[0]


def whole_stream(tok, spec, store, processes=1, max_tokens=None) -> np.ndarray:
    return np.asarray(packed_sequences(tok, spec, 1, max_tokens, store, processes)[0]).ravel()


def test_stream_equals_tokenise_on_the_lee_corpus(tmp_path, tok):
    spec = DatasetSpec("lee-background")
    np.testing.assert_array_equal(whole_stream(tok, spec, tmp_path), old_stream(tok, spec))


def test_blank_and_non_text_documents_and_bos(tmp_path, tok, texts, monkeypatch):
    """Documents that are not text or only whitespace are skipped as before; a BOS-adding tokenizer puts BOS
    before each document; two processes give the same stream as one."""
    rows = [texts[0], "", "   ", None, "\n\t", texts[1], "x", texts[2], " ", texts[3]] * 3
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    spec = DatasetSpec(str(data))
    monkeypatch.setattr(tok, "add_bos_token", True, raising=False)
    ref = tokenise(tok, [t for t in rows if isinstance(t, str) and t.strip()])[0]
    assert (ref == tok.bos_token_id).sum() == (ref == tok.eos_token_id).sum() == 15 and ref[0] == tok.bos_token_id
    np.testing.assert_array_equal(whole_stream(tok, spec, tmp_path / "one", processes=1), ref)
    monkeypatch.setattr(S, "ROWS_PER_PROCESS", 1)  # a pool even for 30 rows
    np.testing.assert_array_equal(whole_stream(tok, spec, tmp_path / "two", processes=2), ref)


def test_two_processes_and_many_chunks_equal_one(tmp_path, tok, monkeypatch, counted):
    """The Lee corpus by pools of 2 and of 1 process, in chunks of about 20,000 tokens: the old stream each time."""
    monkeypatch.setattr(S, "ROWS_PER_PROCESS", 1)
    monkeypatch.setattr(S, "CHUNK_TOKENS", 20_000)
    monkeypatch.setattr(S, "FIRST_ROWS", 1)
    spec = DatasetSpec("lee-background")
    ref = old_stream(tok, spec)
    np.testing.assert_array_equal(whole_stream(tok, spec, tmp_path / "a", processes=2), ref)
    assert len(counted) >= 4 and sum(counted) == 300
    np.testing.assert_array_equal(whole_stream(tok, spec, tmp_path / "b", processes=1), ref)


def test_max_tokens_tokenises_a_prefix_then_continues(tmp_path, tok, counted):
    """--max-tokens tokenises a growing prefix of the rows until enough tokens are in; a later capture that
    wants more continues the stored stream; the sequences always equal cutting the old stream."""
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(3000)))
    spec, store = DatasetSpec(str(data)), tmp_path / "store"
    ref = old_stream(tok, spec)
    seqs, _ = packed_sequences(tok, spec, 32, 320, store, 1)
    np.testing.assert_array_equal(seqs, cut(ref, 32, 320))
    (meta_file,) = store.glob("*.json")
    meta = json.loads(meta_file.read_text())
    assert not meta["complete"] and 320 <= meta["tokens"] < len(ref) // 4 and meta["rows"] == sum(counted) < 3000
    seqs, note = packed_sequences(tok, spec, 64, 20_000, store, 1)
    np.testing.assert_array_equal(seqs, cut(ref, 64, 20_000))
    more = json.loads(meta_file.read_text())
    assert "tokenised" in note["note"] and not more["complete"] and more["rows"] > meta["rows"] == counted[0]
    np.testing.assert_array_equal(whole_stream(tok, spec, store), ref)  # the rest, then everything reused
    assert json.loads(meta_file.read_text())["complete"] and sum(counted) == 3000


def test_a_second_capture_reuses_the_store(tmp_path, tok, teacher, counted):
    """Two captures of the same text (array jobs, reruns, another --max-seq-len): the second tokenises nothing,
    reads its sequences as a read-only memory map of the store, and both fingerprints equal the old one."""
    from stage_teacher.capture import prepare

    data = tmp_path / "docs.txt"
    data.write_text("\n".join(load_texts(DatasetSpec("lee-background"))[:60]))
    cfg = capture_cfg(teacher, data, tmp_path / "c", hidden_layers=[], max_tokens=None, token_store=str(tmp_path / "s"),
                      tokenize_processes=1)
    first, seqs, *_ = prepare(cfg)
    assert counted == [60]
    again, seqs2, *_ = prepare(cfg)
    assert counted == [60] and isinstance(seqs2, np.memmap) and not seqs2.flags.writeable
    ref = cut(old_stream(tok, DatasetSpec(str(data))), 64)
    np.testing.assert_array_equal(seqs2, ref)
    assert first["dataset"] == again["dataset"]
    assert first["dataset"]["fingerprint"] == hashlib.sha256(ref.tobytes()).hexdigest()


def test_an_unwritable_token_store_is_a_config_error_before_the_engine(tmp_path, teacher, text_file, monkeypatch):
    import stage_teacher.capture as C

    monkeypatch.setattr(C, "make_backend", lambda *a, **k: pytest.fail("the engine started"))
    (tmp_path / "a-file").write_text("not a dir")
    cfg = capture_cfg(teacher, text_file, tmp_path / "c", hidden_layers=[], token_store=str(tmp_path / "a-file" / "tokens"))
    with pytest.raises(ConfigError, match="--token-store .* cannot be written"):
        C.run(cfg)
    with pytest.raises(ConfigError, match="--tokenize-processes 0 must be at least 1"):
        C.run(capture_cfg(teacher, text_file, tmp_path / "c", hidden_layers=[], tokenize_processes=0))


def test_streaming_fingerprint_equals_the_old_one(tmp_path, monkeypatch):
    """sha256 of the int32 [N, T] bytes, whether the sequences are a store's memory map (hashed from the file
    with plain reads, in blocks), a view of one, or an array."""
    stream = np.random.default_rng(0).integers(0, 50_000, 10_000, dtype=np.int32)
    path = tmp_path / "s.npy"
    np.save(path, stream)
    monkeypatch.setattr(S, "BLOCK", 4096)  # many blocks
    reads = []
    real = S.hash_file_range
    monkeypatch.setattr(S, "hash_file_range", lambda *a: reads.append(a[1:]) or real(*a))
    for t, max_tokens in ((64, None), (100, 5_000), (7, 9_999)):
        seqs = S.sequences_view(path, len(stream), t, max_tokens)
        old = hashlib.sha256(np.ascontiguousarray(cut(stream, t, max_tokens), dtype=np.int32).tobytes()).hexdigest()
        assert fingerprint_tokens(seqs) == old
        assert (str(reads[-1][0]), *reads[-1][1:]) == (str(path), 128, seqs.nbytes)  # the file, after its header
        assert fingerprint_tokens(seqs[:3]) == hashlib.sha256(cut(stream, t)[:3].tobytes()).hexdigest()  # a view
        assert fingerprint_tokens(np.array(seqs)) == old
    assert len(reads) == 3


def test_jobs_arriving_together_tokenise_once(tmp_path, tok, counted, monkeypatch):
    """Two jobs that find no stream at the same moment: one tokenises under the store's lock, the other waits and
    reuses its stream (without the lock both would tokenise: each chunk is slowed so they overlap)."""
    import threading
    import time

    spec = DatasetSpec("lee-background")
    whole_stream(tok, spec, tmp_path / "alone")
    once = len(counted)
    counted.clear()
    inner = S.append_chunk
    monkeypatch.setattr(S, "append_chunk", lambda *a, **k: time.sleep(0.3) or inner(*a, **k))
    streams = []
    jobs = [threading.Thread(target=lambda: streams.append(whole_stream(tok, spec, tmp_path / "shared"))) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert once > 0 and len(counted) == once, (once, len(counted))
    np.testing.assert_array_equal(streams[0], streams[1])
