"""--init teacher-layers reads only what it copies; --init-layers auto streams the teacher a layer at a time and
runs once per job (rank 0), the other ranks receive its choice and read no teacher bytes."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from test_train_student import cfg_for

from pipeline.cache import CacheReader
from stage_student.students.build import build_student
from stage_student.students.teacher_weights import TeacherCheckpoint


def full_teacher(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def teacher_path(cache) -> str:
    return CacheReader(cache).manifest["teacher"]["path"]


def test_copied_student_equals_the_fully_loaded_teachers_layers(tmp_path, hf_cache):
    teacher = full_teacher(teacher_path(hf_cache))
    student, _, info = build_student(cfg_for(hf_cache, tmp_path, init_layers=[1, 3]), CacheReader(hf_cache))
    assert info["teacher_layers"] == [1, 3]
    t, s = teacher.state_dict(), student.state_dict()
    for i, src in enumerate([1, 3]):
        for name, value in teacher.model.layers[src].state_dict().items():
            assert torch.equal(s[f"model.layers.{i}.{name}"], value), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name]), name
    # and the copy behaves like the teacher's layers: the same logits as the teacher pruned to them
    ids = torch.arange(20).reshape(2, 10) % teacher.config.vocab_size
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[1], teacher.model.layers[3]])
    teacher.config.num_hidden_layers = 2
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids, use_cache=False).logits, teacher(input_ids=ids, use_cache=False).logits)


def test_checkpoint_reads_only_the_tensors_asked_for(hf_cache):
    path = teacher_path(hf_cache)
    layer_3 = full_teacher(path).model.layers[3]
    ckpt = TeacherCheckpoint(path)
    for name, value in layer_3.state_dict().items():
        assert torch.equal(ckpt[f"model.layers.3.{name}"], value)
    want = sum(p.numel() * p.element_size() for p in layer_3.parameters())
    assert ckpt.bytes_read == want < os.path.getsize(Path(path) / "model.safetensors") / 4  # one of 4 layers
    assert ckpt.shape("model.layers.3.mlp.up_proj.weight") == tuple(layer_3.mlp.up_proj.weight.shape)
    assert ckpt.bytes_read == want  # shapes come from the header


def test_streaming_teacher_equals_the_full_teacher_and_frees_each_layer(hf_cache):
    path = teacher_path(hf_cache)
    ckpt = TeacherCheckpoint(path)
    stream = ckpt.streaming_model(torch.device("cpu"))
    ids = torch.arange(48).reshape(3, 16) % ckpt.config.vocab_size
    with torch.no_grad():
        got, want = stream(input_ids=ids).logits, full_teacher(path)(input_ids=ids).logits
    assert torch.equal(got, want)
    assert all(p.is_meta for p in stream.model.layers.parameters())  # every layer dropped after it ran
    assert not stream.model.embed_tokens.weight.is_meta


def _rank(rank: int, port: int, cache: str, out: str, result: dict) -> None:
    import torch.distributed as dist

    from stage_student.students import teacher_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    reads = []
    orig = teacher_weights.TeacherCheckpoint.__getitem__

    def counting(self, name):
        reads.append(name)
        return orig(self, name)

    teacher_weights.TeacherCheckpoint.__getitem__ = counting
    model, _, info = build_student(cfg_for(cache, out, init_layers="auto", select_sequences=3), CacheReader(cache))
    result[rank] = {"layers": info["teacher_layers"], "reads": len(reads),
                    "state": {k: v.clone() for k, v in model.state_dict().items()} if rank == 0 else None}
    dist.destroy_process_group()


def test_auto_selection_runs_once_per_job(tmp_path, hf_cache):
    """Two gloo ranks: rank 0 searches and copies; rank 1 gets the same layers without reading the teacher."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_rank, args=(port, str(hf_cache), str(tmp_path / "run"), result), nprocs=2)
    assert result[0]["layers"] == result[1]["layers"] and len(result[0]["layers"]) == 2
    assert result[0]["reads"] > 0 and result[1]["reads"] == 0
    # rank 0's student equals a single-process build from the stored choice
    single, _, info = build_student(cfg_for(hf_cache, tmp_path / "run", init_layers="auto", select_sequences=3),
                                   CacheReader(hf_cache))
    assert info["layer_selection"]["reused"] and info["teacher_layers"] == result[0]["layers"]
    assert all(torch.equal(v, result[0]["state"][k]) for k, v in single.state_dict().items())
