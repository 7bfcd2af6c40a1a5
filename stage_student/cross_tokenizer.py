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
The mapping and the alignment statistics are stored with the run (cross_tokenizer.json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.manifest import atomic_write_json
from pipeline.resolve import tokenizer_fingerprint

METHODS = ("none", "bucket", "gold", "uld")
MIN_COVERAGE = 0.05  # below this share of the teacher's mass on mapped tokens the KD signal is mostly noise
MAX_UNSPELLED = 0.01  # above this share of the text re-tokenised inexactly (normalisers) the student is refused
PREFLIGHT_SEQUENCES = 64
PREFLIGHT_SHARDS = 8
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


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


# ------------------------------------------------------------------------------------------- token bytes


def token_bytes(tokenizer) -> list[bytes | None]:
    """Every id's exact bytes (None: a special token, which stands for no text).

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each vocabulary character stands for one byte (the GPT-2 map).
    Sentencepiece-style (Llama 2, Mistral, Gemma): '▁' is a space and <0xXX> the byte XX. Added tokens that are not
    special are their text."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    kinds = _types(state.get("decoder")) | _types(state.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    special = set(tokenizer.all_special_ids)
    if "ByteLevel" in kinds:
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        convert = lambda s: bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else None  # noqa: E731
    elif "ByteFallback" in kinds or "Metaspace" in kinds or "<0x0A>" in vocab:
        convert = _sentencepiece_bytes
    else:
        raise ConfigError(f"--cross-tokenizer: the tokenizer {tokenizer.name_or_path} is neither byte-level BPE nor "
                          "sentencepiece-style, so its tokens' exact bytes are unknown; use a student tokenizer of one "
                          "of those kinds (what every Llama, Qwen, Mistral or GPT-2 family model has)")
    for text, i in vocab.items():
        if i in special or (text in added and added[text].special):
            continue
        out[i] = text.encode("utf-8") if text in added else convert(text)
    return out


def _types(node) -> set[str]:
    if not isinstance(node, dict):
        return set()
    inner = node.get("decoders") or node.get("pretokenizers") or []
    return {node.get("type")} | {t for child in inner for t in _types(child)}


def _sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def special_map(teacher, student) -> dict[int, int]:
    """Teacher special id -> student special id: by role (bos, eos, ...), then by equal content."""
    out = {}
    student_vocab = student.get_vocab()
    for role in ROLES:
        t, s = getattr(teacher, f"{role}_id", None), getattr(student, f"{role}_id", None)
        if t is not None and s is not None and t not in out:
            out[t] = s
    for i in teacher.all_special_ids:
        content = teacher.convert_ids_to_tokens(i)
        if i not in out and content in student_vocab and student_vocab[content] in student.all_special_ids:
            out[i] = student_vocab[content]
    return out


def vocab_map(t_bytes: list[bytes | None], s_bytes: list[bytes | None], specials: dict[int, int]) -> np.ndarray:
    """[teacher vocab] student id of the token with the same bytes, else -1 (exact: one teacher id per student id)."""
    by_bytes = {}
    for i, b in enumerate(s_bytes):
        if b:
            by_bytes.setdefault(b, i)
    t2s = np.full(len(t_bytes), -1, dtype=np.int64)
    used = set()
    for i, b in enumerate(t_bytes):
        s = specials.get(i) if b is None else by_bytes.get(b)
        if s is not None and s not in used:
            t2s[i] = s
            used.add(s)
    return t2s


def prefix_map(exact: np.ndarray, t_bytes: list[bytes | None], s_bytes: list[bytes | None], encode_batch) -> np.ndarray:
    """The exact map, plus each unmatched teacher token -> the first student token of its bytes (a proper prefix of
    them; teacher tokens that are not whole UTF-8 text, or whose student tokens do not start with their bytes, stay
    -1). Many teacher tokens may share a student token: the loss adds their mass into one bucket."""
    out = exact.copy()
    todo, texts = [], []
    for i, b in enumerate(t_bytes):
        if b and exact[i] < 0:
            try:
                texts.append(b.decode("utf-8"))
                todo.append(i)
            except UnicodeDecodeError:
                pass
    for i, ids in zip(todo, encode_batch(texts) if texts else []):
        first = s_bytes[ids[0]] if ids else None
        if first and len(first) < len(t_bytes[i]) and t_bytes[i].startswith(first):
            out[i] = ids[0]
    return out


# ---------------------------------------------------------------------------------------------- alignment


@dataclass
class Aligned:
    """One cached sequence in the student's tokens, and its aligned rows. Row r predicts token r + 1."""

    student_ids: np.ndarray  # [S]
    teacher_rows: np.ndarray  # [P] teacher row at each common boundary
    student_rows: np.ndarray  # [P] the student row there
    exact: np.ndarray  # [P] bool: both next tokens are the same bytes (the comparison is exact there)
    span_ids: np.ndarray  # [P] the student's next token where it is >= 2 whole teacher tokens, else -1
    span_first: np.ndarray  # [P] the first of those teacher tokens (-1: none)
    span_logprob: np.ndarray  # [P] sum of the cached log-probs of those teacher tokens (the chain rule)
    text_bytes: int = 0  # bytes of text in the sequence
    unspelled: int = 0  # of them, in parts the student's tokens do not spell exactly (CE only there, no KD)
    dropped_specials: int = 0  # teacher special tokens with no student counterpart (left out of the student's ids)


class AlignError(ValueError):
    pass


def complete_utf8(data: bytes) -> tuple[int, int]:
    """(lead, end): data[lead:end] is data without a character cut at either edge (a packed sequence may start or
    end inside one)."""
    lead = 0
    while lead < min(3, len(data)) and data[lead] & 0xC0 == 0x80:
        lead += 1
    end = len(data)
    for back in range(1, min(4, end - lead) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # the last character's first byte: is the character whole?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            if need > back:
                end -= back
            break
    return lead, end


def align(teacher_ids, target_logprob, t_bytes, s_bytes, t2s_special: dict[int, int], encode,
          strict: bool = True) -> Aligned:
    """Re-tokenise one cached sequence for the student and pair the rows that end at the same byte.

    teacher_ids [T], target_logprob [T-1] (the cached log-prob of each next teacher token); encode(str) -> student
    ids. The key of a token's end is (bytes so far, mapped special tokens so far), on both sides. A document part
    the student's tokens do not spell byte for byte (a normaliser, e.g. NFC, changed it) raises AlignError when
    strict, else keeps its student tokens for CE with none of their ends compared."""
    t_keys, pieces, text = [], [], bytearray()
    n_special = dropped = 0
    for tid in teacher_ids.tolist():
        b = t_bytes[tid] if tid < len(t_bytes) else None
        if b is None:
            if tid in t2s_special:
                pieces.append(("special", t2s_special[tid], len(text)))
                n_special += 1
            else:
                dropped += 1
        else:
            if not pieces or pieces[-1][0] != "text":
                pieces.append(("text", len(text), None))
            text += b
            pieces[-1] = ("text", pieces[-1][1], len(text))
        t_keys.append((len(text), n_special))
    s_ids, s_keys, n_special, unspelled = [], [], 0, 0
    for kind, a, b in pieces:
        if kind == "special":
            s_ids.append(a)
            n_special += 1
            s_keys.append((b, n_special))
            continue
        lead, end = complete_utf8(bytes(text[a:b]))
        if end <= lead:
            continue
        chunk = bytes(text[a + lead : a + end])
        try:
            ids = encode(chunk.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AlignError(f"the cached text is not UTF-8 at bytes {a + lead}..{a + end} ({e})") from None
        got = b"".join(s_bytes[i] or b"" for i in ids)
        shift = 1 if got == b" " + chunk and ids and (s_bytes[ids[0]] or b"").startswith(b" ") else 0  # a prefix space
        if got[shift:] != chunk:
            if strict:
                raise AlignError(f"the student's tokens of {chunk[:60]!r} spell {got[:60]!r}: its tokenizer changes "
                                 "the text (a normaliser, or characters it maps to <unk>)")
            unspelled += len(chunk)
            s_ids += ids
            s_keys += [None] * len(ids)
            continue
        pos = a + lead - shift
        for i in ids:
            pos += len(s_bytes[i] or b"")
            s_ids.append(i)
            s_keys.append((pos, n_special))
    teacher_at = {k: r for r, k in enumerate(t_keys[:-1])}  # the last row of each key predicts what follows it
    t_end_index = {k: r for r, k in enumerate(t_keys)}
    rows = []
    student_at = {k: r for r, k in enumerate(s_keys[:-1]) if k is not None}
    for key, s_row in student_at.items():
        t_row = teacher_at.get(key)
        if t_row is None:
            continue
        nxt_t, nxt_s = teacher_ids[t_row + 1], s_ids[s_row + 1]
        t_next = t_bytes[nxt_t] if nxt_t < len(t_bytes) else None
        exact = t_next is not None and t_next == s_bytes[nxt_s]
        span = (-1, -1, 0.0)
        last = t_end_index.get(s_keys[s_row + 1])
        if not exact and s_bytes[nxt_s] and last is not None and last - t_row >= 2 and last <= len(target_logprob):
            inside = teacher_ids[t_row + 1 : last + 1]
            if all(t_bytes[t] for t in inside.tolist()):
                span = (nxt_s, int(teacher_ids[t_row + 1]), float(np.sum(target_logprob[t_row:last], dtype=np.float64)))
        rows.append((t_row, s_row, exact, *span))
    rows.sort(key=lambda r: r[1])
    cols = list(zip(*rows)) if rows else [[]] * 6
    return Aligned(np.asarray(s_ids, dtype=np.int64), np.asarray(cols[0], dtype=np.int64),
                   np.asarray(cols[1], dtype=np.int64), np.asarray(cols[2], dtype=bool),
                   np.asarray(cols[3], dtype=np.int64), np.asarray(cols[4], dtype=np.int64),
                   np.asarray(cols[5], dtype=np.float32), len(text), unspelled, dropped)


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
