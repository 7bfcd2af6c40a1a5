"""How the training module runs on one process or several: chosen here, in one place.

One process: the Distiller itself. Under torchrun: the Distiller wrapped once in DDP, so every trainable
part (student, projectors, direct-MHA maps, BitNet latent weights) is broadcast from rank 0 at the start
and has its gradient averaged over ranks by the same all-reduce; ranks then clip the same gradient and
step the same optimizer state, and stay bit-identical (tests/test_parallel_train.py checks every step).
"""
from __future__ import annotations

import hashlib

import torch


def wrap(model: torch.nn.Module, world: int, device: torch.device, find_unused: bool):
    """`model` for this run: as is on one process, in DistributedDataParallel under torchrun.

    find_unused: some trainable parameter gets no gradient in a step (the untied LM head at --kd-weight 0);
    DDP then marks it ready itself instead of waiting for it (which fails on the next step)."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def state_digest(module: torch.nn.Module, optimizer) -> str:
    """sha256 over every parameter and every optimizer state tensor and number, in a fixed order: equal on
    two ranks only if their replicas agree bit for bit (the DDP agreement test writes one per step)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                h.update(key.encode())
                if torch.is_tensor(value):
                    h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                else:
                    h.update(repr(value).encode())
    return h.hexdigest()
