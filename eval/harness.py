"""lm-evaluation-harness on an in-memory model (HFLM), one task at a time so one failure is one note."""
from __future__ import annotations


def available_tasks(include_path: str | None, tasks: list[str]) -> tuple[object, set[str]]:
    """lm-eval's task index: distily's own tasks alone when they hold every task asked for (milliseconds), else with
    lm-eval's built-in catalogue too (about 14,000 YAML files: 10-30 s to index). `distily eval` builds it once for
    all its models."""
    if include_path:
        tm, known = _index(include_path, False)
        if set(tasks) <= known:
            return tm, known
    return _index(include_path, True)


def _index(include_path: str | None, defaults: bool) -> tuple[object, set[str]]:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path, include_defaults=defaults)
    return tm, set(tm.all_tasks)


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None, limit: int | None = None,
              batch_size: int = 4, max_length: int = 1024, index: tuple[object, set[str]] | None = None,
              ) -> tuple[dict[str, float], list[str]]:
    """Return ({"task/metric": value}, notes). Unknown tasks and tasks that fail (hub offline) become notes. `index`:
    available_tasks' (built here when not given)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tm, known = index or available_tasks(include_path, tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    metrics: dict[str, float] = {}
    notes: list[str] = []
    for task in tasks:
        if task not in known:
            notes.append(f"{task}: lm-eval {_version()} has no task of this name; skipped")
            continue
        try:
            out = simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=limit, log_samples=False,
                                  bootstrap_iters=0, verbosity="ERROR")
        except Exception as e:  # e.g. a hub dataset while offline
            notes.append(f"{task}: failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        for name, values in out["results"].items():
            for key, value in values.items():
                metric = key.split(",")[0]
                if isinstance(value, (int, float)) and "stderr" not in metric and metric not in ("alias", "sample_len"):
                    metrics[f"{name}/{metric}"] = float(value)
    return metrics, notes


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")
