"""Student quality levers: layers chosen from the cache, the online full-logit reference, top-k truncation,
the `copied` layer mapper and the tempered tail estimate. Real numbers against independent computations."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import capture_cfg
from test_train_student import cfg_for, log

from pipeline.cache import CacheReader
from pipeline.errors import DistilyError
from stage_student.losses import kd as losses
from stage_student.students.build import build_student
from stage_student.students.select_layers import selection_batch
from stage_student.train import Trainer, train
from stage_student.training.data import CacheStream


def test_auto_layers_score_equals_a_copied_student_and_is_recorded(tmp_path, hf_cache):
    trainer = Trainer(cfg_for(hf_cache, tmp_path / "run", init_layers="auto", select_sequences=3, max_steps=2))
    sel = trainer.student_info["layer_selection"]
    assert {(2, 3), (0, 3), (0, 1)} <= {tuple(c["layers"]) for c in sel["candidates"]}  # every block removal
    assert sel["scored"] > len(sel["candidates"])  # the greedy search scored 3-layer intermediates too
    assert sel["kl"] == min(c["kl"] for c in sel["candidates"]) and trainer.student_info["teacher_layers"] == sel["layers"]
    # every candidate's score (computed with shared prefixes and pruned forwards) equals the cached-target
    # KL of a real student built by copying those layers, run from scratch
    ids, targets = selection_batch(CacheReader(hf_cache), 3)
    for c in sel["candidates"]:
        model, _, _ = build_student(cfg_for(hf_cache, tmp_path / "x", init_layers=c["layers"]), CacheReader(hf_cache))
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        assert c["kl"] == pytest.approx(losses.kd_loss("forward_kl", logits, *targets).item(), rel=1e-5), c
    # recorded in run_config.json and the log; the next student of the same cache and depth reuses it
    trainer.run()
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["student"]["layer_selection"]["candidates"] == sel["candidates"]
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["init/selection_kl"] == sel["kl"] and first["init/teacher_layers"] == sel["layers"]
    again = Trainer(cfg_for(hf_cache, tmp_path / "run2", init_layers="auto", select_sequences=3))
    assert again.student_info["layer_selection"]["reused"] and again.student_info["teacher_layers"] == sel["layers"]
    from eval.report import model_card

    card = model_card("run", {"run": {"metrics": {"heldout/perplexity": 9.0}}}, "| table |", run_config, "lee")
    assert "Layer selection" in card and f"{sel['kl']:.4f}" in card


def test_selection_prefers_the_layers_that_matter(tmp_path, hf_cache):
    """A teacher whose layer 1 is an identity: dropping it costs nothing, so auto must drop it."""
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    src = CacheReader(hf_cache).manifest["teacher"]["path"]
    import shutil

    shutil.copytree(src, teacher)
    weights = load_file(teacher / "model.safetensors")
    for name in list(weights):
        if name.startswith("model.layers.1.") and name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])  # the block adds nothing to the residual stream
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    t = Trainer(cfg_for(hf_cache, tmp_path / "run", student_layers=3, init_layers="auto", teacher=str(teacher)))
    assert t.student_info["teacher_layers"] == [0, 2, 3]


def test_online_kd_equals_cache_kd_when_k_is_the_vocabulary(tmp_path, tiny_teacher, text_file):
    from transformers import AutoConfig

    from stage_teacher.capture import run

    V = AutoConfig.from_pretrained(tiny_teacher).vocab_size
    full = tmp_path / "cache-full"
    run(capture_cfg(tiny_teacher, text_file, full, top_k=V, vllm_max_logprobs=V))  # fp32 hidden states too
    kw = dict(init_layers="evenly", loss="jsd", temperature=2.0, max_steps=5, hs_weight=0.5, layer_mapper="last",
              gradient_noise=0.5)  # the same noise on both sides: each draws it from (seed, step)
    train(cfg_for(full, tmp_path / "cached", **kw))
    train(cfg_for(full, tmp_path / "online", online_teacher=str(tiny_teacher), **kw))
    a, b = log(tmp_path / "cached"), log(tmp_path / "online")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss/kd", "loss/hs"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


def test_kd_top_k_equals_a_smaller_cache(tmp_path, tiny_teacher, text_file, hf_cache):
    from stage_teacher.capture import run

    small = tmp_path / "cache-k4"
    run(capture_cfg(tiny_teacher, text_file, small, top_k=4, hidden_layers=[]))
    train(cfg_for(small, tmp_path / "k4", init_layers="evenly", max_steps=4))
    train(cfg_for(hf_cache, tmp_path / "k8-as-4", init_layers="evenly", max_steps=4, kd_top_k=4))
    for ra, rb in zip(log(tmp_path / "k4"), log(tmp_path / "k8-as-4")):
        assert rb["loss/kd"] == pytest.approx(ra["loss/kd"], abs=2e-6), ra["step"]
    with pytest.raises(DistilyError, match="--kd-top-k 9 is more than the cache holds"):
        Trainer(cfg_for(hf_cache, tmp_path / "bad", kd_top_k=9))


def test_copied_mapper_pairs_each_student_layer_with_its_source(tmp_path, tiny_teacher, text_file, hf_cache):
    from stage_teacher.capture import run

    cache = tmp_path / "cache-h1"
    run(capture_cfg(tiny_teacher, text_file, cache, hidden_layers=[1, 4]))
    t = Trainer(cfg_for(cache, tmp_path / "a", init_layers=[0, 3], hs_weight=1.0, layer_mapper="copied", max_steps=3))
    assert t.plan.pairs == [(1, [1]), (2, [4])]  # HF numbering: teacher layer l's output is hidden state l + 1
    batch = next(iter(CacheStream(str(cache), t.plan.train_pairs, 2, 0, 8, hidden_layers=[1, 4])))
    with torch.no_grad():
        hidden = t.model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    # student layer 1 is the teacher's layer 0 on the same embeddings: the very state the cache holds
    torch.testing.assert_close(hidden[1], batch["hidden_states"][1], atol=2e-5, rtol=1e-4)
    assert t.run()["finished"] and log(tmp_path / "a")[-1]["loss/hs"] > 0
    with pytest.raises(DistilyError, match=r"needs teacher hidden layers \[2, 4\].*missing \[2\]"):
        Trainer(cfg_for(cache, tmp_path / "b", init_layers=[1, 3], hs_weight=1.0, layer_mapper="copied"))
