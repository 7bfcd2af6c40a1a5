"""How the training module runs on one process or several: chosen here, in one place.

One process: the Distiller itself. Under torchrun, `--parallel`:

  ddp   the Distiller wrapped once in DistributedDataParallel: every trainable part (student, projectors,
        direct-MHA maps, BitNet latent weights) is broadcast from rank 0 at the start and has its gradient
        averaged over ranks by the same all-reduce; ranks then clip the same gradient and step the same
        optimizer state, and stay bit-identical (tests/test_parallel_train.py checks every step).
  fsdp  PyTorch's fully_shard (FSDP2): each decoder layer is one unit, the rest (embeddings, final norm, LM
        head, projectors, maps) the root unit. Parameters, gradients and optimizer state live as DTensor
        shards (1/world of each on every rank); a unit's full weights exist only while it runs. The fused
        chunked head sees the gathered head weight inside the root's forward and its gradient is
        reduce-scattered like any other. Rank 0's weights are broadcast before sharding (only rank 0 copies
        the teacher's layers). bitsandbytes' 8-bit optimizers reject DTensor shards ("mixed torch.Tensor and
        DTensor"): use torchao's AdamW8bit (--optimizer ao_adamw8bit) or adamw.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

PARALLEL = ("ddp", "fsdp")
FSDP_OPTIMIZERS = ("ao_adamw8bit", "adamw")


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; under torchrun the process group is started here (NCCL on
    GPUs, gloo on CPU)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def wrap(model: torch.nn.Module, world: int, device: torch.device, find_unused: bool, kind: str = "ddp",
         bf16: bool = False):
    """`model` for this run: as is on one process, in DDP or sharded by FSDP under torchrun.

    find_unused (DDP): some trainable parameter gets no gradient in a step (the untied LM head at --kd-weight
    0); DDP then marks it ready itself instead of waiting for it (which fails on the next step). FSDP needs
    nothing: a unit whose parameters get no gradient reduces none."""
    if world == 1:
        return model
    if kind == "fsdp":
        return shard(model, bf16 and device.type == "cuda")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def shard(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """fully_shard every decoder layer (the classes the HF model names in _no_split_modules), then the root.
    bf16 (GPUs): layers compute in bf16 from fp32 master shards; gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # one start on every rank: rank 0's (the ranks built the same shapes)
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    layer_classes = set()
    for m in model.modules():
        layer_classes.update(getattr(m, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in layer_classes:
            fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with every DTensor shard gathered into a whole tensor on rank 0's CPU (a collective
    under FSDP: every rank calls it). Only rank 0 holds the result: the others get an empty dict, so the host
    memory of a save is one model, not one per rank (torch.distributed.checkpoint's full_state_dict + cpu_offload)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def global_value(x: torch.Tensor) -> torch.Tensor:
    """A reduced value (gradient norm) as a plain tensor: a DTensor's full value under FSDP."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a rank-local tensor over all ranks (one all-reduce): the logged losses are the global batch's."""
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world


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
