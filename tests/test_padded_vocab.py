"""Padded vocabularies (issue 21 §1): a teacher and students of one tokenizer whose LM heads have different numbers of
padding rows beyond it (Qwen2.5-7B: 152,064 rows, 0.5B: 151,936, tokenizer: 151,665).

The teacher here is the tiny teacher with PAD extra head rows, the first of which is twice its most likely token's
row, so the padding carries real probability (about 40% of the mass on average). The cache must hold the teacher
conditioned on the real tokens; students with wider and narrower (but >= len(tokenizer)) heads train from it and
from the online teacher with every loss over the real tokens; a head narrower than the tokenizer is refused.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, build_llama, capture_cfg, read_all

from pipeline.cache import CacheReader
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, DistilyError
from stage_student.losses import chunked

PAD = 4  # the teacher's padding rows
K = 8


def tokenizer_len(model_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir))


def copy_tokenizer(src, dst) -> None:
    for f in src.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)


@pytest.fixture(scope="module")
def padded_teacher(tmp_path_factory, tiny_teacher, texts):
    """The tiny teacher with PAD padding rows in an untied head; padding row 0 = 2 x the most likely token's row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.resolve import pack

    out = tmp_path_factory.mktemp("padded-teacher")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    n = len(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    ids = torch.from_numpy(pack(tok, texts[:40], 64)[:8].astype(np.int64))
    with torch.no_grad():
        likely = int(model(input_ids=ids).logits.softmax(-1).mean((0, 1)).argmax())
        model.resize_token_embeddings(n + PAD, mean_resizing=False)
        head = model.get_output_embeddings().weight
        head[n] = 2.0 * head[likely]
    assert model.config.vocab_size == n + PAD and not model.config.tie_word_embeddings
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tiny_teacher, out)
    return out


@pytest.fixture(scope="module")
def padded_cache(tmp_path_factory, padded_teacher, text_file):
    from stage_teacher.capture import run

    out = tmp_path_factory.mktemp("padded-cache")
    run(capture_cfg(padded_teacher, text_file, out, targets="both", samples=32, max_tokens=64 * 12, hidden_layers=[]))
    return out


def teacher_log_probs64(model_dir, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs over the n real tokens, the whole head's padding mass), float64, from a plain HF forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        z = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(z[..., :n], -1), torch.softmax(z, -1)[..., n:].sum(-1)


# ------------------------------------------------------------------------------------------------ capture


def test_cache_holds_the_teacher_over_the_real_tokens(padded_teacher, padded_cache):
    n = tokenizer_len(padded_teacher)
    m = CacheReader(padded_cache).manifest
    assert m["capture"]["targets_vocab"] == n and m["teacher"]["vocab_size"] == n + PAD
    rows = read_all(padded_cache)
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    logp, padding_mass = teacher_log_probs64(padded_teacher, ids, n)
    assert padding_mass.mean() > 0.2  # the test means something: the head's padding rows carry real probability
    topk_ids = np.stack([r["topk_ids"] for r in rows])
    sample_ids = np.concatenate([r["sample_ids"].ravel() for r in rows])
    assert topk_ids.max() < n and sample_ids.max() < n and (sample_ids >= 0).sum() > 12 * 63
    top = logp.topk(K, dim=-1)
    np.testing.assert_allclose(np.stack([r["topk_logprobs"] for r in rows]), top.values.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.stack([r["tail_mass"] for r in rows]),
                               (1 - top.values.exp().sum(-1)).numpy(), atol=2e-5)
    np.testing.assert_allclose(np.stack([r["target_logprob"] for r in rows]),
                               logp.gather(-1, ids[:, 1:, None])[..., 0].numpy(), atol=2e-5)
    entropy = -(logp.exp() * logp).sum(-1)
    np.testing.assert_allclose(np.stack([r["teacher_entropy"] for r in rows]), entropy.numpy(), atol=2e-5)


def test_vllm_hooks_cut_the_padding_rows_too(tmp_path, padded_teacher, padded_cache, text_file):
    """The vLLM hooks path (a CLI subprocess: its own engine) makes the same targets as the HF backend."""
    out = tmp_path / "vllm"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "teacher-cache", "--teacher", str(padded_teacher),
                        "--dataset", str(text_file), "--backend", "vllm", "--targets", "both", "--samples", "32",
                        "--top-k", str(K), "--vllm-max-logprobs", str(K), "--max-seq-len", "64",
                        "--max-tokens", str(64 * 12), "--sequences-per-shard", "4", "--logprob-dtype", "float32",
                        "--dtype", "float32", "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    n = tokenizer_len(padded_teacher)
    manifest = CacheReader(out).manifest
    assert manifest["capture"]["targets_from"] == "hooks" and manifest["capture"]["targets_vocab"] == n
    v, h = read_all(out), read_all(padded_cache)
    assert len(v) == len(h) == 12
    for a, b in zip(v, h):
        assert a["topk_ids"].max() < n and a["sample_ids"].max() < n
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-4)
        np.testing.assert_allclose(a["tail_mass"], b["tail_mass"], atol=1e-4)
        np.testing.assert_allclose(a["teacher_entropy"], b["teacher_entropy"], atol=1e-4)


def test_padded_head_refusals_before_the_engine(tmp_path, padded_teacher, tiny_teacher, text_file):
    from stage_teacher.capture import prepare

    with pytest.raises(ConfigError, match="--targets-from hooks"):
        prepare(capture_cfg(padded_teacher, text_file, tmp_path / "a", backend="vllm", targets_from="engine"))
    n = tokenizer_len(padded_teacher)
    with pytest.raises(ConfigError, match=f"--top-k {n + 1} must be between 1 and the vocab size {n}"):
        prepare(capture_cfg(padded_teacher, text_file, tmp_path / "b", top_k=n + 1))
    narrow = tmp_path / "narrow-teacher"  # a head narrower than its tokenizer cannot embed or predict the text's last ids
    build_llama(narrow, n - 2, layers=1, hidden=32)
    copy_tokenizer(tiny_teacher, narrow)
    with pytest.raises(ConfigError, match=f"the text holds token ids >= {n - 2}"):
        prepare(capture_cfg(narrow, text_file, tmp_path / "c", hidden_layers=[]))
    # ids the head lacks but the text never holds (an added special token) are accepted: targets over the head
    # (tests/test_families.py: transformers' Qwen2 tokenizer adds <|endoftext|> to the tiny tokenizer)
    # an unpadded teacher's manifest is as before (older caches keep their identity)
    assert "targets_vocab" not in prepare(capture_cfg(tiny_teacher, text_file, tmp_path / "d"))[0]["capture"]


# --------------------------------------------------------------------------------------------- the losses


def reference_kd64(student_logits, n: int, targets: dict, kind: str, teacher_logits=None) -> torch.Tensor:
    """Forward KL on the n real tokens in float64 (differentiable), written out apart from losses.py/chunked.py."""
    logq = torch.log_softmax(student_logits.double()[..., :n], -1)
    if kind == "online":
        logp = torch.log_softmax(teacher_logits.double()[..., :n], -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    if kind == "sampled":
        picked = logq.gather(-1, targets["sample_ids"].long().clamp_min(0))
        return ((targets["sample_weights"].double() * -picked).sum(-1) - targets["teacher_entropy"].double()).mean()
    p = torch.cat([targets["topk_logprobs"].double().exp(), targets["tail_mass"].double()[:, None]], -1)
    q_top = logq.gather(-1, targets["topk_ids"].long()).exp()
    q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1).mean()


@pytest.mark.parametrize("kind", ["topk", "sampled", "online"])
@pytest.mark.parametrize("path", ["fused", "logits", "reference"])
def test_head_losses_use_the_first_vocab_rows(kind, path):
    """A student head 5 rows wider than the n real tokens and a teacher 3 wider, each with a padding row that
    would take much of the mass: loss and gradient equal a float64 reference on the real tokens, and the
    padding rows get no gradient. fused: the chunked head on the weight; logits: the chunked loss on logits
    (an unfusable head); reference: --loss-chunk-size 0."""
    g = torch.Generator().manual_seed(0)
    n, pad, h, positions = 30, 5, 16, 20
    hidden = torch.randn(positions, h, generator=g, dtype=torch.float64)
    weight = torch.randn(n + pad, h, generator=g, dtype=torch.float64)
    weight[n] = 3 * weight[0]
    teacher = torch.randn(positions, n + 3, generator=g, dtype=torch.float64) * 2
    teacher[:, n] = 5.0
    logp = torch.log_softmax(teacher[:, :n], -1)
    if kind == "topk":
        top = logp.topk(6, -1)
        targets = {"topk_ids": top.indices, "topk_logprobs": top.values.float(),
                   "tail_mass": (1 - top.values.exp().sum(-1)).float()}
    elif kind == "sampled":
        draws = torch.multinomial(logp.exp(), 16, replacement=True, generator=g)
        ids, counts = torch.unique(draws[0], return_counts=True)  # the same unique ids on every row, for brevity
        targets = {"sample_ids": ids.expand(positions, -1), "sample_weights": (counts / 16).float().expand(positions, -1),
                   "teacher_entropy": -(logp.exp() * logp).sum(-1).float()}
    else:
        targets = {"teacher_logits": teacher.float()}
    ref_w = weight[:n].clone().requires_grad_(True)
    want = reference_kd64(hidden @ ref_w.T, n, targets, kind, teacher)
    want.backward()

    spec = chunked.LossSpec(kd="forward_kl", vocab=n)
    w = weight.float().requires_grad_(True)
    t = chunked.Targets(**targets)
    if path == "fused":
        out = chunked.head_losses(hidden.float(), w, None, spec, t, 7)
    elif path == "logits":
        out = chunked.head_losses(hidden.float() @ w.T, None, None, spec, t, 7)
    else:
        out = chunked.reference_losses(hidden.float() @ w.T, spec, t)
    out["loss"].backward()
    assert out["kd"].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(w.grad[:n].double(), ref_w.grad, rtol=1e-4, atol=1e-6)
    assert (w.grad[n:] == 0).all()


def test_a_head_narrower_than_the_targets_is_an_error():
    with pytest.raises(DistilyError, match="LM head has 29 rows, fewer than the 30 tokens"):
        chunked.head_losses(torch.zeros(3, 4), torch.zeros(29, 4), None, chunked.LossSpec(vocab=30),
                            chunked.Targets(labels=torch.zeros(3, dtype=torch.long)), 2)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def students(tmp_path_factory, padded_teacher):
    """Pretrained-style students (no tokenizer files: the cache's is used) 7 rows wider and 1 row wider than the
    tokenizer, so wider and narrower than the teacher's n + PAD rows."""
    n = tokenizer_len(padded_teacher)
    root = tmp_path_factory.mktemp("students")
    return {name: build_llama(root / name, n + extra, layers=2, hidden=64, seed=3)
            for name, extra in (("wider", 7), ("narrower", 1))}


def train_cfg(cache, out, student, **kw) -> TrainConfig:
    base = dict(cache=str(cache), output=str(out), student=str(student), batch_size=2, max_steps=2, save_steps=100,
                logging_steps=1, eval_sequences=2, lr=1e-3, warmup_steps=0, num_workers=1, shuffle_buffer=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("which", ["wider", "narrower"])
@pytest.mark.parametrize("kind", ["topk", "sampled", "online"])
def test_students_of_other_head_widths_train(tmp_path, padded_teacher, padded_cache, students, which, kind):
    from stage_student.train import Trainer
    from stage_student.training.data import CacheStream

    n = tokenizer_len(padded_teacher)
    kw = {"online_teacher": str(padded_teacher)} if kind == "online" else {"kd_targets": kind}
    trainer = Trainer(train_cfg(padded_cache, tmp_path, students[which], **kw))
    assert trainer.model.config.vocab_size != n + PAD
    batch = next(iter(CacheStream(str(padded_cache), trainer.plan.train_pairs, 2, 0, 4)))
    ids = batch["input_ids"]
    ids = batch["input_ids"].to(trainer.device)
    got = trainer.train_module(ids, trainer.teacher(batch, ids), trainer.loss_spec)["kd"].item()
    student = copy.deepcopy(trainer.model).double()
    with torch.no_grad():
        logits = student(input_ids=ids).logits[:, :-1].reshape(-1, student.config.vocab_size)
    teacher_logits = None
    if kind == "online":
        from transformers import AutoModelForCausalLM

        t = AutoModelForCausalLM.from_pretrained(padded_teacher, dtype=torch.float64)
        with torch.no_grad():
            teacher_logits = t(input_ids=ids).logits[:, :-1].reshape(-1, n + PAD)
    targets = {} if kind == "online" else trainer.cached.targets(batch)
    want = reference_kd64(logits, n, targets, kind, teacher_logits).item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    result = trainer.run()
    assert result["finished"] and np.isfinite(result["eval/forward_kl"])


def test_student_head_narrower_than_the_tokenizer_is_refused(tmp_path, padded_teacher, padded_cache):
    from stage_student.train import Trainer

    n = tokenizer_len(padded_teacher)
    narrow = build_llama(tmp_path / "narrow", n - 1, layers=1, hidden=32)
    with pytest.raises(DistilyError, match=f"LM head of {n - 1} rows.*cannot produce tokens {n - 1}..{n - 1}"):
        Trainer(train_cfg(padded_cache, tmp_path / "a", narrow))
    with pytest.raises(DistilyError, match=f"--online-teacher .* LM head of {n - 1} rows"):
        copy_tokenizer(padded_teacher, narrow)
        Trainer(train_cfg(padded_cache, tmp_path / "b", padded_teacher, online_teacher=str(narrow)))


def test_sampled_exact_targets_of_a_padded_head_cover_the_real_tokens_only(tmp_path, padded_teacher, text_file):
    """The default kind: draws and their exact log-probs come from the teacher over its real tokens (the padding
    rows' mass, > 20% here, cut as for top-k), and a student trains from them."""
    from stage_student.train import train
    from stage_teacher.capture import run

    n = tokenizer_len(padded_teacher)
    cache = tmp_path / "exact"
    run(capture_cfg(padded_teacher, text_file, cache, targets="sampled-exact", samples=16, max_tokens=64 * 8,
                    hidden_layers=[]))
    rows = read_all(cache)
    ids = torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64))
    logp, padding_mass = teacher_log_probs64(padded_teacher, ids, n)
    assert padding_mass.mean() > 0.2
    for r, lp in zip(rows, logp.numpy()):
        drawn = r["sample_ids"]
        valid = drawn >= 0
        assert drawn.max() < n and ((drawn == r["input_ids"][1:, None]).sum(-1) == 1).all()
        ref = np.clip(np.take_along_axis(lp, np.maximum(drawn, 0), -1), -254 / 16, 0)
        tail = valid & (drawn != r["input_ids"][1:, None]) & (ref < -np.log(16))  # kept without log-probs: 1/N
        np.testing.assert_allclose(r["sample_weights"][tail], 1 / 16, rtol=1e-5)
        assert np.abs(ref - r["sample_logprobs"])[valid & ~tail].max() <= 1 / 32 + 1e-4
        np.testing.assert_allclose(r["teacher_entropy"], -(np.exp(lp) * lp).sum(-1), rtol=2e-3, atol=2e-3)
    result = train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"), student_layers=2, init="random",
                               max_steps=3, batch_size=2, eval_sequences=2, optimizer="adamw"))
    assert result["finished"] and np.isfinite(result["eval/forward_kl"])
