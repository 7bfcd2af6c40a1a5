"""Which teacher layers a depth-pruned student keeps, chosen from the cache (`--init-layers auto`).

A candidate is a list of teacher layers, in order; the student it gives is those layers plus the teacher's
embeddings, final norm and head (what `--init teacher-layers` copies). Its score is the forward KL to the
cached teacher distributions (the training loss at step 0, on the k+1 buckets) on the first
`--select-sequences` cached training sequences. Candidates:

  evenly       evenly spaced, first and last included (DistilBERT, Minitron's depth pruning)
  importance   the n layers with the largest block importance 1 - cos(h_in, h_out) (ShortGPT)
  drop a-b     the teacher without the contiguous block a..b, for every position of the block
  greedy       from the best of the blocks and the importance set that keep `slack` layers more, drop one
               layer at a time: the one whose removal raises the KL least

The lowest KL wins. Forwards share work: a candidate that keeps the same first j layers as an already
scored one starts from that one's hidden state after them (the teacher's, for block candidates).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.decoder import layer_list_name
from pipeline.errors import DistilyError
from pipeline.manifest import atomic_write_json
from pipeline.resolve import distily_home
from stage_student.losses.kd import kd_loss

GREEDY_SLACK = 2  # greedy drops this many layers one by one, from the best block or importance set that keeps as many more

@dataclass
class Candidate:
    name: str
    layers: list[int]
    kl: float


def evenly_spaced(n_student: int, n_teacher: int) -> list[int]:
    return [int(round(x)) for x in np.linspace(0, n_teacher - 1, n_student)]


def decoder_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the ModuleList holding the decoder layers."""
    parent, _, attr = layer_list_name(model).rpartition(".")
    return model.get_submodule(parent), attr


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


class PrunedForward:
    """Runs the teacher with only some of its layers, starting from a stored hidden state where it can."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, targets: tuple[torch.Tensor, ...]):
        device = model.get_input_embeddings().weight.device  # the teacher's (a GPU where there is one)
        self.model, self.ids, self.targets = model.eval(), input_ids.to(device), tuple(t.to(device) for t in targets)
        self.parent, self.attr = decoder_stack(model)
        self.layers = list(getattr(self.parent, self.attr))
        self.forwards = 0  # layer forwards run, for the record

    @torch.inference_mode()
    def logits(self, kept: list[int], start: int = 0, hidden: torch.Tensor | None = None, record_inputs: bool = False):
        """Logits of the model keeping `kept`, the hidden state after each layer run (and, if asked, before it).

        With start > 0, `hidden` is the state after kept[:start] and only kept[start:] run.
        """
        stack = nn.ModuleList([self.layers[i] for i in kept[start:]])
        outputs, inputs, hooks = [], [], []

        def inject(_module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def record(_module, args, kwargs, output):
            outputs.append(_first_tensor(output))
            if record_inputs:
                inputs.append(args[0] if args else kwargs["hidden_states"])

        if start > 0:
            hooks.append(stack[0].register_forward_pre_hook(inject, with_kwargs=True))
        hooks += [layer.register_forward_hook(record, with_kwargs=True) for layer in stack]
        setattr(self.parent, self.attr, stack)
        try:
            logits = self.model(input_ids=self.ids, use_cache=False).logits
        finally:
            setattr(self.parent, self.attr, nn.ModuleList(self.layers))
            for h in hooks:
                h.remove()
        self.forwards += len(stack)
        return logits, outputs, inputs

    @torch.inference_mode()
    def run(self, kept: list[int], start: int = 0, hidden: torch.Tensor | None = None, record_inputs: bool = False):
        """(forward KL to the cached targets, hidden states after each layer run, inputs if asked)."""
        logits, outputs, inputs = self.logits(kept, start, hidden, record_inputs)
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return kd_loss("forward_kl", flat, *self.targets).item(), outputs, inputs


def select_layers(model: nn.Module, input_ids: torch.Tensor, targets: tuple[torch.Tensor, ...], n_student: int,
                  slack: int = GREEDY_SLACK, log=print) -> dict:
    """Score the candidates; return {"layers", "kl", "method", "candidates": [...], "seconds", ...}."""
    n_teacher = model.config.num_hidden_layers
    if not 1 <= n_student < n_teacher:
        raise DistilyError(f"--init-layers auto picks fewer layers than the teacher's {n_teacher}; got {n_student}")
    t0 = time.perf_counter()
    pf = PrunedForward(model, input_ids, targets)
    teacher_kl, after, before = pf.run(list(range(n_teacher)), record_inputs=True)
    importance = [1 - torch.cosine_similarity(b.float(), a.float(), dim=-1).mean().item() for b, a in zip(before, after)]
    scored: dict[tuple[int, ...], Candidate] = {}

    def teacher_prefix(kept: list[int]) -> list[torch.Tensor]:
        """The teacher's hidden states after the layers 0, 1, ... that `kept` starts with."""
        s = 0
        while s < len(kept) and kept[s] == s:
            s += 1
        return after[:s]

    def from_prefix(kept: list[int], prefix: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """(KL, hidden state after each layer of `kept`), running only the layers after `prefix`: the hidden
        states after kept[0], kept[1], ... from an earlier forward that kept them too."""
        prefix = prefix[: len(kept) - 1]  # run at least one layer
        kl, outputs, _ = pf.run(kept, len(prefix), prefix[-1] if prefix else None)
        return kl, [*prefix, *outputs]

    def score(name: str, kept: list[int], prefix: list[torch.Tensor] | None = None) -> Candidate:
        key = tuple(kept)
        if key not in scored:
            scored[key] = Candidate(name, kept, from_prefix(kept, teacher_prefix(kept) if prefix is None else prefix)[0])
        return scored[key]

    def drop_block(size: int) -> list[Candidate]:
        return [score(f"drop {a}-{a + size - 1}", [l for l in range(n_teacher) if not a <= l < a + size])
                for a in range(0, n_teacher - size + 1)]

    drop = n_teacher - n_student
    score("evenly", evenly_spaced(n_student, n_teacher))
    score("importance", sorted(int(i) for i in np.argsort(importance)[::-1][:n_student]))
    drop_block(drop)
    slack = min(slack, drop)
    if slack > 0:
        if slack < drop:
            top = sorted(int(i) for i in np.argsort(importance)[::-1][: n_student + slack])
            kept = min([*drop_block(drop - slack), score("importance", top)], key=lambda c: c.kl).layers
            base = from_prefix(kept, teacher_prefix(kept))[1]  # one more forward: cheaper than keeping every candidate's
        else:
            kept, base = list(range(n_teacher)), after
        for step in range(slack):  # greedy: drop the layer whose removal raises the KL least
            trials = [score("greedy", kept[:j] + kept[j + 1:], base[:j]) for j in range(len(kept))]
            j = min(range(len(trials)), key=lambda i: trials[i].kl)
            kept = trials[j].layers
            base = from_prefix(kept, base[:j])[1] if step < slack - 1 else base
    result = {**best_of(scored, n_student, n_teacher), "teacher_kl": teacher_kl, "block_importance": importance,
              "sequences": int(input_ids.shape[0]), "tokens": int(input_ids.numel()), "layer_forwards": pf.forwards,
              "slack": slack, "seconds": time.perf_counter() - t0}
    log(format_table(result))
    return result


def best_of(scored: dict, n_student: int, n_teacher: int) -> dict:
    """The scored candidate of n_student layers with the least KL, and every such candidate, best first."""
    table = sorted((c for c in scored.values() if len(c.layers) == n_student), key=lambda c: c.kl)
    best = table[0]
    return {"layers": best.layers, "kl": best.kl, "method": best.name,
            "evenly_kl": scored[tuple(evenly_spaced(n_student, n_teacher))].kl,
            "candidates": [asdict(c) for c in table], "scored": len(scored)}


def format_table(result: dict, rows: int = 8) -> str:
    lines = [f"layer selection: {result['scored']} candidates scored on {result['sequences']} cached sequences "
             f"({result['tokens']} tokens) in {result['seconds']:.0f} s; forward KL to the cached teacher:"]
    shown = result["candidates"][:rows]
    for name in ("evenly", "importance"):
        if not any(c["name"] == name for c in shown):
            shown += [c for c in result["candidates"] if c["name"] == name]
    for c in shown:
        mark = "*" if c["layers"] == result["layers"] else " "
        lines.append(f" {mark} {c['kl']:8.4f}  {c['name']:<12} {','.join(map(str, c['layers']))}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- from a run's config


def check_init_layers(init_layers, n_student: int, n_teacher: int, train_sequences: int, select_sequences: int) -> None:
    """Bad --init-layers values fail here, before any model is loaded."""
    if init_layers in ("auto", "evenly"):
        if init_layers == "auto" and not 1 <= select_sequences <= train_sequences:
            raise DistilyError(
                f"--init-layers auto scores candidates on --select-sequences {select_sequences} cached training "
                f"sequences, but the cache holds {train_sequences}: capture more tokens, lower --select-sequences, "
                "or pass --init-layers evenly (or a list)."
            )
        if n_student > n_teacher:
            raise DistilyError(f"--init teacher-layers: the student has {n_student} layers, the teacher only {n_teacher}")
        return
    if not isinstance(init_layers, list) or len(init_layers) != n_student or not all(0 <= l < n_teacher for l in init_layers):
        raise DistilyError(
            f"--init-layers {init_layers} must be auto, evenly, or a list of {n_student} teacher layers in [0, {n_teacher})"
        )


def selection_batch(reader, count: int, teacher: nn.Module | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The first `count` cached sequences: input ids and the cached top-k targets flattened over positions (a cache
    of RS-KD samples alone: the teacher's own top-64 and tail on those sequences, from one forward)."""
    rows: list[dict] = []
    for shard in reader.shards:
        data = reader.read_shard(shard, hidden=False)
        rows += [{k: v[i] for k, v in data.items()} for i in range(len(data["input_ids"]))]
        if len(rows) >= count:
            break
    rows = rows[:count]
    stack = lambda key: torch.from_numpy(np.stack([r[key] for r in rows]))  # noqa: E731
    ids = stack("input_ids").long()
    if "topk_ids" not in rows[0]:
        with torch.no_grad():
            device = teacher.get_input_embeddings().weight.device
            logp = torch.log_softmax(teacher(input_ids=ids.to(device)).logits[:, :-1].float(), dim=-1).cpu()
        top = logp.topk(min(64, logp.shape[-1]), dim=-1)
        k = top.indices.shape[-1]
        tail = (1 - top.values.double().exp().sum(-1)).clamp(0, 1).float()
        return ids, (top.indices.reshape(-1, k), top.values.reshape(-1, k), tail.reshape(-1))
    k = reader.top_k
    return ids, (stack("topk_ids").long().reshape(-1, k), stack("topk_logprobs").reshape(-1, k), stack("tail_mass").reshape(-1))


def chosen_layers(cfg, reader, teacher, n_student: int) -> tuple[list[int], dict | None]:
    """(teacher layers to copy, the selection record or None) for cfg.init_layers auto | evenly | a list.

    teacher: a TeacherCheckpoint (teacher_weights.py; the search then streams one layer at a time) or a model.
    An auto selection runs once per job: on rank 0 (the other ranks wait and receive it), stored in the run dir
    (`layer_selection.json`, for --resume) and under $DISTILY_HOME/layer-selection, keyed by everything it depends
    on, so the next student of the same cache, teacher and depth reuses it without reading the teacher.
    """
    n_teacher = teacher.config.num_hidden_layers
    if isinstance(cfg.init_layers, list):
        return list(cfg.init_layers), None
    if cfg.init_layers == "evenly" or n_student >= n_teacher:  # a student of the teacher's depth keeps every layer
        return evenly_spaced(n_student, n_teacher), None
    m = reader.manifest
    key = {"version": 1, "teacher_sha256": m["teacher"]["weights_sha256"], "teacher": str(cfg.teacher or m["teacher"]["path"]),
           "dataset": m["dataset"]["fingerprint"], "top_k": reader.top_k, "n_student": n_student,
           "select_sequences": cfg.select_sequences, "slack": GREEDY_SLACK}
    result = None
    if not distributed() or torch.distributed.get_rank() == 0:
        result = stored_or_new_selection(cfg, reader, teacher, n_student, key)
    result = share_from_rank0(result)
    return result["layers"], result


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def share_from_rank0(obj):
    """rank 0's obj on every rank (the others block until rank 0 has it); obj itself outside torch.distributed."""
    if not distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def stored_or_new_selection(cfg, reader, teacher, n_student: int, key: dict) -> dict:
    """A stored selection with this key (run dir first, then $DISTILY_HOME), else a new search; stored in both."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    places = [Path(cfg.output) / "layer_selection.json", distily_home() / "layer-selection" / f"{digest}.json"]
    for path in places:
        result = json.loads(path.read_text()) if path.exists() else {}
        if result.get("key") == key:
            print(f"layer selection: reusing {path}")
            print(format_table(result))
            break
    else:
        model = teacher.streaming_model() if hasattr(teacher, "streaming_model") else teacher
        ids, targets = selection_batch(reader, cfg.select_sequences, model)
        result = {**select_layers(model, ids, targets, n_student, GREEDY_SLACK), "key": key}
        path = None
    for place in places:
        place.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(place, result)
    return {**result, "reused": str(path)} if path else result
