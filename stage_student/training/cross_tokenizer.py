"""Cross-tokenizer distillation from the cache (`--cross-tokenizer bucket|gold|uld`): a student whose tokenizer is
not the teacher's learns from the cached teacher distributions.

    bytes    every token id's exact bytes, from each tokenizer's vocabulary (byte-level BPE: the GPT-2 byte map;
             sentencepiece: '▁' is a space and <0xXX> a byte); special tokens stand for no text
    map      teacher id -> student id: where the two tokens are the same byte string (exact matches, one to one;
             special tokens by role, BOS to BOS, EOS to EOS, ..., then by equal content), and for the other teacher
             tokens the first token of the student's own tokenization of their bytes (" Washington" -> " Wash"):
             the teacher's mass on them counts for the student token its text starts with; once per run
    align    each cached sequence's text is rebuilt from the teacher ids and re-tokenised by the student; where
             both tokenizations end a token at the same byte (and after the same special tokens), the teacher
             row and the student row there predict text starting at the same byte: that pair gets a KD target
    spans    where the student's next token is several whole teacher tokens ("there" = "the" + "re"), the
             teacher's probability of it is the product of the cached probabilities of those tokens (the chain
             rule along the cached text); cross_loss.py gives it a bucket of its own

The loss on an aligned pair is in cross_loss.py. Every student position still gets CE on its own next token.
The mapping and the alignment statistics are stored with the run (cross_tokenizer.json). The bytes, the map and
the alignment are pure functions in token_align.py; this module runs them on a run's batches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError, DistilyError
from pipeline.manifest import atomic_write_json
from pipeline.resolve import tokenizer_fingerprint
from stage_student.training.token_align import Aligned, AlignError, align, prefix_map, special_map, token_bytes, vocab_map

METHODS = ("none", "bucket", "gold", "uld")
MIN_COVERAGE = 0.05  # below this share of the teacher's mass on mapped tokens the KD signal is mostly noise
MAX_UNSPELLED = 0.01  # above this share of the text re-tokenised inexactly (normalisers) the student is refused
PREFLIGHT_SEQUENCES = 64
PREFLIGHT_SHARDS = 8


def check_cross_options(cfg) -> None:
    """--cross-tokenizer and the options it cannot be combined with, before any data or weights are read."""
    method = cfg.cross_tokenizer
    if method not in METHODS:
        raise ConfigError(f"--cross-tokenizer {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if method == "none":
        return
    if not cfg.student:
        raise ConfigError("--cross-tokenizer distils into a student with its own tokenizer: pass --student DIR (an HF "
                          "model dir holding that tokenizer); recipes from the teacher config share the teacher's")
    clashes = [flag for flag, on in (("--hs-weight", cfg.hs_weight > 0), ("--attn-loss", cfg.attn_loss != "none"),
                                     ("--online-teacher", bool(cfg.online_teacher)), ("--kd-top-k", bool(cfg.kd_top_k)),
                                     ("--temperature", cfg.temperature != 1.0), ("--tail", cfg.tail != "bucket"),
                                     ("--kd-targets sampled", cfg.kd_targets == "sampled")) if on]
    if clashes:
        raise ConfigError(f"--cross-tokenizer {method} reads the cached top-k at aligned positions only; it does not "
                          f"combine with {', '.join(clashes)} (their positions or vocabularies are the teacher's): drop them")


# ----------------------------------------------------------------------------------------- batches and runs


class CrossTokenizer:
    """The tables of one (teacher, student) pair, and the loader's collate for cross-tokenizer batches."""

    def __init__(self, method: str, teacher, student, max_positions: int | None = None):
        self.method, self.max_positions = method, max_positions
        self.student = student
        self.t_bytes, self.s_bytes = token_bytes(teacher), token_bytes(student)
        self.specials = special_map(teacher, student)
        self.t2s_exact = vocab_map(self.t_bytes, self.s_bytes, self.specials)
        self.t2s = prefix_map(self.t2s_exact, self.t_bytes, self.s_bytes,
                              lambda texts: student(texts, add_special_tokens=False)["input_ids"])
        self.pad_id = student.pad_token_id if student.pad_token_id is not None else student.eos_token_id or 0
        self.info = {"method": method, "teacher_tokenizer": tokenizer_fingerprint(teacher),
                     "student_tokenizer": tokenizer_fingerprint(student),
                     "exact_teacher_tokens": int((self.t2s_exact >= 0).sum()),
                     "prefix_teacher_tokens": int((self.t2s >= 0).sum() - (self.t2s_exact >= 0).sum()),
                     "exact_student_share": float((self.t2s_exact >= 0).sum() / max(1, len(student))),
                     "special_tokens": {str(k): v for k, v in self.specials.items()}}

    def encode(self, text: str) -> list[int]:
        return self.student(text, add_special_tokens=False)["input_ids"]

    def align(self, row: dict, strict: bool = False) -> Aligned:
        return align(row["input_ids"], row["target_logprob"], self.t_bytes, self.s_bytes, self.specials, self.encode,
                     strict)

    def __call__(self, rows: list[dict]) -> dict:
        """CacheStream's collate: the student's ids (padded at the end), labels (-100 on padding) and, for the
        aligned rows, the teacher's top-k in student ids (-1: unmapped), log-probs, tail and span buckets."""
        aligned = [self.align(r) for r in rows]
        width = max(len(a.student_ids) for a in aligned)
        self.check_length(rows, aligned)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width - 1), -100, dtype=np.int64)
        for b, a in enumerate(aligned):
            ids[b, : len(a.student_ids)] = a.student_ids
            labels[b, : len(a.student_ids) - 1] = a.student_ids[1:]
        topk = np.concatenate([r["topk_ids"][a.teacher_rows] for r, a in zip(rows, aligned)])
        span_first = np.concatenate([a.span_first for a in aligned])
        slot = np.where((topk == span_first[:, None]).any(-1), (topk == span_first[:, None]).argmax(-1), -1)
        cat = lambda f: torch.from_numpy(np.concatenate([f(r, a) for r, a in zip(rows, aligned)]))  # noqa: E731
        cross = {
            "method": self.method,
            "labels": torch.from_numpy(labels.reshape(-1)),
            "rows": torch.from_numpy(np.concatenate([a.student_rows + b * (width - 1) for b, a in enumerate(aligned)])),
            "mapped_ids": torch.from_numpy(self.t2s[topk]),
            "topk_logprobs": cat(lambda r, a: r["topk_logprobs"][a.teacher_rows]),
            "tail_mass": cat(lambda r, a: r["tail_mass"][a.teacher_rows]),
            "span_ids": cat(lambda r, a: a.span_ids), "span_slot": torch.from_numpy(slot),
            "span_logprob": cat(lambda r, a: a.span_logprob), "exact": cat(lambda r, a: a.exact),
            # [text bytes, bytes re-tokenised inexactly (CE only there), teacher special tokens the student lacks]:
            # the trainer logs them per window and stops a run whose text the student cannot spell
            "counts": torch.tensor([sum(a.text_bytes for a in aligned), sum(a.unspelled for a in aligned),
                                    sum(a.dropped_specials for a in aligned)], dtype=torch.float64),
        }
        return {"seq_index": torch.tensor([int(r["seq_index"]) for r in rows]), "input_ids": torch.from_numpy(ids),
                "cross": cross}

    def check_length(self, rows: list[dict], aligned: list[Aligned]) -> None:
        """A re-tokenised sequence longer than the student's max_position_embeddings cannot train: refuse it."""
        if self.max_positions is None:
            return
        for r, a in zip(rows, aligned):
            if len(a.student_ids) > self.max_positions:
                raise ConfigError(f"--cross-tokenizer: cached sequence {int(r['seq_index'])} is {len(a.student_ids)} student "
                                  f"tokens, more than the student's max_position_embeddings {self.max_positions}. Capture "
                                  "with a smaller --max-seq-len, or use a student with more positions")

    def statistics(self, rows: list[dict], aligned: list[Aligned] | None = None) -> dict:
        """What the alignment and the mapping give on these cached sequences (logged, and in the model card);
        `aligned`: their alignments, when the caller has them already."""
        aligned = aligned if aligned is not None else [self.align(r) for r in rows]
        unspelled = sum(a.unspelled for a in aligned) / max(1, sum(a.text_bytes for a in aligned))
        student_rows = sum(len(a.student_ids) - 1 for a in aligned)
        pairs = sum(len(a.teacher_rows) for a in aligned)
        def coverage(t2s):  # the teacher's top-k mass on tokens with a student bucket, mean over aligned pairs
            return float(np.concatenate([(np.exp(r["topk_logprobs"][a.teacher_rows]) * (t2s[r["topk_ids"][a.teacher_rows]] >= 0)).sum(-1)
                                         for r, a in zip(rows, aligned)]).mean()) if pairs else 0.0

        return {"sequences": len(rows), "teacher_positions": sum(len(r["input_ids"]) - 1 for r in rows),
                "student_positions": student_rows, "aligned_positions": pairs,
                "student_share_with_target": pairs / max(1, student_rows),
                "exact_share": float(np.mean(np.concatenate([a.exact for a in aligned]))) if pairs else 0.0,
                "span_share": float(np.mean(np.concatenate([a.span_ids >= 0 for a in aligned]))) if pairs else 0.0,
                "exact_coverage": coverage(self.t2s_exact), "mapped_coverage": coverage(self.t2s),
                "student_tokens_per_teacher_token": (student_rows + len(rows)) / sum(len(r["input_ids"]) for r in rows),
                "unspelled_share": unspelled, "dropped_special_tokens": sum(a.dropped_specials for a in aligned),
                "longest_student_sequence": max(len(a.student_ids) for a in aligned)}

    def save(self, out: Path) -> None:
        """cross_tokenizer.json in the run dir: the statistics and every mapped (teacher id, student id) pair."""
        pairs = [[int(t), int(s)] for t, s in enumerate(self.t2s) if s >= 0]
        exact = [int(t) for t, s in enumerate(self.t2s_exact) if s >= 0]
        atomic_write_json(Path(out) / "cross_tokenizer.json", {**self.info, "teacher_to_student": pairs, "exact": exact})


def preflight_rows(reader) -> list[dict]:
    """PREFLIGHT_SEQUENCES cached sequences spread over the whole cache (from up to PREFLIGHT_SHARDS shards evenly
    spaced), not only its first: text that changes along the cache is seen before training."""
    shards = reader.shards
    count = min(PREFLIGHT_SHARDS, len(shards))
    picks = sorted({round(i * (len(shards) - 1) / max(1, count - 1)) for i in range(count)})
    per_shard = -(-PREFLIGHT_SEQUENCES // len(picks))
    rows = []
    for i in picks:
        data = reader.read_shard(shards[i], hidden=False)
        n = len(data["input_ids"])
        for j in np.linspace(0, n - 1, min(per_shard, n)).round().astype(int):
            rows.append({k: v[j] for k, v in data.items()})
    return rows[:PREFLIGHT_SEQUENCES]


def window_counts(counts: list[float], first_step: int, last_step: int) -> dict:
    """The log record's cross/ numbers of a logging window's summed (text bytes, inexactly re-tokenised bytes,
    dropped special tokens); a window above MAX_UNSPELLED stops the run."""
    text, unspelled, dropped = counts
    if unspelled / text > MAX_UNSPELLED:
        raise DistilyError(f"--cross-tokenizer: the student's tokenizer re-tokenised {unspelled / text:.1%} of the text of "
                           f"steps {first_step}-{last_step} inexactly (more than {MAX_UNSPELLED:.0%}; those parts get CE "
                           "only). The last checkpoint is kept; use a student tokenizer that encodes this text losslessly")
    return {"cross/unspelled_share": unspelled / text, "cross/dropped_special_tokens": int(dropped)}


def for_run(cfg, reader, student_tokenizer, max_positions: int | None = None) -> CrossTokenizer:
    """The run's tables, checked before any training on sequences spread over the cache: the student's tokenizer
    must spell the cached text byte for byte, the re-tokenised sequences must fit the student's positions, and the
    mapping must cover a useful share of the teacher's mass. During training every batch is counted (logged as
    cross/unspelled_share, cross/dropped_special_tokens) and a window whose text the student cannot spell stops it."""
    from transformers import AutoTokenizer

    if reader.targets in ("sampled", "sampled-exact"):
        raise ConfigError(f"--cross-tokenizer reads the cached top-k, and this cache holds {reader.targets} targets only: "
                          "capture with `distily teacher-cache --targets topk` (or both)")
    teacher = AutoTokenizer.from_pretrained(reader.tokenizer_dir())
    cross = CrossTokenizer(cfg.cross_tokenizer, teacher, student_tokenizer, max_positions)
    rows = preflight_rows(reader)
    aligned = [cross.align(r) for r in rows]
    stats = cross.statistics(rows, aligned)
    cross.check_length(rows, aligned)
    try:
        if stats["unspelled_share"] > MAX_UNSPELLED:
            for row in rows:  # the first part it misspells, for the message
                cross.align(row, strict=True)
    except AlignError as e:
        raise ConfigError(f"--cross-tokenizer: the student's tokenizer cannot re-tokenise the cached text exactly "
                          f"({stats['unspelled_share']:.1%} of it, more than {MAX_UNSPELLED:.0%}): {e}. Use a student "
                          "tokenizer that encodes any text losslessly (byte-level BPE or sentencepiece with byte "
                          "fallback, no normaliser that changes this text)") from None
    cross.info["preflight"] = stats
    if cfg.cross_tokenizer != "uld" and stats["mapped_coverage"] < MIN_COVERAGE:
        raise ConfigError(f"--cross-tokenizer {cfg.cross_tokenizer}: only {stats['mapped_coverage']:.1%} of the teacher's "
                          f"cached probability mass is on tokens that map to the student's vocabulary by their bytes, on "
                          f"{stats['aligned_positions']} aligned positions; the KD signal would be almost all rest bucket. "
                          "Use --cross-tokenizer uld (needs no mapping), or a student tokenizer closer to the teacher's")
    if stats["aligned_positions"] == 0:
        raise ConfigError("--cross-tokenizer: no student token ends where a teacher token ends on the first cached "
                          "sequences, so no position has a teacher target; check that the student's tokenizer is for "
                          "the same language/script as the cached text")
    return cross


def to_device(cross: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in cross.items()}
