"""Teacher signals from a plain transformers forward pass: the reference and the fallback backend."""
from __future__ import annotations

import numpy as np
import torch


class HFTeacher:
    def __init__(self, model_dir: str, top_k: int, hidden_layers: list[int], dtype: str = "float32",
                 batch_size: int = 4, device: str | None = None):
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.top_k = top_k
        self.hidden_layers = list(hidden_layers)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, sequences: np.ndarray) -> dict:
        parts = [self._forward(sequences[i : i + self.batch_size]) for i in range(0, len(sequences), self.batch_size)]
        out = {key: np.concatenate([p[key] for p in parts]) for key in ("topk_ids", "topk_logprobs", "target_logprob")}
        out["hidden"] = (
            {l: torch.cat([p["hidden"][l] for p in parts]) for l in self.hidden_layers} if self.hidden_layers else None
        )
        return out

    def _forward(self, batch: np.ndarray) -> dict:
        ids = torch.from_numpy(batch.astype(np.int64)).to(self.device)
        out = self.model(input_ids=ids, output_hidden_states=bool(self.hidden_layers))
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # row t predicts ids[t+1]
        top = logprobs.topk(self.top_k, dim=-1, sorted=True)
        target = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
        hidden = {l: out.hidden_states[l].float().cpu() for l in self.hidden_layers} if self.hidden_layers else None
        return {
            "topk_ids": top.indices.int().cpu().numpy(),
            "topk_logprobs": top.values.cpu().numpy(),
            "target_logprob": target.cpu().numpy(),
            "hidden": hidden,
        }

    def close(self) -> None:
        del self.model
