"""`distily train-student` and `distily export`: their options are the fields of pipeline.config.TrainConfig and
ExportConfig."""
from __future__ import annotations

import typer

from pipeline.cli import Command
from pipeline.config import ExportConfig, TrainConfig


def run(cfg: TrainConfig) -> None:
    from stage_student.train import train

    result = train(cfg)
    if result.get("finished"):
        typer.echo(f"student saved to {result['final']}")
    else:
        typer.echo(f"stopped at step {result['step']}; continue with --resume")


COMMAND = Command("train-student", TrainConfig, "train_student", run,
                  "Train a student from a teacher cache with an 8-bit optimizer (runs under torchrun unchanged).")


def run_export(cfg: ExportConfig) -> None:
    from stage_student.export.run import export

    export(cfg, log=typer.echo)


EXPORT = Command("export", ExportConfig, "export", run_export,
                 "Pack a --student-quant bitnet student into 2-bit ternary safetensors that transformers loads.")
