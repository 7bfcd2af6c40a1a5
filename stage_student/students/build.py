"""Building the student: an HF model dir/id, or a recipe derived from the teacher config in the cache.

Recipe: the teacher's config with fewer layers (--student-layers) and any other overrides
(--student-config '{"hidden_size": 384, ...}'). Initialisation:
  random          fresh weights (seeded);
  teacher-layers  copy the chosen teacher layers and, with --copy-embeddings, the embeddings, final norm and
                  LM head. --init-layers auto (default) chooses them by the damage their removal does to the
                  cached teacher distributions (select_layers.py); evenly = evenly spaced, first and last
                  included (DistilBERT, Minitron); or a list. The teacher runs only for that choice.
Then, with --student-quant bitnet, the decoder linears become BitNet b1.58 ternary layers (bitnet.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.errors import DistilyError
from pipeline.manifest import targets_vocab
from pipeline.resolve import resolve_model, tokenizer_fingerprint
from stage_student.students.bitnet import check_student_quant, to_bitnet
from stage_student.students.select_layers import check_init_layers, chosen_layers, distributed, evenly_spaced
from stage_student.students.teacher_weights import TeacherCheckpoint, copy_plan

INITS = ("random", "teacher-layers")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_tokenizer(tokenizer, manifest: dict, where: str) -> None:
    got, want = tokenizer_fingerprint(tokenizer), manifest["tokenizer"]
    if got["sha256"] != want["sha256"] or got["vocab_size"] != want["vocab_size"]:
        raise DistilyError(
            f"the tokenizer of {where} (vocab {got['vocab_size']}, sha256 {got['sha256'][:12]}) is not the "
            f"cache's (vocab {want['vocab_size']}, sha256 {want['sha256'][:12]}): its token ids would not "
            "match the cached teacher distributions. Use a student with the teacher's tokenizer, or distil into "
            "this one with --cross-tokenizer bucket (docs/cross-tokenizer.md)."
        )


def check_head_rows(rows: int, manifest: dict, where: str) -> None:
    """A student (or online teacher) head of any width that covers the token ids of the cache's targets: the losses
    use its first targets_vocab rows (chunked.real_tokens); rows beyond are padding. A narrower one is refused."""
    vocab, tokens = targets_vocab(manifest), manifest["tokenizer"]["vocab_size"]
    if rows >= vocab:
        return
    old = (f" This cache was captured before padded heads were cut: its targets range over the teacher's whole "
           f"{vocab}-row head. Recapture it with this version to cover the tokenizer's {tokens} tokens only."
           if vocab > tokens else "")
    raise DistilyError(
        f"{where} has an LM head of {rows} rows (vocab_size), fewer than the {vocab} token ids of the cache's targets: "
        f"it cannot produce tokens {rows}..{vocab - 1}. Use a model whose vocab_size is at least {vocab} (e.g. "
        f"model.resize_token_embeddings({vocab}) and save it); a wider head (padding rows) is fine.{old}")


def student_depth(cfg: TrainConfig, reader: CacheReader) -> int:
    """The student's layer count, known before any weights are loaded (for early config checks)."""
    if cfg.student:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model(cfg.student)[0]).num_hidden_layers
    teacher_layers = reader.manifest["teacher"]["num_hidden_layers"]
    return cfg.student_layers or (cfg.student_config or {}).get("num_hidden_layers") or max(1, teacher_layers // 2)


@dataclass
class StudentPlan:
    """What the student will be, decided before any of its weights exist (printed into run_config.json).

    path: the --student model dir, or None for a recipe derived from the teacher's config (`config`).
    teacher_layers: the teacher layer each student layer starts from (--init teacher-layers), else None.
    """
    depth: int
    tokenizer_dir: str
    info: dict
    path: str | None = None
    config: dict | None = None
    teacher_layers: list[int] | None = None


def plan_student(cfg: TrainConfig, reader: CacheReader) -> StudentPlan:
    """Check the student's options against the cache and decide its shape and, for --init-layers auto, its layers
    (the one step here that reads the teacher: select_layers.py)."""
    from transformers import AutoConfig

    check_student_quant(cfg.student_quant)
    manifest = reader.manifest
    if cfg.init not in INITS:
        raise DistilyError(f"--init {cfg.init!r} is unknown; choose one of {', '.join(INITS)}")
    if cfg.student:
        path, _ = resolve_model(cfg.student)
        has_tokenizer = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tokenizer_dir = path if has_tokenizer else reader.tokenizer_dir()
        config = AutoConfig.from_pretrained(path)
        if cfg.cross_tokenizer == "none":  # else its own tokenizer and head (cross_tokenizer.py)
            check_tokenizer(load_tokenizer(tokenizer_dir), manifest, f"--student {cfg.student}")
            check_head_rows(config.vocab_size, manifest, f"--student {cfg.student}")
        return StudentPlan(config.num_hidden_layers, str(tokenizer_dir), {"student": cfg.student, "init": "pretrained"},
                           path=str(path))
    tokenizer_dir = reader.tokenizer_dir()  # once: a remote cache's is fetched into a temporary dir
    check_tokenizer(load_tokenizer(tokenizer_dir), manifest, "the cache's tokenizer dir")
    n_student, n_teacher = student_depth(cfg, reader), manifest["teacher"]["num_hidden_layers"]
    config = recipe_config(cfg, reader.teacher_config(), n_student)
    overrides = {k: v for k, v in (cfg.student_config or {}).items() if k != "num_hidden_layers"}
    info = {"recipe": {"num_hidden_layers": n_student, **overrides}, "init": cfg.init}
    layers = None
    if cfg.init == "teacher-layers":
        check_init_layers(cfg.init_layers, n_student, n_teacher, reader.num_sequences - cfg.eval_sequences, cfg.select_sequences)
        layers, selection = chosen_layers(cfg, reader, load_teacher(cfg, manifest), n_student)
        info["teacher_layers"] = layers
        if selection:
            info["layer_selection"] = selection
    # per-layer settings (e.g. layer_types: sliding or full attention) follow the teacher layers kept
    kept = layers or evenly_spaced(n_student, n_teacher)
    for key, value in config.items():
        if isinstance(value, list) and len(value) == n_teacher and key not in (cfg.student_config or {}):
            config[key] = [value[l] for l in kept]
    check_head_rows(AutoConfig.for_model(**config).vocab_size, manifest, "the student recipe (--student-config)")
    return StudentPlan(n_student, str(tokenizer_dir), info, config=config, teacher_layers=layers)


def recipe_config(cfg: TrainConfig, teacher_cfg: dict, n_student: int) -> dict:
    """The teacher's config with the student's depth and the --student-config overrides, as a dict."""
    from transformers import AutoConfig

    overrides = dict(cfg.student_config or {})
    overrides.pop("num_hidden_layers", None)
    config = {k: v for k, v in teacher_cfg.items() if k not in ("architectures", "_name_or_path", "transformers_version")}
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise DistilyError(f"--student-config keys {unknown} are not in the teacher's {teacher_cfg['model_type']} config")
    depth_key = type(AutoConfig.for_model(teacher_cfg["model_type"])).attribute_map.get("num_hidden_layers", "num_hidden_layers")
    return {**config, **overrides, depth_key: n_student}  # n_layer for GPT-2


def build_student(cfg: TrainConfig, reader: CacheReader, plan: StudentPlan | None = None):
    """(model, tokenizer, info) of the student `plan` describes (planned here when not given)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    plan = plan or plan_student(cfg, reader)
    tokenizer, info = load_tokenizer(plan.tokenizer_dir), dict(plan.info)
    if plan.path:
        model = AutoModelForCausalLM.from_pretrained(plan.path, dtype=torch.float32)
        return model, tokenizer, quantize(model, cfg, info)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plan.config), dtype=torch.float32)
    if plan.teacher_layers is not None:
        copy_teacher_layers(model, load_teacher(cfg, reader.manifest), plan.teacher_layers, cfg.copy_embeddings)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        info["frozen"] = "embeddings"
    return model, tokenizer, quantize(model, cfg, info)


def quantize(model, cfg: TrainConfig, info: dict) -> dict:
    """--student-quant bitnet: the built (and teacher-initialised) student's decoder linears become ternary;
    --int8-training: they compute their matmuls in int8 instead."""
    if cfg.student_quant == "bitnet":
        info["quant"] = {"kind": "bitnet", "modules": len(to_bitnet(model))}
    if cfg.int8_training:  # int8 matmuls, float weights (int8.py); imported here: torchao takes seconds to import
        from stage_student.students.int8 import to_int8_training

        info["int8_training"] = {"modules": len(to_int8_training(model))}
    return info


def load_teacher(cfg: TrainConfig, manifest: dict) -> TeacherCheckpoint:
    """The teacher's weights, read lazily by name (teacher_weights.py): --init teacher-layers copies only the kept
    layers' tensors, and --init-layers auto streams one layer at a time; the whole teacher is never in memory."""
    path = Path(resolve_model(cfg.teacher)[0] if cfg.teacher else manifest["teacher"]["path"])  # a .gguf converts once
    if not (path / "config.json").exists():
        raise DistilyError(
            f"--init teacher-layers reads the teacher's weights, but {path} is not a model dir. "
            "Pass --teacher DIR (the teacher model dir), or use --init random."
        )
    return TeacherCheckpoint(path)


def copy_teacher_layers(model, weights, layers: list[int], copy_embeddings: bool) -> None:
    """Student layer i <- teacher layer layers[i]; non-layer weights (embeddings, norm, head) if asked.

    `weights`: a state dict or a TeacherCheckpoint (read tensor by tensor, cast to the student's dtype as it is
    copied). Shapes are checked on every rank (from the files' headers); under torch.distributed only rank 0 reads
    the tensors: DistributedDataParallel broadcasts rank 0's parameters to the other ranks when it wraps the model.
    """
    own = model.state_dict()
    plan = copy_plan(model, list(weights.keys()), layers, copy_embeddings)
    for s_name, t_name in plan.items():
        shape = tuple(weights.shape(t_name)) if hasattr(weights, "shape") else tuple(weights[t_name].shape)
        if tuple(own[s_name].shape) != shape:
            raise DistilyError(
                f"--init teacher-layers cannot copy {s_name}: teacher {shape} vs student "
                f"{tuple(own[s_name].shape)}. A narrower student needs --init random."
            )
    if distributed() and torch.distributed.get_rank() != 0:
        return  # DDP broadcasts rank 0's weights when it wraps the model
    by_source: dict[str, list[str]] = {}
    for s_name, t_name in plan.items():
        by_source.setdefault(t_name, []).append(s_name)
    with torch.no_grad():
        for t_name, s_names in by_source.items():  # one read per teacher tensor, even where two layers copy it
            tensor = weights[t_name]
            for s_name in s_names:
                own[s_name].copy_(tensor)


def describe(model) -> dict:
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": json.loads(model.config.to_json_string()),
    }


class StudentForward(torch.nn.Module):
    """The student up to what the loss needs, so the LM head can run inside the chunked loss (chunked.py).

    fuse=True: returns the final (normed) hidden states; the head's weight and bias go to the loss.
    fuse=False (--loss-chunk-size 0, or a head that is not one plain linear layer, e.g. logit soft-capping):
    returns the logits. Either way also the per-layer hidden states when asked (hidden-state losses).
    """

    def __init__(self, model, fuse: bool):
        super().__init__()
        self.model = model
        self.fuse = fuse and can_fuse_head(model)

    def forward(self, input_ids, output_hidden_states: bool = False):
        if self.fuse:
            out = self.model.get_decoder()(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=False)
            return out.last_hidden_state, out.hidden_states
        out = self.model(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=False)
        return out.logits, out.hidden_states

    def head(self):
        """(weight, bias) of the LM head when fused, else (None, None): the forward's output is already logits."""
        if not self.fuse:
            return None, None
        head = self.model.get_output_embeddings()
        return head.weight, head.bias


def can_fuse_head(model) -> bool:
    """True when logits = final hidden @ W^T (+ b) exactly: a plain linear head, no soft-capping or scaling."""
    config = model.config
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
    return isinstance(model.get_output_embeddings(), torch.nn.Linear) and not scaled
