"""Where a causal LM keeps its decoder layers: the one search every part of distily uses (the student builder,
the layer search, Q/K/V recording, the vLLM capture hooks). HF and vLLM models of one family share the names."""
from __future__ import annotations

from torch import nn

from .errors import DistilyError


def layer_list_name(model: nn.Module, num_layers: int | None = None) -> str:
    """The qualified name of the ModuleList of the num_layers decoder layers (default: the config's count):
    model.layers (Llama, Qwen2, Mistral, Phi-3, Gemma, and vLLM's), transformer.h (GPT-2), ..."""
    n = model.config.num_hidden_layers if num_layers is None else num_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return name
    raise DistilyError(f"found no list of {n} decoder layers in {type(model).__name__}: its layers cannot be mapped, "
                       "copied or hooked (for a student, use --init random)")


def decoder_layers(model: nn.Module, num_layers: int | None = None) -> nn.ModuleList:
    return model.get_submodule(layer_list_name(model, num_layers))


def find_decoder(model: nn.Module, num_layers: int) -> nn.Module:
    """The module that owns embed_tokens, the layers and the final norm (what the capture hooks follow)."""
    parent = layer_list_name(model, num_layers).rpartition(".")[0]
    decoder = model.get_submodule(parent)
    if not (hasattr(decoder, "embed_tokens") and hasattr(decoder, "norm")):
        raise DistilyError(
            f"the decoder of {type(model).__name__} has no embed_tokens and norm beside its layers "
            "(Llama/Mistral/Qwen/Phi-3/Gemma style): capture its hidden states with --backend hf, or its top-k "
            "logits alone under vLLM (--targets-from engine, no --hidden-layers)")
    return decoder
