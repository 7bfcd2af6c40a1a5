"""Evaluation: perplexity against a reference loop and against lm-eval, offline tasks, reports, model card."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from eval.harness import available_tasks, run_tasks
from eval.perplexity import evaluate_perplexity, windows
from eval.tasks import write_suite
from pipeline.config import EvalConfig
from pipeline.errors import DistilyError
from pipeline.resolve import DatasetSpec, load_texts

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), AutoTokenizer.from_pretrained(tiny_teacher)


def reference_nll(model, ids: list[int], max_len: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity-doc loop, one document, batch size 1."""
    x = torch.tensor([ids])
    nll, n, prev_end = 0.0, 0, 1
    begin = 0
    while prev_end < len(ids):
        end = min(begin + max_len, len(ids))
        target = x[:, begin:end].clone()
        target[:, : prev_end - begin] = -100
        with torch.no_grad():
            logits = model(x[:, begin:end]).logits
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100, reduction="sum").item()
        n += int((target[0, 1:] != -100).sum())
        prev_end, begin = end, min(begin + stride, end - 1)
    return nll, n


def test_windows_score_every_token_once():
    for length in (2, 5, 64, 65, 200):
        for max_len, stride in ((64, 64), (64, 16), (10, 9)):
            scored = []
            for w, skip in windows(list(range(length)), max_len, stride):
                assert len(w) <= max_len and skip >= 1
                scored.extend(w[skip:])
            assert scored == list(range(1, length))


@pytest.mark.parametrize("max_len, stride", [(1024, 512), (48, 16), (48, 48)])
def test_perplexity_equals_reference(teacher_model, texts, max_len, stride):
    model, tok = teacher_model
    docs = texts[:5]
    got = evaluate_perplexity(model, tok, docs, max_len=max_len, stride=stride, batch_size=3)
    nll, n = 0.0, 0
    for d in docs:
        a, b = reference_nll(model, [tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"]], max_len, stride)
        nll, n = nll + a, n + b
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-4)


def test_lm_eval_offline_suite_agrees_with_our_perplexity(tmp_path, teacher_model):
    model, tok = teacher_model
    docs = load_texts(DatasetSpec("lee"))
    include = write_suite(docs, tmp_path / "tasks")
    assert yaml.safe_load((include / "distily_offline.yaml").read_text())["group"] == "distily_offline"
    metrics, notes = run_tasks(model, tok, ["distily_offline", "no_such_task"], str(include), limit=4, max_length=1000)
    assert notes == [f"no_such_task: lm-eval {notes[0].split()[2]} has no task of this name; skipped"]
    assert 0 <= metrics["distily_lee_cloze/acc"] <= 1 and metrics["distily_lee_lastword/perplexity"] > 1
    # Documents that fit one window: lm-eval's rolling log-likelihood and ours are the same computation.
    # (Longer ones differ by design: lm-eval right-aligns the last window, the transformers recipe strides.)
    assert max(len(tok(d)["input_ids"]) for d in docs[:4]) < 1000
    ours = evaluate_perplexity(model, tok, docs[:4], max_len=1000, stride=500)
    assert metrics["distily_lee_rolling/bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)
    # distily's own tasks alone need no index of lm-eval's catalogue (10-30 s); a built-in task name gets it
    _, ours_only = available_tasks(str(include), ["distily_offline"])
    _, everything = available_tasks(str(include), ["distily_offline", "hellaswag"])
    assert "distily_lee_cloze" in ours_only and "hellaswag" not in ours_only and "hellaswag" in everything


def test_eval_report_and_model_card(tmp_path, hf_cache, tiny_teacher):
    from test_train_student import cfg_for

    from eval.run import run
    from stage_student.train import train

    for name, loss in (("kd", "forward_kl"), ("ce", "ce")):
        train(cfg_for(hf_cache, tmp_path / name, max_steps=3, loss=loss))
    # --model takes the run dir train-student wrote (its final/ is evaluated), --baseline a model dir
    summary = run(EvalConfig(model=str(tmp_path / "kd"), baseline=[str(tmp_path / "ce" / "final")],
                             max_documents=4, max_seq_len=128, stride=64, limit=3, output=str(tmp_path / "eval")))
    models = summary["models"]
    assert list(models) == ["teacher", "kd", "ce"]  # the teacher comes from the cache manifest
    assert models["teacher"]["path"] == str(tiny_teacher)
    assert models["kd"]["parameters"] < models["teacher"]["parameters"]
    ratio = summary["ratios"]["kd"]["heldout/perplexity"]
    assert ratio == pytest.approx(models["kd"]["metrics"]["heldout/perplexity"] / models["teacher"]["metrics"]["heldout/perplexity"])
    report = (tmp_path / "eval" / "eval.md").read_text()
    assert "| heldout/perplexity |" in report and "kd/teacher" in report and "ce/teacher" in report
    assert (tmp_path / "eval" / "training_loss.png").stat().st_size > 10_000
    assert (tmp_path / "eval" / "eval_comparison.png").stat().st_size > 10_000
    card = (tmp_path / "kd" / "final" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    listed = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert listed == {k: round(v, 6) for k, v in models["kd"]["metrics"].items()}
    assert "forward_kl" in card and "adamw8bit" in card and str(3 * 2 * 64) in card
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]["ce"]["metrics"]


def test_lastword_task_scores_what_a_direct_forward_does(tmp_path, teacher_model):
    """lm-eval's number for the offline last-word task equals log p(" word" | context) from our own forward."""
    model, tok = teacher_model
    include = write_suite(load_texts(DatasetSpec("lee")), tmp_path / "tasks")
    metrics, _ = run_tasks(model, tok, ["distily_lee_lastword"], str(include), limit=5, max_length=1000)
    rows = [json.loads(l) for l in (include / "distily_lee_lastword.jsonl").read_text().splitlines()[:5]]
    lls = []
    for r in rows:
        ctx = tok(r["context"], add_special_tokens=False)["input_ids"]
        whole = tok(r["context"] + " " + r["target"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    assert metrics["distily_lee_lastword/perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-4)


def test_report_labels_are_unique_and_unfinished_runs_are_refused(tmp_path):
    from eval.run import unique_labels
    from pipeline.resolve import trained_model_dir as model_dir

    paths = ["runs/a/student/final", "runs/b/student/final", "runs/c/kd", "elsewhere/teacher"]
    assert unique_labels(paths) == ["a/student", "b/student", "kd", "elsewhere/teacher"]
    assert unique_labels(["x/final", "x/final"]) == ["x", "x-2"]
    (tmp_path / "run_config.json").write_text("{}")
    with pytest.raises(DistilyError, match="has not finished"):
        model_dir(str(tmp_path))


def test_benchmark_task_metrics_match_the_official_definitions():
    from eval import task_metrics as m

    assert m.exact_match("the Denver Broncos!", "Denver Broncos") == 1.0
    assert m.f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    assert m.process_squad({"answers": {"text": ["Carolina", "Carolina Panthers"]}}, ["Carolina Panthers\nmore"]) == \
        {"exact_match": 1.0, "f1": 1.0}
    assert m.f1("no", "yes", yes_no=True) == 0.0 and m.f1("yes", "yes", yes_no=True) == 1.0
    rows = [json.loads(l) for l in (FIXTURES / "conll2003.jsonl").read_text().splitlines()]
    assert m.gold_entities(rows[0]["tokens"], rows[0]["ner_tags"]) == {("ORG", "EU"), ("MISC", "German"), ("MISC", "British")}
    assert m.gold_entities(rows[1]["tokens"], rows[1]["ner_tags"]) == {("PER", "Peter Blackburn")}
    counts = m.process_conll(rows[0], ["ORG: EU; misc: German. ; LOC: Paris"])["entity_f1"]
    assert counts == (2, 1, 1) and m.micro_f1([counts]) == pytest.approx(2 / 3)
    assert m.micro_f1([(1, 0, 0), (0, 1, 1)]) == pytest.approx(2 / 4)  # micro: summed over sentences


def test_benchmark_tasks_run_offline_in_lm_eval(tmp_path, teacher_model):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from eval import task_metrics as m
    from eval.tasks import BENCHMARKS, write_benchmark_tasks

    files = {"distily_squad": FIXTURES / "squad.jsonl", "distily_hotpotqa": FIXTURES / "hotpotqa.jsonl",
             "distily_conll2003": FIXTURES / "conll2003.jsonl"}
    include = write_benchmark_tasks(tmp_path / "tasks", {k: str(v) for k, v in files.items()})
    model, tok = teacher_model
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=512), tasks=list(BENCHMARKS),
                          task_manager=TaskManager(include_path=str(include), include_defaults=False), log_samples=True, bootstrap_iters=0,
                          verbosity="ERROR", gen_kwargs="max_gen_toks=8")
    process = {"distily_squad": m.process_squad, "distily_hotpotqa": m.process_hotpotqa, "distily_conll2003": m.process_conll}
    for task in BENCHMARKS:
        samples = out["samples"][task]
        assert len(samples) == len(files[task].read_text().splitlines())
        per_doc = [process[task](s["doc"], s["filtered_resps"]) for s in samples]
        got = out["results"][task]
        if task == "distily_conll2003":
            assert got["entity_f1,none"] == pytest.approx(m.micro_f1([d["entity_f1"] for d in per_doc]))
        else:
            for metric in ("exact_match", "f1"):
                assert got[f"{metric},none"] == pytest.approx(sum(d[metric] for d in per_doc) / len(per_doc))
    squad_prompt = out["samples"]["distily_squad"][0]["arguments"][0][0]
    assert "Question: Which NFL team represented the AFC at Super Bowl 50?" in squad_prompt
