"""--targets sampled-exact (the default): drawn ids with their exact teacher probabilities, Horvitz-Thompson weights.

Checked: the estimator is unbiased (loss and gradient averaged over many draws equal the full-vocabulary forward
KL's), the reader's weights equal a float64 computation from the stored codes, a captured cache (real vLLM engine
and the HF reference) holds the teacher's exact log-probs of every drawn id and the true token, and a student
trains from it end to end.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_mean_is_forward_kl, capture_cfg, read_all

from pipeline import schema
from pipeline.cache import CacheReader, inclusion_probability, inclusion_weights
from pipeline.cache_write import write_shard
from stage_student.losses import chunked
from stage_student.losses import kd as losses
from stage_teacher.capture import run
from stage_teacher.targets import TargetSpec, batch_targets, chunk_targets, sequence_generator, sequence_targets


def manifest(samples: int, temperature: float = 1.0, vocab: int = 40) -> dict:
    return {"format_version": 2, "teacher": {"vocab_size": vocab},
            "capture": {"targets": "sampled-exact", "top_k": 8, "logprob_dtype": "uint8", "samples": samples,
                        "sample_temperature": temperature, "hidden_dtype": "bfloat16"}}


@pytest.mark.parametrize("temperature,sampling", [(1.0, "iid"), (1.5, "iid"), (1.0, "systematic"), (1.5, "systematic")])
def test_exact_sample_estimate_is_unbiased(temperature, sampling):
    """Over many independent draws the loss and its gradient (wrt the student's logits) average to the full forward
    KL's: the Horvitz-Thompson weights p / pi, with pi = 1 - (1 - q)^N (iid) or min(1, N q) (systematic) and the
    true token at pi = 1."""
    g = torch.Generator().manual_seed(0)
    vocab, positions, repeats, draws = 40, 3, 20000, 8
    teacher = torch.randn(positions, vocab, generator=g, dtype=torch.float64) * 2
    student = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    next_ids = torch.tensor([3, 17, 29])
    spec = TargetSpec(targets="sampled-exact", samples=draws, sample_temperature=temperature, sampling=sampling)
    rows = teacher.repeat_interleave(repeats, 0)
    t = chunk_targets(rows.clone(), next_ids.repeat_interleave(repeats), spec, sequence_generator(0, 0, "cpu"))
    ids, logp = t["sample_ids"], t["sample_logprobs"].double()
    valid = ids >= 0
    true_logp = torch.log_softmax(teacher, -1).repeat_interleave(repeats, 0)
    torch.testing.assert_close(torch.where(valid, true_logp.gather(-1, ids.clamp_min(0)), 0.0), logp, rtol=0, atol=1e-5)
    certain = ids == next_ids.repeat_interleave(repeats)[:, None]
    assert (certain.sum(-1) == 1).all()  # the true next token is always there
    logq = logp / temperature + (t["sample_logq_norm"].double()[:, None] if temperature != 1.0 else 0.0)
    w = torch.from_numpy(inclusion_weights(logp.numpy(), logq.numpy(), draws, certain.numpy(), valid.numpy(), sampling))

    s = student.repeat_interleave(repeats, 0).requires_grad_(True)
    per_row = (w * (logp - torch.log_softmax(s, -1).gather(-1, ids.clamp_min(0)))).sum(-1)
    per_row.sum().backward()
    estimate, grad = per_row.detach().reshape(positions, repeats), s.grad.reshape(positions, repeats, vocab)
    assert_mean_is_forward_kl(estimate, grad, teacher, student)
    # lower variance than RS-KD's counts at the same N: the head is exact
    rs = chunk_targets(rows.clone(), next_ids.repeat_interleave(repeats), TargetSpec(targets="sampled", samples=draws),
                       sequence_generator(0, 0, "cpu"))
    s2 = student.repeat_interleave(repeats, 0).requires_grad_(True)
    (rs["sample_counts"] / draws * -torch.log_softmax(s2, -1).gather(-1, rs["sample_ids"].clamp_min(0))).sum().backward()
    assert grad.var(1).sum() < 0.7 * s2.grad.reshape(positions, repeats, vocab).var(1).sum()


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
def test_reader_weights_equal_float64_reference(tmp_path, sampling):
    """A shard round trip: stored codes within 1/32 nat of the exact log-probs, and the reader's weights and entropy
    estimate equal a float64 computation from the codes (p / (1 - (1 - p)^N) iid, p / min(1, N p) systematic; p for
    the true token)."""
    g = torch.Generator().manual_seed(3)
    n, t, vocab, draws = 3, 9, 40, 16
    logits = torch.randn(n, t - 1, vocab, generator=g) * 3
    input_ids = torch.randint(0, vocab, (n, t), generator=g)
    spec = TargetSpec(targets="sampled-exact", samples=draws, sampling=sampling)
    per_seq = [sequence_targets(lambda a, b, z=logits[i]: z[a:b].clone(), input_ids[i, 1:], spec, i) for i in range(n)]
    m = manifest(draws)
    m["capture"]["sampling"] = sampling
    entry = write_shard(tmp_path, 0, m, np.arange(n), input_ids.numpy(), batch_targets(per_seq))
    reader = CacheReader(tmp_path)
    reader.__dict__["manifest"] = m
    got = reader.read_shard(entry, hidden=False)
    exact = torch.log_softmax(logits.double(), -1).numpy()
    ids = got["sample_ids"]
    valid = ids >= 0
    ref_logp = np.where(valid, np.take_along_axis(exact, np.maximum(ids, 0), -1), 0.0)
    assert np.abs(got["sample_logprobs"] - ref_logp)[valid].max() <= 1 / 32 + 1e-6
    codes_logp = got["sample_logprobs"].astype(np.float64)
    certain = ids == input_ids.numpy()[:, 1:, None]
    for i, j in zip(*np.nonzero(valid.any(-1))):
        for k in np.nonzero(valid[i, j])[0]:
            p = math.exp(codes_logp[i, j, k])
            pi = 1 - (1 - p) ** draws if sampling == "iid" else min(1.0, draws * p)
            want = p if certain[i, j, k] else p / pi
            assert got["sample_weights"][i, j, k] == pytest.approx(want, rel=1e-6)
    assert (certain.sum(-1) == 1).all()
    np.testing.assert_allclose(got["teacher_entropy"], -(got["sample_weights"].astype(np.float64) * codes_logp).sum(-1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
def test_sampled_exact_cache_vllm_equals_hf(tmp_path, tiny_teacher, text_file, vllm_engine, sampling):
    """Captured under vLLM (LM-head hooks; the session's one engine) and with the HF reference: the same seeded
    draws, and every stored log-prob within the code's rounding of an independent HF forward's log-softmax."""
    from transformers import AutoModelForCausalLM

    kw = dict(targets="sampled-exact", samples=16, sampling=sampling)
    run(capture_cfg(tiny_teacher, text_file, tmp_path / "vllm", backend="vllm", **kw), teacher=vllm_engine)
    run(capture_cfg(tiny_teacher, text_file, tmp_path / "hf", **kw))
    a, b = read_all(tmp_path / "vllm"), read_all(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    same = total = 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.from_numpy(x["input_ids"])[None]).logits[0, :-1].double(), -1).numpy()
        for seq in (x, y):
            ids = seq["sample_ids"]
            valid = ids >= 0
            ref = np.take_along_axis(lp, np.maximum(ids, 0), -1)
            certain = ids == x["input_ids"][1:, None]
            assert (certain.sum(-1) == 1).all()
            # systematic (the default): an id below 1/N other than the true token reads -log N, weight 1/N
            tail = valid & ~certain & (ref < -math.log(16)) if sampling == "systematic" else np.zeros_like(valid)
            np.testing.assert_allclose(seq["sample_logprobs"][tail], -math.log(16), rtol=1e-6)
            np.testing.assert_allclose(seq["sample_weights"][tail], 1 / 16, rtol=1e-5)
            assert np.abs(np.clip(ref, -255 / 16, 0) - seq["sample_logprobs"])[valid & ~tail].max() <= 1 / 32 + 1e-4
            if sampling == "systematic":  # the stored entropy: H(p) of the HF forward, to float16's rounding
                np.testing.assert_allclose(seq["teacher_entropy"], -(np.exp(lp) * lp).sum(-1), rtol=2e-3, atol=2e-3)
        m = min(x["sample_ids"].shape[-1], y["sample_ids"].shape[-1])
        same += int((x["sample_ids"][:, :m] == y["sample_ids"][:, :m]).all(-1).sum())
        total += len(x["sample_ids"])
    assert same / total >= 0.98  # the same seeded draws, but for a rare near-tie of float rounding
    cap = CacheReader(tmp_path / "vllm").manifest["capture"]
    assert cap["sampling"] == sampling and schema.tail_logprobs_of(cap) == (sampling == "iid")


def test_systematic_draws_keep_each_id_with_chance_min_1_nq():
    """--sampling systematic: over many offsets each id is drawn with frequency min(1, N q) (every id above 1/N
    always), its count is floor or ceil of N q, the draws are N per row; at the same N the estimate of p has less
    variance than iid draws', and its total weight (sum of p / pi) varies less."""
    from stage_teacher.targets import draw

    g = torch.Generator().manual_seed(4)
    vocab, n, repeats = 50, 12, 40000
    q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, -1)
    draws = draw(q.repeat(repeats, 1), n, "systematic", torch.Generator().manual_seed(5))
    assert draws.shape == (repeats, n)
    counts = torch.zeros(repeats, vocab, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    seen = (counts > 0).double().mean(0)
    pi = torch.clamp(n * q, max=1.0)
    se = (pi * (1 - pi) / repeats).sqrt()
    assert ((seen - pi).abs() <= 4 * se + 1e-4).all()
    assert ((counts >= torch.floor(n * q).long()) & (counts <= torch.ceil(n * q).long())).all()
    assert (seen[q >= 1 / n] == 1).all()
    weights = {}
    for sampling in ("systematic", "iid"):
        d = draw(q.repeat(repeats, 1), n, sampling, torch.Generator().manual_seed(6))
        hit = torch.zeros(repeats, vocab, dtype=torch.bool).scatter_(1, d, True)
        pi = torch.from_numpy(inclusion_probability(q.log().numpy(), n, sampling))
        weights[sampling] = torch.where(hit, q / pi, 0.0)
        torch.testing.assert_close(weights[sampling].mean(0), q, atol=4 * float(weights[sampling].std(0).max()) / repeats**0.5, rtol=0)
    assert weights["systematic"].var(0).sum() < 0.95 * weights["iid"].var(0).sum()
    assert weights["systematic"].sum(-1).std() < 0.5 * weights["iid"].sum(-1).std()


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory, tiny_teacher, text_file):
    out = tmp_path_factory.mktemp("cache-exact")
    run(capture_cfg(tiny_teacher, text_file, out, targets="sampled-exact", samples=16, hidden_layers=[]))
    return out


def test_every_column_of_a_sampled_exact_shard_is_byte_stream_split(exact_cache):
    """pipeline/schema.py BYTE_STREAM_SPLIT: Parquet holds uint8/uint16 values as 4-byte INT32; split into byte streams,
    their zero bytes compress away (the log-prob codes 29% and the ids 23% fewer bytes than plain)."""
    import pyarrow.parquet as pq

    from pipeline import schema

    shards = sorted(exact_cache.glob("*.parquet"))
    assert shards
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata.row_group(0)
        encodings = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).encodings for i in range(meta.num_columns)}
        for name in schema.BYTE_STREAM_SPLIT:
            assert "BYTE_STREAM_SPLIT" in encodings[name], (shard.name, name, encodings[name])


def test_a_cache_from_before_sampling_resumes_as_iid(tmp_path, tiny_teacher, text_file, exact_cache):
    """A manifest without capture.sampling (written before --sampling existed) drew iid: rerunning its capture with
    --sampling iid finds it complete, with the new default (systematic) it is refused, naming the field."""
    import json
    import shutil

    from pipeline.errors import CacheError

    shutil.copytree(exact_cache, tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["capture"].pop("sampling") == "systematic"  # the default
    assert manifest["capture"].pop("tail_logprobs") is False  # (its rule came later still)
    path.write_text(json.dumps(manifest))
    kw = dict(targets="sampled-exact", samples=16, hidden_layers=[])
    run(capture_cfg(tiny_teacher, text_file, tmp_path / "c", sampling="iid", **kw))
    assert CacheReader(tmp_path / "c").manifest["capture"].get("sampling", "iid") == "iid"
    with pytest.raises(CacheError, match="different settings.*capture.sampling: 'iid' != 'systematic'"):
        run(capture_cfg(tiny_teacher, text_file, tmp_path / "c", **kw))
    # a systematic cache from before the tail rule kept every log-prob: the default now would store it otherwise
    manifest["capture"]["sampling"] = "systematic"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="different settings.*capture.tail_logprobs: True != False.*--tail-logprobs"):
        run(capture_cfg(tiny_teacher, text_file, tmp_path / "c", **kw))
    run(capture_cfg(tiny_teacher, text_file, tmp_path / "c", tail_logprobs=True, **kw))  # what the error says
    # a cache of the old default draws, rerun with the new default: the error names the field and what to pass
    with pytest.raises(CacheError, match="capture.samples: 16 != 88.*--samples with the cache's number"):
        run(capture_cfg(tiny_teacher, text_file, tmp_path / "c", tail_logprobs=True, targets="sampled-exact", hidden_layers=[]))


def tail_manifest(draws: int, vocab: int = 40) -> dict:
    """A default cache's manifest: sampled-exact, systematic draws at t = 1, no log-probs below 1/N."""
    m = manifest(draws, vocab=vocab)
    m["capture"].update(sampling="systematic", tail_logprobs=False)
    return m


def test_ids_below_one_over_n_are_stored_without_logprobs_and_weigh_one_over_n(tmp_path):
    """The default cache (systematic, t = 1): a drawn id below 1/N other than the true token is stored as
    SAMPLE_TAIL_CODE and read at weight 1/N; every other id keeps its code and weight p (the true token: p); the
    weights equal those of the same draws stored with every log-prob (where rounding does not cross 1/N); the stored
    entropy equals a float64 H(p); the log-prob column shrinks."""
    from pipeline.cache_write import column_bytes

    g = torch.Generator().manual_seed(6)
    n, t, vocab, draws = 6, 33, 400, 16
    logits = torch.randn(n, t - 1, vocab, generator=g) * 3
    input_ids = torch.randint(0, vocab, (n, t), generator=g)
    spec = TargetSpec(targets="sampled-exact", samples=draws, sampling="systematic")
    per_seq = batch_targets([sequence_targets(lambda a, b, z=logits[i]: z[a:b].clone(), input_ids[i, 1:], spec, i)
                             for i in range(n)])
    got = {}
    for name, m in (("all", manifest(draws, vocab=vocab)), ("tail", tail_manifest(draws, vocab))):
        m["capture"]["sampling"] = "systematic"
        (tmp_path / name).mkdir()
        entry = write_shard(tmp_path / name, 0, m, np.arange(n), input_ids.numpy(), per_seq)
        reader = CacheReader(tmp_path / name)
        reader.__dict__["manifest"] = m
        got[name] = reader.read_shard(entry, hidden=False)
        got[name]["bytes"] = column_bytes((tmp_path / name / entry["file"]).read_bytes())["sample_logprobs"]
    a, b = got["all"], got["tail"]
    np.testing.assert_array_equal(a["sample_ids"], b["sample_ids"])
    ids, valid = b["sample_ids"], b["sample_ids"] >= 0
    exact = torch.log_softmax(logits.double(), -1).numpy()
    logp = np.take_along_axis(exact, np.maximum(ids, 0), -1)
    certain = ids == input_ids.numpy()[:, 1:, None]
    tail = valid & ~certain & (logp < -math.log(draws))
    assert tail.sum() > 0.3 * valid.sum() and (~tail & valid).sum() > n * (t - 1)
    np.testing.assert_allclose(b["sample_weights"][tail], 1 / draws, rtol=1e-6)
    np.testing.assert_allclose(b["sample_weights"][valid & ~tail], np.exp(b["sample_logprobs"][valid & ~tail]), rtol=1e-6)
    floor = -(schema.SAMPLE_TAIL_CODE - 1) / schema.SAMPLE_LOGPROB_STEPS  # the lowest code left
    assert np.abs(b["sample_logprobs"] - np.maximum(logp, floor))[valid & ~tail].max() <= 1 / 32 + 1e-6
    near = np.abs(logp + math.log(draws)) < 1 / 32 + 1e-6  # rounding may cross 1/N there in the stored-codes cache
    np.testing.assert_allclose(b["sample_weights"][valid & ~near], a["sample_weights"][valid & ~near], rtol=1e-6, atol=1e-6)
    entropy = -(np.exp(exact) * exact).sum(-1)
    np.testing.assert_allclose(b["teacher_entropy"], entropy, rtol=2e-3, atol=2e-3)  # float16
    assert b["bytes"] < 0.6 * a["bytes"]


def test_a_default_cache_read_back_is_an_unbiased_estimate():
    """Through the writer and the reader (ids below 1/N at weight 1/N, the stored exact entropy), over many draws: each
    id's mean weight is its p (the stored code's p where the id is always there: above 1/N, or the true token), and
    the loss's mean is the KL with that distribution, within 4 standard errors."""
    import tempfile

    g = torch.Generator().manual_seed(7)
    vocab, positions, repeats, draws = 40, 3, 20000, 8
    teacher = torch.randn(positions, vocab, generator=g, dtype=torch.float64) * 2
    student = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    next_ids = torch.tensor([3, 17, 29])
    spec = TargetSpec(targets="sampled-exact", samples=draws, sampling="systematic")
    input_ids = torch.cat([torch.zeros(1, dtype=torch.long), next_ids]).repeat(repeats, 1)
    per_seq = [sequence_targets(lambda a, b: teacher[a:b].float().clone(), next_ids, spec, i) for i in range(repeats)]
    m = tail_manifest(draws)
    with tempfile.TemporaryDirectory() as d:
        entry = write_shard(d, 0, m, np.arange(repeats), input_ids.numpy(), batch_targets(per_seq))
        reader = CacheReader(d)
        reader.__dict__["manifest"] = m
        got = reader.read_shard(entry, hidden=False)
    ids, w = got["sample_ids"], got["sample_weights"].astype(np.float64)
    full = np.zeros((repeats, positions, vocab))
    np.add.at(full, (*np.nonzero(ids >= 0)[:2], ids[ids >= 0]), w[ids >= 0])
    logp = torch.log_softmax(teacher, -1).numpy()
    coded = -np.minimum(np.rint(-logp * schema.SAMPLE_LOGPROB_STEPS), 254) / schema.SAMPLE_LOGPROB_STEPS
    always = (draws * np.exp(logp) >= 1) | (np.arange(vocab) == next_ids.numpy()[:, None])
    expected = np.where(always, np.exp(coded), np.exp(logp))
    se = full.std(0) / repeats**0.5
    assert (np.abs(full.mean(0) - expected) <= 4 * se + 1e-6).all()
    assert (se[~always] > 0).all()  # the tail is sampled, the rest exact
    neg_logq = -torch.log_softmax(student, -1).numpy()
    estimate = (full * neg_logq).sum(-1) - got["teacher_entropy"]
    exact_entropy = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(got["teacher_entropy"][0], exact_entropy, rtol=1e-3)
    want = (expected * neg_logq).sum(-1) - exact_entropy
    assert (np.abs(estimate.mean(0) - want) <= 4 * estimate.std(0) / repeats**0.5 + 2e-3).all()


def test_student_trains_from_sampled_exact_cache(tmp_path, exact_cache):
    """train-student reads the cache as samples (auto), the loss falls, and the fused head's loss equals the
    reference on the same batch."""
    from pipeline.config import TrainConfig
    from stage_student.train import Trainer
    from stage_student.training.data import CacheStream

    cfg = TrainConfig(cache=str(exact_cache), output=str(tmp_path / "run"), student_layers=1, init_layers="evenly",
                      max_steps=6, batch_size=2, lr=3e-3, warmup_steps=1, eval_sequences=2, save_steps=6, logging_steps=2,
                      optimizer="adamw")
    trainer = Trainer(cfg)
    assert trainer.plan.kd_targets == "sampled"
    batch = next(iter(CacheStream(str(exact_cache), trainer.plan.train_pairs, 2, 0, 16)))
    assert "sample_logprobs" in batch and (batch["sample_weights"] >= 0).all()
    targets = trainer.cached.targets(batch)
    logits = torch.randn(targets["sample_ids"].shape[0], 384, generator=torch.Generator().manual_seed(0))
    ref = losses.sampled_kd_loss(logits, targets["sample_ids"], targets["sample_weights"], targets["teacher_entropy"])
    fused = chunked.head_losses(logits, None, None, chunked.LossSpec(kd="forward_kl"), chunked.Targets(**targets), 7)
    assert fused["kd"].item() == pytest.approx(ref.item(), rel=1e-5)
    result = trainer.run()
    log = [r for r in result["log"] if "train/kd" in r] if "log" in result else []
    assert result["tokens_seen"] > 0
    if log:
        assert log[-1]["train/kd"] < log[0]["train/kd"]


def test_losses_other_than_forward_kl_are_refused(tmp_path, exact_cache):
    from pipeline.config import TrainConfig
    from pipeline.errors import DistilyError
    from stage_student.train import Trainer

    cfg = TrainConfig(cache=str(exact_cache), output=str(tmp_path / "run"), student_layers=1, init_layers="evenly",
                      loss="reverse_kl", eval_sequences=2)
    with pytest.raises(DistilyError, match=r"--loss reverse_kl is not defined on sampled targets \(this cache: sampled-exact\).*--targets topk"):
        Trainer(cfg)
    assert schema.TARGETS[0] == "sampled-exact"


def test_a_cache_of_an_unknown_kind_is_refused_naming_it(tmp_path, exact_cache):
    """A cache written by a newer version with targets this one cannot read is refused before any weights load."""
    import json
    import shutil

    from pipeline.config import TrainConfig
    from pipeline.errors import DistilyError
    from stage_student.train import Trainer

    cache = tmp_path / "future"
    shutil.copytree(exact_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["capture"]["targets"] = "sketched"
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DistilyError, match="holds 'sketched' targets, which this version of distily cannot train from"):
        Trainer(TrainConfig(cache=str(cache), output=str(tmp_path / "run"), student_layers=1, init_layers="evenly",
                            eval_sequences=2))


@pytest.mark.parametrize("sampling", ["iid", "systematic"])
def test_draws_per_epoch_is_an_unbiased_fresh_subset_each_epoch(sampling):
    """--draws-per-epoch: over many epochs the subset's weights average to the stored estimate's (both estimate p),
    the subsets differ between epochs, repeat for the same (seed, sequence, epoch), and keep the true token.
    Systematic rows come as the default cache's reader gives them: ids below 1/N at log p = -log N."""
    from stage_student.training.data import epoch_subset

    g = torch.Generator().manual_seed(5)
    vocab, positions, draws, keep = 30, 4, 32, 8
    logits = torch.randn(positions, vocab, generator=g, dtype=torch.float64) * 2
    next_ids = torch.tensor([1, 7, 7, 20])
    p = torch.softmax(logits, -1).numpy()
    spec = TargetSpec(targets="sampled-exact", samples=draws, sampling=sampling)
    totals = np.zeros((positions, vocab))
    repeats = 600
    for rep in range(repeats):  # fresh caches, each thinned in a fresh epoch: the mean weight per token -> p
        t = chunk_targets(logits.clone(), next_ids, spec, sequence_generator(rep, 0, "cpu"))
        ids, logp = t["sample_ids"].numpy(), t["sample_logprobs"].numpy()
        if sampling == "systematic":
            logp = np.where((logp < -math.log(draws)) & (ids != next_ids.numpy()[:, None]), -math.log(draws), logp)
        row = {"sample_ids": ids, "sample_logprobs": logp, "seq_index": np.int64(3),
               "input_ids": np.concatenate([[0], next_ids.numpy()])}
        sub = epoch_subset(row, draws, keep, seed=0, epoch=rep, sampling=sampling)
        np.add.at(totals, (np.repeat(np.arange(positions), ids.shape[1]), np.maximum(ids, 0).reshape(-1)),
                  np.where(ids >= 0, sub["sample_weights"], 0).reshape(-1))
        assert (sub["sample_weights"][ids == next_ids.numpy()[:, None]] > 0).all()  # the true token always stays
    np.testing.assert_allclose(totals / repeats, p, atol=0.025)
    tail = p < 0.05  # where the subset's weights differ most from the stored ones: their total mass, per position
    np.testing.assert_allclose((totals / repeats * tail).sum(-1), (p * tail).sum(-1), atol=0.04)
    a, b, again = (epoch_subset(row, draws, keep, 0, e)["sample_weights"] for e in (1, 2, 1))
    assert not np.array_equal(a, b) and np.array_equal(a, again)


def test_resume_equals_the_uninterrupted_run_across_epochs(tmp_path, exact_cache):
    """On a sampled-exact cache with --draws-per-epoch, over more than one epoch: a run stopped and resumed logs the
    uninterrupted run's losses and ends with its weights (each epoch's subset is redrawn the same way)."""
    from test_train_student import cfg_for, log

    from stage_student.train import train

    kw = dict(max_steps=12, save_steps=3, draws_per_epoch=6, embedding_noise=5.0)  # 16 sequences, batch 2: 8 steps/epoch
    train(cfg_for(exact_cache, tmp_path / "a", **kw))
    assert not train(cfg_for(exact_cache, tmp_path / "b", stop_after_steps=9, **kw))["finished"]
    train(cfg_for(exact_cache, tmp_path / "b", resume=True, **kw))
    a, b = log(tmp_path / "a"), log(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13)) and b[-1]["epoch"] > 1
    for ra, rb in zip(a, b):
        assert rb["loss/kd"] == pytest.approx(ra["loss/kd"], abs=1e-6), ra["step"]
    wa = torch.load(tmp_path / "a/checkpoints/step-000012/state.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/step-000012/state.pt", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    # another draws-per-epoch is another run: refused on resume
    from pipeline.errors import DistilyError

    with pytest.raises(DistilyError, match="draws_per_epoch"):
        train(cfg_for(exact_cache, tmp_path / "b", resume=True, **{**kw, "draws_per_epoch": 5, "max_steps": 14}))


def test_ddp_ranks_agree_on_a_sampled_exact_cache(tmp_path, exact_cache):
    """Two torchrun ranks on disjoint sequences, with per-epoch subsets over 2 epochs: identical parameters and
    optimizer state after every step."""
    from test_parallel_train import torchrun

    rank0, rank1 = torchrun(exact_cache, tmp_path / "ddp", 29551, "--max-steps", "5", "--draws-per-epoch", "6",
                            "--init-layers", "evenly", "--optimizer", "adamw8bit", "--lr", "1e-2")
    assert [l.split()[0] for l in rank0] == ["1", "2", "3", "4", "5"] and rank0 == rank1

