"""One training step, readable top to bottom: what the teacher says, the losses, backward, clip, update.

    teacher = CachedTeacher(...) or OnlineTeacher(...)    # same call: a batch -> TeacherBatch
    model = Distiller(student, projectors, attn_maps, ...)  # every trainable part, one module tree
    parts = model(ids, teacher(batch, ids), spec)           # {"loss", "kd", "ce", "hs", "attn"}
    train_step(wrapped, teacher, micro_batches, ...)       # grad accumulation, clip, optimizer step

The loss lives in `Distiller.forward`, so the module torchrun's DDP wraps (parallel.py) produces the loss
itself: DDP then sees, and averages, the gradient of every trainable part (student, hidden-state
projectors, direct-MHA maps, BitNet latent weights) by one mechanism, and can find the parameters a run
leaves unused (the LM head at --kd-weight 0). Evaluation calls the same forward with another LossSpec.
"""
from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from stage_student.losses import attention, chunked
from stage_student.losses import balance as balancing
from stage_student.losses import cross as cross_loss
from stage_student.losses.hidden import mapped_hidden_loss
from stage_student.losses.kd import truncate_topk
from stage_student.training.cross_tokenizer import to_device


@dataclass
class TeacherBatch:
    """What the teacher provides for one micro-batch: chunked.Targets fields (top-k, samples or full logits;
    empty when no KD term reads them), hidden states {layer: [B, T, H]} and Q/K/V {layer: {"q"|"k"|"v": ...}}."""

    targets: dict = field(default_factory=dict)
    hidden: dict = field(default_factory=dict)
    qkv: dict = field(default_factory=dict)
    positions: torch.Tensor | None = None  # graded caches: [N] bool, the positions the token losses learn at


def graded_positions(batch: dict, device: torch.device) -> torch.Tensor | None:
    """A graded cache's loss mask flattened like the logits ([N] bool), or None (every position counts)."""
    return batch["loss_mask"].reshape(-1).to(device).bool() if "loss_mask" in batch else None


class CachedTeacher:
    """The teacher as the cache recorded it: the batch's cached targets, hidden states and Q/K/V on `device`."""

    def __init__(self, kind: str, device: torch.device, kd_top_k: int | None = None):
        self.kind, self.device, self.kd_top_k = kind, device, kd_top_k  # kind: topk | sampled | token

    def __call__(self, batch: dict, ids: torch.Tensor, kd: bool = True) -> TeacherBatch:
        """kd: with the KD targets (else only what the hidden-state and attention losses read)."""
        return TeacherBatch(
            targets=self.targets(batch, self.kd_top_k) if kd or "cross" in batch else {},
            hidden={l: h.to(self.device) for l, h in batch.get("hidden_states", {}).items()},
            qkv={l: {x: a.to(self.device) for x, a in parts.items()} for l, parts in batch.get("qkv", {}).items()},
            positions=graded_positions(batch, self.device))

    def targets(self, batch: dict, kd_top_k: int | None = None) -> dict[str, torch.Tensor]:
        """chunked.Targets fields, flattened like the logits: the teacher's top-k ids, log-probs and tail mass
        (its first kd_top_k), or the RS-KD samples' ids, weights and entropy. A cross-tokenizer batch carries its
        aligned rows and the student's labels instead (cross_tokenizer.py), with or without KD."""
        if "cross" in batch:
            return {"cross": to_device(batch["cross"], self.device)}
        if self.kind == "token":  # --loss token_reverse_kl: the teacher's log-prob of each written token
            out = {"teacher_token_logprob": batch["target_logprob"].reshape(-1).to(self.device)}
            if "behaviour_logprob" in batch:
                out["behaviour_logprob"] = batch["behaviour_logprob"].reshape(-1).to(self.device)
            return out
        if self.kind == "sampled":
            m = batch["sample_ids"].shape[-1]
            return {"sample_ids": batch["sample_ids"].reshape(-1, m).to(self.device),
                    "sample_weights": batch["sample_weights"].reshape(-1, m).to(self.device),
                    "teacher_entropy": batch["teacher_entropy"].reshape(-1).to(self.device)}
        k = batch["topk_ids"].shape[-1]
        ids, logprobs = batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k)
        tail = batch["tail_mass"].reshape(-1)
        if kd_top_k and kd_top_k < k:
            ids, logprobs, tail = truncate_topk(ids, logprobs, kd_top_k)
        return {"topk_ids": ids.to(self.device), "topk_logprobs": logprobs.to(self.device), "tail_mass": tail.to(self.device)}


class OnlineTeacher:
    """--online-teacher, the reference: the teacher model runs on each batch (no grad) and gives full logits,
    the mapped hidden states and, through its Q/K/V recorder, the attention inputs."""

    def __init__(self, model, hidden_layers: list[int], qkv_recorder=None, bf16: bool = False):
        self.model, self.hidden_layers, self.qkv_recorder, self.bf16 = model, hidden_layers, qkv_recorder, bf16

    @torch.no_grad()
    def __call__(self, batch: dict, ids: torch.Tensor, kd: bool = True) -> TeacherBatch:
        if self.qkv_recorder is not None:
            self.qkv_recorder.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext():
            out = self.model(input_ids=ids, output_hidden_states=bool(self.hidden_layers))
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        return TeacherBatch(targets={"teacher_logits": logits} if kd else {},
                            hidden={l: out.hidden_states[l] for l in self.hidden_layers},
                            qkv=self.qkv_recorder.out if self.qkv_recorder is not None else {},
                            positions=graded_positions(batch, ids.device))


def select_positions(targets: chunked.Targets, keep: torch.Tensor) -> chunked.Targets:
    """The targets at the kept positions ([N] bool): every per-position field indexed alike."""
    return chunked.Targets(**{k: None if v is None else v[keep] for k, v in vars(targets).items()})


@dataclass
class AttnSpec:
    """--attn-loss and its settings (kind "none": no attention term)."""

    kind: str = "none"
    pairs: list = field(default_factory=list)
    relation_heads: int = 0
    relation_weights: tuple = (1.0, 1.0, 1.0)
    relation_loss: str = "kl"


class Distiller(nn.Module):
    """Every trainable part in one module tree, and the loss as its forward.

    forward(ids, teacher, spec) runs the student (StudentForward: up to the fused LM head), then the head
    losses on the teacher's targets (spec: which KD/CE terms, weights), the hidden-state loss through the
    projectors and the attention loss through the direct-MHA maps, and returns
    {"loss": differentiable total, "kd", "ce", "hs", "attn": the parts present in this run}. The hidden-state
    and attention terms are computed when the teacher batch carries hidden states and Q/K/V: the training
    stream always loads those the run maps; the eval loss passes none (hidden) or only Q/K/V."""

    def __init__(self, student, projectors: nn.Module, attn_maps: nn.Module, *, hs_pairs, hs_weight: float = 0.0,
                 hs_loss: str = "mse", hs_norm: str = "none", attn: AttnSpec | None = None, attn_weight: float = 0.0,
                 student_qkv=None, chunk_size: int = 1024, bf16: bool = False):
        super().__init__()
        self.student, self.projectors, self.attn_maps = student, projectors, attn_maps
        self.hs_pairs, self.hs_weight, self.hs_loss, self.hs_norm = hs_pairs, hs_weight, hs_loss, hs_norm
        self.attn, self.attn_weight, self.student_qkv = attn or AttnSpec(), attn_weight, student_qkv
        self.chunk_size, self.bf16 = chunk_size, bf16

    def forward(self, ids: torch.Tensor, teacher: TeacherBatch, spec: chunked.LossSpec) -> dict[str, torch.Tensor]:
        if self.student_qkv is not None:
            self.student_qkv.clear()
        hs = bool(self.hs_pairs) and bool(teacher.hidden)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            out, student_hidden = self.student(input_ids=ids, output_hidden_states=hs)
            if "cross" in teacher.targets:  # a student with another tokenizer: losses/cross.py
                parts = cross_loss.head_losses(out[:, :-1].reshape(-1, out.shape[-1]), *self.student.head(), spec,
                                               teacher.targets["cross"])
            else:
                targets = chunked.Targets(labels=ids[:, 1:].reshape(-1), **teacher.targets)
                flat = out[:, :-1].reshape(-1, out.shape[-1])
                if teacher.positions is not None:  # a graded cache: only the positions whose next token was written
                    flat, targets = flat[teacher.positions], select_positions(targets, teacher.positions)
                parts = self.head_losses(flat, targets, spec)
        self.terms = {"logit": parts["loss"]}  # the weighted terms whose sum is the loss (balance.py reads them)
        if hs:
            parts["hs"] = mapped_hidden_loss(self.hs_pairs, student_hidden, teacher.hidden, self.projectors,
                                             self.hs_loss, self.hs_norm)
            self.terms["hs"] = self.hs_weight * parts["hs"]
            parts["loss"] = parts["loss"] + self.terms["hs"]
        if self.attn.pairs and teacher.qkv:
            parts["attn"] = self.attention_loss(teacher.qkv)
            self.terms["attn"] = self.attn_weight * parts["attn"]
            parts["loss"] = parts["loss"] + self.terms["attn"]
        if not self.terms["logit"].requires_grad:  # no KD or CE term in this run
            del self.terms["logit"]
        return parts

    def head_losses(self, out, targets: chunked.Targets, spec: chunked.LossSpec) -> dict[str, torch.Tensor]:
        """KD and CE from the student's output over positions [N, H] (fused head) or its logits [N, V]."""
        if spec.kd is None and spec.ce_weight == 0:  # e.g. --kd-weight 0 with an attention or hidden loss alone
            return {"loss": torch.zeros((), device=out.device)}
        weight, bias = self.student.head()
        if weight is not None or self.chunk_size > 0:
            return chunked.head_losses(out, weight, bias, spec, targets, self.chunk_size)
        return chunked.reference_losses(out, spec, targets)  # --loss-chunk-size 0: on the full logits

    def attention_loss(self, teacher_qkv: dict) -> torch.Tensor:
        """The --attn-loss over the mapped layers (a 1-to-N pair averages its N teacher layers), from the Q/K/V
        the student's forward just recorded and the teacher's."""
        a = self.attn
        total = 0.0
        for s_layer, t_layers in a.pairs:
            student = self.student_qkv.out[s_layer]
            for t in t_layers:
                if a.kind == "mha_relation":
                    part = attention.mha_relation_loss(student, teacher_qkv[t], a.relation_heads, a.relation_weights,
                                                       a.relation_loss)
                else:
                    part = attention.direct_mha_loss(student, teacher_qkv[t], self.attn_maps(s_layer), a.relation_weights)
                total = total + part / len(t_layers)
        return total / len(a.pairs)

    def uses_every_parameter(self, spec: chunked.LossSpec) -> bool:
        """False when some trainable parameter may get no gradient in a step: with no KD or CE term (--kd-weight 0
        with a hidden or attention loss alone) the head, the final norm and every layer after the last mapped one
        (or, for an attention loss, the rest of each mapped layer) are unused. DDP must then look for them."""
        return not (spec.kd is None and spec.ce_weight == 0)


def train_step(model, teacher, micro_batches: Iterable[dict], n: int, spec: chunked.LossSpec, optimizer, scheduler,
               max_grad_norm: float, device: torch.device, balance: str = "none", gradient_noise: float = 0.0, seed: int = 0,
               step: int = 0) -> dict:
    """One optimizer step over the n `micro_batches` (gradient accumulation; an iterator, so only one micro-batch
    with its cached hidden states is held at a time): each micro-batch's loss / n is backpropagated (under DDP
    the gradients are averaged over ranks on the last one only; under FSDP reduce-scattered on the last one),
    then the global gradient norm is clipped and the optimizer and scheduler step.

    Returns {"losses": {name: mean over the micro-batches, a 0-d tensor on the device}, "grad_norm": before
    clipping (a tensor), "lr": the step's}. Nothing here waits for the device: the caller reads the values
    once per logging window.

    balance (--loss-balance, one process): each weighted term's gradient is taken alone and they are combined
    by balance.combine (pcgrad | gradnorm) instead of one backward of their sum.

    gradient_noise (--gradient-noise, > 0): add_gradient_noise to the clipped gradient, drawn from (seed, step)."""
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        ids = batch["input_ids"].to(device)
        last = i == n - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP
            model.set_requires_gradient_sync(last)
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            parts = model(ids, teacher(batch, ids, kd=spec.kd is not None), spec)
            if balance == "none":
                (parts["loss"] / n).backward()
            else:
                balanced_backward(model, n, balance)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / n
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if gradient_noise > 0:
        add_gradient_noise([p.grad for p in params if p.grad is not None], gradient_noise,
                           torch.clamp(grad_norm, max=max_grad_norm), seed, step)
    lr = float(scheduler.get_last_lr()[0])  # torchao's optimizers hold lr as a (host) tensor
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": sums, "grad_norm": grad_norm, "lr": lr}


def add_gradient_noise(grads: list[torch.Tensor], ratio: float, norm: torch.Tensor, seed: int, step: int) -> None:
    """--gradient-noise: annealed Gaussian gradient noise (Neelakantan et al. 2015, arXiv 1511.06807), scaled
    to the gradient: N(0, sigma^2) on every element, sigma = ratio x norm / sqrt(n) x (1 + step)^-0.275, so the
    noise's expected norm is ratio x `norm` (the clipped gradient's) at step 0 and its variance decays as the
    paper's (1 + t)^-0.55. The paper's absolute variance (eta in 0.01-1) would swamp a 135M-parameter gradient
    clipped to norm 1, hence relative. The draw comes from a generator seeded by (seed, step) alone: every DDP
    rank adds the same noise to the same averaged gradient, and a resumed run draws what an uninterrupted one did.
    Under FSDP each gradient is a DTensor shard: every rank draws the whole tensor, as one process would, and adds
    its own shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    n = sum(g.numel() for g in grads)  # a DTensor's numel is the whole tensor's
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    sigma = ratio * norm / n ** 0.5 * (1 + step) ** -0.275
    gen = torch.Generator(device=grads[0].device).manual_seed(seed * 1_000_003 + step)
    for g in grads:
        noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype) * sigma.to(g.dtype)
        if isinstance(g, DTensor):  # no communication: each rank keeps its shard of the same draw
            noise = distribute_tensor(noise, g.device_mesh, g.placements, src_data_rank=None)
        g.add_(noise)


def balanced_backward(model: Distiller, n: int, method: str) -> None:
    """Add this micro-batch's balanced gradient / n to .grad: one autograd pass per weighted term, combined."""
    params = [p for p in model.parameters() if p.requires_grad]
    ratios = {"hs": model.hs_weight, "attn": model.attn_weight}
    grads = balancing.combine(balancing.term_gradients(model.terms, params), method, ratios)
    for p, g in zip(params, grads):
        g = (g / n).to(p.dtype)
        p.grad = g if p.grad is None else p.grad + g


def gradient_cosines(model: Distiller, teacher, batch: dict, spec: chunked.LossSpec, device: torch.device) -> dict:
    """The measurement: on `batch`, each weighted term's gradient alone (nothing accumulated in .grad), their
    norms and each auxiliary's cosine with the logit gradient (balance.cosines); {} with fewer than two terms."""
    ids = batch["input_ids"].to(device)
    model(ids, teacher(batch, ids, kd=spec.kd is not None), spec)
    if len(model.terms) < 2:
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    return balancing.cosines(balancing.term_gradients(model.terms, params))
