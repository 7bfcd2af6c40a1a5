"""Tiny GGUF model files written with the `gguf` package, for the GGUF-teacher tests: an HF model dir's tensors
under llama.cpp's names (F32, so nothing is lost), its hyperparameters and its byte-level BPE tokenizer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3": "GEMMA3"}


def write_gguf(model_dir: Path, out: Path, arch: str) -> Path:
    """out: the model in model_dir as a GGUF of `arch`, as llama.cpp's converter writes it (llama: q/k rows in
    llama.cpp's RoPE order; qwen2: attention biases; gemma3: norm weights + 1, the global RoPE base, head dims and
    the sliding window)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from stage_student.export.gguf import add_hparams, add_tokenizer, hparams, rope_permute

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hp = {**hparams(model.config), "rope_theta": rope_base(model.config)}
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(model_dir.name)
    add_hparams(writer, hp, gguf.LlamaFileType.ALL_F32)  # the export's: the same keys llama.cpp's converter writes
    if arch == "gemma3":
        writer.add_sliding_window(model.config.sliding_window)
    add_tokenizer(writer, model_dir, hp["vocab"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[arch]], hp["layers"])
    heads = {"self_attn.q_proj.weight": hp["heads"], "self_attn.k_proj.weight": hp["kv_heads"]}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        data = param.float().numpy()
        n_head = next((n for key, n in heads.items() if name.endswith(key)), None)
        if arch == "llama" and n_head:
            data = rope_permute(data, n_head)
        if arch == "gemma3" and name.endswith("norm.weight"):  # Gemma scales by 1 + w; GGUF stores 1 + w
            data = data + 1
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def rope_base(config) -> float:
    """The RoPE base of the model's full-attention layers (Gemma 3's sliding layers use llama.cpp's fixed 10,000)."""
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def build_gemma3(out: Path, vocab_size: int, seed: int = 0) -> Path:
    """A tiny random Gemma 3 text model: 6 layers, so the pattern's sixth is full attention (the others slide over
    16 positions), QK norms, norms drawn away from 0."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_qwen2(out: Path, vocab_size: int, seed: int = 0) -> Path:
    """A tiny random Qwen2 (attention biases on Q/K/V, 4 heads over 2 KV heads)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases: a converter that dropped them would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out
