"""Teacher signals from one vLLM prefill pass: teacher targets (top-k, RS-KD samples) and hidden states.

Targets, two ways (``--targets-from``):
  hooks (default): a forward hook on the decoder's final norm keeps every scheduled token's final hidden
      state on the engine's device; after the pass each sequence's logits are made by the model's own
      ``compute_logits`` (its LM head, vocab padding, soft-capping and scale) a chunk of positions at a time
      and turned into targets by targets.py, the code the HF backend uses too. The engine itself runs bare
      prefill (max_tokens=1, no prompt log-probs), so the cost is prefill plus the LM head at every position.
  engine: vLLM's prompt log-probs, ``max_tokens=1, prompt_logprobs=k, flat_logprobs=True``. In the flat form
      every position p >= 1 holds k+1 entries: the actual token at p first, then the top-1..top-k (the actual
      token may appear twice). Row t of the cache is vLLM position t+1. Top-k only; it makes a full-vocabulary
      log-softmax, rank counts and Python objects for every position (measured slower: tests/bench).

Hidden states: forward hooks on the decoder's embedding, layers and final norm, in the same pass. Q/K/V
(--qkv-layers): a forward hook on each chosen layer's fused ``qkv_proj`` (before rotary embeddings), split at
the attention's own ``q_size`` / ``kv_size``. The
engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eagerly (compiled graphs skip hooks).
vLLM flattens every scheduled request of a step into one token axis, so each forward's positions are
split into runs of consecutive positions and each run is matched to the request whose tokens it holds.
Prefix caching is off, so every prompt token passes through the model exactly once.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.manifest import CacheError

from .targets import TargetSpec, batch_targets, sequence_targets


def configure_environment(cpu_threads_all: bool = True) -> None:
    """Engine settings that must be in the environment before vLLM is imported."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # hooks must live in this process
    if not torch.cuda.is_available():
        if cpu_threads_all:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM keeps one core idle by default
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


TARGETS_FROM = ("hooks", "engine")


def start_llm(model_dir: str, max_model_len: int, dtype: str = "float32", enforce_eager: bool = True, seed: int = 0,
              **engine_kwargs):
    """The one place a vLLM engine is built (teacher-cache and generate): in-process, no prefix caching (every
    prompt token passes through the model exactly once)."""
    configure_environment()
    from vllm import LLM

    return LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=enforce_eager,
               enable_prefix_caching=False, seed=seed, **engine_kwargs)


class VLLMTeacher:
    """targets_from: hooks | engine (see the module doc), or "floor" (benchmarks: the LM head runs at every
    position and its logits are dropped: the cost a cache cannot go below)."""

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
    ):
        configure_environment()  # before vllm is first imported (configure)
        self.hidden_layers = list(hidden_layers)
        self.qkv_layers: list[int] = []
        self._splits: dict[int, list[int]] = {}
        self.num_layers = num_layers
        self.max_logprobs = max_logprobs
        self.hooked = bool(hidden_layers) or bool(qkv_layers) or targets_from != "engine"
        self.configure(spec, targets_from, qkv_layers)  # checked before the engine starts
        self.llm = start_llm(model_dir, max_seq_len + 1, dtype, enforce_eager or self.hooked, seed,
                             max_logprobs=max_logprobs, **(engine_kwargs or {}))
        self._records: list[dict] = []
        self._model = None
        if self.hooked:
            self.llm.apply_model(self._install_hooks)

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
        if targets_from == "engine" and spec.top_k > self.max_logprobs:
            raise CacheError(
                f"--top-k {spec.top_k} is larger than the engine's max_logprobs {self.max_logprobs}: vLLM refuses it. "
                f"Raise it with --vllm-max-logprobs {spec.top_k} (costs memory and time per token)."
            )
        self.spec, self.top_k, self.targets_from = spec, spec.top_k, targets_from
        logprobs = {"prompt_logprobs": spec.top_k, "flat_logprobs": True} if targets_from == "engine" else {}
        self.params = SamplingParams(max_tokens=1, detokenize=False, temperature=1.0, **logprobs)

    def _install_hooks(self, model: torch.nn.Module) -> None:
        decoder = _find_decoder(model, self.num_layers)
        self._model = model  # in-process engine: compute_logits runs on the engine's own module and device
        records = self._records

        # The decoder's own forward may be wrapped (torch.compile support) past module hooks, so the step's
        # token ids come from the embedding's input and its positions from the first layer's input.
        def record_ids(module, args):
            records.append({"ids": args[0].detach().cpu().clone(), "h": {}})

        def record_positions(module, args, kwargs):
            pos = kwargs.get("positions", args[0] if args else None)
            records[-1]["pos"] = pos.detach().cpu().clone()
            if 0 in self.hidden_layers:  # the stream entering layer 1: the embeddings, scaled where the model
                h = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)  # scales them (Gemma)
                records[-1]["h"][0] = h.detach().float().cpu().clone()

        def capture(layer: int):
            def hook(module, args, out):
                if isinstance(out, tuple):  # vLLM layers return (hidden, residual); the stream is their sum
                    h = out[0] if out[1] is None or layer == self.num_layers else out[0] + out[1]
                else:
                    h = out
                if layer in self.hidden_layers:
                    records[-1]["h"][layer] = h.detach().float().cpu().clone()
                if layer == self.num_layers and self.targets_from != "engine":  # the LM head's input, on the device
                    records[-1]["final"] = h.detach().clone()

            return hook

        def capture_qkv(layer: int):
            def hook(module, args, out):
                if layer in self.qkv_layers:
                    x = out[0] if isinstance(out, tuple) else out  # vLLM linears return (output, bias)
                    records[-1].setdefault("qkv", {})[layer] = x.detach().float().cpu().clone()

            return hook

        for l, block in enumerate(decoder.layers, start=1):
            attn = next((m for m in block.modules() if hasattr(m, "qkv_proj") and hasattr(m, "q_size")), None)
            if attn is not None:
                self._splits[l] = [attn.q_size, attn.kv_size, attn.kv_size]
                attn.qkv_proj.register_forward_hook(capture_qkv(l))

        decoder.embed_tokens.register_forward_pre_hook(record_ids)
        decoder.layers[0].register_forward_pre_hook(record_positions, with_kwargs=True)
        for layer in sorted(set(self.hidden_layers) | {self.num_layers}):
            if layer == 0:
                continue  # recorded by record_positions
            if layer == self.num_layers:
                module = decoder.norm  # HF's last hidden state is after the final norm
            else:
                module = decoder.layers[layer - 1]
            module.register_forward_hook(capture(layer))

    def _placements(self, sequences: np.ndarray) -> list[tuple[int, int, int, int, int]]:
        """Where each request's tokens went: (record, start, end, request, position) runs covering every
        position of every sequence once, found by matching the step's token ids to the requests'."""
        n, t = sequences.shape
        filled = np.zeros(n, dtype=np.int64)
        seqs = torch.from_numpy(sequences.astype(np.int64))
        runs = []
        for i, rec in enumerate(self._records):
            if "pos" not in rec:
                continue
            pos, ids = rec["pos"].long(), rec["ids"].long()
            breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
            bounds = [0, *breaks.tolist(), len(pos)]
            for s, e in zip(bounds[:-1], bounds[1:]):
                p = int(pos[s])
                for r in np.nonzero(filled == p)[0]:
                    if p + (e - s) <= t and torch.equal(seqs[r, p : p + e - s], ids[s:e]):
                        runs.append((i, s, e, int(r), p))
                        filled[r] = p + e - s
                        break
        if not (filled == t).all():
            bad = np.nonzero(filled != t)[0]
            raise RuntimeError(
                f"hook capture covered {filled[bad[0]]}/{t} positions of sequence {bad[0]}: "
                "the engine scheduled tokens in a way the hooks could not follow (is prefix caching on?)"
            )
        return runs

    def _gather(self, runs, key, n: int, t: int, layer: int | None = None) -> torch.Tensor:
        """[n, t, H] from the records' per-step tensors (a hidden layer, or the final state on the device)."""
        first = self._records[runs[0][0]]
        src = (lambda rec: rec[key][layer]) if layer is not None else (lambda rec: rec[key])
        like = src(first)
        out = torch.empty(n, t, like.shape[-1], dtype=like.dtype, device=like.device)
        for i, s, e, r, p in runs:
            out[r, p : p + e - s] = src(self._records[i])[s:e]
        return out

    # ------------------------------------------------------------------------------------------- call

    def __call__(self, sequences: np.ndarray, seq_index: np.ndarray | None = None) -> dict:
        from vllm.inputs import TokensPrompt

        n, t = sequences.shape
        seq_index = np.arange(n) if seq_index is None else seq_index
        self._records.clear()
        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in sequences]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        runs = self._placements(sequences) if self._records else None
        if self.targets_from == "engine":
            targets = self._engine_targets(outputs, n, t)
        else:
            targets = self._hook_targets(self._gather(runs, "final", n, t), sequences, seq_index)
        hidden = {l: self._gather(runs, "h", n, t, l) for l in self.hidden_layers} if self.hidden_layers else None
        qkv = {l: self._qkv(runs, n, t, l) for l in self.qkv_layers} if self.qkv_layers else None
        self._records.clear()
        return {"targets": targets, "hidden": hidden, "qkv": qkv}

    def _qkv(self, runs, n: int, t: int, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._splits:
            raise CacheError(f"--qkv-layers: layer {layer} of this vLLM model has no fused qkv_proj to hook; "
                             "capture Q/K/V with --backend hf")
        q, k, v = self._gather(runs, "qkv", n, t, layer).split(self._splits[layer], dim=-1)
        return {"q": q, "k": k, "v": v}

    def _hook_targets(self, final: torch.Tensor, sequences: np.ndarray, seq_index: np.ndarray) -> dict | None:
        """Targets from the final hidden states [n, t, H] (on the engine's device) and the model's LM head."""
        model = self._model
        nexts = torch.from_numpy(sequences[:, 1:].astype(np.int64))
        per_sequence = []
        for i in range(len(sequences)):
            h = final[i]
            logits_fn = lambda a, b, h=h: model.compute_logits(h[a:b])  # noqa: E731
            if self.targets_from == "floor":
                for a in range(0, h.shape[0] - 1, self.spec.chunk_positions):
                    logits_fn(a, min(h.shape[0] - 1, a + self.spec.chunk_positions))
                continue
            per_sequence.append(sequence_targets(logits_fn, nexts[i], self.spec, int(seq_index[i])))
        return batch_targets(per_sequence) if per_sequence else None

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
        """Plain generation on this engine (`distily generate` in one process with a capture); nothing recorded."""
        self._records.clear()
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            self._records.clear()

    def close(self) -> None:
        shutdown(self.llm)
        del self.llm


def shutdown(llm) -> None:
    """Shut an engine down before interpreter exit (vLLM sometimes aborts if left to the GC)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def has_hookable_decoder(model: torch.nn.Module, num_layers: int) -> bool:
    """Whether a model (vLLM's, or the HF one of the same family: they share these names) has the decoder
    the hidden-state hooks need."""
    try:
        _find_decoder(model, num_layers)
        return True
    except CacheError:
        return False


def _find_decoder(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """The module that owns embed_tokens, layers (a ModuleList of num_layers) and the final norm."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if (
            isinstance(layers, torch.nn.ModuleList)
            and len(layers) == num_layers
            and hasattr(module, "embed_tokens")
            and hasattr(module, "norm")
        ):
            return module
    raise CacheError(
        "hidden-state capture under vLLM needs a decoder with embed_tokens, layers and norm "
        f"(Llama/Mistral/Qwen/Phi-3/Gemma style); this model has none with {num_layers} layers. Capture its "
        "hidden states with --backend hf, or capture logits only under vLLM (no --hidden-layers)."
    )
