"""On-policy distillation in rounds of offline stages (`distily on-policy`): the student writes, the teacher grades.

One round, three commands that each run alone (on a cluster: (1) and (3) on student nodes, (2) on teacher nodes):

    distily generate      -o OUT/round-R/generated --teacher STUDENT --generator prefix ...   # the student samples
    distily teacher-cache -o OUT/round-R/cache --dataset OUT/round-R/generated --graded ...   # the teacher grades
    distily train-student --cache OUT/round-R/cache --student STUDENT -o OUT/round-R/student --resume ...

STUDENT is the start (--student) in round 1 and round R-1's `student/final` after it. Each round is a new
train-student run from the previous round's weights with a new constant schedule (--warmup-steps, then --lr):
each round's data is new, as in GKD and on-policy distillation's loops, and a run per round keeps the three stages
plain batch jobs whose outputs are all that links them; the optimizer's state restarts (8-bit AdamW, warmed up
again in --warmup-steps). This orchestrator imports neither stage: it runs their commands as subprocesses,
skips a stage whose output is complete, and each stage resumes itself after a kill (generate and teacher-cache
rewrite only the shards they lack, train-student runs with --resume). OUT/rounds.json links each round's
generations, cache and student, with the time each stage took and the orchestrator's own.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .config import OnPolicyConfig
from .errors import ConfigError
from .generated import read_manifests
from .manifest import atomic_write_json, read_json

ROUNDS = "rounds.json"


def check(cfg: OnPolicyConfig) -> str:
    """Everything that can be refused before any engine starts; returns the starting student's model dir."""
    from transformers import AutoConfig, AutoTokenizer

    from .resolve import resolve_model, tokenizer_fingerprint, trained_model_dir

    if not cfg.student:
        raise ConfigError("--student is required: the model that writes round 1's samples (a train-student run dir "
                          "or an HF model dir), e.g. runs/demo/student-kd")
    if cfg.rounds < 1 or cfg.steps < 1 or cfg.num_sequences < 1:
        raise ConfigError("--rounds, --steps and --num-sequences must be at least 1")
    if not 1 <= cfg.prefix_tokens < cfg.max_seq_len:
        raise ConfigError(f"--prefix-tokens {cfg.prefix_tokens}: prompts must be shorter than --max-seq-len "
                          f"{cfg.max_seq_len} (the student needs room to write)")
    if not 0 < cfg.mix <= 1:
        raise ConfigError(f"--mix {cfg.mix} must be in (0, 1]: the share of each round's sequences the student writes")
    if cfg.loss == "token_reverse_kl" and cfg.mix < 1:
        raise ConfigError(f"--mix {cfg.mix} puts the documents' own text into the rounds, where the per-token "
                          "reverse-KL estimator does not hold (the student did not sample it): use --loss forward_kl "
                          "(or another divergence) with --mix, or --mix 1")
    if cfg.loss == "token_reverse_kl" and cfg.temperature != 1.0:
        raise ConfigError(f"--temperature {cfg.temperature}: the per-token reverse-KL estimator assumes the student "
                          "sampled its own distribution (temperature 1); use --temperature 1 or another --loss")
    student, _ = resolve_model(trained_model_dir(cfg.student))
    arch = AutoConfig.from_pretrained(student).architectures or []
    supported = vllm_architectures()
    if supported is not None and not set(arch) & supported:
        raise ConfigError(f"--student {cfg.student}: vLLM cannot load its architecture {arch or '(none named)'} to "
                          "sample from it; on-policy rounds need a student vLLM serves (Llama, Qwen2, Mistral, ...)")
    teacher, _ = resolve_model(cfg.teacher)
    same = tokenizer_fingerprint(AutoTokenizer.from_pretrained(student)) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher))
    if not same:
        raise ConfigError(f"--student {cfg.student} has another tokenizer than the teacher: the teacher grades the "
                          "student's token ids, so on-policy rounds need one tokenizer (cross-tokenizer KD, "
                          "train-student --cross-tokenizer, reads off-policy caches only)")
    return student


def vllm_architectures() -> set[str] | None:
    """The model architectures this vLLM can load (None where vLLM is not installed: the stage will say so)."""
    try:
        from vllm import ModelRegistry
    except ImportError:
        return None
    return set(ModelRegistry.get_supported_archs())


def round_commands(cfg: OnPolicyConfig, r: int, student: str) -> dict[str, list[str]]:
    """Round r's three stage commands (arguments after `distily`)."""
    out = Path(cfg.output) / f"round-{r}"
    prompts = ["--prompts", cfg.prompts] if cfg.prompts else []
    teacher = ["--teacher", cfg.teacher] if cfg.teacher else []
    return {
        "generate": ["generate", "-o", str(out / "generated"), "--teacher", student, "--generator", "prefix", *prompts,
                     "--prompts-column", cfg.prompts_column, "--prefix-tokens", str(cfg.prefix_tokens),
                     "--num-sequences", str(cfg.num_sequences), "--max-seq-len", str(cfg.max_seq_len),
                     "--temperature", str(cfg.temperature), "--seed", str(cfg.seed * 1000 + r),
                     *(["--corpus-fraction", str(round(1 - cfg.mix, 6))] if cfg.mix < 1 else [])],
        "teacher-cache": ["teacher-cache", "-o", str(out / "cache"), *teacher, "--dataset", str(out / "generated"),
                          "--graded", "--max-seq-len", str(cfg.max_seq_len), "--targets", cfg.targets],
        "train-student": ["train-student", "--cache", str(out / "cache"), "--student", student, "-o", str(out / "student"),
                          "--loss", cfg.loss, "--max-steps", str(cfg.steps), "--lr", str(cfg.lr), "--lr-schedule",
                          "constant", "--warmup-steps", str(cfg.warmup_steps), "--batch-size", str(cfg.batch_size),
                          "--optimizer", cfg.optimizer, "--eval-sequences", str(cfg.eval_sequences), "--seed",
                          str(cfg.seed), "--save-steps", str(max(1, cfg.steps // 3)), "--logging-steps",
                          str(max(1, min(10, cfg.steps // 3))), *[a for x in cfg.train_args for a in shlex.split(x)], "--resume"],
    }


def stage_done(stage: str, cmd: list[str]) -> bool:
    """Whether the stage's output is complete (its command would find nothing to do)."""
    out = Path(cmd[cmd.index("-o") + 1])
    if stage == "generate":
        manifests = read_manifests(out)
        return bool(manifests) and all(m.get("complete") for m in manifests)
    if stage == "teacher-cache":
        return (out / "manifest.json").exists() and bool(read_json(out / "manifest.json").get("complete"))
    return (out / "final" / "config.json").exists()


def run(cfg: OnPolicyConfig) -> dict:
    """Run (or resume) every round; returns rounds.json's content."""
    c0 = time.perf_counter()
    student = check(cfg)
    checked = round(time.perf_counter() - c0, 2)
    out = Path(cfg.output)
    if cfg.print_commands:
        for r in range(1, cfg.rounds + 1):
            print(f"# round {r}" + ("" if r == 1 else f" (its student: round {r - 1}'s student/final)"))
            for cmd in round_commands(cfg, r, student if r == 1 else str(out / f"round-{r - 1}" / "student" / "final")).values():
                print(shlex.join(["distily", *cmd]))
        return {}
    out.mkdir(parents=True, exist_ok=True)
    record = read_json(out / ROUNDS) if (out / ROUNDS).exists() else {}
    record = {"start_student": student, "teacher": cfg.teacher or "embedded", "check_seconds": checked,
              "rounds": record.get("rounds", [])}
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        entry = {"round": r, "student_in": student, "seconds": {}}
        stage_time = 0.0
        for stage, cmd in round_commands(cfg, r, student).items():
            entry[stage] = cmd[cmd.index("-o") + 1]
            if stage_done(stage, cmd):
                continue
            print(f"on-policy round {r}/{cfg.rounds}: {shlex.join(['distily', *cmd])}", flush=True)
            s0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.cli", *cmd], check=True)
            stage_time += time.perf_counter() - s0
            entry["seconds"][stage] = round(time.perf_counter() - s0, 2)
        student = str(Path(entry["train-student"]) / "final")
        entry["student_out"] = student
        entry["seconds"]["outside_stages"] = round(max(0.0, time.perf_counter() - t0 - stage_time), 3)
        record["rounds"] = [e for e in record["rounds"] if e["round"] != r] + [entry]
        atomic_write_json(out / ROUNDS, record)
    print(json.dumps({e["round"]: e["student_out"] for e in record["rounds"]}, indent=1))
    return record
