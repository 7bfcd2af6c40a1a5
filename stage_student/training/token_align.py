"""The pure functions of cross-tokenizer distillation: each token's bytes, the teacher -> student token map, and
the alignment of one cached sequence with its re-tokenisation by the student (see cross_tokenizer.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError

ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

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
    t_keys, pieces, text, dropped = teacher_pieces(teacher_ids, t_bytes, t2s_special)
    s_ids, s_keys, unspelled = student_tokens(pieces, text, s_bytes, encode, strict)
    rows = paired_rows(teacher_ids, target_logprob, t_bytes, s_bytes, t_keys, s_ids, s_keys)
    rows.sort(key=lambda r: r[1])
    cols = list(zip(*rows)) if rows else [[]] * 6
    return Aligned(np.asarray(s_ids, dtype=np.int64), np.asarray(cols[0], dtype=np.int64),
                   np.asarray(cols[1], dtype=np.int64), np.asarray(cols[2], dtype=bool),
                   np.asarray(cols[3], dtype=np.int64), np.asarray(cols[4], dtype=np.int64),
                   np.asarray(cols[5], dtype=np.float32), len(text), unspelled, dropped)


def teacher_pieces(teacher_ids, t_bytes, t2s_special: dict[int, int]):
    """The cached text as pieces ("text", start, end) and ("special", student id, offset), each teacher token's end key
    (bytes so far, mapped special tokens so far), the text's bytes and the count of special tokens the student lacks."""
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
    return t_keys, pieces, text, dropped


def student_tokens(pieces, text: bytearray, s_bytes, encode, strict: bool):
    """The student's ids of the pieces and each one's end key (None inside a part it does not spell byte for byte),
    and how many bytes those parts hold."""
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
    return s_ids, s_keys, unspelled


def paired_rows(teacher_ids, target_logprob, t_bytes, s_bytes, t_keys, s_ids, s_keys) -> list[tuple]:
    """(teacher row, student row, exact, span student id, span first teacher id, span log-prob) of every student
    row whose token ends where a teacher token ends: the same prefix on both sides."""
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
    return rows
