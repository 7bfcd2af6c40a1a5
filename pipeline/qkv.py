"""What a cached Q/K/V tensor is, and how to read one out of a transformers model.

A layer's Q, K and V are the outputs of its attention's query, key and value projections, before rotary
embeddings (and before any q/k norm): [.., T, heads x head_dim] for Q and [.., T, kv_heads x head_dim] for K
and V, heads concatenated in the model's order. Layers are numbered 1..L (decoder layer l is layers[l-1]),
like the hidden-state layer whose output it feeds. The teacher's HF backend and the student trainer both read
them with `QKVRecorder`; the vLLM backend hooks its engine's fused qkv_proj and splits it the same way.
"""
from __future__ import annotations

import torch
from torch import nn

from .decoder import decoder_layers
from .errors import DistilyError

SEPARATE = ("q_proj", "k_proj", "v_proj")  # Llama, Mistral, Qwen, Gemma, ...
FUSED = ("qkv_proj", "c_attn")  # Phi-3; GPT-2 (Conv1D): [q | k | v] along the output


def qkv_widths(config) -> dict:
    """{"q"|"k"|"v": {"heads", "head_dim", "width"}} of an HF config (grouped-query widths as the model has them)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q = {"heads": heads, "head_dim": head_dim, "width": heads * head_dim}
    kv = {"heads": kv_heads, "head_dim": head_dim, "width": kv_heads * head_dim}
    return {"q": q, "k": dict(kv), "v": dict(kv)}


def projections(layer: nn.Module) -> dict[str, nn.Module]:
    """{"q", "k", "v"} projection modules of one decoder layer, or {"qkv": fused}; a clear error otherwise."""
    for module in layer.modules():
        if all(isinstance(getattr(module, n, None), nn.Module) for n in SEPARATE):
            return {kind: getattr(module, f"{kind}_proj") for kind in "qkv"}
        for name in FUSED:
            if isinstance(getattr(module, name, None), nn.Module):
                return {"qkv": getattr(module, name)}
    raise DistilyError(
        f"{type(layer).__name__} has no q_proj/k_proj/v_proj or fused qkv_proj/c_attn: Q/K/V cannot be read from "
        "this architecture; use the hidden-state loss (--hs-weight) instead"
    )


class QKVRecorder:
    """Forward hooks that keep layers' Q/K/V outputs of the next forward: `recorder.out[l]["q"]`, etc.

    The tensors keep their autograd graph (student losses backpropagate through them). `clear()` before each
    forward; `remove()` detaches the hooks."""

    def __init__(self, model: nn.Module, layers: list[int], detach: bool = False):
        config = model.config
        self.widths = qkv_widths(config)
        blocks = decoder_layers(model, config.num_hidden_layers)
        bad = [l for l in layers if not 1 <= l <= len(blocks)]
        if bad:
            raise DistilyError(f"Q/K/V layers {bad} out of range: the model has layers 1..{len(blocks)}")
        self.out: dict[int, dict[str, torch.Tensor]] = {}
        self.detach = detach
        self.handles = []
        for l in layers:
            for kind, module in projections(blocks[l - 1]).items():
                self.handles.append(module.register_forward_hook(self._hook(l, kind)))

    def _hook(self, layer: int, kind: str):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            if self.detach:
                x = x.detach()
            parts = self.out.setdefault(layer, {})
            if kind == "qkv":
                q, kv = self.widths["q"]["width"], self.widths["k"]["width"]
                parts["q"], parts["k"], parts["v"] = x.split([q, kv, kv], dim=-1)
            else:
                parts[kind] = x

        return hook

    def clear(self) -> None:
        self.out = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
