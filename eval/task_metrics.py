"""Metrics of the benchmark tasks lm-eval lacks (SQuAD v1.1, HotpotQA, CoNLL-2003), as lm-eval hooks.

Standalone on purpose: lm-eval imports this file by path (`!function task_metrics.name` in the task YAMLs
that eval/tasks.py writes next to a copy of it), so it imports nothing from distily.

  SQuAD v1.1   exact match and F1 of the official evaluation script: lower case, no punctuation, no
               articles (a/an/the), whitespace collapsed; the maximum over the gold answers.
  HotpotQA     the official answer EM and F1 (same normalisation; a yes/no/noanswer prediction or gold
               scores F1 0 unless they are equal).
  CoNLL-2003   entity-level micro F1 (as conlleval): an entity is (type, exact text); the model lists
               "TYPE: text" pairs separated by ";", parsed leniently; gold entities come from the BIO tags.
"""
from __future__ import annotations

import re
import string
from collections import Counter

# ------------------------------------------------------------------------------------------- QA


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, yes_no: bool = False) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if yes_no and (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    p, g = pred.split(), ref.split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def first_line(results: list[str]) -> str:
    return results[0].strip().split("\n")[0].strip() if results else ""


def process_squad(doc: dict, results: list[str]) -> dict:
    pred = first_line(results)
    golds = list(doc["answers"]["text"]) or [""]
    return {"exact_match": max(exact_match(pred, g) for g in golds), "f1": max(f1(pred, g) for g in golds)}


def process_hotpotqa(doc: dict, results: list[str]) -> dict:
    pred = first_line(results)
    return {"exact_match": exact_match(pred, doc["answer"]), "f1": f1(pred, doc["answer"], yes_no=True)}


def hotpotqa_context(doc: dict) -> str:
    ctx = doc["context"]
    return "\n".join(f"{title}: {''.join(sents)}" for title, sents in zip(ctx["title"], ctx["sentences"]))


# ------------------------------------------------------------------------------------------- NER

CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")


def gold_entities(tokens: list[str], tags: list) -> set[tuple[str, str]]:
    """(type, text) for every entity of a BIO-tagged sentence (tags as ints of the HF dataset or strings)."""
    names = [CONLL_TAGS[t] if isinstance(t, int) else t for t in tags]
    out, current, kind = set(), [], None
    for token, tag in zip(tokens, [*names]):
        if tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != kind):
            if current:
                out.add((kind, " ".join(current)))
            current, kind = [token], tag[2:]
        elif tag.startswith("I-"):
            current.append(token)
        else:
            if current:
                out.add((kind, " ".join(current)))
            current, kind = [], None
    if current:
        out.add((kind, " ".join(current)))
    return out


def parse_entities(text: str) -> set[tuple[str, str]]:
    """'PER: John Smith; LOC: Paris' -> {('PER', 'John Smith'), ('LOC', 'Paris')} (unknown types dropped)."""
    out = set()
    for part in re.split(r"[;\n]", text):
        if ":" not in part:
            continue
        kind, _, name = part.partition(":")
        kind, name = kind.strip().upper(), " ".join(name.strip().strip(".").split())
        if kind in ENTITY_TYPES and name:
            out.add((kind, name))
    return out


def conll_sentence(doc: dict) -> str:
    return " ".join(doc["tokens"])


def conll_target(doc: dict) -> str:
    return "; ".join(f"{k}: {t}" for k, t in sorted(gold_entities(doc["tokens"], doc["ner_tags"]))) or "none"


def process_conll(doc: dict, results: list[str]) -> dict:
    pred = parse_entities(results[0] if results else "")
    gold = gold_entities(doc["tokens"], doc["ner_tags"])
    counts = (len(pred & gold), len(pred - gold), len(gold - pred))  # tp, fp, fn
    return {"entity_f1": counts, "entity_precision": counts, "entity_recall": counts}


def _totals(items) -> tuple[int, int, int]:
    tp = sum(i[0] for i in items)
    fp = sum(i[1] for i in items)
    fn = sum(i[2] for i in items)
    return tp, fp, fn


def micro_f1(items) -> float:
    tp, fp, fn = _totals(items)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def micro_precision(items) -> float:
    tp, fp, _ = _totals(items)
    return tp / (tp + fp) if tp else 0.0


def micro_recall(items) -> float:
    tp, _, fn = _totals(items)
    return tp / (tp + fn) if tp else 0.0


# ------------------------------------------------------------------------------------------ prompts


def hotpotqa_prompt(doc: dict) -> str:
    return f"{hotpotqa_context(doc)}\n\nQuestion: {doc['question']}\nAnswer:"


def conll_prompt(doc: dict) -> str:
    return ("List the named entities of the sentence as TYPE: text, separated by semicolons, with TYPE one of "
            f"PER, ORG, LOC, MISC (or none).\nSentence: {conll_sentence(doc)}\nEntities:")
