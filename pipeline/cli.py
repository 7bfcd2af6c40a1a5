"""The `distily` command line.

Every option of a command is a field of its config dataclass (pipeline/config.py): the flags, their types,
defaults and `--help` text are generated from the fields here, and YAML files (`--config`) use the same
names, so nothing can drift. The commands that run a stage are declared by the stage itself
(stage_teacher/cli.py, stage_student/cli.py, eval/cli.py as a `Command`) and found through the
`distily.commands` entry points in pyproject.toml: `pipeline` imports nothing from the stages.
"""
from __future__ import annotations

import dataclasses
import inspect as pyinspect
import json
import os
import sys
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

import typer

from . import config as C
from .errors import DistilyError

# Plain click help (rich_markup_mode=None): rich's option table cuts flag names at 80 columns (--tensor-parallel-s...).
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Offline two-stage knowledge distillation.")


@dataclass
class Command:
    """A command that runs `run(cfg)` on the config dataclass `config` (YAML section `section`)."""

    name: str
    config: type
    section: str
    run: Callable[[Any], None]
    help: str


def fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


def flag_type(kind) -> Any:
    """The type typer parses a field's flag as; `config.coerce` then converts it to the field's type."""
    arms = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) in (typing.Union, type(int | str)) else [kind]
    base = arms[0] if len(arms) == 1 else str  # e.g. list[int] | str: given as text
    origin = typing.get_origin(base) or base
    if origin is list and typing.get_args(base) == (str,):
        return Optional[list[str]]  # repeatable
    return Optional[origin] if origin in (bool, int, float) else Optional[str]


def option_for(f: dataclasses.Field, kind) -> pyinspect.Parameter:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = meta.get("shown") or (json.dumps(default) if isinstance(default, (list, dict)) else str(default))
    flag = "--" + f.name.replace("_", "-")
    ftype = flag_type(kind)
    if ftype is Optional[bool]:
        names = [meta.get("flag") or f"{flag}/--no-{flag[2:]}"]
    else:
        names = [flag, *meta.get("names", ())]
    help_text = f"{meta.get('help', '')} Default: {shown}." if shown != "None" else meta.get("help", "")
    if meta.get("positional"):
        default = typer.Argument(None, help=help_text, show_default=False, metavar=f.name.upper())
    else:
        default = typer.Option(None, *names, help=help_text, show_default=False)
    return pyinspect.Parameter(f.name, pyinspect.Parameter.KEYWORD_ONLY, annotation=ftype, default=default)


def add_command(cmd: Command) -> None:
    """Register `cmd` with flags generated from its config dataclass, plus --config YAML."""
    hints = typing.get_type_hints(cmd.config)
    params = [option_for(f, hints[f.name]) for f in dataclasses.fields(cmd.config)]
    params.append(pyinspect.Parameter(
        "config", pyinspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
        default=typer.Option(None, "--config", help="YAML file with the options of this command (flags override it).")))

    def command(**values):
        yaml_path = values.pop("config")
        try:
            cfg = C.load(cmd.config, yaml_path, cmd.section, values)
            cmd.run(cfg)
        except DistilyError as e:
            fail(e)

    command.__signature__ = pyinspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = cmd.help
    command.__name__ = cmd.name.replace("-", "_")
    app.command(cmd.name)(command)


@app.command("merge-manifests")
def merge_manifests(
    output: str = typer.Argument(..., help="Cache dir that receives manifest.json (and the shards)."),
    parts: list[str] = typer.Argument(None, help="Other dirs where array jobs wrote their parts."),
):
    """Join the part manifests of array jobs (--num-shards/--shard-index) into one cache."""
    from .cache_write import merge_manifests as merge

    try:
        merged = merge(output, parts or [])
    except DistilyError as e:
        fail(e)
    typer.echo(f"merged {merged['job']['merged_from']} parts: {len(merged['shards'])} shards, {merged['stats']['tokens']} tokens")


@app.command()
def inspect(cache: str = typer.Argument(..., help="Cache dir or fsspec URL.")):
    """Print what a cache holds: teacher, tokens, k, layers, size, bytes per token."""
    from . import schema
    from .cache import CacheReader

    try:
        m = CacheReader(cache).manifest
    except DistilyError as e:
        fail(e)
    tokens = sum(s["tokens"] for s in m["shards"])
    cap = m["capture"]
    logit_bytes = sum(s["bytes"] for s in m["shards"])
    hidden_bytes = sum(s.get("hidden_bytes", 0) for s in m["shards"])
    qkv_bytes = sum(s.get("hidden_bytes", 0) * s.get("qkv_share", 0.0) for s in m["shards"])
    layers = cap["hidden_layers"]
    targets = cap.get("targets", "topk")
    parts = bytes_per_part(m["shards"])
    per_token = lambda b: f"{b / max(tokens, 1):.1f}"  # noqa: E731
    stats = m.get("stats", {})
    rows = [
        ("teacher", f"{m['teacher']['source']} ({m['teacher']['path']})"),
        ("weights sha256", m["teacher"]["weights_sha256"][:16]),
        ("tokenizer", f"sha256 {m['tokenizer']['sha256'][:16]}, vocab {m['tokenizer']['vocab_size']}"),
        ("dataset", json.dumps(m["dataset"]["spec"])),
        *([("generated", "by `distily generate --generator {generator}`, seed {seed}".format(**m["dataset"]["generated"]))]
          if m["dataset"].get("generated") else []),
        ("sequences", f"{sum(s['rows'] for s in m['shards'])} x {cap['max_seq_len']} tokens"),
        ("tokens", f"{tokens}"),
        ("format", f"version {m['format_version']}"),
        ("targets", f"{targets} ({cap['backend']}{', ' + cap['targets_from'] if cap.get('targets_from') else ''}, {cap['dtype']})"),
    ]
    if targets in ("topk", "both"):
        rows.append(("top-k", f"{cap['top_k']} as {cap.get('logprob_dtype', 'float32')} log-probs"))
    if targets in ("sampled", "both", "sampled-exact"):
        exact = (" with exact log-probs" + ("" if schema.tail_logprobs_of(cap) else " above 1/N (below: weight 1/N, exact H)")
                 + ", + the true next token") if targets == "sampled-exact" else ""
        rows.append(("samples", f"{cap['samples']} {schema.sampling_of(cap)} draws/position at "
                                f"t={cap['sample_temperature']}, seed {cap['sample_seed']}{exact}; "
                                f"{stats.get('mean_unique_samples', float('nan')):.1f} unique ids/position"))
    if cap.get("graded"):
        rows.append(("graded", "on-policy data: one generated sequence per row, the loss on the written tokens only"
                               + (", with the writer's log-probs" if cap.get("behaviour_logprobs") else "")))
    rows += [
        ("hidden layers", f"{layers} as {cap['hidden_dtype']}" if layers else "none"),
        *([("qkv layers", "{} as {} (widths q {}, k {}, v {}; before RoPE)".format(
            cap["qkv_layers"], cap["hidden_dtype"], *(cap["qkv"][x]["width"] for x in "qkv")))] if cap.get("qkv_layers") else []),
        ("shards", f"{len(m['shards'])} (complete: {m.get('complete')})"),
        ("size", f"{(logit_bytes + hidden_bytes) / 2**20:.1f} MiB"),
        ("bytes/token targets", per_token(logit_bytes) + (
            "  (" + ", ".join(f"{name} {per_token(b)}" for name, b in parts.items()) + ")" if parts else "")),
        ("bytes/token/layer hidden", f"{(hidden_bytes - qkv_bytes) / max(tokens, 1) / max(len(layers), 1):.1f}" if layers else "-"),
        *([("bytes/token/layer qkv", f"{qkv_bytes / max(tokens, 1) / len(cap['qkv_layers']):.1f}")] if cap.get("qkv_layers") else []),
        ("teacher mean p(target)", f"{stats.get('mean_target_prob', float('nan')):.4f}"),
        ("distily", m["distily_version"]),
    ]
    for k, v in rows:
        typer.echo(f"{k:>26}  {v}")
    leave()


EXIT_EARLY = False  # main() sets it: a console command, not an in-process call (a test's CliRunner)


def leave(code: int = 0) -> None:
    """A console command exits now, without the interpreter's teardown: native worker threads (vLLM's; Arrow's Parquet
    readers, apache/arrow#34314) occasionally abort it ("terminate called without an active exception") after the
    command has done its work. Everything the command writes is on disk (atomic renames) before this."""
    if not EXIT_EARLY:
        if code:
            raise typer.Exit(code)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


PARTS = {"seq_index": "tokens", "input_ids": "tokens", "target_logprob": "target", "tail_mass": "top-k"}


def bytes_per_part(shards: list[dict]) -> dict[str, int]:
    """Compressed bytes of the Parquet files by part: tokens, top-k, sampled, target (caches of format 2+)."""
    out: dict[str, int] = {}
    for shard in shards:
        for col, b in shard.get("column_bytes", {}).items():
            name = PARTS.get(col) or ("top-k" if col.startswith("topk_") else "sampled" if col.startswith("sample_") else col)
            out[name] = out.get(name, 0) + b
    return out


@app.command()
def verify(cache: str = typer.Argument(..., help="Cache dir or fsspec URL.")):
    """Check every shard's checksum and schema; name the first bad file."""
    from .cache import CacheReader

    problems = CacheReader(cache).verify()
    for p in problems:
        typer.secho(f"BAD  {p}", fg="red", err=True)
    if not problems:
        typer.echo(f"OK   {cache}: every shard matches its checksum and the schema")
    leave(1 if problems else 0)


def load_commands() -> None:
    """The stage commands, declared by the stages (entry points group `distily.commands`)."""
    found = sorted(entry_points(group="distily.commands"), key=lambda e: e.name)
    if not found:
        raise SystemExit("distily's stage commands are not registered: install the project (`make setup` or `pip install -e .`)")
    for ep in found:
        add_command(ep.load())
    add_command(Command("on-policy", C.OnPolicyConfig, "on_policy", run_on_policy,
                        "On-policy KD in rounds: the student writes (generate), the teacher grades (teacher-cache "
                        "--graded), the student trains (train-student); each stage a batch job. docs/on-policy.md."))


def run_on_policy(cfg) -> None:
    from .on_policy import run

    run(cfg)


def main() -> None:  # pragma: no cover
    global EXIT_EARLY
    EXIT_EARLY = True
    app()


if __name__ == "__main__":  # pragma: no cover  (python -m pipeline.cli: run the importable module's app)
    from pipeline.cli import main as run_main

    run_main()
elif __name__ == "pipeline.cli":  # not as __mp_main__, where vLLM's spawned workers re-run `python -m pipeline.cli`
    load_commands()
