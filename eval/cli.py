"""`distily eval`: its options are the fields of pipeline.config.EvalConfig."""
from __future__ import annotations

import typer

from pipeline.cli import Command
from pipeline.config import EvalConfig


def run(cfg: EvalConfig) -> None:
    from .run import run as evaluate

    summary = evaluate(cfg)
    typer.echo(summary["table"])
    for note in summary["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(f"report: {cfg.output}/eval.md, {cfg.output}/eval.json; plots: {', '.join(summary['plots'])}")
    if summary.get("model_card"):
        typer.echo(f"model card: {summary['model_card']}")


COMMAND = Command("eval", EvalConfig, "eval", run,
                  "Teacher vs student(s): perplexity, bits per byte, lm-eval tasks; a table, plots and a model card.")
