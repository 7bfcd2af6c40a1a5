"""BitNet b1.58 students (`--student-quant bitnet`): ternary decoder linears trained with straight-through gradients.

Every nn.Linear inside the decoder layers becomes a `BitLinear`. Its forward is transformers' `AutoBitLinear` in
"online" mode (transformers/integrations/bitnet.py), op for op, so a saved student loads back through
`AutoModelForCausalLM.from_pretrained` into the same function:

  weights      s = 1 / clamp(mean|W|, 1e-5)           (one scale per tensor: absmean)
               Wq = clamp(round(W s), -1, 1) / s      (ternary codes {-1, 0, 1} times 1/s)
  activations  a = 127 / clamp(max|x|, 1e-5)          (per token: absmax over the last dim)
               xq = clamp(round(x a), -128, 127) / a  (int8 levels)
  output       F.linear(xq, Wq, bias)                 (no extra norm: transformers' use_rms_norm stays off)

Both roundings pass gradients straight through (STE), so the optimizer updates float32 latent weights like any
others (bitsandbytes 8-bit optimizers unchanged). transformers' own WeightQuant/ActQuant are `@torch.compile`d
(a C compiler and seconds of compilation per shape on CPUs, and the compiled weight path differs from eager by
an ulp), so the same arithmetic is written out here in eager mode; tests/test_bitnet.py checks it against them.

Embeddings, norms and the LM head stay full precision. `ternary_codes` is the single definition of the codes
and scale: the training forward uses it, and `distily export` (export.py) packs exactly what it returns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.decoder import layer_list_name
from pipeline.errors import ConfigError, DistilyError

QUANTS = ("none", "bitnet")
EPS = 1e-5  # transformers' clamp on mean|W| and max|x|


def check_student_quant(name: str) -> None:
    """Refuse an unknown --student-quant before any model is built."""
    if name not in QUANTS:
        raise ConfigError(f"--student-quant {name!r} is unknown; choose one of {', '.join(QUANTS)}")


# ------------------------------------------------------------------------------ the quantisers


def ternary_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): int8 codes in {-1, 0, 1} and the float32 0-dim `scale` = 1/s, s = 1/clamp(mean|W|).

    codes * scale equals transformers' clamp(round(W s), -1, 1) / s bit for bit (x/s and x*(1/s) round the same
    for x in {-1, 0, 1}), so the packed export holds exactly the weights the student trained with. `scale` is
    what transformers' offline AutoBitLinear multiplies its outputs by (its `weight_scale`).
    """
    w = weight.detach().float()
    s = 1.0 / w.abs().mean().clamp(min=EPS)
    codes = (w * s).round().clamp(-1, 1).to(torch.int8)
    return codes, 1.0 / s


def act_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, a): per-token int8 levels round(x a) clamped to [-128, 127] (as float32) and the scales a."""
    x = x.float()
    a = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=EPS)
    return (x * a).round().clamp(-128, 127), a


class WeightQuant(torch.autograd.Function):
    """Forward: the ternary weight codes * scale (in the weight's dtype). Backward: the gradient unchanged (STE)."""

    @staticmethod
    def forward(ctx, weight):
        codes, scale = ternary_codes(weight)
        return (codes.float() * scale).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class ActQuant(torch.autograd.Function):
    """Forward: per-token int8 fake quantisation (in the input's dtype). Backward: the gradient unchanged (STE)."""

    @staticmethod
    def forward(ctx, x):
        levels, a = act_levels(x)
        return (levels / a).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 fake quantisation in the forward; the float32 `weight` is the latent weight.

    Same parameters and state-dict keys as nn.Linear (`weight`, `bias`), so checkpoints, DDP and optimizers see a
    plain linear layer, and transformers loads the saved weights into an online AutoBitLinear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ActQuant.apply(x), WeightQuant.apply(self.weight), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BitLinear":
        """A BitLinear sharing `linear`'s parameters (no copy: the optimizer and ties keep working)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new


# ------------------------------------------------------------------------------ the model


def quantization_config(mode: str, modules_to_not_convert: list[str]) -> dict:
    """transformers' BitNetQuantConfig as a dict. online: latent float weights, quantised in each forward (what
    training saves); offline: packed ternary weights + weight_scale (what `distily export` writes).
    `modules_to_not_convert` lists every nn.Linear outside the decoder layers (the LM head), so that loading
    converts exactly the layers the student trained as ternary."""
    return {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": mode,
            "modules_to_not_convert": list(modules_to_not_convert), "use_rms_norm": False, "rms_norm_eps": 1e-6}


def to_bitnet(model: nn.Module) -> list[str]:
    """Make every nn.Linear under the decoder-layer list a BitLinear (same weights); return their names.

    Embeddings and the LM head stay full precision. Sets model.config.quantization_config (online
    autobitlinear) so that `save_pretrained` writes a dir transformers loads back into the same model.
    """
    prefix = layer_list_name(model)
    replaced = []
    for name, module in list(model.get_submodule(prefix).named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, BitLinear):
            continue
        full = f"{prefix}.{name}"
        if hasattr(module, "weight_scale"):  # transformers' offline AutoBitLinear: its weights are codes, not latent
            raise DistilyError(f"{full} holds packed (exported) BitNet weights, which cannot be trained: start from "
                               "the run's final/ dir (latent float weights) instead of an export")
        model.set_submodule(full, BitLinear.from_linear(module))
        replaced.append(full)
    if not replaced:
        raise DistilyError(f"--student-quant bitnet found no nn.Linear in the decoder layers of {type(model).__name__} "
                           "(e.g. GPT-2's Conv1D projections are not supported); use --student-quant none")
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)]
    check_loadable(replaced, keep)
    model.config.quantization_config = quantization_config("online", keep)
    return replaced


def check_loadable(replaced: list[str], keep: list[str]) -> None:
    """transformers matches modules_to_not_convert by prefix, regex and name suffix: make sure none of the full-
    precision names also matches a ternary layer, or loading would silently leave that layer in float."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    clash = [n for n in replaced if not should_convert_module(n, keep)]
    if clash:
        raise DistilyError(f"the full-precision linears {keep} match decoder linears such as {clash[0]} by "
                           "transformers' name rules, so a saved BitNet student would not load back as trained: "
                           "use --student-quant none for this architecture")

