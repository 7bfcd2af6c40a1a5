"""--int8-training: the student's decoder linears run their three matmuls in int8, with float latent weights.

torchao's int8 mixed-precision training recipe (torchao.prototype.quantized_training, module-swap form), per linear:

  forward   Y  = X @ W^T    X row-wise (per token), W row-wise (per output channel)
  backward  dX = dY @ W     dY per token, W per input channel
            dW = dY^T @ X   dY per output channel, X per input channel (all over the tokens)

Each operand is quantised on the fly with absmax scales, q = round(a * 127 / max|row|) in int8, multiplied with
torch._int_mm (int32 accumulation; torchao's Triton kernel with the scaling fused on CUDA), and scaled back to float.
The bias and its gradient stay float. The weight is an ordinary float parameter under its usual state-dict name
(`...q_proj.weight`), so optimizers (bitsandbytes 8-bit included), checkpoints, resume and `final/` are unchanged,
and the saved model is a plain float model.

torchao's function views its operands as 2-D (`.view`), which fails on a non-contiguous input or incoming gradient
(e.g. a transposed or broadcast consumer); `Int8Linear` hands it contiguous ones. Embeddings, norms, the LM head
(inside the fused loss, chunked.py) and the projectors stay float.
"""
from __future__ import annotations

import torch
from torch import nn
from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig
from torchao.prototype.quantized_training.int8_mixed_precision import Int8MixedPrecisionTrainingLinear

from pipeline.decoder import layer_list_name
from pipeline.errors import DistilyError

INT8 = Int8MixedPrecisionTrainingConfig(output=True, grad_input=True, grad_weight=True, module_swap=True)


class ContiguousGrad(torch.autograd.Function):
    """Identity forward; the backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class Int8Linear(Int8MixedPrecisionTrainingLinear):
    """nn.Linear whose forward and backward matmuls run in int8 (torchao); `weight` stays the float latent weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ContiguousGrad.apply(super().forward(x.contiguous()))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """An Int8Linear sharing `linear`'s parameters (no copy: ties and the optimizer keep working)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", config=INT8)
        new.weight = linear.weight
        new.bias = linear.bias
        return new


def to_int8_training(model: nn.Module) -> list[str]:
    """Make every nn.Linear under the decoder-layer list an Int8Linear (same parameters); return their names."""
    prefix = layer_list_name(model)
    replaced = []
    for name, module in list(model.get_submodule(prefix).named_modules()):
        if type(module) is nn.Linear:
            full = f"{prefix}.{name}"
            model.set_submodule(full, Int8Linear.from_linear(module))
            replaced.append(full)
    if not replaced:
        raise DistilyError(f"--int8-training found no nn.Linear in the decoder layers of {type(model).__name__} "
                           "(e.g. GPT-2's Conv1D projections are not supported); drop --int8-training")
    return replaced
