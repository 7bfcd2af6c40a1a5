"""`distily teacher-cache`: its options are the fields of pipeline.config.CaptureConfig."""
from __future__ import annotations

import os
import sys

import typer

from pipeline.cli import Command
from pipeline.config import CaptureConfig


def run(cfg: CaptureConfig) -> None:
    from .capture import run as capture

    manifest = capture(cfg)
    typer.echo(f"wrote {manifest['stats']['tokens']} tokens in {len(manifest['shards'])} shards to {cfg.output}")
    if cfg.backend == "vllm":
        # vLLM's worker threads occasionally abort the interpreter at exit after a successful run:
        # the cache and manifest are on disk, so leave without running their finalisers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


COMMAND = Command("teacher-cache", CaptureConfig, "teacher_cache", run,
                  "Run the teacher once over the dataset and write top-k log-probs and hidden states to a cache.")
