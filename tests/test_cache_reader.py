"""The hidden-state file read a tensor and a row at a time (format 3), format-2 files still read, the loader's
batches unchanged: synthetic caches written by the real writer (no teacher)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from pipeline import schema
from pipeline.cache import CacheReader
from pipeline.errors import CacheError
from pipeline.hidden_file import RowFrames, encode_tensor
from stage_student.training.data import CacheStream

sys.path.insert(0, str(ROOT / "tests" / "bench"))
from bench_reader import synthetic_manifest, synthetic_shard, write_cache  # noqa: E402

WIDTH, SEQ, ROWS = 48, 12, 5
LAYERS, QKV = [0, 3, 5], [2]
QKV_WIDTHS = {"q": 32, "k": 16, "v": 16}


def make_cache(path, version, hidden_dtype, targets="both", shards=2, seed=0):
    manifest = synthetic_manifest(version, targets, LAYERS, hidden_dtype, top_k=8, samples=16, vocab=1000,
                                  width=WIDTH, qkv_layers=QKV, qkv_widths=QKV_WIDTHS)
    rng = np.random.default_rng(seed)
    data = [synthetic_shard(rng, ROWS, SEQ, manifest, WIDTH) for _ in range(shards)]
    return write_cache(path, manifest, data), data


def reference(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """What the stored form decodes to, computed the way the format-2 reader did (torch), independently."""
    stored = encode_tensor("t", x, dtype)
    h = stored["t"].float()
    if dtype == "int8":
        h = h * stored["t_scale"][..., None]
        h.scatter_(-1, stored["t_outlier_idx"].long(), stored["t_outlier_val"].float())
    return h


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "float16", "float32"])
def test_both_layouts_read_the_stored_values(tmp_path, dtype):
    new, data = make_cache(tmp_path / "v3", 3, dtype)
    old, _ = make_cache(tmp_path / "v2", 2, dtype)
    for path in (new, old):
        reader = CacheReader(path)
        assert reader.verify() == []
        reader.check_files()
        for shard, d in zip(reader.shards, data):
            batch = reader.read_shard(shard)
            for l in LAYERS:
                want = reference(d["hidden"][l], dtype).numpy()
                assert batch["hidden_states"][l].dtype == np.float32
                np.testing.assert_array_equal(batch["hidden_states"][l], want)
                exact = d["hidden"][l].double().numpy()  # error per token, relative to its largest value
                err = (np.abs(batch["hidden_states"][l] - exact).max(-1) / np.abs(exact).max(-1)).max()
                assert err <= {"float32": 1e-7, "float16": 2 ** -11, "bfloat16": 2 ** -8, "int8": 1 / 254}[dtype]
            for kind, x in d["qkv"][QKV[0]].items():
                np.testing.assert_array_equal(batch["qkv"][QKV[0]][kind], reference(x, dtype).numpy())


def test_a_layer_and_rows_read_alone(tmp_path, monkeypatch):
    path, data = make_cache(tmp_path / "v3", 3, "int8", shards=1)
    reader = CacheReader(path)
    shard = reader.shards[0]
    fetched = []
    cat_file = reader.fs.cat_file
    monkeypatch.setattr(reader.fs, "cat_file", lambda p, start, end: fetched.append(end - start) or cat_file(p, start=start, end=end))
    got = reader.read_hidden(shard, layers=[3], rows=slice(1, 3))[3]
    reads = list(fetched)
    np.testing.assert_array_equal(got, reference(data[0]["hidden"][3], "int8").numpy()[1:3])
    # the header, then rows 1-2 of layer_3 and of its three int8 parts: nothing of the other layers or Q/K/V
    index = RowFrames(reader.fs, reader._join(shard["hidden_file"])).index
    frames = sum(index[k]["frames"][3] - index[k]["frames"][1]
                 for k in ("layer_3", "layer_3_scale", "layer_3_outlier_idx", "layer_3_outlier_val"))
    assert sum(reads[2:]) == frames and len(reads) == 2 + 4
    assert frames < shard["hidden_bytes"] / 10


def test_loader_batches_are_the_same_from_both_layouts(tmp_path):
    new, data = make_cache(tmp_path / "v3", 3, "bfloat16", shards=3)
    old, _ = make_cache(tmp_path / "v2", 2, "bfloat16", shards=3)
    reader = CacheReader(new)
    full = [reader.read_shard(s) for s in reader.shards]
    pairs = [(i, r) for i, s in enumerate(reader.shards) for r in range(s["rows"])]
    streams = [CacheStream(str(p), pairs, 3, seed=1, buffer=4, hidden_layers=[5], qkv_layers=QKV, epochs=1) for p in (new, old)]
    n = 0
    for a, b in zip(*streams):
        for key in ("input_ids", "topk_ids", "topk_logprobs", "sample_ids", "sample_weights"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(a["hidden_states"][5], b["hidden_states"][5])
        assert torch.equal(a["qkv"][2]["k"], b["qkv"][2]["k"])
        for i, seq in enumerate(a["seq_index"].tolist()):  # and both equal the shard read whole
            s, r = divmod(seq, ROWS)
            np.testing.assert_array_equal(a["hidden_states"][5][i].numpy(), full[s]["hidden_states"][5][r])
            np.testing.assert_array_equal(a["qkv"][2]["v"][i].numpy(), full[s]["qkv"][2]["v"][r])
            np.testing.assert_array_equal(a["topk_logprobs"][i].numpy(), full[s]["topk_logprobs"][r])
        n += 1
    assert n == len(pairs) // 3


def test_format_version_changes_only_with_a_hidden_state_file():
    assert schema.format_version([], []) == 2  # nothing in such a cache changed: it keeps its identity
    assert schema.format_version([4], []) == schema.format_version([], [2]) == schema.FORMAT_VERSION == 3
    assert 3 in schema.READABLE_VERSIONS


def test_bad_hidden_files_are_clear_errors(tmp_path):
    path, _ = make_cache(tmp_path / "v3", 3, "bfloat16", shards=1)
    reader = CacheReader(path)
    shard = reader.shards[0]
    with pytest.raises(CacheError, match=r"holds no layer_7.*hidden layers \[0, 3, 5\]"):
        reader.read_hidden(shard, layers=[7])
    hidden = path / shard["hidden_file"]
    hidden.write_bytes(hidden.read_bytes()[:100])
    with pytest.raises(CacheError, match="is corrupt"):
        reader.read_hidden(shard, layers=[3])
    hidden.unlink()
    with pytest.raises(CacheError, match="is missing"):
        reader.read_hidden(shard, layers=[3])


def test_row_frames_file_is_plain_safetensors(tmp_path):
    """Any safetensors tool opens the file; its metadata says what each tensor's frames hold."""
    from safetensors import safe_open

    path, data = make_cache(tmp_path / "v3", 3, "bfloat16", shards=1)
    shard = CacheReader(path).shards[0]
    with safe_open(path / shard["hidden_file"], "np") as f:
        index = json.loads(f.metadata()[schema.ROW_FRAMES_KEY])
        assert set(f.keys()) == set(index) == {"layer_0", "layer_3", "layer_5", "q_2", "k_2", "v_2"}
        assert index["layer_3"]["dtype"] == "BF16" and index["layer_3"]["shape"] == [ROWS, SEQ, WIDTH]
        assert f.get_tensor("layer_3").size == index["layer_3"]["frames"][-1]
