"""What the teacher is asked to write (`distily generate --generator NAME`): one small function per generator.

A generator gets the run's context and a random generator seeded by (seed, sequence index), and returns the
Request for that one sequence: the prompt ids the teacher continues, how many tokens it decodes greedily first,
and (optionally) its own temperature. The teacher then samples the rest, up to --max-seq-len tokens in all.

  random      data-free (LLM-QAT, Liu et al. 2023): the first token drawn uniformly from the vocabulary
              (special tokens excluded), the next --greedy-tokens decoded greedily, the rest sampled. Needs no
              text at all; the teacher's own distribution decides what the data is about.
  prefix      sequence-level KD (Kim & Rush 2016): the first --prefix-tokens of a --prompts document,
              continued by the teacher. Stays near the user's domain while the words are the teacher's.
  shuffled    OOD: a prompt of words drawn from two --prompts documents and shuffled. Puts the teacher in
              broken, mixed-topic contexts, the kind a small student's own mistakes create at generation time,
              and shows the student how the teacher recovers from them (exposure bias, as on-policy KD
              targets, without running the student).
  structured  OOD: prompts for numbers, lists, arithmetic, dates, code, tables and key-value records, filled
              with random values. Prose corpora hold few digit, symbol and code tokens; this covers the part of
              the vocabulary and the formats that prose leaves out.
  mix         one of the above per sequence, drawn with the --mix weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.token_store import document_bos


@dataclass
class Request:
    prompt: list[int]  # token ids the teacher continues
    generator: str  # the generator that made it (mix: the one it picked)
    greedy_tokens: int = 0  # decoded greedily before sampling starts
    temperature: float | None = None  # None: the run's --temperature
    continuation: list[int] | None = None  # --corpus-fraction: the document's own next tokens, written instead


@dataclass
class Context:
    """What generators may use: the tokenizer, the run's options, and the prompt documents (token ids)."""

    tokenizer: object
    cfg: object  # pipeline.config.GenerateConfig
    documents: list[list[int]] = field(default_factory=list)  # --prompts, tokenised (prefix/shuffled only)
    words: list[list[str]] = field(default_factory=list)  # --prompts, split into words (shuffled only)
    vocab_ids: np.ndarray | None = None  # ids a random start may use (no special tokens)
    mix: dict[str, float] = field(default_factory=dict)  # mix: normalised weights


GENERATORS: dict[str, Callable[[Context, np.random.Generator], Request]] = {}
NEEDS_PROMPTS = {"prefix", "shuffled"}


def register(name: str):
    def add(fn):
        GENERATORS[name] = fn
        return fn

    return add


@register("random")
def random_start(ctx: Context, rng: np.random.Generator) -> Request:
    return Request(document_bos(ctx.tokenizer) + [int(rng.choice(ctx.vocab_ids))], "random", greedy_tokens=ctx.cfg.greedy_tokens)


@register("prefix")
def prefix(ctx: Context, rng: np.random.Generator) -> Request:
    doc = ctx.documents[int(rng.integers(len(ctx.documents)))]
    prompt = document_bos(ctx.tokenizer) + doc[: ctx.cfg.prefix_tokens]
    if ctx.cfg.corpus_fraction > 0 and rng.random() < ctx.cfg.corpus_fraction:  # no draw at 0: older sets unchanged
        return Request(prompt, "corpus", continuation=doc[ctx.cfg.prefix_tokens :])
    return Request(prompt, "prefix")


@register("shuffled")
def shuffled(ctx: Context, rng: np.random.Generator) -> Request:
    a, b = (ctx.words[int(i)] for i in rng.integers(len(ctx.words), size=2))
    pool = a[:48] + b[:48]
    words = [pool[int(i)] for i in rng.permutation(len(pool))]
    ids = ctx.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return Request(document_bos(ctx.tokenizer) + ids[: ctx.cfg.prefix_tokens], "shuffled")


NAMES = ["alpha", "beta", "gamma", "delta", "count", "total", "item", "user", "price", "score", "index", "value"]
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum", "peach"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _structured_text(rng: np.random.Generator) -> str:
    n = lambda lo=0, hi=1000: int(rng.integers(lo, hi))  # noqa: E731
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    start, step = n(0, 100), n(1, 13)
    templates = [
        lambda: ", ".join(str(start + i * step) for i in range(5)) + ",",
        lambda: f"{n()} + {n()} = ",
        lambda: f"{n(2, 99)} x {n(2, 99)} = {n(100, 9999)}\n{n(2, 99)} x {n(2, 99)} =",
        lambda: f"def {pick(NAMES)}_{pick(NAMES)}({pick(NAMES)}, {pick(NAMES)}):\n    ",
        lambda: f"for (int i = 0; i < {n(2, 100)}; i++) {{\n    ",
        lambda: "| name | " + pick(NAMES) + " | " + pick(NAMES) + " |\n|---|---|---|\n| " + pick(FRUITS) + f" | {n()} |",
        lambda: '{"' + pick(NAMES) + f'": {n()}, "' + pick(NAMES) + '": "' + pick(FRUITS) + '", "',
        lambda: f"{n(1, 29)} {pick(MONTHS)} {n(1900, 2030)}: ",
        lambda: f"1. {pick(FRUITS).capitalize()}\n2. {pick(FRUITS).capitalize()}\n3.",
        lambda: f"{pick(NAMES)},{pick(NAMES)},{pick(NAMES)}\n{n()},{n()},{n()}\n",
        lambda: f"The {pick(NAMES)} of {n(2, 50)} {pick(FRUITS)}s at ${n(1, 20)}.{n(10, 99)} each is",
        lambda: f"<{pick(NAMES)} id=\"{n()}\">",
    ]
    return templates[int(rng.integers(len(templates)))]()


@register("structured")
def structured(ctx: Context, rng: np.random.Generator) -> Request:
    ids = ctx.tokenizer(_structured_text(rng), add_special_tokens=False)["input_ids"]
    return Request(document_bos(ctx.tokenizer) + ids[: ctx.cfg.max_seq_len - 1], "structured")


@register("mix")
def mix(ctx: Context, rng: np.random.Generator) -> Request:
    names = sorted(ctx.mix)
    name = names[int(rng.choice(len(names), p=[ctx.mix[n] for n in names]))]
    return GENERATORS[name](ctx, rng)


def parse_mix(text: str) -> dict[str, float]:
    """'prefix=2,random=1' -> normalised weights; ValueError says what is wrong."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in GENERATORS or name == "mix":
            raise ValueError(f"--mix entry {part!r}: expected NAME=WEIGHT with NAME one of "
                             f"{', '.join(n for n in GENERATORS if n != 'mix')}")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"--mix entry {part!r}: the weight {value!r} is not a number") from None
        if not w >= 0:
            raise ValueError(f"--mix entry {part!r}: weights must be >= 0")
        weights[name] = weights.get(name, 0.0) + w
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"--mix {text!r} gives no generator a positive weight")
    return {k: v / total for k, v in weights.items() if v > 0}


def used_generators(generator: str, mix_weights: dict[str, float]) -> set[str]:
    return set(mix_weights) if generator == "mix" else {generator}
