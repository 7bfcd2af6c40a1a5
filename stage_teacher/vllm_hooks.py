"""The capture hooks, run where vLLM keeps the model: in this process (one device), or in every vLLM worker
process under tensor / pipeline parallelism. The driver (vllm_backend.py) calls these functions through
``LLM.collective_rpc(fn, args=...)``; each runs once per worker with the worker as its first argument.

One worker holds one ``Recorder``: forward hooks that write every step's tensors straight into per-shard host
buffers, at the rows and positions of the requests they belong to, so nothing is kept twice and nothing waits
on the device for the whole shard.

* Where a step's tokens belong: a forward pre-hook on the top-level model sees the step's flattened token ids
  and positions (vLLM packs every scheduled request of a step into one token axis). The step is cut into runs
  of consecutive positions and each run is matched to the request whose tokens at those positions it holds.
  The later hooks of the same step write with these runs.
* Hidden state l (HF numbering): the residual stream after decoder layer l, i.e. the sum of the (hidden,
  residual) pair vLLM's layers return; 0 is the embedding output (the first layer's input), L the final norm's
  output. Under tensor parallelism the stream is replicated on every rank (after each all-reduce): rank 0's
  copy is returned. Under pipeline parallelism each stage records the layers it owns.
* Targets: the final norm's output goes to a host buffer step by step; after the pass every rank of the last
  stage runs the model's own ``compute_logits`` (the vocab-parallel LM head is a collective: all ranks call it
  in the same order) a chunk of positions at a time, and tensor rank 0 turns the logits into targets
  (targets.py, the code the HF backend uses; it cuts a padded head's logits to the tokenizer's tokens).
* Q/K/V: each rank hooks its partition of the fused ``qkv_proj`` and splits it at the attention's per-rank
  ``q_size`` / ``kv_size``; the driver concatenates the partitions in tensor-rank order (key/value heads that
  are replicated across ranks are taken once).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.decoder import find_decoder

from .targets import TargetSpec, batch_targets, sequence_targets

_RECORDER: "Recorder | None" = None  # one per process: the worker's


@dataclass
class Placement:
    """Which requests a step's flattened tokens belong to: runs (start, end, request, position)."""

    runs: list[tuple[int, int, int, int]] = field(default_factory=list)


class Recorder:
    def __init__(self, model: torch.nn.Module, num_layers: int, hidden_layers: list[int]):
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.model = model
        self.decoder = find_decoder(model, num_layers)
        self.num_layers = num_layers
        self.hidden_layers = sorted(hidden_layers)
        self.want_final = False  # per pass (begin): the LM head's input is kept only when the hooks make the targets
        self.qkv_layers: list[int] = []
        self.tp_rank, self.tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        self.pp_rank, self.last_stage = get_pp_group().rank_in_group, get_pp_group().is_last_rank
        self.owned = {l for l, block in enumerate(self.decoder.layers, start=1) if not _missing(block)}
        self.splits: dict[int, list[int]] = {}
        self.kv_replicas = 1
        self.sequences: torch.Tensor | None = None
        self.step = Placement()
        self._install()

    # ------------------------------------------------------------------------------------------ hooks

    def _install(self) -> None:
        d = self.decoder
        self.model.register_forward_pre_hook(self._on_step, with_kwargs=True)
        first = min(self.owned)
        if first == 1 and 0 in self.hidden_layers:
            d.layers[0].register_forward_pre_hook(self._on_embeddings, with_kwargs=True)
        for l in sorted((set(self.hidden_layers) | {self.num_layers}) & self.owned):
            module = d.norm if l == self.num_layers else d.layers[l - 1]
            if l != self.num_layers or self.last_stage:
                module.register_forward_hook(self._on_layer(l))
        for l in sorted(self.owned):
            attn = next((m for m in d.layers[l - 1].modules() if hasattr(m, "qkv_proj") and hasattr(m, "q_size")), None)
            if attn is not None:
                self.splits[l] = [attn.q_size, attn.kv_size, attn.kv_size]
                self.kv_replicas = int(getattr(attn.qkv_proj, "num_kv_head_replicas", 1))
                attn.qkv_proj.register_forward_hook(self._on_qkv(l))

    def _on_step(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if self.sequences is None or ids is None or pos is None:  # not a capture call (e.g. the engine's warm-up)
            self.step = Placement()
            return
        self.step = self._place(ids.detach().cpu().long(), pos.detach().cpu().long())

    def _place(self, ids: torch.Tensor, pos: torch.Tensor) -> Placement:
        n, t = self.sequences.shape
        breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
        bounds = [0, *breaks.tolist(), len(pos)]
        runs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            p = int(pos[s])
            for r in np.nonzero(self.filled == p)[0]:
                if p + (e - s) <= t and torch.equal(self.sequences[r, p : p + e - s], ids[s:e]):
                    runs.append((s, e, int(r), p))
                    self.filled[r] = p + e - s
                    break
        return Placement(runs)

    def _write(self, buffer: torch.Tensor, h: torch.Tensor) -> None:
        for s, e, r, p in self.step.runs:
            buffer[r, p : p + e - s].copy_(h[s:e].to(buffer.dtype), non_blocking=buffer.is_pinned())

    def _buffer(self, store: dict, key, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if key not in store:
            n, t = self.sequences.shape
            pin = like.is_cuda  # host buffers the device copies into without waiting
            store[key] = torch.empty(n, t, like.shape[-1], dtype=dtype, pin_memory=pin)
        return store[key]

    def _on_embeddings(self, module, args, kwargs) -> None:
        if self.step.runs and self.tp_rank == 0:  # the stream entering layer 1 (embeddings, scaled where the model
            # scales them); replicated over tensor ranks, so rank 0's copy is the one kept
            h = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
            self._write(self._buffer(self.hidden, 0, h, torch.float32), h.detach())

    def _on_layer(self, layer: int):
        def hook(module, args, out):
            if not self.step.runs:
                return
            if isinstance(out, tuple):  # vLLM layers return (hidden, residual); the stream is their sum
                h = out[0] if out[1] is None or layer == self.num_layers else out[0] + out[1]
            else:
                h = out
            h = h.detach()
            if layer in self.hidden_layers and self.tp_rank == 0:  # replicated over tensor ranks: rank 0's is kept
                self._write(self._buffer(self.hidden, layer, h, torch.float32), h)
            if layer == self.num_layers and self.want_final:  # the LM head's input, kept in the model's dtype
                self._write(self._buffer(self.final, 0, h, h.dtype), h)

        return hook

    def _on_qkv(self, layer: int):
        def hook(module, args, out):
            if self.step.runs and layer in self.qkv_layers:
                x = (out[0] if isinstance(out, tuple) else out).detach()  # vLLM linears return (output, bias)
                self._write(self._buffer(self.qkv, layer, x, torch.float32), x)

        return hook

    # ------------------------------------------------------------------------------------------- calls

    def begin(self, sequences: np.ndarray, qkv_layers: list[int], want_final: bool) -> None:
        self.want_final = want_final
        self.sequences = torch.from_numpy(np.asarray(sequences, dtype=np.int64))
        self.filled = np.zeros(len(sequences), dtype=np.int64)
        self.qkv_layers = sorted(qkv_layers)
        self.hidden: dict[int, torch.Tensor] = {}
        self.final: dict[int, torch.Tensor] = {}
        self.qkv: dict[int, torch.Tensor] = {}

    def finish(self, spec: TargetSpec | None, seq_index: np.ndarray) -> dict:
        """This worker's share of the shard: targets (tensor rank 0 of the last stage), hidden states (tensor
        rank 0 of the stage owning them), its Q/K/V partitions. Every rank must call it (the LM head is a collective)."""
        n, t = self.sequences.shape
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pass's non-blocking copies into pinned host buffers have all landed
        if (self.filled != t).any():
            bad = int(np.nonzero(self.filled != t)[0][0])
            self.sequences = None
            raise RuntimeError(
                f"hook capture covered {self.filled[bad]}/{t} positions of sequence {bad}: the engine scheduled "
                "tokens in a way the hooks could not follow (is prefix caching on?)")
        out = {"tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "kv_replicas": self.kv_replicas}
        if spec is not None and self.final:
            out["targets"] = self._targets(self.final[0], spec, seq_index)
        if self.tp_rank == 0:
            out["hidden"] = {l: h.numpy() for l, h in self.hidden.items()}
        out["qkv"] = {l: [x.numpy() for x in self.qkv[l].split(self.splits[l], dim=-1)] for l in self.qkv}
        self.sequences = None
        return out

    @torch.no_grad()
    def _targets(self, final: torch.Tensor, spec: TargetSpec, seq_index: np.ndarray) -> dict | None:
        device = next(self.model.parameters()).device
        nexts = self.sequences[:, 1:]
        per_sequence = []
        for i in range(len(final)):
            logits_fn = lambda a, b, h=final[i]: self.model.compute_logits(h[a:b].to(device))  # noqa: E731
            if self.tp_rank == 0:
                per_sequence.append(sequence_targets(logits_fn, nexts[i], spec, int(seq_index[i])))
            else:  # the same LM-head calls, in the same order: the head is split over the ranks
                p = nexts.shape[1]
                for a in range(0, p, spec.chunk_positions):
                    logits_fn(a, min(p, a + spec.chunk_positions))
        return batch_targets(per_sequence) if per_sequence else None


def _missing(module: torch.nn.Module) -> bool:
    """A pipeline-parallel placeholder for a layer another stage owns."""
    return type(module).__name__ == "PPMissingLayer"


# ----------------------------------------------------------------------- the functions collective_rpc runs


def install(worker, num_layers: int, hidden_layers: list[int]) -> dict:
    """Hooks on this worker's model; returns what the driver checks (layers owned, Q/K/V splits)."""
    global _RECORDER
    _RECORDER = Recorder(worker.get_model(), num_layers, hidden_layers)
    r = _RECORDER
    return {"tp_rank": r.tp_rank, "tp_size": r.tp_size, "pp_rank": r.pp_rank, "owned": sorted(r.owned),
            "qkv_hookable": sorted(r.splits), "kv_replicas": r.kv_replicas}


def begin(worker, sequences: np.ndarray, qkv_layers: list[int], want_final: bool) -> None:
    _RECORDER.begin(sequences, qkv_layers, want_final)


def finish(worker, spec: TargetSpec | None, seq_index: np.ndarray) -> dict:
    return _RECORDER.finish(spec, seq_index)

