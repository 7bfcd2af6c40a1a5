"""`distily export --format gguf`: a `--student-quant bitnet` Llama student as one GGUF file that llama.cpp runs.

What is written (OUTPUT/model.gguf, arch "llama", read with llama.cpp's own Llama graph):

  ternary linears   the codes {-1, 0, 1} (bitnet.ternary_codes) in blocks whose scale is exactly 1, plus a float32
                    `blk.N.<name>.scale` tensor holding the matrix's scale mean|W|. llama.cpp multiplies a matmul's
                    output by that tensor (its generic per-tensor ".scale" pass, llama-model.cpp), so the file
                    holds the trained weights exactly, with no fp16 rounding of the scale.
                    Block type: TQ2_0 (2.06 bits) or TQ1_0 (1.69 bits) when the row length (in_features) is a
                    multiple of 256; else Q4_0 (4.5 bits; blocks of 32, written here with d = 1, nibble = code + 8,
                    since gguf's own Q4_0 quantiser maps +-1 to -1 and 7/8); else F16. All are exact for codes.
  q_proj, k_proj    rows permuted for llama.cpp's interleaved RoPE, as llama.cpp's convert_hf_to_gguf does
  embeddings, head  F16 (what convert_hf_to_gguf writes for TQ outputs); a tied head is not stored twice
  norms             F32
  tokenizer         the student's BPE vocabulary, merges and special tokens (GPT-2 style byte-level BPE only)

Not reproduced by llama.cpp: the student's per-token int8 activation quantisation. llama.cpp's Llama graph feeds
float activations, which its CPU kernels round to 8 bits per block of 256 (Q8_K, for TQ types) or 32 (Q8_0, for
Q4_0): finer than the student's one scale per token, so llama.cpp computes (nearly) ternary weights x float
activations. The measured logit difference this makes is in docs/bitnet.md. llama.cpp's "bitnet" architecture is
not used: its graph adds sub-norms (attn_sub_norm, ffn_sub_norm) that our students do not have.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError, DistilyError
from stage_student.students.bitnet import ternary_codes

TERNARY_TYPES = ("tq2_0", "tq1_0")
ARCHS = {"llama": "llama"}  # transformers model_type -> GGUF arch whose llama.cpp graph is the same forward
FILE_NAME = "model.gguf"


def check(config: dict, ternary_type: str) -> None:
    """Refuse what the GGUF export cannot write, before any weights are loaded."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ConfigError("--format gguf needs the gguf package: pip install 'distily[gguf]'") from e
    if ternary_type not in TERNARY_TYPES:
        raise ConfigError(f"--gguf-type {ternary_type!r} is unknown; choose one of {', '.join(TERNARY_TYPES)}")
    kind = config.get("model_type")
    if kind not in ARCHS:
        raise ConfigError(f"--format gguf writes Llama-family students (model_type {', '.join(ARCHS)}); this student "
                          f"is {kind!r}: use --format bitnet")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"--format gguf supports plain RoPE only; this student uses rope_type {rope['rope_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"--format gguf: llama.cpp's Llama graph uses SiLU; this student uses {config['hidden_act']!r}")


# ------------------------------------------------------------------------------ tensors


def q4_0_codes(codes: np.ndarray) -> np.ndarray:
    """Ternary codes [rows, n] (n % 32 == 0) as Q4_0 blocks with d = 1: value = (nibble - 8) * d = code, exactly.
    A block is fp16 d, then 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble."""
    rows, n = codes.shape
    q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(-1, 32)
    d = np.ones((len(q), 1), np.float16).view(np.uint8)
    return np.concatenate([d, q[:, :16] | (q[:, 16:] << 4)], axis=1).reshape(rows, -1)


def ternary_tensor(codes: np.ndarray, ternary) -> tuple[np.ndarray, "gguf.GGMLQuantizationType"]:  # noqa: F821
    """The codes [out, in] in the densest type whose block divides the row length (in), every code exact."""
    import gguf

    Q = gguf.GGMLQuantizationType
    n = codes.shape[1]
    if n % gguf.GGML_QUANT_SIZES[ternary][0] == 0:  # every block's max |code| is 1 (or 0): its fp16 scale is exact
        return gguf.quants.quantize(codes.astype(np.float32), ternary), ternary
    if n % gguf.GGML_QUANT_SIZES[Q.Q4_0][0] == 0:
        return q4_0_codes(codes), Q.Q4_0
    return codes.astype(np.float16), Q.F16


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj/k_proj from transformers' rotate-half RoPE order to llama.cpp's interleaved pairs
    (llama.cpp's convert_hf_to_gguf LlamaModel.permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hparams(config) -> dict:
    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
        "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope_theta": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "eps": float(config.rms_norm_eps), "context": config.max_position_embeddings, "vocab": config.vocab_size,
    }


def add_hparams(writer, hp: dict, file_type) -> None:
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_vocab_size(hp["vocab"])
    writer.add_file_type(file_type)


def add_tensors(writer, model: torch.nn.Module, ternary_names: list[str], hp: dict, ternary) -> list[dict]:
    """Every parameter under its GGUF name and type; returns one record per tensor (name, type, shape, source)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    ternary_names = set(ternary_names)
    heads = {"self_attn.q_proj": hp["heads"], "self_attn.k_proj": hp["kv_heads"]}
    records = []
    for name, param in model.named_parameters():  # a tied LM head is the embedding: listed once
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise DistilyError(f"--format gguf: the student's tensor {name} has no place in llama.cpp's Llama graph")
        module = name.rsplit(".", 1)[0]
        n_head = next((n for key, n in heads.items() if module.endswith(key)), None)
        if module in ternary_names and name.endswith(".weight"):
            codes, scale = ternary_codes(param)
            codes = codes.numpy()
            if n_head:
                codes = rope_permute(codes, n_head)
            data, qtype = ternary_tensor(codes, ternary)
            writer.add_tensor(target, data, raw_dtype=qtype)
            scale_name = target.removesuffix(".weight") + ".scale"
            writer.add_tensor(scale_name, scale.reshape(1).numpy().astype(np.float32))
            records += [{"name": target, "type": qtype.name, "shape": list(codes.shape), "source": name, "ternary": True},
                        {"name": scale_name, "type": "F32", "shape": [1], "source": name}]
            continue
        data = param.detach().float().numpy()
        if n_head:
            data = rope_permute(data, n_head)
        qtype = Q.F32 if data.ndim == 1 else Q.F16  # norms and biases F32; embeddings and an untied head F16
        writer.add_tensor(target, data.astype(np.float16 if qtype == Q.F16 else np.float32))
        records.append({"name": target, "type": qtype.name, "shape": list(data.shape), "source": name})
    return records


# ------------------------------------------------------------------------------ tokenizer


def byte_level_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the student's pre-tokenizer: 'gpt-2' for plain byte-level (GPT-2 regex), 'smollm' for
    digits split one by one then byte-level (SmolLM2's original tokenizer), else 'default' (llama.cpp's generic
    regex: text may then be tokenised differently from the student; token ids passed directly are unaffected)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    known = {(("ByteLevel", None, True),): "gpt-2", (("Digits", True, None), ("ByteLevel", None, True)): "smollm"}
    return known.get(tuple(kinds), "default")


def add_tokenizer(writer, src: Path, n_vocab: int) -> str:
    """The student's byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" tokenizer; returns its pre."""
    import gguf

    path = src / "tokenizer.json"
    if not path.exists():
        raise DistilyError(f"--format gguf needs the student's tokenizer.json in {src} (train-student's final/ has it)")
    data = json.loads(path.read_text())
    try:
        vocab = gguf.vocab.BpeVocab(src)
    except (FileNotFoundError, ValueError) as e:
        raise DistilyError(f"--format gguf writes byte-level BPE tokenizers (GPT-2 style) only; {path}: {e}") from e
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        text = text.decode() if isinstance(text, bytes) else text
        tokens.append(text)
        types.append(gguf.TokenType.CONTROL if text in special else kind)
    if len(tokens) > n_vocab:
        raise DistilyError(f"the tokenizer in {src} has {len(tokens)} tokens but the model's vocab_size is {n_vocab}")
    for i in range(len(tokens), n_vocab):  # embedding rows past the tokenizer (padding), as convert_hf_to_gguf names them
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    pre = byte_level_pre(data)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return pre


# ------------------------------------------------------------------------------ the file


def write(model: torch.nn.Module, ternary_names: list[str], src: Path, out_dir: Path, ternary_type: str) -> dict:
    """Write out_dir/model.gguf (fsynced) for the BitLinear student `model`; return its sizes and tensor types."""
    import gguf

    ternary = gguf.GGMLQuantizationType[ternary_type.upper()]
    file_type = gguf.LlamaFileType[f"MOSTLY_{ternary_type.upper()}"]
    hp = hparams(model.config)
    path = out_dir / FILE_NAME
    writer = gguf.GGUFWriter(path, ARCHS[model.config.model_type])
    writer.add_name(src.parent.name if src.name == "final" else src.name)
    add_hparams(writer, hp, file_type)
    pre = add_tokenizer(writer, src, hp["vocab"])
    records = add_tensors(writer, model, ternary_names, hp, ternary)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return accounting(path, records, pre, ternary_type)


def accounting(path: Path, records: list[dict], pre: str, ternary_type: str) -> dict:
    """Sizes read back from the file: bytes per tensor type, the ternary linears' bits per weight (scales included)."""
    import gguf

    reader = gguf.GGUFReader(path)
    nbytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    by_type = Counter()
    for t in reader.tensors:
        by_type[t.tensor_type.name] += int(t.n_bytes)
    ternary = [r for r in records if r.get("ternary")]
    ternary_sources = {r["source"] for r in ternary}
    packed = sum(nbytes[r["name"]] for r in records if r["source"] in ternary_sources)
    params = sum(int(np.prod(r["shape"])) for r in ternary)
    types = {r["name"]: r["type"] for r in ternary}
    return {
        "format": "gguf",
        "file": FILE_NAME,
        "gguf_type": ternary_type,
        "tokenizer_pre": pre,
        "total_bytes": path.stat().st_size,
        "tensor_bytes": sum(nbytes.values()),
        "bytes_by_type": dict(by_type),
        "packed_linear_bytes": packed,
        "linear_params": params,
        "bits_per_linear_param": 8 * packed / max(params, 1),
        "full_precision_bytes": sum(nbytes.values()) - packed,
        "ternary_modules": len(ternary),
        "ternary_types": dict(Counter(types.values())),
        "fallback_tensors": sorted(n for n, t in types.items() if t != ternary_type.upper()),
    }


def describe(sizes: dict, out: Path) -> str:
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    types = ", ".join(f"{n} {t}" for t, n in sizes["ternary_types"].items())
    lines = [
        f"exported {sizes['ternary_modules']} ternary linears to {out / sizes['file']} (llama.cpp GGUF, arch llama)",
        f"  total on disk         {mib(sizes['total_bytes'])} ({sizes['total_bytes']} bytes)",
        f"  ternary linears       {types}: {mib(sizes['packed_linear_bytes'])} for {sizes['linear_params']} "
        f"parameters, {sizes['bits_per_linear_param']:.3f} bits each (scales included)",
        f"  full precision rest   {mib(sizes['full_precision_bytes'])} (embeddings F16, norms F32)",
    ]
    if sizes["fallback_tensors"]:
        lines.append(f"  {len(sizes['fallback_tensors'])} matrices have rows that are not a multiple of 256 and are "
                     f"not {sizes['gguf_type'].upper()} (exact codes in a wider block type)")
    return "\n".join(lines)
