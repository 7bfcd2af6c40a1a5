"""Shared fixtures: a tiny random Llama teacher with a locally trained tokenizer, real text, one vLLM engine.

vLLM's caches and temp files stay inside the project (.cache/test-vllm) and the engine runs in-process.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CACHE = ROOT / ".cache" / "test-vllm"
_CACHE.mkdir(parents=True, exist_ok=True)
for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
    os.environ.setdefault(var, str(_CACHE / sub))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Layer selections are remembered under $DISTILY_HOME: a fresh one per session keeps tests independent.
import tempfile  # noqa: E402

os.environ["DISTILY_HOME"] = tempfile.mkdtemp(prefix="distily-home-")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TINY_LAYERS = 4
TINY_K = 8
TINY_HIDDEN_LAYERS = [0, 2, 4]
ENGINE_MAX_LEN = 128


def build_tokenizer(texts: list[str], out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def build_llama(out: Path, vocab_size: int, layers: int = TINY_LAYERS, hidden: int = 128, seed: int = 0,
                tie: bool = False, pretrain_on: np.ndarray | None = None, steps: int = 150, heads: int = 2,
                kv_heads: int = 1) -> Path:
    """A tiny Llama; with `pretrain_on` ([N, T] token ids) a few CE steps give it real structure to distil."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, max_position_embeddings=1024,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    if pretrain_on is not None:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = torch.from_numpy(pretrain_on.astype(np.int64))
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = data[torch.randint(0, len(data), (16,), generator=g)]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def texts() -> list[str]:
    from pipeline.resolve import DatasetSpec, load_texts

    return load_texts(DatasetSpec("lee-background"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n".join(texts[:120]) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, texts) -> Path:
    from pipeline.resolve import pack

    out = tmp_path_factory.mktemp("tiny-teacher")
    tok = build_tokenizer(texts, out)
    build_llama(out, len(tok), pretrain_on=pack(tok, texts[150:], 64))  # trained on text the tests do not capture
    return out


@pytest.fixture(scope="session")
def other_teacher(tmp_path_factory, tiny_teacher) -> Path:
    """Same tokenizer, other weights: a different teacher for the 'wrong cache' checks."""
    import shutil

    out = tmp_path_factory.mktemp("other-teacher")
    for f in tiny_teacher.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    from transformers import AutoTokenizer

    build_llama(out, len(AutoTokenizer.from_pretrained(out)), seed=1)
    return out


@pytest.fixture(scope="session")
def vllm_engine(tiny_teacher):
    """One real vLLM engine (vllm-cpu here, vllm on GPU nodes) shared by every test of the session."""
    from stage_teacher.targets import TargetSpec
    from stage_teacher.vllm_backend import VLLMTeacher

    engine = VLLMTeacher(
        str(tiny_teacher), TargetSpec(top_k=TINY_K), TINY_HIDDEN_LAYERS, TINY_LAYERS, ENGINE_MAX_LEN, dtype="float32", max_logprobs=TINY_K
    )
    yield engine
    engine.close()


def capture_cfg(tiny_teacher, text_file, out, **kw):
    from pipeline.config import CaptureConfig

    base = dict(
        output=str(out), teacher=str(tiny_teacher), dataset=str(text_file), max_seq_len=64, max_tokens=64 * 20,
        top_k=TINY_K, hidden_layers=TINY_HIDDEN_LAYERS, hidden_dtype="float32", sequences_per_shard=4,
        logprob_dtype="float32",  # the reference fixture stores exact values; uint8 has tests of its own
        targets="topk",  # the top-k fixture most tests read; sampled-exact (the default) has tests of its own
        backend="hf", vllm_max_logprobs=TINY_K,
    )
    base.update(kw)
    return CaptureConfig(**base)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, tiny_teacher, text_file) -> Path:
    """A finished cache from the HF backend (the reference), reused by reader and trainer tests."""
    from stage_teacher.capture import run

    out = tmp_path_factory.mktemp("cache-hf")
    run(capture_cfg(tiny_teacher, text_file, out))
    return out


def assert_mean_is_forward_kl(estimate, grad, teacher, student) -> None:
    """Sampled targets are unbiased: over the repeats (dim 1) of estimate [P, R] and its gradient wrt the student's
    logits [P, R, V], the means equal the full-vocabulary forward KL of teacher vs student logits [P, V] and its
    gradient, within 4 standard errors (+1e-4)."""
    repeats = estimate.shape[1]
    exact_s = student.clone().requires_grad_(True)
    p = torch.softmax(teacher, -1)
    exact = (p * (torch.log_softmax(teacher, -1) - torch.log_softmax(exact_s, -1))).sum(-1)
    exact.sum().backward()
    se = estimate.std(1) / repeats**0.5
    assert ((estimate.mean(1) - exact.detach()).abs() <= 4 * se + 1e-4).all(), (estimate.mean(1), exact, se)
    gse = grad.std(1) / repeats**0.5
    assert ((grad.mean(1) - exact_s.grad).abs() <= 4 * gse + 1e-4).all()


def read_all(path) -> list[dict]:
    from pipeline.cache import CacheReader

    return list(CacheReader(path).iter_sequences())


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        for key in ("input_ids", "topk_ids", "topk_logprobs", "target_logprob", "tail_mass"):
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        for l in x.get("hidden_states", {}):
            np.testing.assert_array_equal(x["hidden_states"][l], y["hidden_states"][l])
