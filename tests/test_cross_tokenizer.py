"""Cross-tokenizer distillation (--cross-tokenizer): byte tables, alignment by byte offsets, the mapped-bucket
and ULD losses against float64 references, the identity case against the normal path, a run end to end, bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import build_llama, build_tokenizer, read_all

from pipeline.errors import ConfigError, DistilyError
from stage_student.losses import cross as cross_loss
from stage_student.training.cross_tokenizer import CrossTokenizer
from stage_student.training.evaluate import evaluate
from stage_student.training.token_align import complete_utf8, token_bytes


@pytest.fixture(scope="module")
def teacher_tok(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory, texts):
    """A byte-level BPE of another size, trained on other text: most tokens differ from the teacher's."""
    return build_tokenizer(texts[::3], tmp_path_factory.mktemp("other-tok"), vocab_size=2000)


@pytest.fixture(scope="module")
def rows(hf_cache):
    return read_all(hf_cache)


def test_token_bytes_spell_any_text(teacher_tok, other_tok):
    text = "naïve café: 東京 costs €5 — \"quoted\"\n\ttabs"
    for tok in (teacher_tok, other_tok):
        table = token_bytes(tok)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(table[i] for i in ids) == text.encode()
        assert table[tok.eos_token_id] is None and table[tok.bos_token_id] is None


def test_sentencepiece_student_with_its_prefix_space(rows, teacher_tok, texts):
    """A sentencepiece-style student (Metaspace, '▁' prepended to each text): its bytes are a space + the text, and
    the alignment absorbs that space into its first token."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(texts[::3], vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"])
    student = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    table = token_bytes(student)
    text = "The cat sat. Then, 12 dogs"
    assert b"".join(table[i] for i in student(text, add_special_tokens=False)["input_ids"]) == b" " + text.encode()
    stats = CrossTokenizer("bucket", teacher_tok, student).statistics(rows[:4])
    assert stats["student_share_with_target"] > 0.5 and stats["exact_share"] > 0.3


def test_vocabulary_mapping_exact_then_first_student_token(teacher_tok, other_tok):
    """A coarse teacher (2000 tokens) into a finer student (384): byte-identical tokens map one to one; every other
    teacher token maps to the first token of the student's own tokenization of its text."""
    cross = CrossTokenizer("bucket", other_tok, teacher_tok)
    t_table, s_table = token_bytes(other_tok), token_bytes(teacher_tok)
    exact = cross.t2s_exact
    assert len(set(exact[exact >= 0].tolist())) == (exact >= 0).sum() > 300
    prefix = [i for i in range(len(exact)) if exact[i] < 0 <= cross.t2s[i]]
    assert len(prefix) > 1000
    for i in prefix:
        text = other_tok.convert_tokens_to_string([other_tok.convert_ids_to_tokens(i)])
        assert cross.t2s[i] == teacher_tok(text, add_special_tokens=False)["input_ids"][0]
        assert t_table[i].startswith(s_table[cross.t2s[i]]) and t_table[i] != s_table[cross.t2s[i]]
    assert cross.t2s[other_tok.eos_token_id] == teacher_tok.eos_token_id


def test_complete_utf8_cuts_partial_characters():
    data = "é東".encode()[1:] + b"ab" + "東".encode()[:2]  # starts inside é, ends inside 東
    lead, end = complete_utf8(data)
    assert data[lead:end] == "東ab".encode()
    assert complete_utf8(b"abc") == (0, 3)


def reference_pairs(t_ids, s_ids, t_tok, s_tok):
    """Aligned (teacher row, student row) pairs from each tokenizer's own decoder (ASCII text: every prefix decodes
    to whole characters): the row's key is (UTF-8 bytes of the decoded prefix, special tokens so far)."""
    def keys(ids, tok):
        special = set(tok.all_special_ids)
        return [(len(tok.decode(ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False).encode()),
                 sum(t in special for t in ids[: i + 1])) for i in range(len(ids) - 1)]

    t_at = {k: i for i, k in enumerate(keys(t_ids, t_tok))}
    s_at = {k: j for j, k in enumerate(keys(s_ids, s_tok))}
    return sorted((t_at[k], j) for k, j in s_at.items() if k in t_at)


def test_alignment_matches_byte_offsets_from_the_decoders(rows, teacher_tok, other_tok):
    cross = CrossTokenizer("bucket", teacher_tok, other_tok)
    checked, pairs, teacher_rows, spans = 0, 0, 0, 0
    for row in rows[:8]:
        text = teacher_tok.decode(row["input_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not text.isascii():
            continue
        a = cross.align(row)
        s_ids = a.student_ids.tolist()
        # the student's tokens spell the same text, and are its own tokenization of each document's part
        assert other_tok.decode(s_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
        assert s_ids.count(other_tok.eos_token_id) == row["input_ids"].tolist().count(teacher_tok.eos_token_id)
        want = reference_pairs(row["input_ids"].tolist(), s_ids, teacher_tok, other_tok)
        assert list(zip(a.teacher_rows.tolist(), a.student_rows.tolist())) == want
        pairs, teacher_rows, spans = pairs + len(want), teacher_rows + len(row["input_ids"]) - 1, spans + (a.span_ids >= 0).sum()
        # exact where both next tokens are the same bytes; a span's log-prob is the chain rule over its teacher tokens
        for t, s, exact, span, lp in zip(a.teacher_rows, a.student_rows, a.exact, a.span_ids, a.span_logprob):
            t_next = teacher_tok.decode([row["input_ids"][t + 1]])
            assert exact == (t_next == other_tok.decode([s_ids[s + 1]]) and row["input_ids"][t + 1] != teacher_tok.eos_token_id)
            if span >= 0:
                word = other_tok.decode([span])
                m = next(m for m in range(2, 20) if teacher_tok.decode(row["input_ids"][t + 1 : t + 1 + m]) == word)
                assert lp == pytest.approx(float(row["target_logprob"][t : t + m].astype(np.float64).sum()), abs=1e-4)
        checked += 1
    assert checked >= 4
    # the student's larger vocabulary: a real mix of aligned and unaligned teacher rows, and multi-token spans
    assert 0.3 < pairs / teacher_rows < 0.95 and spans > 10


def test_identity_tokenizer_gives_the_normal_loss(rows, tiny_teacher, teacher_tok, tmp_path):
    """The teacher's own tokenizer through the cross path: alignment and mapping are identities, the loss is the
    cached path's (fused head, every divergence) to float32 rounding."""
    from stage_student.losses import chunked
    from stage_student.students.build import StudentForward
    from stage_student.training.data import collate
    from stage_student.training.step import CachedTeacher, Distiller

    cross = CrossTokenizer("bucket", teacher_tok, teacher_tok)
    batch_rows = rows[:3]
    a = cross.align(batch_rows[0])
    n = len(batch_rows[0]["input_ids"]) - 1
    np.testing.assert_array_equal(a.student_ids, batch_rows[0]["input_ids"])
    assert a.teacher_rows.tolist() == list(range(n)) == a.student_rows.tolist()
    assert (a.span_ids == -1).all()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_llama(tmp_path / "s", len(teacher_tok), layers=1, seed=3))
    distiller = Distiller(StudentForward(model, fuse=True), torch.nn.Module(), torch.nn.Module(), hs_pairs=[])
    teacher = CachedTeacher("topk", torch.device("cpu"))
    normal, crossed = collate(batch_rows), cross(batch_rows)
    assert torch.equal(normal["input_ids"], crossed["input_ids"])
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        spec = chunked.LossSpec(kd=name, ce_weight=0.5)
        want = distiller(normal["input_ids"], teacher(normal, normal["input_ids"]), spec)
        got = distiller(crossed["input_ids"], teacher(crossed, crossed["input_ids"]), spec)
        for key in ("kd", "ce", "loss"):
            assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), (name, key)


def constructed():
    """Four aligned rows over a 7-token student vocabulary: unmapped top-k slots, a span taken from a mapped
    slot, a span taken from the rest, one whose span token is already mapped (no span bucket), and two teacher
    tokens sharing a student token with a span taken from the second of them."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64)
    p = torch.tensor([[0.5, 0.2, 0.1], [0.4, 0.3, 0.05], [0.6, 0.25, 0.1], [0.3, 0.3, 0.2]], dtype=torch.float64)
    t = {"mapped_ids": torch.tensor([[2, -1, 4], [0, 5, -1], [1, 3, 6], [4, 2, 4]]), "topk_logprobs": p.log(),
         "tail_mass": 1 - p.sum(-1), "span_ids": torch.tensor([6, 3, 3, 5]), "span_slot": torch.tensor([0, -1, 1, 2]),
         "span_logprob": torch.tensor([0.3, 0.04, 0.2, 0.1], dtype=torch.float64).log()}
    return logits, t


def reference_buckets(logits, t):
    """Float64, row by row: the bucket probabilities of both sides, as the docstring of cross_loss.py defines them."""
    out = []
    for r in range(logits.shape[0]):
        q = torch.softmax(logits[r], -1).tolist()
        ids, p = t["mapped_ids"][r].tolist(), t["topk_logprobs"][r].exp().tolist()
        span, slot, p_span = int(t["span_ids"][r]), int(t["span_slot"][r]), math.exp(float(t["span_logprob"][r]))
        rest_p = float(t["tail_mass"][r]) + sum(pi for pi, i in zip(p, ids) if i < 0)
        P = {}
        for pi, i in zip(p, ids):
            if i >= 0:
                P[i] = P.get(i, 0.0) + pi
        if span >= 0 and span not in P:
            if slot >= 0 and ids[slot] >= 0:
                take = min(p_span, P[ids[slot]])
                P[ids[slot]] -= take
            else:
                take = min(p_span, rest_p)
                rest_p -= take
            P["span"] = take
        P["rest"] = rest_p
        Q = {i: q[i] for i in P if i not in ("span", "rest")}
        if "span" in P:
            Q["span"] = q[span]
        Q["rest"] = 1 - sum(Q.values())
        total = sum(P.values())
        out.append(({k: v / total for k, v in P.items()}, Q))
    return out


def test_mapped_kd_equals_a_float64_reference():
    logits, t = constructed()
    for name, d in (("forward_kl", lambda P, Q: sum(P[k] * math.log(P[k] / Q[k]) for k in P if P[k] > 0)),
                    ("reverse_kl", lambda P, Q: sum(Q[k] * math.log(Q[k] / P[k]) for k in P if Q[k] > 0)),
                    ("tvd", lambda P, Q: 0.5 * sum(abs(P[k] - Q[k]) for k in P))):
        want = np.mean([d(P, Q) for P, Q in reference_buckets(logits, t)])
        got = cross_loss.mapped_kd(name, logits.float(), **{k: v.float() if v.is_floating_point() else v for k, v in t.items()})
        assert got.item() == pytest.approx(want, rel=1e-5), name
    # the three kinds of row were all there: a span from a mapped slot, from the rest, and none (token mapped)
    buckets = reference_buckets(logits, t)
    assert "span" in buckets[0][0] and "span" in buckets[1][0] and "span" not in buckets[2][0]
    assert buckets[0][0][2] == pytest.approx((0.5 - 0.3) / 1.0) and buckets[3][0][4] == pytest.approx(0.5 - 0.1)


def test_reverse_kl_gradient_is_finite_with_empty_buckets():
    logits, t = constructed()
    z = logits.float().requires_grad_()
    cross_loss.mapped_kd("reverse_kl", z, **{k: v.float() if v.is_floating_point() else v for k, v in t.items()}).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_uld_terms_equal_sorted_wasserstein_references():
    logits, t = constructed()
    q = torch.softmax(logits, -1).numpy()
    p = t["topk_logprobs"].exp().numpy()
    tail = t["tail_mass"].numpy()
    want = np.mean([np.abs(np.r_[np.sort(p[r])[::-1], tail[r]] - np.r_[np.sort(q[r])[::-1][:3], 1 - np.sort(q[r])[::-1][:3].sum()]).sum()
                    for r in range(4)])
    assert cross_loss.uld(logits.float(), t["topk_logprobs"].float(), t["tail_mass"].float()).item() == pytest.approx(want, rel=1e-5)
    # on the unmapped mass only: teacher's unmapped top-k vs the student's largest tokens outside the mapped + span
    rows = []
    for r in range(4):
        ids = t["mapped_ids"][r].tolist()
        span = int(t["span_ids"][r])
        covered = {i for i in ids if i >= 0} | ({span} if span not in ids else set())
        pt = np.sort([p[r][j] if ids[j] < 0 else 0.0 for j in range(3)])[::-1]
        qs = np.sort([q[r][i] for i in range(7) if i not in covered])[::-1][:3]
        rows.append(np.abs(pt - np.pad(qs, (0, 3 - len(qs)))).sum())
    got = cross_loss.uld_unmatched(logits.float(), t["mapped_ids"], t["topk_logprobs"].float(), t["span_ids"])
    assert got.item() == pytest.approx(np.mean(rows), rel=1e-5)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, other_tok):
    out = tmp_path_factory.mktemp("other-student")
    other_tok.save_pretrained(out)
    return build_llama(out, len(other_tok), layers=2, hidden=64, seed=5)


def test_cross_tokenizer_run_end_to_end(hf_cache, other_student, tmp_path):
    from test_train_student import cfg_for

    from stage_student.train import Trainer, train

    with pytest.raises(DistilyError, match="--cross-tokenizer"):  # never silently
        train(cfg_for(hf_cache, tmp_path / "refused", student=str(other_student), max_steps=1))
    trainer = Trainer(cfg_for(hf_cache, tmp_path / "run", student=str(other_student), cross_tokenizer="gold",
                              ce_weight=0.5, max_steps=8, lr=1e-2, num_workers=1))  # the collate runs in a worker
    before = evaluate(trainer)
    result = trainer.run()
    assert result["finished"] and result["eval/forward_kl"] < before["eval/forward_kl"]
    stored = json.loads((tmp_path / "run" / "cross_tokenizer.json").read_text())
    assert stored["teacher_to_student"] and stored["method"] == "gold"
    pre = stored["preflight"]
    assert 0 < pre["exact_coverage"] <= pre["mapped_coverage"] <= 1 and 0 < pre["student_share_with_target"] < 1 and pre["aligned_positions"] > 0
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["cross_tokenizer"]["preflight"] == pre
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["cross/aligned_positions"] == pre["aligned_positions"]
    from eval.report import model_card

    card = model_card("run", {"run": {"metrics": {"heldout/bits_per_byte": 3.0}}}, "", run_config, "lee")
    assert "method `gold`" in card and f"{pre['aligned_positions']} aligned positions" in card
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "final")) == len(AutoTokenizer.from_pretrained(other_student))


def test_bad_input_is_refused_before_training(hf_cache, other_student, tmp_path, monkeypatch, texts):
    from test_train_student import cfg_for
    from tokenizers import normalizers

    from stage_student.train import Trainer
    from stage_student.training import cross_tokenizer

    with pytest.raises(ConfigError, match="--student DIR"):
        Trainer(cfg_for(hf_cache, tmp_path / "a", cross_tokenizer="bucket"))
    with pytest.raises(ConfigError, match="unknown"):
        Trainer(cfg_for(hf_cache, tmp_path / "b", student=str(other_student), cross_tokenizer="gld"))
    with pytest.raises(ConfigError, match="--hs-weight"):
        Trainer(cfg_for(hf_cache, tmp_path / "c", student=str(other_student), cross_tokenizer="bucket", hs_weight=1.0))
    # a tokenizer that changes the text (lower-cases it) cannot spell the cached text
    lower = tmp_path / "lower"
    tok = build_tokenizer(texts[::3], lower, vocab_size=500)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    tok.save_pretrained(lower)
    build_llama(lower, len(tok), layers=1, hidden=32)
    with pytest.raises(ConfigError, match="re-tokenise the cached text exactly"):
        Trainer(cfg_for(hf_cache, tmp_path / "d", student=str(lower), cross_tokenizer="bucket"))
    # in training (where a rare part may not be spelled exactly, e.g. under NFC) such parts get CE only, no pairs
    from transformers import AutoTokenizer

    row = read_all(hf_cache)[0]
    cross = CrossTokenizer("bucket", AutoTokenizer.from_pretrained(hf_cache / "tokenizer"), AutoTokenizer.from_pretrained(lower))
    with pytest.raises(cross_tokenizer.AlignError, match="spell"):
        cross.align(row, strict=True)
    loose = cross.align(row)
    assert loose.unspelled == loose.text_bytes > 0 and len(loose.student_ids) > 10
    eos = [j for j, i in enumerate(loose.student_ids.tolist()) if i == cross.student.eos_token_id]
    assert set(loose.student_rows.tolist()) <= {j - 1 for j in eos} | set(eos)  # only around document boundaries
    # a mapping that covers nothing
    monkeypatch.setattr(cross_tokenizer, "vocab_map", lambda t, s, specials: np.full(len(t), -1))
    monkeypatch.setattr(cross_tokenizer, "prefix_map", lambda exact, *_: exact)
    with pytest.raises(ConfigError, match="uld"):
        Trainer(cfg_for(hf_cache, tmp_path / "e", student=str(other_student), cross_tokenizer="bucket"))


def test_what_cannot_train_is_counted_logged_and_refused(hf_cache, other_student, other_tok, tmp_path, monkeypatch):
    """Teacher special tokens the student lacks are counted; a re-tokenised sequence longer than the student's
    positions is refused before training; the pre-flight sees sequences from the whole cache, not its first 64;
    a training window whose text the student cannot spell stops the run; the counts are in the log."""
    from test_train_student import cfg_for
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from stage_student.train import Trainer
    from stage_student.training import cross_tokenizer

    teacher = AutoTokenizer.from_pretrained(hf_cache / "tokenizer")
    teacher.add_special_tokens({"additional_special_tokens": ["<|tool_call|>"]})  # a special the student lacks
    row = dict(read_all(hf_cache)[0])
    cross = CrossTokenizer("bucket", teacher, other_tok)
    unmapped = teacher.convert_tokens_to_ids("<|tool_call|>")
    assert unmapped not in cross.specials
    row["input_ids"] = row["input_ids"].copy()
    row["input_ids"][[5, 9]] = unmapped
    assert cross.align(row).dropped_specials == 2
    assert float(cross([row])["cross"]["counts"][2]) == 2
    # too long for the student: refused before training, naming the sequence
    short = tmp_path / "short-student"
    other_tok.save_pretrained(short)
    build_llama(short, len(other_tok), layers=1, hidden=32)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 16}))
    with pytest.raises(ConfigError, match="more than the student's max_position_embeddings 16"):
        Trainer(cfg_for(hf_cache, tmp_path / "long", student=str(short), cross_tokenizer="bucket"))
    # the pre-flight reads sequences from the cache's last shard too
    reader = CacheReader(hf_cache)
    last = reader.shards[-1]["first_seq"]
    assert any(int(r["seq_index"]) >= last for r in cross_tokenizer.preflight_rows(reader))
    # a window whose text the student misspells stops the run; the counts are logged
    trainer = Trainer(cfg_for(hf_cache, tmp_path / "run", student=str(other_student), cross_tokenizer="bucket",
                              max_steps=2, logging_steps=1))
    result = trainer.run()
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["cross/unspelled_share"] == 0 and first["cross/dropped_special_tokens"] == 0 and result["finished"]
    monkeypatch.setattr(cross_tokenizer, "MAX_UNSPELLED", -1.0)  # any share is now too much
    trainer = Trainer(cfg_for(hf_cache, tmp_path / "run2", student=str(other_student), cross_tokenizer="bucket",
                              max_steps=2, logging_steps=1))
    with pytest.raises(DistilyError, match="re-tokenised 0.0% of the text of steps 1-1 inexactly"):
        trainer.run()
