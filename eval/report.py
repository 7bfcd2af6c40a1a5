"""Reports people read: the side-by-side table (markdown + JSON), plots, and the student's model card."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pipeline import __version__


def comparison_table(results: dict[str, dict], teacher: str | None) -> str:
    """Markdown: one row per metric, one column per model, and student/teacher ratios."""
    names = list(results)
    metrics = sorted({m for r in results.values() for m in r["metrics"]})
    others = [n for n in names if n != teacher]
    head = ["metric", *names, *([f"{n}/{teacher}" for n in others] if teacher else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("parameters (M)", {n: results[n]["parameters"] / 1e6 for n in names}),
            ("forward tokens/s", {n: results[n]["forward_tokens_per_s"] for n in names})]
    rows += [(m, {n: results[n]["metrics"].get(m) for n in names}) for m in metrics]
    for label, vals in rows:
        cells = [_fmt(vals[n]) for n in names]
        if teacher:
            t = vals.get(teacher)
            cells += [_fmt(vals[n] / t) if vals[n] is not None and t else "-" for n in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_training(log_files: dict[str, Path], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, f in log_files.items():
        rows = [json.loads(l) for l in f.read_text().splitlines() if '"loss"' in l]
        keys = sorted({k for r in rows for k in r if k.startswith("loss")})
        if len(keys) == 2:  # one component: the total is the same line
            keys.remove("loss")
        for key in keys:
            series[f"{name}: {key}"] = ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("training loss per component")
    ax.grid(alpha=0.3)
    return _save(fig, ax, out / "training_loss.png")


def plot_comparison(results: dict[str, dict], teacher: str | None, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = sorted({m for r in results.values() for m in r["metrics"]})
    if not metrics:
        return None
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(metrics)), 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = []
        for m in metrics:
            v, t = results[n]["metrics"].get(m), results.get(teacher, {}).get("metrics", {}).get(m) if teacher else None
            vals.append(v / t if v is not None and t else (v or float("nan")))
        ax.bar(np.arange(len(metrics)) + i * width, vals, width, label=n)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([m.replace("/", "\n") for m in metrics], fontsize=7)
    ax.set_ylabel(f"value / {teacher}" if teacher else "value")
    if teacher:
        ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")  # ratios: 2x worse and 2x better are the same distance from 1
    ax.set_title("evaluation, relative to the teacher (log scale; perplexities: lower is better)")
    return _save(fig, ax, out / "eval_comparison.png")


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def model_card(student: str, results: dict[str, dict], table: str, run_config: dict | None, dataset: str) -> str:
    """README.md for the student dir: HF model-card YAML (with model-index) and a readable body."""
    r = results[student]
    manifest = (run_config or {}).get("cache_manifest", {})
    teacher = manifest.get("teacher", {})
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["distily", "knowledge-distillation"],
        "base_model": teacher.get("hub_id"),
        "model-index": [{
            "name": student,
            "results": [{
                "task": {"type": "text-generation"},
                "dataset": {"name": dataset, "type": dataset},
                "metrics": [{"type": m, "value": round(v, 6), "name": m} for m, v in sorted(r["metrics"].items())],
            }],
        }],
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {student}", "",
             f"A student distilled with [distily](https://pypi.org/project/distily/) {__version__} "
             f"(commit `{git_commit() or 'unknown'}`) from an offline teacher cache.", ""]
    if manifest:
        cap, data, stats = manifest["capture"], manifest["dataset"], manifest.get("stats", {})
        lines += ["## Teacher and cache", "",
                  f"- teacher: `{teacher.get('source')}` ({teacher.get('num_hidden_layers')} layers, hidden {teacher.get('hidden_size')}), "
                  f"weights sha256 `{teacher.get('weights_sha256', '')[:16]}`",
                  f"- tokenizer sha256 `{manifest['tokenizer']['sha256'][:16]}`, vocab {manifest['tokenizer']['vocab_size']}",
                  f"- cache: top-{cap['top_k']} log-probs via {cap['backend']} ({cap['dtype']}), hidden layers {cap['hidden_layers']}, "
                  f"{stats.get('tokens')} tokens in {len(manifest['shards'])} shards",
                  f"- dataset: `{json.dumps(data['spec'])}`, fingerprint `{data['fingerprint'][:16]}`", ""]
    if run_config:
        cfg = run_config["config"]
        lines += ["## Training", "",
                  f"- student: {json.dumps(run_config['student'].get('recipe', cfg.get('student')))}, init `{cfg['init']}` "
                  f"{run_config['student'].get('teacher_layers', '')}, {run_config['student']['num_parameters'] / 1e6:.1f}M parameters",
                  f"- objective: loss `{cfg['loss']}` (T={cfg['temperature']}, tail `{cfg['tail']}`), ce_weight {cfg['ce_weight']}, "
                  f"hs_weight {cfg['hs_weight']} ({cfg['hs_loss']}, mapper `{cfg['layer_mapper']}`)",
                  f"- optimizer `{cfg['optimizer']}`, lr {cfg['lr']} ({cfg['lr_schedule']}, warmup {cfg['warmup_steps']}), "
                  f"batch {cfg['batch_size']} x accum {cfg['grad_accum']} x world {run_config.get('world_size', 1)}, {cfg['max_steps']} steps",
                  f"- tokens seen: {run_config.get('tokens_seen', 'see log.jsonl')}", ""]
        lines += cross_tokenizer_lines(run_config.get("cross_tokenizer"))
        lines += layer_selection_lines(run_config["student"].get("layer_selection"))
        lines += ["<details><summary>all training parameters</summary>", "", "```json",
                  json.dumps(cfg, indent=2, default=str), "```", "</details>", ""]
    lines += ["## Evaluation", "", f"Held-out text: `{dataset}`.", "", table, ""]
    return "\n".join(lines)


def cross_tokenizer_lines(cross: dict | None) -> list[str]:
    """The model card's section on a student with another tokenizer (stage_student/training/cross_tokenizer.py);
    none for a student with the teacher's."""
    if not cross:
        return []
    pre = cross.get("preflight", {})
    return ["### Cross-tokenizer distillation", "",
            f"- method `{cross['method']}`; student tokenizer sha256 `{cross['student_tokenizer']['sha256'][:16]}`, "
            f"vocab {cross['student_tokenizer']['vocab_size']}; {cross['exact_teacher_tokens']} teacher tokens "
            f"map to byte-identical student tokens, {cross['prefix_teacher_tokens']} more to the student token "
            "their text starts with",
            f"- on {pre.get('sequences')} cached sequences: {pre.get('aligned_positions')} aligned positions, "
            f"{pre.get('student_share_with_target', 0):.1%} of student positions with a teacher target, "
            f"{pre.get('mapped_coverage', 0):.1%} of the teacher's mass on mapped tokens there "
            f"({pre.get('exact_coverage', 0):.1%} byte-identical), "
            f"{pre.get('exact_share', 0):.1%} exact (same next token), {pre.get('span_share', 0):.1%} spans", ""]


def layer_selection_lines(selection: dict | None) -> list[str]:
    """The model card's section on the teacher layers `--init-layers auto` kept; none without it."""
    if not selection:
        return []
    lines = ["### Layer selection (`--init-layers auto`)", "",
             f"Kept teacher layers {selection['layers']} ({selection['method']}): forward KL to the cached teacher "
             f"{selection['kl']:.4f} nats before training, vs {selection['evenly_kl']:.4f} for evenly spaced layers; "
             f"{selection['scored']} candidates scored on {selection['tokens']} cached tokens in {selection['seconds']:.0f} s.",
             "", "| forward KL | candidate | teacher layers kept |", "|---|---|---|"]
    lines += [f"| {c['kl']:.4f} | {c['name']} | {','.join(map(str, c['layers']))} |" for c in selection["candidates"]]
    lines += [""]
    return lines
