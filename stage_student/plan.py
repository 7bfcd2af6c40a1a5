"""What a run needs, resolved once from the config and the cache's manifest, before any weights are loaded.

`plan_run(cfg)` checks every option, opens the cache, and decides the KD targets, the student (shape, tokenizer,
the teacher layers it starts from: students/build.py), the layer pairs of the hidden-state and attention losses, the
relation heads and the train/eval split. The result, a `RunPlan`, is a plain dataclass: print it, test it, and build
the run's parts from it (train.py). Bad input is refused here, with what to do, before anything expensive runs;
choosing the student's layers, the one expensive step, runs after every check that needs only the options and the
manifest (the relation heads' widths, known once the student is planned, are checked after it).

    from pipeline.config import TrainConfig
    from stage_student.plan import plan_run
    print(plan_run(TrainConfig(cache="runs/demo/cache", output="/tmp/student")))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, DistilyError
from pipeline.manifest import targets_vocab
from pipeline.qkv import qkv_widths
from pipeline.resolve import resolve_model
from stage_student.losses import attention
from stage_student.losses.balance import BALANCES
from stage_student.losses.hidden import check_hidden_options
from stage_student.losses.kd import SAMPLED_LOSSES, TEMPERATURE_WITH_BUCKET, check_loss_name
from stage_student.students.bitnet import check_student_quant
from stage_student.students.build import StudentPlan, check_head_rows, check_tokenizer, plan_student, student_depth
from stage_student.students.layer_map import MAPPERS, map_layers, required_teacher_layers
from stage_student.training import cross_tokenizer
from stage_student.training.data import split_eval
from stage_student.training.optim import OPTIMIZERS, SCHEDULES
from stage_student.training.parallel import FSDP_OPTIMIZERS, PARALLEL, init_distributed


@dataclass
class RunPlan:
    """Everything a run decided before building anything. pairs / attn_pairs: (student layer, [teacher layers])
    of the hidden-state and attention losses; kd_targets: topk or sampled, what the KD loss reads."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    bf16: bool
    kd: bool
    kd_targets: str
    gamma: float
    student: StudentPlan
    pairs: list = field(default_factory=list)
    attn_pairs: list = field(default_factory=list)
    relation_heads: int = 0
    train_pairs: list = field(default_factory=list, repr=False)
    eval_pairs: list = field(default_factory=list, repr=False)
    reader: CacheReader | None = field(default=None, repr=False)

    @property
    def manifest(self) -> dict:
        return self.reader.manifest


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Check, resolve and decide everything a run needs (see the module's docstring)."""
    validate(cfg)
    rank, world, device = init_distributed()
    if cfg.loss_balance != "none" and world > 1:
        raise ConfigError(f"--loss-balance {cfg.loss_balance} runs on one process: its per-loss gradients bypass "
                          "DDP/FSDP's gradient reduction. Use --loss-balance none under torchrun.")
    reader = open_cache(cfg.cache)
    manifest = reader.manifest
    kd_on = cfg.loss != "ce" and cfg.kd_weight > 0
    check_graded(cfg, manifest["capture"], manifest["dataset"], kd_on)
    kd_targets = "token" if cfg.loss == "token_reverse_kl" else resolve_kd_targets(cfg, reader.targets, kd_on)
    check_draws_per_epoch(cfg, manifest["capture"])
    check_top_k(cfg, reader, kd_targets)
    depth = student_depth(cfg, reader)  # the pairs of mappers other than `copied`, checked before the selection
    pairs, attn_pairs = hidden_pairs(cfg, depth, reader), attention_pairs(cfg, depth, reader)
    if cfg.online_teacher:  # may download or convert it: after the cheap checks
        check_online_teacher(cfg.online_teacher, manifest)
    student = plan_student(cfg, reader)
    pairs = pairs or hidden_pairs(cfg, student.depth, reader, student)  # `copied`: known once the layers are chosen
    attn_pairs = attn_pairs or attention_pairs(cfg, student.depth, reader, student)
    train_pairs, eval_pairs = split_eval(manifest["shards"], cfg.eval_sequences)
    gamma = cfg.cakld_gamma if cfg.cakld_gamma is not None else manifest.get("stats", {}).get("mean_target_prob", 0.5)
    return RunPlan(cfg, rank, world, device, cfg.bf16 if cfg.bf16 is not None else device.type == "cuda", kd_on,
                   kd_targets, gamma, student, pairs, attn_pairs, relation_heads(cfg, attn_pairs, student, manifest),
                   train_pairs, eval_pairs, reader)


def open_cache(path: str) -> CacheReader:
    reader = CacheReader(path)
    if not reader.manifest.get("complete", True) or not reader.manifest["shards"]:
        raise DistilyError(f"the cache {path} is empty or unfinished; rerun `distily teacher-cache` to complete it")
    reader.check_files()
    return reader


def validate(cfg: TrainConfig) -> None:
    """Every name and number checked before the cache or a model is touched."""
    check_loss_name(cfg.loss, cfg.tail)
    check_hidden_options(cfg.hs_loss, cfg.hs_norm, cfg.projector)
    for flag, mapper in (("--layer-mapper", cfg.layer_mapper), ("--attn-layer-mapper", cfg.attn_layer_mapper)):
        if mapper not in MAPPERS:
            raise ConfigError(f"{flag} {mapper!r} is unknown; choose one of {', '.join(MAPPERS)}")
    attention.check_attn_options(cfg.attn_loss, cfg.attn_relation_loss, cfg.relation_weights)
    check_student_quant(cfg.student_quant)
    if cfg.int8_training and cfg.student_quant != "none":
        raise ConfigError(f"--int8-training cannot run with --student-quant {cfg.student_quant}: those decoder linears "
                          "already quantise their own forward (ternary weights, int8 activations). Drop one of the two.")
    cross_tokenizer.check_cross_options(cfg)
    if cfg.attn_loss != "none" and cfg.gradient_checkpointing:
        raise ConfigError("--attn-loss reads the student's Q/K/V from its forward, which --gradient-checkpointing "
                          "recomputes without them: drop one of the two")
    for flag, value, choices in (("--optimizer", cfg.optimizer, OPTIMIZERS), ("--loss-balance", cfg.loss_balance, BALANCES),
                                 ("--parallel", cfg.parallel, PARALLEL), ("--lr-schedule", cfg.lr_schedule, SCHEDULES),
                                 ("--kd-targets", cfg.kd_targets, ("auto", "topk", "sampled"))):
        if value not in choices:
            raise ConfigError(f"{flag} {value!r} is unknown; choose one of {', '.join(choices)}")
    validate_numbers(cfg)
    if cfg.loss_balance != "none" and not ((cfg.hs_weight > 0 or cfg.attn_loss != "none")
                                           and (cfg.kd_weight > 0 and cfg.loss != "ce" or cfg.ce_weight > 0 or cfg.loss == "ce")):
        raise ConfigError(f"--loss-balance {cfg.loss_balance} balances an auxiliary loss (--hs-weight > 0 or --attn-loss) "
                          "against the logit loss (KD or CE): this run lacks one of the two")
    if cfg.parallel == "fsdp" and cfg.optimizer not in FSDP_OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer} cannot run with --parallel fsdp: bitsandbytes' optimizers do not "
                          "accept FSDP's DTensor shards (they fail with 'mixed torch.Tensor and DTensor'). Use "
                          f"--optimizer {' or '.join(FSDP_OPTIMIZERS)} (torchao's 8-bit AdamW, sharded like the weights), "
                          "or --parallel ddp.")
    if cfg.online_teacher and (cfg.tail != "bucket" or cfg.kd_top_k):
        raise ConfigError("--online-teacher uses the full vocabulary: --tail and --kd-top-k do not apply")


def validate_numbers(cfg: TrainConfig) -> None:
    """The numeric options' ranges."""
    if cfg.embedding_noise < 0:
        raise ConfigError(f"--embedding-noise {cfg.embedding_noise} must be >= 0 (NEFTune's alpha; 0: off)")
    if cfg.gradient_noise < 0:
        raise ConfigError(f"--gradient-noise {cfg.gradient_noise} must be >= 0 (the noise's norm over the gradient's; 0: off)")
    if cfg.temperature <= 0:
        raise ConfigError("--temperature must be > 0")
    if not 0 <= cfg.beta <= 1:
        raise ConfigError(f"--beta {cfg.beta} must be in [0, 1] (JSD's mixture weight, skew KL's alpha)")
    if cfg.loss_chunk_size < 0:
        raise ConfigError("--loss-chunk-size must be >= 0 (0: the full-logits reference loss)")
    if cfg.kd_top_k is not None and cfg.kd_top_k < 1:
        raise ConfigError("--kd-top-k must be >= 1")
    for name in ("batch_size", "grad_accum", "max_steps", "save_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


def resolve_kd_targets(cfg: TrainConfig, cached: str, kd_on: bool) -> str:
    """topk or sampled: what the KD loss reads from a cache holding `cached` (schema.TARGETS). Samples with exact
    probabilities (sampled-exact) are read as samples: the reader has turned them into weights."""
    want = cfg.kd_targets
    readable = {"topk": ("topk",), "sampled": ("sampled",), "both": ("topk", "sampled"), "sampled-exact": ("sampled",)}
    if cached not in readable:
        raise DistilyError(f"the cache holds {cached!r} targets, which this version of distily cannot train from (it "
                           f"reads {', '.join(readable)}): upgrade distily, or capture again with `distily teacher-cache "
                           "--targets sampled-exact` (or topk)")
    has = readable[cached]
    if want == "auto":
        want = "sampled" if "topk" not in has else "topk"
    if want not in has:
        raise DistilyError(f"--kd-targets {want}: the cache holds {cached} targets only. Use --kd-targets {has[0]}, or "
                           f"capture with `distily teacher-cache --targets {want}` (or both).")
    if want == "sampled" and kd_on and not cfg.online_teacher:
        if cfg.loss not in SAMPLED_LOSSES:
            raise DistilyError(f"--loss {cfg.loss} is not defined on sampled targets (this cache: {cached}), whose estimate "
                               "is unbiased only for losses linear in the teacher's distribution: use --loss "
                               f"{' or '.join(SAMPLED_LOSSES)}" + (", or --kd-targets topk" if cached == "both" else
                               ", or capture with `distily teacher-cache --targets topk`"))
        if cfg.temperature != 1.0 or cfg.kd_top_k:
            raise DistilyError("--temperature and --kd-top-k apply to top-k targets; sampled targets are drawn from the "
                               "teacher's distribution (set the draw temperature with teacher-cache --sample-temperature)")
    return want


def check_graded(cfg: TrainConfig, capture: dict, dataset: dict, kd_on: bool) -> None:
    """--loss token_reverse_kl reads a graded cache (the student's own samples: docs/on-policy.md); a graded cache
    trains with any loss (at the written positions only), but not across tokenizers."""
    graded = bool(capture.get("graded"))
    if cfg.loss == "token_reverse_kl":
        if dataset.get("generated", {}).get("params", {}).get("corpus_fraction", 0) > 0:
            raise ConfigError("--loss token_reverse_kl holds on the student's own samples, and this graded cache also "
                              "holds documents' own text (generate --corpus-fraction): use --loss forward_kl")
        if not graded:
            raise ConfigError("--loss token_reverse_kl estimates the reverse KL on tokens the student sampled itself: it "
                              "needs a graded cache (`distily generate --teacher STUDENT`, then `distily teacher-cache "
                              "--dataset THAT_DIR --graded`; `distily on-policy` runs both). Use --loss forward_kl on "
                              "this cache")
        if cfg.online_teacher or cfg.kd_targets != "auto" or cfg.kd_top_k or not kd_on:
            raise ConfigError("--loss token_reverse_kl reads the cached teacher log-prob of each written token: drop "
                              "--online-teacher, --kd-targets and --kd-top-k, and keep --kd-weight above 0")
        if cfg.temperature != 1.0:
            raise ConfigError("--loss token_reverse_kl estimates KL(q || p) at temperature 1, the one the student "
                              f"sampled at: drop --temperature {cfg.temperature}")
    if graded and cfg.cross_tokenizer != "none":
        raise ConfigError("a graded cache (on-policy data) trains students of the cache's tokenizer only: drop "
                          "--cross-tokenizer")


def check_draws_per_epoch(cfg: TrainConfig, capture: dict) -> None:
    """--draws-per-epoch needs a sampled-exact cache drawn at t = 1, and fewer draws than it holds."""
    if not cfg.draws_per_epoch:
        return
    if capture.get("targets") != "sampled-exact" or float(capture.get("sample_temperature", 1.0)) != 1.0:
        raise DistilyError(f"--draws-per-epoch takes a subset of a sampled-exact cache's draws (at --sample-temperature 1); "
                           f"this cache holds {capture.get('targets', 'topk')} targets")
    if not 1 <= cfg.draws_per_epoch < int(capture["samples"]):
        raise DistilyError(f"--draws-per-epoch {cfg.draws_per_epoch} must be between 1 and the cache's {capture['samples']} "
                           "draws less one (0: every draw, every epoch)")


def check_top_k(cfg: TrainConfig, reader: CacheReader, kd_targets: str) -> None:
    """--kd-top-k within the cached k; --temperature with the rest bucket only where the top-k is the whole vocab."""
    if kd_targets != "topk":
        return
    if cfg.kd_top_k and cfg.kd_top_k > reader.top_k:
        raise DistilyError(f"--kd-top-k {cfg.kd_top_k} is more than the cache holds (top-{reader.top_k})")
    k = cfg.kd_top_k or reader.top_k
    if cfg.temperature != 1.0 and cfg.tail == "bucket" and not cfg.online_teacher and cfg.loss != "ce" \
            and k < targets_vocab(reader.manifest):
        raise DistilyError(TEMPERATURE_WITH_BUCKET)


def check_online_teacher(path: str, manifest: dict) -> None:
    """--online-teacher must speak the cache's tokenizer and its head cover the cache's tokens (padding rows beyond
    them are cut from its logits in the loss, as the capture cut them)."""
    from transformers import AutoConfig, AutoTokenizer

    local, _ = resolve_model(path)
    check_tokenizer(AutoTokenizer.from_pretrained(local), manifest, f"--online-teacher {path}")
    check_head_rows(AutoConfig.from_pretrained(local).vocab_size, manifest, f"--online-teacher {path}")


def hidden_pairs(cfg: TrainConfig, n_student: int, reader: CacheReader, student: StudentPlan | None = None) -> list:
    """(student layer, [teacher layers]) of the hidden-state loss, checked against the cached hidden layers. With
    --layer-mapper copied they follow the student's layers, known once `student` is planned ([] until then)."""
    if cfg.hs_weight <= 0 or (cfg.layer_mapper == "copied") != (student is not None):
        return []
    pairs = mapped(cfg.layer_mapper, n_student, reader, cfg.layer_mapper_k, student)
    check_cached(cfg, pairs, reader.hidden_layers, f"--layer-mapper {cfg.layer_mapper} needs teacher hidden layers",
                 "--hidden-layers", "")
    return pairs


def attention_pairs(cfg: TrainConfig, n_student: int, reader: CacheReader, student: StudentPlan | None = None) -> list:
    """The same for the attention loss, checked against the cached Q/K/V layers."""
    if cfg.attn_loss == "none" or (cfg.attn_layer_mapper == "copied") != (student is not None):
        return []
    pairs = mapped(cfg.attn_layer_mapper, n_student, reader, cfg.layer_mapper_k, student)
    check_cached(cfg, pairs, reader.qkv_layers, f"--attn-loss {cfg.attn_loss} with --attn-layer-mapper "
                 f"{cfg.attn_layer_mapper} needs the teacher's Q/K/V of layers", "--qkv-layers",
                 ", or pick another --attn-layer-mapper")
    return pairs


def mapped(mapper: str, n_student: int, reader: CacheReader, k: int, student: StudentPlan | None) -> list:
    n_teacher = reader.manifest["teacher"]["num_hidden_layers"]
    if student is not None:
        return map_layers("copied", n_student, n_teacher, copied_from=student.teacher_layers)
    return map_layers(mapper, n_student, n_teacher, k)


def check_cached(cfg: TrainConfig, pairs, cached: list[int], what: str, capture_flag: str, advice: str) -> None:
    """The teacher layers `pairs` map to are in the cache (or come from --online-teacher), else what to capture."""
    need = required_teacher_layers(pairs)
    missing = sorted(set(need) - set(cached))
    if missing and cfg.online_teacher is None:
        raise DistilyError(f"{what} {need}, but the cache holds {cached or 'none'} (missing {missing}). Capture them "
                           f"with `distily teacher-cache {capture_flag} {','.join(map(str, need))}`{advice}.")


def relation_heads(cfg: TrainConfig, attn_pairs: list, student: StudentPlan, manifest: dict) -> int:
    """The attention heads the relation loss splits Q/K/V into (--relation-heads, else the most that divide every
    width); 0 without --attn-loss."""
    if not attn_pairs:
        return 0
    s_widths, t_widths = qkv_widths(student_config(student)), teacher_qkv_widths(cfg, manifest)
    heads = cfg.relation_heads or attention.auto_relation_heads(s_widths, t_widths)
    if cfg.attn_loss == "mha_relation":
        attention.check_relation_heads(heads, s_widths, t_widths)
    return heads


def teacher_qkv_widths(cfg: TrainConfig, manifest: dict) -> dict:
    """The teacher's Q/K/V widths: from the capture, or from the --online-teacher's config."""
    from transformers import AutoConfig

    return manifest["capture"].get("qkv") or qkv_widths(AutoConfig.from_pretrained(resolve_model(cfg.online_teacher)[0]))


def student_config(student: StudentPlan):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(student.path) if student.path else AutoConfig.for_model(**student.config)
