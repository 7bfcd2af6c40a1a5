"""What a run measures and writes while it trains: memory, tensor bytes, the logging window and the logs.

log.jsonl and TensorBoard (tb/) get one record every --logging-steps: the window's mean losses over all ranks,
learning rate, gradient norm, tokens/s, step time, data wait, memory and its peak.
"""
from __future__ import annotations

import json
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stage_student.training.parallel import mean_over_ranks


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds on this rank: its local shard of a DTensor, the packed parts of a tensor subclass."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # a tensor subclass (torchao's 8-bit state)
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds (its shard under FSDP; the packed bytes of 8-bit state)."""
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak: the CUDA allocator's, or on Linux this process's resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the CPU peak is the process's lifetime peak


def memory_mb(device: torch.device) -> tuple[float, float]:
    """(current, peak since the last reset) in MB: CUDA tensors allocated, or this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak


def global_sums(sums: dict, device: torch.device, world: int) -> dict[str, float]:
    """Per-rank sums (device tensors or floats) -> their means over the ranks, as floats: the whole global batch's,
    in one all-reduce and one read from the device."""
    if not sums:
        return {}
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=device) for k in names])
    return dict(zip(names, mean_over_ranks(values, world).tolist()))


@dataclass
class Window:
    """Sums over one logging window (checkpoints keep the open one, so its means survive a resume)."""
    time: float = 0.0
    data: float = 0.0
    tokens: int = 0
    steps: int = 0
    losses: dict = field(default_factory=dict)
    peak: float = 0.0
    cross: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # text bytes, unspelled bytes, dropped specials

    def add(self, losses: dict, tokens: int, seconds: float, wait: float) -> None:
        self.time, self.data, self.tokens, self.steps = self.time + seconds, self.data + wait, self.tokens + tokens, self.steps + 1
        for k, v in losses.items():  # device tensors: read once per window
            name = f"loss/{k}" if k != "loss" else "loss"
            self.losses[name] = self.losses.get(name, 0.0) + v

    def means(self, device: torch.device, world: int) -> dict:
        """The window's mean losses over all ranks and its speeds."""
        return {**{k: v / self.steps for k, v in global_sums(self.losses, device, world).items()},
                "tokens_per_s": self.tokens / self.time, "step_time_s": self.time / self.steps,
                "data_wait_s": self.data / self.steps}


def new_window(device: torch.device) -> Window:
    """An empty window; the memory peak restarts with it."""
    reset_peak_memory(device)
    return Window()


class RunLog:
    """log.jsonl and TensorBoard, written by rank 0 (other ranks' calls do nothing)."""

    def __init__(self, out: Path, rank: int, purge_step: int | None):
        self.path, self.tb = out / "log.jsonl", None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=purge_step)

    def __call__(self, record: dict) -> None:
        if self.tb is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
