"""Teacher signals from a plain transformers forward pass: the reference and the fallback backend."""
from __future__ import annotations

import numpy as np
import torch

from .targets import TargetSpec, batch_targets, sequence_targets


class HFTeacher:
    def __init__(self, model_dir: str, spec: TargetSpec, hidden_layers: list[int], dtype: str = "float32",
                 batch_size: int = 4, device: str | None = None, qkv_layers: list[int] = ()):
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.spec = spec
        self.top_k = spec.top_k
        self.hidden_layers = list(hidden_layers)
        self.batch_size = batch_size
        self.configure(spec, qkv_layers=qkv_layers)

    def configure(self, spec: TargetSpec, targets_from: str = "hf", qkv_layers: list[int] = ()) -> None:
        from pipeline.qkv import QKVRecorder

        self.spec, self.top_k = spec, spec.top_k
        if getattr(self, "qkv", None) is not None:
            self.qkv.remove()
        self.qkv_layers = sorted(qkv_layers)
        self.qkv = QKVRecorder(self.model, self.qkv_layers, detach=True) if qkv_layers else None

    @torch.inference_mode()
    def __call__(self, sequences: np.ndarray, seq_index: np.ndarray | None = None) -> dict:
        seq_index = np.arange(len(sequences)) if seq_index is None else seq_index
        per_sequence, hidden_parts, qkv_parts = [], [], []
        for i in range(0, len(sequences), self.batch_size):
            ids = torch.from_numpy(sequences[i : i + self.batch_size].astype(np.int64)).to(self.device)
            if self.qkv:
                self.qkv.clear()
            out = self.model(input_ids=ids, output_hidden_states=bool(self.hidden_layers))
            if self.qkv:
                qkv_parts.append({l: {k: x.float().cpu() for k, x in parts.items()} for l, parts in self.qkv.out.items()})
            for j in range(len(ids)):  # row t of the logits predicts ids[t+1]
                logits_fn = lambda a, b, j=j: out.logits[j, a:b]  # noqa: E731
                per_sequence.append(sequence_targets(logits_fn, ids[j, 1:], self.spec, int(seq_index[i + j])))
            if self.hidden_layers:
                hidden_parts.append({l: out.hidden_states[l].float().cpu() for l in self.hidden_layers})
        hidden = ({l: torch.cat([p[l] for p in hidden_parts]) for l in self.hidden_layers}
                  if self.hidden_layers else None)
        qkv = ({l: {k: torch.cat([p[l][k] for p in qkv_parts]) for k in "qkv"} for l in self.qkv_layers}
               if self.qkv else None)
        return {"targets": batch_targets(per_sequence), "hidden": hidden, "qkv": qkv}

    def close(self) -> None:
        del self.model
