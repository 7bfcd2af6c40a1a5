"""`distily eval`: teacher and students side by side on perplexity, bits per byte and lm-eval tasks."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import EvalConfig
from pipeline.errors import DistilyError
from pipeline.manifest import atomic_write_bytes
from pipeline.resolve import DEFAULT_EVAL_DATASET, DatasetSpec, is_gguf, load_texts, resolve_model, trained_model_dir

from . import harness, report
from .perplexity import evaluate_perplexity
from .tasks import write_benchmark_tasks, write_suite


def label_for(path: str, depth: int = 1) -> str:
    """A model's name in the report: its run dir's last `depth` path parts (`runs/kd/final` -> `kd`)."""
    p = Path(path).resolve() if Path(path).exists() else Path(path)
    parts = (p.parent if p.name == "final" else p).parts
    return "/".join(parts[-depth:])


def unique_labels(paths: list[str]) -> list[str]:
    """One label per model, never two alike: more of the path where names collide, else a counter."""
    depth = [1] * len(paths)
    for _ in range(8):
        labels = [label_for(p, d) for p, d in zip(paths, depth)]
        clashes = {l for l in labels if labels.count(l) > 1 or l == "teacher"}
        if not clashes:
            return labels
        depth = [d + 1 if l in clashes else d for l, d in zip(labels, depth)]
    seen: dict[str, int] = {}
    out = []
    for l in labels:
        seen[l] = seen.get(l, 0) + 1
        out.append(l if seen[l] == 1 else f"{l}-{seen[l]}")
    return out


def training_dir(model_path: str) -> Path | None:
    """The run dir of a student trained by distily (holds run_config.json), if this is one."""
    p = Path(model_path)
    for d in (p, p.parent):
        if (d / "run_config.json").exists():
            return d
    return None


def evaluate_model(path: str, texts: list[str], cfg: EvalConfig, include_path: str, index=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local, _ = resolve_model(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    t0 = time.perf_counter()
    ppl = evaluate_perplexity(model, tokenizer, texts, cfg.max_seq_len, cfg.stride, cfg.batch_size)
    metrics = {"heldout/perplexity": ppl["perplexity"], "heldout/bits_per_byte": ppl["bits_per_byte"]}
    tasks, notes = harness.run_tasks(model, tokenizer, cfg.tasks, include_path, cfg.limit, cfg.batch_size, cfg.max_seq_len,
                                     index) if cfg.tasks else ({}, [])
    metrics.update(tasks)
    return {
        "path": local, "parameters": sum(p.numel() for p in model.parameters()), "metrics": metrics,
        "forward_tokens_per_s": ppl["forward_tokens_per_s"], "heldout": ppl, "notes": notes,
        "seconds": time.perf_counter() - t0,
    }


def run(cfg: EvalConfig) -> dict:
    paths = [trained_model_dir(p) for p in (cfg.model, *cfg.baseline)]
    student_dir = training_dir(paths[0])
    run_config = json.loads((student_dir / "run_config.json").read_text()) if student_dir else None
    teacher = cfg.teacher or (run_config or {}).get("cache_manifest", {}).get("teacher", {}).get("path")
    labels = unique_labels(paths)
    models = dict(zip(labels, paths))
    if teacher:
        models = {"teacher": teacher, **models}
    for name, path in models.items():  # fail on a bad path before any model is loaded (a GGUF is converted once)
        resolve_model(path) if name == "teacher" or is_gguf(path) else _check_dir(path)
    spec = DatasetSpec(cfg.dataset or DEFAULT_EVAL_DATASET, None, cfg.split, cfg.text_column, cfg.sample_by)
    texts = load_texts(spec)[: cfg.max_documents]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    include = str(write_benchmark_tasks(write_suite(load_texts(DatasetSpec(DEFAULT_EVAL_DATASET)), out / "tasks")))
    index = harness.available_tasks(include, cfg.tasks) if cfg.tasks else None  # one task index for every model
    results = {}
    for name, path in models.items():
        print(f"evaluating {name} ({path})", flush=True)
        results[name] = evaluate_model(path, texts, cfg, include, index)
    teacher_name = "teacher" if teacher else None
    table = report.comparison_table(results, teacher_name)
    notes = sorted({n for r in results.values() for n in r["notes"]})
    student = labels[0]
    summary = {"dataset": spec.to_dict(), "tasks": cfg.tasks, "limit": cfg.limit, "models": results, "notes": notes}
    if teacher_name:
        summary["ratios"] = {
            n: {m: v / results[teacher_name]["metrics"][m] for m, v in r["metrics"].items() if results[teacher_name]["metrics"].get(m)}
            for n, r in results.items() if n != teacher_name
        }
    logs = {n: d / "log.jsonl" for n, p in models.items() if n != "teacher" and (d := training_dir(p))}
    plots = [report.plot_training({n: f for n, f in logs.items() if f.exists()}, out), report.plot_comparison(results, teacher_name, out)]
    summary["plots"] = [str(p) for p in plots if p]
    atomic_write_bytes(out / "eval.json", json.dumps(summary, indent=2, default=str).encode())
    md = [f"# distily eval: {', '.join(results)}", "", f"held-out text: `{spec.path}` ({len(texts)} documents)", "", table, ""]
    md += [f"- {n}" for n in notes]
    md += [f"![{Path(p).stem}]({Path(p).name})" for p in summary["plots"]]
    atomic_write_bytes(out / "eval.md", ("\n".join(md) + "\n").encode())
    if student_dir:
        if run_config is not None and (student_dir / "result.json").exists():
            run_config["tokens_seen"] = json.loads((student_dir / "result.json").read_text()).get("tokens_seen")
        card = report.model_card(student, results, table, run_config, spec.path)
        atomic_write_bytes(Path(models[student], "README.md"), card.encode())
        summary["model_card"] = str(Path(models[student], "README.md"))
    summary["table"] = table
    return summary


def _check_dir(path: str) -> None:
    if not (Path(path) / "config.json").exists():
        raise DistilyError(f"--model/--baseline {path}: not an HF model dir (no config.json); train one with `distily train-student`")
