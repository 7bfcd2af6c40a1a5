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
import re
from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.errors import DistilyError
from pipeline.resolve import resolve_model, tokenizer_fingerprint

from .bitnet import check_student_quant, to_bitnet
from .select_layers import check_init_layers, chosen_layers, evenly_spaced, layer_list_name

INITS = ("random", "teacher-layers")


def load_tokenizer(reader: CacheReader):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reader.tokenizer_dir())


def check_tokenizer(tokenizer, manifest: dict, where: str) -> None:
    got, want = tokenizer_fingerprint(tokenizer), manifest["tokenizer"]
    if got["sha256"] != want["sha256"] or got["vocab_size"] != want["vocab_size"]:
        raise DistilyError(
            f"the tokenizer of {where} (vocab {got['vocab_size']}, sha256 {got['sha256'][:12]}) is not the "
            f"cache's (vocab {want['vocab_size']}, sha256 {want['sha256'][:12]}): its token ids would not "
            "match the cached teacher distributions. Use a student with the teacher's tokenizer."
        )


def student_depth(cfg: TrainConfig, reader: CacheReader) -> int:
    """The student's layer count, known before any weights are loaded (for early config checks)."""
    if cfg.student:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_model(cfg.student)[0]).num_hidden_layers
    teacher_layers = reader.manifest["teacher"]["num_hidden_layers"]
    return cfg.student_layers or (cfg.student_config or {}).get("num_hidden_layers") or max(1, teacher_layers // 2)


def build_student(cfg: TrainConfig, reader: CacheReader):
    """Return (model, tokenizer, info dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_student_quant(cfg.student_quant)
    manifest = reader.manifest
    vocab = manifest["teacher"]["vocab_size"]
    if cfg.init not in INITS:
        raise DistilyError(f"--init {cfg.init!r} is unknown; choose one of {', '.join(INITS)}")
    if cfg.student:
        path, _ = resolve_model(cfg.student)
        has_tokenizer = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else load_tokenizer(reader)
        check_tokenizer(tokenizer, manifest, f"--student {cfg.student}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if model.config.vocab_size != vocab:
            raise DistilyError(f"--student {cfg.student} has vocab_size {model.config.vocab_size}, the cache's teacher {vocab}")
        return model, tokenizer, quantize(model, cfg, {"student": cfg.student, "init": "pretrained"})

    tokenizer = load_tokenizer(reader)
    check_tokenizer(tokenizer, manifest, "the cache's tokenizer dir")
    teacher_cfg = reader.teacher_config()
    n_teacher = manifest["teacher"]["num_hidden_layers"]
    overrides = dict(cfg.student_config or {})
    overrides.pop("num_hidden_layers", None)
    n_student = student_depth(cfg, reader)
    student_cfg = {k: v for k, v in teacher_cfg.items() if k not in ("architectures", "_name_or_path", "transformers_version")}
    unknown = sorted(set(overrides) - set(student_cfg))
    if unknown:
        raise DistilyError(f"--student-config keys {unknown} are not in the teacher's {teacher_cfg['model_type']} config")
    info = {"recipe": {"num_hidden_layers": n_student, **overrides}, "init": cfg.init}
    teacher, layers = None, evenly_spaced(n_student, n_teacher)
    if cfg.init == "teacher-layers":
        check_init_layers(cfg.init_layers, n_student, n_teacher, reader.num_sequences - cfg.eval_sequences, cfg.select_sequences)
        teacher = load_teacher(cfg, manifest)
        layers, selection = chosen_layers(cfg, reader, teacher, n_student)
        info["teacher_layers"] = layers
        if selection:
            info["layer_selection"] = selection
    # per-layer settings (e.g. layer_types: sliding or full attention) follow the teacher layers kept
    for key, value in student_cfg.items():
        if isinstance(value, list) and len(value) == n_teacher and key not in overrides:
            student_cfg[key] = [value[l] for l in layers]
    depth_key = type(AutoConfig.for_model(teacher_cfg["model_type"])).attribute_map.get("num_hidden_layers", "num_hidden_layers")
    student_cfg.update(overrides, **{depth_key: n_student})  # n_layer for GPT-2
    config = AutoConfig.for_model(**student_cfg)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if teacher is not None:
        copy_teacher_layers(model, teacher.state_dict(), layers, cfg.copy_embeddings)
        del teacher
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        info["frozen"] = "embeddings"
    return model, tokenizer, quantize(model, cfg, info)


def quantize(model, cfg: TrainConfig, info: dict) -> dict:
    """--student-quant bitnet: the built (and teacher-initialised) student's decoder linears become ternary."""
    if cfg.student_quant == "bitnet":
        info["quant"] = {"kind": "bitnet", "modules": len(to_bitnet(model))}
    return info


def load_teacher(cfg: TrainConfig, manifest: dict, dtype=torch.float32):
    """The teacher model (its weights seed --init teacher-layers; it also runs for --init-layers auto)."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.teacher or manifest["teacher"]["path"])
    if not (path / "config.json").exists():
        raise DistilyError(
            f"--init teacher-layers reads the teacher's weights, but {path} is not a model dir. "
            "Pass --teacher DIR (the teacher model dir), or use --init random."
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def copy_teacher_layers(model, weights: dict[str, torch.Tensor], layers: list[int], copy_embeddings: bool) -> None:
    """Student layer i <- teacher layer layers[i]; non-layer weights (embeddings, norm, head) if asked."""
    own = model.state_dict()
    prefix = layer_list_name(model)
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    new = {}
    for name, tensor in weights.items():
        m = layer_key.search(name)
        if m:
            t_layer = int(m.group(1))
            for s_layer, src in enumerate(layers):
                if src == t_layer:
                    new[layer_key.sub(f"{prefix}.{s_layer}.", name, count=1)] = tensor
        elif copy_embeddings:
            new[name] = tensor
    head = next((f"{n}.weight" for n, mod in model.named_modules() if mod is model.get_output_embeddings()), None)
    embed = next((f"{n}.weight" for n, mod in model.named_modules() if mod is model.get_input_embeddings()), None)
    if copy_embeddings and head in own and head not in new and embed in new:
        new[head] = new[embed]  # a tied teacher stores no separate LM head
    for name, tensor in new.items():
        if name not in own:
            continue
        if own[name].shape != tensor.shape:
            raise DistilyError(
                f"--init teacher-layers cannot copy {name}: teacher {tuple(tensor.shape)} vs student "
                f"{tuple(own[name].shape)}. A narrower student needs --init random."
            )
    missing = [n for n in own if n not in new and layer_key.search(n)]
    if missing:
        raise DistilyError(f"--init teacher-layers found no teacher weights for {missing[:3]}...")
    model.load_state_dict({**own, **{k: v for k, v in new.items() if k in own}})


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
