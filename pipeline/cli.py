"""The `distily` command line. Each command builds its config (YAML + flags) and calls one stage.

Stages are imported inside the commands, so `distily inspect` never loads vLLM or torch training code.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from . import config as C
from .errors import DistilyError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Offline two-stage knowledge distillation.")

ConfigOpt = typer.Option(None, "--config", help="YAML file with the options of this command (flags override it).")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


@app.command("teacher-cache")
def teacher_cache(
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Cache directory [runs/cache]."),
    teacher: Optional[str] = typer.Option(None, help="HF model dir or hub id [embedded SmolLM2-135M-Instruct]."),
    dataset: Optional[str] = typer.Option(None, help="txt/jsonl/parquet file, glob, dir or hub id [embedded Lee corpus]."),
    dataset_config: Optional[str] = typer.Option(None, help="Hub dataset config name."),
    split: Optional[str] = typer.Option(None, help="Hub dataset split [train]."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text [text]."),
    top_k: Optional[int] = typer.Option(None, help="Teacher top-k log-probs per position [64]."),
    hidden_layers: Optional[str] = typer.Option(None, help="Comma-separated hidden-state layers, HF numbering (0=embeddings)."),
    hidden_dtype: Optional[str] = typer.Option(None, help="Storage dtype of hidden states: float32|float16|bfloat16."),
    max_seq_len: Optional[int] = typer.Option(None, help="Packed sequence length [512]."),
    max_tokens: Optional[int] = typer.Option(None, help="Capture at most this many dataset tokens."),
    sequences_per_shard: Optional[int] = typer.Option(None, help="Sequences per shard file [64]."),
    num_shards: Optional[int] = typer.Option(None, help="Array jobs: number of jobs [1]."),
    shard_index: Optional[int] = typer.Option(None, help="Array jobs: this job's index [0]."),
    backend: Optional[str] = typer.Option(None, help="vllm (default) or hf (reference)."),
    dtype: Optional[str] = typer.Option(None, help="Teacher compute dtype [float32]."),
    vllm_max_logprobs: Optional[int] = typer.Option(None, help="vLLM's max_logprobs cap [128]."),
    config: Optional[str] = ConfigOpt,
):
    """Run the teacher once over the dataset and write top-k log-probs and hidden states to a cache."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    try:
        overrides["hidden_layers"] = C.parse_int_list(hidden_layers)
        cfg = C.load(C.CaptureConfig, config, "teacher_cache", overrides)
        from stage_teacher.capture import run

        manifest = run(cfg)
    except DistilyError as e:
        _fail(e)
    stats = manifest["stats"]
    typer.echo(f"wrote {stats['tokens']} tokens in {len(manifest['shards'])} shards to {cfg.output}")
    if cfg.backend == "vllm":
        # vLLM's worker threads occasionally abort the interpreter at exit after a successful run:
        # the cache and manifest are on disk, so leave without running their finalisers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command("train-student")
def train_student(
    cache: Optional[str] = typer.Option(None, help="Teacher cache dir or fsspec URL [runs/cache]."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run dir [runs/student]."),
    student: Optional[str] = typer.Option(None, help="Student HF model dir/id; default: a recipe from the teacher config."),
    student_layers: Optional[int] = typer.Option(None, help="Recipe: number of layers [teacher's / 2]."),
    student_config: Optional[str] = typer.Option(None, help='Recipe: JSON config overrides, e.g. \'{"hidden_size": 384}\'.'),
    init: Optional[str] = typer.Option(None, help="random | teacher-layers [teacher-layers]."),
    init_layers: Optional[str] = typer.Option(None, help="auto (chosen from the cache) | evenly | teacher layers (0-based) to copy, e.g. 0,1,2,20 [auto]."),
    select_sequences: Optional[int] = typer.Option(None, help="--init-layers auto: cached sequences to score candidates on [2]."),
    teacher: Optional[str] = typer.Option(None, help="Teacher weights dir for --init teacher-layers [manifest path]."),
    online_teacher: Optional[str] = typer.Option(None, help="Reference only: run this teacher in the loop for full-vocabulary KD."),
    copy_embeddings: Optional[bool] = typer.Option(None, "--copy-embeddings/--no-copy-embeddings", help="Copy teacher embeddings, norm, head."),
    freeze_embeddings: Optional[bool] = typer.Option(None, "--freeze-embeddings/--train-embeddings", help="Freeze input embeddings."),
    loss: Optional[str] = typer.Option(None, help="forward_kl|reverse_kl|jsd|skew_kl|skew_rkl|cakld|tvd|ce [forward_kl]."),
    temperature: Optional[float] = typer.Option(None, help="KD temperature [1.0]."),
    kd_top_k: Optional[int] = typer.Option(None, help="Use only the teacher's top N of the cached top-k [all of them]."),
    tail: Optional[str] = typer.Option(None, help="Teacher tail outside top-k: bucket | renormalize [bucket]."),
    loss_chunk_size: Optional[int] = typer.Option(None, help="Positions per chunk of the fused LM head + KD/CE loss; 0: full logits [1024]."),
    beta: Optional[float] = typer.Option(None, help="JSD beta / skew alpha [0.5]."),
    cakld_gamma: Optional[float] = typer.Option(None, help="CAKLD gamma [teacher mean confidence from the manifest]."),
    kd_weight: Optional[float] = typer.Option(None, help="Weight of the logit KD loss [1.0]."),
    ce_weight: Optional[float] = typer.Option(None, help="Weight of CE on the true next token [0]."),
    hs_weight: Optional[float] = typer.Option(None, help="Weight of the hidden-state loss [0]."),
    hs_loss: Optional[str] = typer.Option(None, help="mse | cosine [mse]."),
    hs_norm: Optional[str] = typer.Option(None, help="none | layernorm | teacher_layernorm [none]."),
    layer_mapper: Optional[str] = typer.Option(None, help="last|uniform|last-k|all|copied|uniform-consecutive|uniform+last [last]."),
    layer_mapper_k: Optional[int] = typer.Option(None, help="k of --layer-mapper last-k [4]."),
    projector: Optional[str] = typer.Option(None, help="auto | none | linear | orthogonal [auto]."),
    optimizer: Optional[str] = typer.Option(None, help="adamw8bit | paged_adamw8bit | lion8bit | adamw [adamw8bit]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [3e-4]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps [10]."),
    lr_schedule: Optional[str] = typer.Option(None, help="cosine | linear | constant [cosine]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch per rank [4]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step [1]."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps [100]; with --resume, a larger value extends the run."),
    save_steps: Optional[int] = typer.Option(None, help="Checkpoint every N steps [50]."),
    logging_steps: Optional[int] = typer.Option(None, help="Log every N steps [10]."),
    eval_steps: Optional[int] = typer.Option(None, help="Held-out eval every N steps [0: at the end only]."),
    eval_sequences: Optional[int] = typer.Option(None, help="Cache sequences held out for eval [16]."),
    seed: Optional[int] = typer.Option(None, help="Seed for init and data order [0]."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers decoding shards [auto: 1 on GPUs, 0 on CPUs without a spare core]."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the student's forward [off]."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the latest checkpoint in --output."),
    stop_after_steps: Optional[int] = typer.Option(None, help="Leave after this step, checkpointed (job time limits)."),
    config: Optional[str] = ConfigOpt,
):
    """Train a student from a teacher cache with an 8-bit optimizer (runs under torchrun unchanged)."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    try:
        overrides["init_layers"] = C.parse_int_list(init_layers, ("auto", "evenly"))
        if student_config is not None:
            overrides["student_config"] = json.loads(student_config)
        cfg = C.load(C.TrainConfig, config, "train_student", overrides)
        from stage_student.train import train

        result = train(cfg)
    except (DistilyError, json.JSONDecodeError) as e:
        _fail(e)
    if result.get("finished"):
        typer.echo(f"student saved to {result['final']}")
    else:
        typer.echo(f"stopped at step {result['step']}; continue with --resume")


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, help="Student (HF model dir) [runs/student/final]."),
    teacher: Optional[str] = typer.Option(None, help="Teacher to compare with [the student's cache teacher]."),
    baseline: Optional[list[str]] = typer.Option(None, help="More models for the table (repeatable), e.g. a CE-only student."),
    dataset: Optional[str] = typer.Option(None, help="Held-out text: txt/jsonl/parquet file, glob or hub id [embedded Lee eval text]."),
    text_column: Optional[str] = typer.Option(None, help="Column holding the text [text]."),
    split: Optional[str] = typer.Option(None, help="Hub dataset split [test]."),
    max_documents: Optional[int] = typer.Option(None, help="Sample size: first N documents."),
    max_seq_len: Optional[int] = typer.Option(None, help="Perplexity window [512]."),
    stride: Optional[int] = typer.Option(None, help="Sliding-window stride [256]."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [4]."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated lm-eval tasks ['distily_offline'; '' for none]."),
    limit: Optional[int] = typer.Option(None, help="lm-eval: at most N examples per task."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Report dir [runs/eval]."),
    config: Optional[str] = ConfigOpt,
):
    """Teacher vs student(s): perplexity, bits per byte, lm-eval tasks; a table, plots and a model card."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    overrides["baseline"] = baseline or None
    overrides["tasks"] = [t for t in tasks.split(",") if t.strip()] if tasks is not None else None
    try:
        cfg = C.load(C.EvalConfig, config, "eval", overrides)
        from eval.run import run

        summary = run(cfg)
    except DistilyError as e:
        _fail(e)
    typer.echo(summary["table"])
    for note in summary["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"report: {cfg.output}/eval.md, {cfg.output}/eval.json; plots: {', '.join(summary['plots'])}")
    if summary.get("model_card"):
        typer.echo(f"model card: {summary['model_card']}")


@app.command("merge-manifests")
def merge_manifests(
    output: str = typer.Argument(..., help="Cache dir that receives manifest.json (and the shards)."),
    parts: list[str] = typer.Argument(None, help="Other dirs where array jobs wrote their parts."),
):
    """Join the part manifests of array jobs (--num-shards/--shard-index) into one cache."""
    from stage_teacher.capture import merge_manifests as merge

    try:
        merged = merge(output, parts or [])
    except DistilyError as e:
        _fail(e)
    typer.echo(f"merged {merged['job']['merged_from']} parts: {len(merged['shards'])} shards, {merged['stats']['tokens']} tokens")


@app.command()
def inspect(cache: str = typer.Argument(..., help="Cache dir or fsspec URL.")):
    """Print what a cache holds: teacher, tokens, k, layers, size, bytes per token."""
    from .cache import CacheReader

    try:
        m = CacheReader(cache).manifest
    except DistilyError as e:
        _fail(e)
    tokens = sum(s["tokens"] for s in m["shards"])
    logit_bytes = sum(s["bytes"] for s in m["shards"])
    hidden_bytes = sum(s.get("hidden_bytes", 0) for s in m["shards"])
    layers = m["capture"]["hidden_layers"]
    rows = [
        ("teacher", f"{m['teacher']['source']} ({m['teacher']['path']})"),
        ("weights sha256", m["teacher"]["weights_sha256"][:16]),
        ("tokenizer", f"sha256 {m['tokenizer']['sha256'][:16]}, vocab {m['tokenizer']['vocab_size']}"),
        ("dataset", json.dumps(m["dataset"]["spec"])),
        ("sequences", f"{sum(s['rows'] for s in m['shards'])} x {m['capture']['max_seq_len']} tokens"),
        ("tokens", f"{tokens}"),
        ("top-k", f"{m['capture']['top_k']} ({m['capture']['backend']}, {m['capture']['dtype']})"),
        ("hidden layers", f"{layers} as {m['capture']['hidden_dtype']}" if layers else "none"),
        ("shards", f"{len(m['shards'])} (complete: {m.get('complete')})"),
        ("size", f"{(logit_bytes + hidden_bytes) / 2**20:.1f} MiB"),
        ("bytes/token logits", f"{logit_bytes / max(tokens, 1):.1f}"),
        ("bytes/token/layer hidden", f"{hidden_bytes / max(tokens, 1) / max(len(layers), 1):.1f}" if layers else "-"),
        ("teacher mean p(target)", f"{m.get('stats', {}).get('mean_target_prob', float('nan')):.4f}"),
        ("distily", m["distily_version"]),
    ]
    for k, v in rows:
        typer.echo(f"{k:>26}  {v}")


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache dir or fsspec URL.")):
    """Check every shard's checksum and schema; name the first bad file."""
    from .cache import CacheReader

    problems = CacheReader(cache).verify()
    if problems:
        for p in problems:
            typer.secho(f"BAD  {p}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK   {cache}: every shard matches its checksum and the schema")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
