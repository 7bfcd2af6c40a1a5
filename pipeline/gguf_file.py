"""GGUF files as models: any GGUF transformers can read becomes a plain fp32 HF model dir, once, named by the
file's hash (`--teacher FILE.gguf`, `--student`, `generate --teacher`; the embedded teacher too: resolve.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import ConfigError

# GGUF architecture names transformers reads under another name (its modeling_gguf_pytorch_utils does the same)
GGUF_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                "t5encoder": "t5"}


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares, as transformers names it."""
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get("general.architecture")
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a readable GGUF file ({e})") from None
    if field is None:
        raise ConfigError(f"{path} is not a model GGUF (no general.architecture in its metadata)")
    arch = bytes(field.parts[field.data[0]]).decode()
    return GGUF_ALIASES.get(arch, arch)


def gguf_sha256(path: Path, records: Path) -> str:
    """The file's sha256, hashed once per (file, size, mtime) and remembered in `records`: every job and rank that
    resolves the same GGUF reads a small record, not the whole file."""
    from .manifest import atomic_write_json, sha256_file

    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    record = records / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24] + ".json")
    try:
        stored = json.loads(record.read_text())
        if stored.get("key") == key:
            return stored["sha256"]
    except (OSError, ValueError):
        pass
    sha256 = sha256_file(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"key": key, "sha256": sha256})
    return sha256


def converted_gguf(path: Path, teachers: Path) -> tuple[Path, str]:
    """(model dir, the file's sha256): the GGUF at `path` dequantised to fp32 safetensors with its tokenizer, once,
    into teachers/<name>-<sha256[:16]> (resolve.py passes DISTILY_HOME/teachers). Architectures transformers cannot read from GGUF are refused,
    named. One job converts (a file lock); jobs arriving meanwhile wait for it, then use its dir."""
    import fcntl

    sha256 = gguf_sha256(path, teachers / ".gguf-sha256")
    out = teachers / f"{path.name[:-len('.gguf')]}-{sha256[:16]}"
    if (out / "config.json").exists():  # a converted dir appears whole (a renamed temporary dir)
        return out, sha256
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = gguf_architecture(path)
    if arch not in GGUF_CONFIG_MAPPING:
        readable = sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})
        raise ConfigError(f"{path}: transformers cannot read GGUF files of architecture {arch!r} (it reads "
                          f"{', '.join(readable)}); convert the model to an HF dir another way and pass that")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if not (out / "config.json").exists():
            print(f"converting {path.name} ({arch}) to safetensors in {out} (once)")
            convert_gguf(path, out)
    return out, sha256


def convert_gguf(path: Path, out: Path) -> None:
    """Write the GGUF's tokenizer and fp32 weights to a temporary dir beside `out`, then rename it to `out`. The
    GGUF is read from a dir holding only a link to it, so files that happen to sit beside it cannot shape the
    result; a failed conversion leaves nothing behind."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from .manifest import fsync_dir, fsync_tree, make_temp_dir

    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        with tempfile.TemporaryDirectory() as alone:
            (Path(alone) / path.name).symlink_to(path.resolve())
            AutoTokenizer.from_pretrained(alone, gguf_file=path.name).save_pretrained(tmp)  # fails fast, before the weights
            dequantised(Path(alone) / path.name).save_pretrained(tmp, safe_serialization=True)
        fsync_tree(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dequantised(path: Path):
    """The GGUF's model as a plain fp32 transformers model (a GGUF-loaded one is flagged as quantised and refuses
    save_pretrained). The copy's random initialisation does not move the process's RNG stream."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    cfg_dict = quant.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg_dict), dtype=torch.float32)
    plain.load_state_dict(quant.state_dict())
    return plain
