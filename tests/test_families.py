"""Teachers and students beyond Llama: tiny random Qwen2, Mistral, Phi-3, Gemma and GPT-2 models with the
locally trained tokenizer. Capture (the HF backend, and vLLM equal to it or a clear refusal),
--init teacher-layers and a short training run."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, capture_cfg, read_all

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from stage_student.students.build import build_student
from stage_student.students.select_layers import layer_list_name
from stage_student.train import train
from stage_teacher.capture import run

FAMILIES = {
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=32),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                 pad_token_id=0),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=2, n_positions=256),
}


def build_family(kind: str, out, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(kind, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  max_position_embeddings=256, **FAMILIES[kind])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_capture_init_and_training(tmp_path, tiny_teacher, text_file, kind):
    from transformers import AutoModelForCausalLM

    teacher = build_family(kind, tmp_path / "teacher", tiny_teacher)
    cache = tmp_path / "cache"
    run(capture_cfg(teacher, text_file, cache, hidden_layers=[0, 2, 4], max_tokens=64 * 12))
    reader = CacheReader(cache)
    assert reader.manifest["teacher"]["model_type"] == kind and reader.num_sequences == 12

    # the cache equals an independent HF forward of the teacher
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    seq = next(reader.iter_sequences())
    with torch.no_grad():
        out = model(torch.from_numpy(seq["input_ids"]).long()[None], output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
    top = logp.topk(8, -1)
    torch.testing.assert_close(torch.from_numpy(seq["topk_logprobs"]).double(), top.values, atol=1e-4, rtol=1e-4)
    for layer in (0, 2, 4):
        torch.testing.assert_close(torch.from_numpy(seq["hidden_states"][layer]), out.hidden_states[layer][0], atol=1e-4, rtol=1e-4)

    # --init teacher-layers copies the chosen teacher layers and the embeddings, norm and head
    cfg = TrainConfig(cache=str(cache), output=str(tmp_path / "run"), student_layers=2, init_layers=[0, 3], teacher=str(teacher),
                      batch_size=2, max_steps=2, save_steps=10, logging_steps=1, eval_sequences=2, warmup_steps=1)
    student, _, info = build_student(cfg, reader)
    assert info["teacher_layers"] == [0, 3] and student.config.num_hidden_layers == 2
    prefix = layer_list_name(model)
    t_weights, s_weights = model.state_dict(), student.state_dict()
    for s_layer, t_layer in enumerate([0, 3]):
        names = [n for n in s_weights if n.startswith(f"{prefix}.{s_layer}.")]
        assert names
        for n in names:
            torch.testing.assert_close(s_weights[n], t_weights[n.replace(f"{prefix}.{s_layer}.", f"{prefix}.{t_layer}.", 1)])
    for n in s_weights:
        if not n.startswith(f"{prefix}."):
            torch.testing.assert_close(s_weights[n], t_weights[n])

    # --init-layers auto scores candidate cuts of this family's decoder too
    auto, _, auto_info = build_student(TrainConfig(cache=str(cache), output=str(tmp_path / "auto"), student_layers=2,
                                                   teacher=str(teacher), eval_sequences=2), reader)
    assert len(auto_info["teacher_layers"]) == 2 and auto_info["layer_selection"]["kl"] <= auto_info["layer_selection"]["evenly_kl"]

    # and it trains end to end (fused chunked head)
    result = train(cfg)
    assert result["finished"] and result["eval/forward_kl"] > 0
    shutil.rmtree(tmp_path / "run")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_under_vllm_equals_hf_or_is_refused_before_the_engine(tmp_path, tiny_teacher, text_file, kind):
    """The real engine in its own process (one engine per family): logits and hidden states as the HF backend."""
    import numpy as np

    teacher = build_family(kind, tmp_path / "teacher", tiny_teacher)
    common = ["--teacher", str(teacher), "--dataset", str(text_file), "--max-seq-len", "64", "--max-tokens", str(64 * 4),
              "--targets", "topk", "--top-k", "8", "--vllm-max-logprobs", "8", "--hidden-layers", "0,2,4", "--hidden-dtype", "float32",
              "--logprob-dtype", "float32"]
    cli = [sys.executable, "-m", "pipeline.cli", "teacher-cache"]
    r = subprocess.run([*cli, *common, "-o", str(tmp_path / "vllm")], capture_output=True, text=True, cwd=ROOT)
    if kind == "gpt2":  # vLLM's GPT-2 has no embed_tokens/layers/norm for the hooks: refused, no engine started
        assert r.returncode == 2 and "--backend hf" in r.stderr and "gpt2" in r.stderr
        assert "Initializing" not in r.stdout + r.stderr and not (tmp_path / "vllm" / "manifest.json").exists()
        return
    assert r.returncode == 0, r.stderr[-3000:]
    run(capture_cfg(teacher, text_file, tmp_path / "hf", hidden_layers=[0, 2, 4], max_tokens=64 * 4))
    for a, b in zip(read_all(tmp_path / "vllm"), read_all(tmp_path / "hf"), strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-3)
        np.testing.assert_allclose(a["target_logprob"], b["target_logprob"], atol=1e-3)
        for layer in (0, 2, 4):
            cos = torch.nn.functional.cosine_similarity(torch.from_numpy(a["hidden_states"][layer]),
                                                        torch.from_numpy(b["hidden_states"][layer]), dim=-1)
            assert cos.min() >= 0.9999, (kind, layer, cos.min())
