"""An offline lm-eval task suite built from real English text that ships in a registry package.

From the held-out Lee news corpus (gensim's test data; the teacher cache uses the other Lee file):
  distily_lee_cloze     multiple choice: pick the sentence that really follows (vs 3 from other articles)
  distily_lee_lastword  loglikelihood: the last word of a passage (LAMBADA style): acc and perplexity
  distily_lee_rolling   loglikelihood_rolling: whole articles: word/byte perplexity, bits per byte
grouped as `distily_offline`. The JSONL files and YAML configs are written to a directory that is passed
to lm-eval's TaskManager(include_path=...). Generation is seeded, so every run sees the same items.

Also written there: benchmark tasks of the roadmap that lm-eval lacks, in lm-eval's own YAML format with
their standard metrics (task_metrics.py): `distily_squad` (SQuAD v1.1: exact match, F1), `distily_hotpotqa`
(HotpotQA distractor: answer exact match, F1), `distily_conll2003` (CoNLL-2003 as prompted extraction:
entity-level micro F1, precision, recall). They read the hub datasets, or local files in the same formats.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import yaml

GROUP = "distily_offline"
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if len(s.split()) >= 4]


def build_items(docs: list[str], seed: int = 1234) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    sents = [sentences(d) for d in docs]
    cloze, lastword, rolling = [], [], []
    for i, doc in enumerate(sents):
        others = [s for j, ss in enumerate(sents) if j != i for s in ss]
        for a, b in list(zip(doc, doc[1:]))[:4]:
            choices = [b, *rng.sample(others, 3)]
            rng.shuffle(choices)
            cloze.append({"context": a, "choices": choices, "label": choices.index(b)})
        for k in range(0, len(doc) - 1, 2):
            passage = " ".join(doc[k : k + 2]).rstrip(".!?\"' ")
            head, _, last = passage.rpartition(" ")
            if head and last.isalpha() and last.islower() and len(last) >= 3:  # common words, not names
                lastword.append({"context": head, "target": last})
    rolling = [{"text": d} for d in docs if d.strip()]
    return {"distily_lee_cloze": cloze, "distily_lee_lastword": lastword, "distily_lee_rolling": rolling}


def _metric(name: str, aggregation: str, higher_is_better: bool) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def task_configs(files: dict[str, Path]) -> dict[str, dict]:
    def base(name):
        return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(files[name])}},
                "test_split": "test", "metadata": {"version": 1.0}}

    return {
        "distily_lee_cloze": {
            **base("distily_lee_cloze"), "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [_metric("acc", "mean", True), _metric("acc_norm", "mean", True)],
        },
        "distily_lee_lastword": {
            **base("distily_lee_lastword"), "output_type": "loglikelihood", "doc_to_text": "{{context}}",
            "doc_to_target": "{{' ' + target}}",  # loglikelihood tasks get no target_delimiter (as lambada)
            "metric_list": [_metric("perplexity", "perplexity", False), _metric("acc", "mean", True)],
        },
        "distily_lee_rolling": {
            **base("distily_lee_rolling"), "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [_metric("word_perplexity", "weighted_perplexity", False),
                            _metric("byte_perplexity", "weighted_perplexity", False),
                            _metric("bits_per_byte", "bits_per_byte", False)],
        },
    }


def write_suite(docs: list[str], out_dir: str | Path) -> Path:
    """Write the JSONL data and YAML configs of the offline suite; return the include_path for lm-eval."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = build_items(docs)
    files = {}
    for name, rows in items.items():
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, cfg in task_configs(files).items():
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / f"{GROUP}.yaml").write_text(yaml.safe_dump({"group": GROUP, "task": list(items)}, sort_keys=False))
    return out


# Hub dataset, config, split, and the YAML body of each benchmark task (lm-eval's format; `!function`
# refers to task_metrics.py, copied next to the YAML).
BENCHMARKS = {
    "distily_squad": ("rajpurkar/squad", None, "validation", """\
output_type: generate_until
doc_to_text: "Title: {{title}}\\n\\nBackground: {{context}}\\n\\nQuestion: {{question}}\\n\\nAnswer:"
doc_to_target: "{{answers.text[0]}}"
generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 32}
process_results: !function task_metrics.process_squad
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
  - {metric: f1, aggregation: mean, higher_is_better: true}
"""),
    "distily_hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation", """\
output_type: generate_until
doc_to_text: !function task_metrics.hotpotqa_prompt
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 32}
process_results: !function task_metrics.process_hotpotqa
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
  - {metric: f1, aggregation: mean, higher_is_better: true}
"""),
    "distily_conll2003": ("eriktks/conll2003", None, "test", """\
output_type: generate_until
doc_to_text: !function task_metrics.conll_prompt
doc_to_target: !function task_metrics.conll_target
generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 64}
process_results: !function task_metrics.process_conll
metric_list:
  - {metric: entity_f1, aggregation: !function task_metrics.micro_f1, higher_is_better: true}
  - {metric: entity_precision, aggregation: !function task_metrics.micro_precision, higher_is_better: true}
  - {metric: entity_recall, aggregation: !function task_metrics.micro_recall, higher_is_better: true}
"""),
}


def write_benchmark_tasks(out_dir: str | Path, data_files: dict[str, str] | None = None) -> Path:
    """Write the benchmark task YAMLs (and task_metrics.py) into out_dir, an lm-eval include_path.

    data_files: {task: local JSONL/Parquet file in the hub dataset's format} instead of the hub dataset
    (offline machines, tests)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("task_metrics.py"), out / "task_metrics.py")
    for name, (path, config, split, body) in BENCHMARKS.items():
        local = (data_files or {}).get(name)
        if local:
            builder = "parquet" if str(local).endswith(".parquet") else "json"
            source = f"dataset_path: {builder}\ndataset_kwargs: {json.dumps({'data_files': {split: str(local)}})}\n"
        else:
            source = f"dataset_path: {path}\n" + (f"dataset_name: {config}\n" if config else "")
        split_key = "test_split" if split == "test" else "validation_split"
        (out / f"{name}.yaml").write_text(f"task: {name}\n{source}{split_key}: {split}\nmetadata: {{version: 1.0}}\n{body}")
    return out
