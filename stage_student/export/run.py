"""`distily export`: a `--student-quant bitnet` student as packed ternary weights that transformers loads.

The run's final/ dir holds the float32 latent weights (online mode: quantised in every forward). The export
writes what those weights quantise to, in transformers' offline BitNet format (transformers/integrations/bitnet.py):

  <layer>.weight        uint8 [out/4, in]: the codes {-1, 0, 1} + 1 in 2 bits, four per byte; code row
                        i + j*(out/4) sits in bits 2j..2j+1 of packed row i (`pack_weights`)
  <layer>.weight_scale  float32 [1]: 1/s = clamp(mean|W|), which offline AutoBitLinear multiplies its output by
  <layer>.bias          bias / weight_scale (offline AutoBitLinear scales the bias too; Llama has no biases)
  everything else       as trained (embeddings, norms, LM head: full precision)
  config.json           quantization_config {"quant_method": "bitnet", "linear_class": "autobitlinear",
                        "quantization_mode": "offline", "modules_to_not_convert": [the LM head, ...]}

The codes and scales come from bitnet.ternary_codes, the function the training forward uses, so the export is
the trained model exactly (up to float rounding of the rescaling order). Written into OUTPUT.tmp-*, fsynced and
renamed: an interrupted export never leaves a half-written OUTPUT. Sizes go to OUTPUT/export.json.
`--format gguf` writes OUTPUT/model.gguf for llama.cpp instead, through the same steps (gguf.py).
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import torch

from pipeline.config import ExportConfig
from pipeline.errors import DistilyError
from pipeline.manifest import atomic_write_json, fsync_dir, fsync_tree, read_json
from pipeline.resolve import trained_model_dir
from stage_student.export import gguf
from stage_student.students.bitnet import quantization_config, ternary_codes, to_bitnet

FORMATS = ("bitnet", "gguf")
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # every safetensors dtype of whole bytes


def check_bitnet_dir(path: Path) -> dict:
    """The quantization_config of a trained BitNet student dir, or a DistilyError saying what the dir is instead."""
    q = read_json(path / "config.json").get("quantization_config")
    if not q or q.get("quant_method") != "bitnet":
        raise DistilyError(f"{path} is not a BitNet student (its config.json has no bitnet quantization_config): "
                           "train it with `distily train-student --student-quant bitnet` to export it")
    if q.get("quantization_mode") != "online" or q.get("linear_class") != "autobitlinear":
        raise DistilyError(f"{path} is already packed ({q.get('linear_class')}, {q.get('quantization_mode')} mode), "
                           "not a training-time student: export the train-student run's final/ dir")
    return q


def pack_linear(name: str, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
    """The offline tensors of one ternary linear: packed codes, weight_scale, and the bias rescaled."""
    from transformers.integrations.bitnet import VALUES_PER_ITEM, pack_weights

    if linear.out_features % VALUES_PER_ITEM:
        raise DistilyError(f"{name} has {linear.out_features} output features: transformers packs {VALUES_PER_ITEM} "
                           "codes per byte along them and needs a multiple of 4 (choose layer sizes divisible by 4)")
    codes, scale = ternary_codes(linear.weight)
    tensors = {f"{name}.weight": pack_weights(codes.clone()), f"{name}.weight_scale": scale.reshape(1)}
    if linear.bias is not None:
        tensors[f"{name}.bias"] = (linear.bias.detach().float() / scale).to(linear.bias.dtype)
    return tensors


def load_latent(src: Path):
    """The student with plain float linears (no transformers quantizer attached, so save_pretrained writes the
    state dict it is given), then its decoder linears made BitLinear exactly as training did."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    del config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=torch.float32)
    names = to_bitnet(model)
    return model, names


def tensor_sizes(directory: Path) -> dict[str, int]:
    """Bytes of every tensor in the safetensors files of `directory` (shapes and dtypes from their headers)."""
    from safetensors import safe_open

    sizes = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                sizes[key] = math.prod(tensor.get_shape()) * DTYPE_BYTES[tensor.get_dtype()]
    return sizes


def accounting(directory: Path, names: list[str], linear_params: int) -> dict:
    """Sizes of an export: on disk (every file but export.json), the packed linears (+ scales), bits per linear
    parameter, and the full-precision rest (embeddings, norms, LM head, biases)."""
    sizes = tensor_sizes(directory)
    packed = {f"{n}.{part}" for n in names for part in ("weight", "weight_scale")}
    packed_bytes = sum(b for k, b in sizes.items() if k in packed)
    safetensors = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    return {
        "format": "bitnet",
        "total_bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.name != "export.json"),
        "safetensors_bytes": safetensors,
        "tensor_bytes": sum(sizes.values()),
        "packed_linear_bytes": packed_bytes,
        "linear_params": linear_params,
        "bits_per_linear_param": 8 * packed_bytes / max(linear_params, 1),
        "full_precision_bytes": sum(b for k, b in sizes.items() if k not in packed),
        "ternary_modules": len(names),
    }


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished, fsynced `tmp` into place as `out` (an earlier export there is replaced)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)


def export(cfg: ExportConfig, log=print) -> dict:
    """Write the export of cfg.run_dir to cfg.output (--format bitnet: packed safetensors; gguf: gguf.py);
    return (and print) its sizes."""
    if cfg.format not in FORMATS:
        raise DistilyError(f"--format {cfg.format!r} is unknown; choose one of {', '.join(FORMATS)}")
    src = Path(trained_model_dir(cfg.run_dir))
    if not (src / "config.json").exists():
        raise DistilyError(f"RUN_DIR {cfg.run_dir}: neither it nor its final/ holds a model (config.json); pass a "
                           "train-student run dir whose training finished, or its final/ dir")
    check_bitnet_dir(src)
    if cfg.format == "gguf":
        gguf.check(read_json(src / "config.json"), cfg.gguf_type)
    out = Path(cfg.output)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DistilyError(f"OUTPUT {out} would write into the student dir {src}: choose another output dir")
    if out.exists() and any(out.iterdir()) and not (out / "export.json").exists():
        raise DistilyError(f"OUTPUT {out} exists and is not an earlier export (no export.json): choose an empty or new dir")

    model, names = load_latent(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        if cfg.format == "gguf":
            sizes = gguf.write(model, names, src, tmp, cfg.gguf_type)
        else:
            sizes = write_packed(model, names, src, tmp)
        sizes["source"] = str(src)
        atomic_write_json(tmp / "export.json", sizes)
        fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(gguf.describe(sizes, out) if cfg.format == "gguf" else describe(sizes, out))
    return {**sizes, "output": str(out)}


def write_packed(model, names: list[str], src: Path, tmp: Path) -> dict:
    """transformers' offline BitNet dir in `tmp`: packed linears, the rest as trained, the tokenizer."""
    state = model.state_dict()
    for name in names:
        state.update(pack_linear(name, model.get_submodule(name)))
    linear_params = sum(model.get_submodule(n).weight.numel() for n in names)
    keep = model.config.quantization_config["modules_to_not_convert"]  # as training computed it (to_bitnet)
    model.config.quantization_config = quantization_config("offline", keep)
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    copy_tokenizer(src, tmp)
    return accounting(tmp, names, linear_params)


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The student's tokenizer files, when its dir has them (train-student's final/ does)."""
    from transformers import AutoTokenizer

    if any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def describe(sizes: dict, out: Path) -> str:
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    return "\n".join([
        f"exported {sizes['ternary_modules']} ternary linears to {out}",
        f"  total on disk         {mib(sizes['total_bytes'])} ({sizes['total_bytes']} bytes)",
        f"  packed linears        {mib(sizes['packed_linear_bytes'])} for {sizes['linear_params']} parameters: "
        f"{sizes['bits_per_linear_param']:.3f} bits each (scales included)",
        f"  full precision rest   {mib(sizes['full_precision_bytes'])} (embeddings, norms, LM head)",
    ])
