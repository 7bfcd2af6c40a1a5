"""`distily teacher-cache`: its options are the fields of pipeline.config.CaptureConfig."""
from __future__ import annotations

import typer

from pipeline.cli import Command, leave
from pipeline.config import CaptureConfig, GenerateConfig


def run(cfg: CaptureConfig) -> None:
    from .capture import run as capture

    manifest = capture(cfg)
    typer.echo(f"wrote {manifest['stats']['tokens']} tokens in {len(manifest['shards'])} shards to {cfg.output}")
    if cfg.backend == "vllm":
        leave()


def generate(cfg: GenerateConfig) -> None:
    from .generate import run as generate_run

    m = generate_run(cfg)
    s = m["stats"]
    rate = s["generated_tokens_per_s"]
    typer.echo(f"wrote {s['sequences']} sequences, {s['tokens']} tokens ({s['mean_tokens']:.0f} per sequence, "
               f"{s['stopped_fraction']:.0%} ended by the teacher) to {cfg.output}"
               + (f"; {rate:.0f} generated tokens/s" if rate else ""))
    typer.echo(f"next: distily teacher-cache --dataset {cfg.output} --max-seq-len N ...")
    leave()



COMMAND = Command("teacher-cache", CaptureConfig, "teacher_cache", run,
                  "Run the teacher once over the dataset and write its targets (sampled ids with exact log-probs by default, or "
                  "top-k), hidden states and Q/K/V to a cache.")
GENERATE = Command("generate", GenerateConfig, "generate", generate,
                   "The teacher writes a dataset under vLLM (synthetic / data-free KD); teacher-cache --dataset reads it.")
