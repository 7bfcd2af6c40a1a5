"""The teacher writes a dataset (`distily generate`): synthetic and data-free distillation sets under vLLM.

Order of work, as in capture.py: check every option and build each generator's inputs (cheap), compare with a
run already in the output dir, then start the engine and write the shards this job owns that are not finished.
Sequence i gets its prompt and its sampling seed from (--seed, i) alone, so array jobs (--num-shards N
--shard-index I own shards j with j % N == I), resumes and a single job all write the same sequences.
Each shard is written atomically and only then named in the job's journal and manifest (the loop is
stage_teacher/runner.py's, shared with capture.py). The format: pipeline/generated.py.

Each sequence is one or two `LLM.generate` requests, batched over the shard: the generator's greedy tokens
(temperature 0), then sampling (--temperature, --top-p, a per-sequence seed) up to --max-seq-len tokens in all
or until the teacher ends it with EOS.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__, generated
from pipeline.config import GenerateConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.manifest import atomic_write_bytes, describe_difference
from pipeline.resolve import (
    DEFAULT_DATASET,
    DatasetSpec,
    load_texts,
    resolve_model,
    save_weights_record,
    tokenizer_fingerprint,
    weights_fingerprint,
)

from . import runner
from .generators import GENERATORS, NEEDS_PROMPTS, Context, Request, parse_mix, used_generators

NOT_IDENTITY = ("output", "teacher", "num_shards", "shard_index", "enforce_eager", "tensor_parallel_size")  # teacher: by its weights hash


def check_options(cfg: GenerateConfig) -> dict[str, float]:
    """Every option that can be judged without loading anything; returns the mix weights."""
    if "://" in cfg.output and not cfg.output.startswith("file://"):
        raise ConfigError(f"--output {cfg.output}: generate writes to a local or shared-filesystem directory")
    if cfg.generator not in GENERATORS:
        raise ConfigError(f"--generator {cfg.generator!r} is unknown; choose one of {', '.join(GENERATORS)}")
    if cfg.num_sequences < 1:
        raise ConfigError(f"--num-sequences {cfg.num_sequences}: generate at least one sequence")
    if cfg.max_seq_len < 2:
        raise ConfigError("--max-seq-len must be at least 2")
    if not 0 <= cfg.temperature <= 100:
        raise ConfigError(f"--temperature {cfg.temperature} is out of range: use 0 (greedy) or a positive value "
                          "(1 samples the teacher's own distribution)")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"--top-p {cfg.top_p} is out of range (0, 1] (1 keeps the whole distribution)")
    if not 1 <= cfg.prefix_tokens < cfg.max_seq_len:
        raise ConfigError(f"--prefix-tokens {cfg.prefix_tokens} must be between 1 and --max-seq-len - 1 ({cfg.max_seq_len - 1})")
    if not 0 <= cfg.corpus_fraction <= 1 or (cfg.corpus_fraction > 0 and cfg.generator != "prefix"):
        raise ConfigError(f"--corpus-fraction {cfg.corpus_fraction} must be in [0, 1], and above 0 only with --generator prefix")
    if not 0 <= cfg.greedy_tokens < cfg.max_seq_len:
        raise ConfigError(f"--greedy-tokens {cfg.greedy_tokens} must be between 0 and --max-seq-len - 1")
    if cfg.sequences_per_shard < 1:
        raise ConfigError("--sequences-per-shard must be at least 1")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ConfigError(f"--shard-index {cfg.shard_index} must be in [0, --num-shards {cfg.num_shards})")
    if cfg.generator != "mix":
        return {}
    try:
        return parse_mix(cfg.mix)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def prepare(cfg: GenerateConfig) -> tuple[dict, Context, str]:
    """Validate everything and build the generators' context and the manifest skeleton; no engine."""
    mix_weights = check_options(cfg)  # before the imports below (seconds): a mistyped option fails at once
    model_dir, info = resolve_model(cfg.teacher)  # a missing teacher too
    from transformers import AutoConfig, AutoTokenizer

    from .capture import software_versions
    from .parallel import check_parallel
    from .vllm_backend import resolve_dtype

    teacher_cfg = AutoConfig.from_pretrained(model_dir)
    check_parallel(cfg, teacher_cfg, model_dir)
    if teacher_cfg.max_position_embeddings < cfg.max_seq_len:
        raise ConfigError(f"--max-seq-len {cfg.max_seq_len} exceeds the teacher's {teacher_cfg.max_position_embeddings} positions")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the teacher's tokenizer has no EOS token: generated sequences could not be told apart")
    ctx = Context(tokenizer, cfg, mix=mix_weights)
    used = used_generators(cfg.generator, mix_weights)
    if used & NEEDS_PROMPTS:
        source = cfg.prompts or DEFAULT_DATASET
        try:
            texts = load_texts(DatasetSpec(source, text_column=cfg.prompts_column))
        except CacheError as e:
            raise ConfigError(f"--prompts {source!r} ({', '.join(sorted(used & NEEDS_PROMPTS))} prompts): "
                              f"{str(e).replace('--dataset', 'the source')}") from None
        ctx.documents = [d for d in tokenizer(texts, add_special_tokens=False)["input_ids"] if d]
        ctx.words = [w for w in (t.split() for t in texts) if w]
        if not ctx.documents:
            raise ConfigError(f"--prompts {source!r} gives no tokens to cut prompts from")
    if "random" in used:
        special = set(tokenizer.all_special_ids)
        ctx.vocab_ids = np.asarray([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    weights_sha256, weights_source = weights_fingerprint(model_dir, cfg.output.removeprefix("file://"))
    manifest = {
        "format_version": generated.FORMAT_VERSION,
        "distily_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": software_versions(),
        "teacher": {**info, "path": model_dir, "weights_sha256": weights_sha256, "weights_sha256_source": weights_source,
                    "model_type": teacher_cfg.model_type, "vocab_size": teacher_cfg.vocab_size},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "generator": cfg.generator,
        "params": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IDENTITY
                   and not (k == "corpus_fraction" and v == 0)}  # sets written before it existed keep their identity
        | {"dtype": resolve_dtype(cfg.dtype)},  # auto: the dtype it resolved to on this machine
        "seed": cfg.seed,
        "job": {"num_shards": cfg.num_shards, "shard_index": cfg.shard_index},
        "shards": [],
        "complete": False,
    }
    return manifest, ctx, model_dir


def requests(ctx: Context, indices: np.ndarray) -> list[Request]:
    """Sequence i's request, from a generator seeded by (seed, i): the same whatever job or batch makes it."""
    make = GENERATORS[ctx.cfg.generator]
    return [make(ctx, np.random.default_rng([ctx.cfg.seed, int(i)])) for i in indices]


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.default_rng([seed, index, 1]).integers(2**31 - 1))


def generate_rows(engine, ctx: Context, indices: np.ndarray) -> list[dict]:
    """One shard's sequences: greedy tokens first where a generator asks for them, then sampling."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    cfg, limit = ctx.cfg, ctx.cfg.max_seq_len
    reqs = requests(ctx, indices)
    ids = [list(r.prompt[: limit - 1]) for r in reqs]
    logprobs = [[float("nan")] * len(x) for x in ids]  # the writer's log-prob of each token it wrote (NaN: prompt)
    finish = ["length"] * len(reqs)
    for k, r in enumerate(reqs):  # --corpus-fraction: the document's own text, no engine
        if r.continuation is not None:
            ids[k] += list(r.continuation[: limit - len(ids[k])])
            logprobs[k] += [float("nan")] * (len(ids[k]) - len(logprobs[k]))
            finish[k] = "corpus"

    def run(which: list[int], params: list) -> None:
        if not which:
            return
        outs = engine.generate([TokensPrompt(prompt_token_ids=ids[k]) for k in which], params)
        for k, out in zip(which, outs):
            written = list(out.outputs[0].token_ids)
            ids[k] += written
            logprobs[k] += sampled_logprobs(written, out.outputs[0].logprobs)
            if out.outputs[0].finish_reason == "stop":
                finish[k] = "stop"

    greedy = [k for k, r in enumerate(reqs) if r.greedy_tokens > 0 and r.continuation is None]
    run(greedy, [SamplingParams(temperature=0.0, max_tokens=min(reqs[k].greedy_tokens, limit - len(ids[k])),
                                logprobs=0, detokenize=False) for k in greedy])
    sampled = [k for k in range(len(reqs)) if finish[k] == "length" and len(ids[k]) < limit]
    run(sampled, [SamplingParams(
        temperature=cfg.temperature if reqs[k].temperature is None else reqs[k].temperature, top_p=cfg.top_p,
        max_tokens=limit - len(ids[k]), seed=sample_seed(cfg.seed, int(indices[k])), logprobs=0, detokenize=False)
        for k in sampled])
    rows = []
    vocab = len(ctx.tokenizer)
    for k, (i, r) in enumerate(zip(indices, reqs)):
        bad = [t for t in ids[k] if not 0 <= t < vocab]
        try:
            if bad:
                raise ValueError(f"ids {bad[:5]} are outside its {vocab} tokens")
            text = ctx.tokenizer.decode(ids[k])
        except Exception as e:  # a tokenizer that cannot decode its teacher's samples
            raise CacheError(f"sequence {int(i)} ({r.generator}): the teacher's tokenizer cannot decode what the "
                             f"teacher wrote ({e}); use a teacher whose tokenizer covers its whole output vocabulary") from e
        rows.append({"seq_index": int(i), "generator": r.generator, "prompt_tokens": min(len(r.prompt), limit - 1), "input_ids": ids[k],
                     "logprobs": logprobs[k], "text": text, "finish": finish[k],
                     "retokenises": ctx.tokenizer(text, add_special_tokens=False)["input_ids"] == ids[k]})
    return rows


def sampled_logprobs(tokens: list[int], steps) -> list[float]:
    """The engine's log-prob of each token it wrote (SamplingParams(logprobs=0): one entry per step holding the
    sampled token; vLLM's default raw_logprobs mode: the model's log-softmax before temperature and top-p)."""
    if steps is None:
        return [float("nan")] * len(tokens)
    return [float(step[t].logprob) if step and t in step else float("nan") for t, step in zip(tokens, steps)]


def write_shard(out: Path, index: int, rows: list[dict], seconds: float) -> dict:
    """One shard file, atomically; its manifest entry."""
    table = pa.table({name: [r[name] for r in rows] for name in generated.SCHEMA.names}, schema=generated.SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    atomic_write_bytes(out / generated.shard_name(index), data)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["generator"]] = counts.get(r["generator"], 0) + 1
    return {"index": index, "file": generated.shard_name(index), "rows": len(rows),
            "tokens": sum(len(r["input_ids"]) for r in rows), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "generators": counts, "stopped": sum(r["finish"] == "stop" for r in rows),
            "retokenise_differs": sum(not r["retokenises"] for r in rows),
            "generated_tokens": sum(len(r["input_ids"]) - r["prompt_tokens"] for r in rows), "seconds": seconds}


def stats(shards: list[dict]) -> dict:
    rows = sum(s["rows"] for s in shards)
    gen_tokens, seconds = sum(s["generated_tokens"] for s in shards), sum(s["seconds"] for s in shards)
    counts: dict[str, int] = {}
    for s in shards:
        for k, v in s["generators"].items():
            counts[k] = counts.get(k, 0) + v
    return {"sequences": rows, "tokens": sum(s["tokens"] for s in shards), "generators": counts,
            "mean_tokens": sum(s["tokens"] for s in shards) / max(rows, 1),
            "stopped_fraction": sum(s["stopped"] for s in shards) / max(rows, 1),
            "retokenise_differs_fraction": sum(s["retokenise_differs"] for s in shards) / max(rows, 1),
            "generated_tokens_per_s": gen_tokens / seconds if seconds else None}


def check_other_jobs(out: Path, manifest: dict) -> None:
    """Every run already in the dir (other array jobs', an earlier run's) is this one."""
    for other in generated.read_manifests(out):
        a, b = generated.identity(other), generated.identity(manifest)
        if a != b:
            raise CacheError(f"{out} holds a generated dataset with other settings ({describe_difference(a, b)}); "
                             "use a new --output dir, or the same options to resume it")


def run(cfg: GenerateConfig, engine=None) -> dict:
    """Generate (or resume) the dataset cfg describes. `engine`: anything with generate(prompts, params) (a running
    VLLMTeacher); it is left open. Without one, a plain vLLM engine is started for the run and shut down after."""
    out = Path(cfg.output.removeprefix("file://"))
    manifest, ctx, model_dir = prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    per = cfg.sequences_per_shard
    job = runner.Job(out=out, manifest_file=out / generated.manifest_name(cfg.shard_index, cfg.num_shards),
                     num_dataset_shards=-(-cfg.num_sequences // per), num_jobs=cfg.num_shards,
                     job_index=cfg.shard_index, files=lambda j: [generated.shard_name(j)], stats=stats)
    with runner.hold(job, "generate"):
        check_other_jobs(out, manifest)
        todo = runner.start(job, manifest)
        save_weights_record(out, model_dir, manifest["teacher"]["weights_sha256"])

        def indices(j: int) -> np.ndarray:
            return np.arange(j * per, min((j + 1) * per, cfg.num_sequences))

        print(f"generate {out}: {cfg.num_sequences} sequences by {cfg.generator!r}, {len(job.owned)} shards for this job, "
              f"{len(job.owned) - len(todo)} already done")
        if todo:
            owned_engine = engine is None
            if owned_engine:
                engine = PlainEngine(model_dir, cfg)

            def compute(j: int) -> tuple[list[dict], float]:
                t0 = time.perf_counter()
                return generate_rows(engine, ctx, indices(j)), time.perf_counter() - t0

            try:
                runner.run_shards(job, manifest, todo, compute, lambda j, done: write_shard(out, j, *done),
                                  units=lambda j: len(indices(j)), desc="generate", unit="seq")
            finally:
                if owned_engine:
                    engine.close()
        runner.finish(job, manifest)
    return manifest


class PlainEngine:
    """A vLLM engine without capture hooks, for generation alone."""

    def __init__(self, model_dir: str, cfg: GenerateConfig):
        from .vllm_backend import start_llm

        self.llm = start_llm(model_dir, cfg.max_seq_len, cfg.dtype, cfg.enforce_eager, cfg.seed,
                             tensor_parallel_size=cfg.tensor_parallel_size)

    def generate(self, prompts, params) -> list:
        return self.llm.generate(prompts, params, use_tqdm=False)

    def close(self) -> None:
        from .vllm_backend import shutdown

        shutdown(self.llm)
