"""Options have one source of truth: the config dataclasses. Flags, YAML and help follow them."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer
from conftest import ROOT

from pipeline import config as C
from pipeline.cli import app
from pipeline.errors import CacheError, ConfigError


def flags_of_every_command() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} for name, cmd in group.commands.items()}


def test_every_field_is_a_flag_and_every_flag_a_field():
    flags = flags_of_every_command()
    for name, cls in (("teacher-cache", C.CaptureConfig), ("generate", C.GenerateConfig), ("train-student", C.TrainConfig),
                      ("eval", C.EvalConfig), ("export", C.ExportConfig)):
        positional = {f.name for f in C.dataclasses.fields(cls) if f.metadata.get("positional")}
        assert positional <= flags[name], positional - flags[name]  # arguments, e.g. `distily export RUN_DIR OUT`
        fields = {"--" + f.replace("_", "-") for f in C.dataclasses.asdict(cls()) if f not in positional}
        assert fields <= flags[name], fields - flags[name]
        long_flags = {f for f in flags[name] if f.startswith("--") and not f.startswith("--no-")}
        assert long_flags - fields - {"--config", "--help", "--train-embeddings"} == set()


def test_yaml_values_take_the_field_types(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train_student:\n  lr: 3e-4\n  init_layers: '0,1,2'\n  student_config: {hidden_size: 64}\n"
                   "  bf16: 'true'\n  max_steps: '20'\nteacher_cache:\n  hidden_layers: '10,20'\n")
    t = C.load(C.TrainConfig, str(cfg), "train_student", {"batch_size": "8"})
    assert (t.lr, t.init_layers, t.student_config, t.bf16, t.max_steps, t.batch_size) == (3e-4, [0, 1, 2], {"hidden_size": 64}, True, 20, 8)
    assert C.load(C.CaptureConfig, str(cfg), "teacher_cache", {}).hidden_layers == [10, 20]
    cfg.write_text("hidden_layers: [10, 20]\ntop_k: 32\n")
    assert C.load(C.CaptureConfig, str(cfg), "teacher_cache", {}).hidden_layers == [10, 20]
    assert C.load(C.TrainConfig, None, "train_student", {"init_layers": "evenly"}).init_layers == "evenly"


@pytest.mark.parametrize("key, value, message", [
    ("lr", "fast", "train_student.lr: expected a number, got 'fast'"),
    ("max_steps", "1.5", "train_student.max_steps: expected an integer"),
    ("resume", "maybe", "train_student.resume: expected true or false"),
    ("init_layers", "first", "train_student.init_layers: expected a list of integers .* or auto or evenly"),
    ("student_config", "{not json", "train_student.student_config: expected a mapping"),
    ("colour", "red", r"unknown option\(s\) \['colour'\]"),
])
def test_a_wrong_value_is_a_config_error_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        C.load(C.TrainConfig, None, "train_student", {key: value})
    assert not isinstance(e.value, CacheError)


def test_cli_reads_yaml_numbers_and_reports_bad_types(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train_student:\n  lr: 3e-4\n  max_steps: lots\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "train-student", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "train_student.max_steps: expected an integer, got 'lots'" in r.stderr


# flags of other tools the README and docs show (torchrun, sbatch, pip, git, llama.cpp)
FOREIGN = {"--extra-index-url", "--no-deps", "--nproc-per-node", "--array", "--gres", "--ntasks", "--help", "--nnodes", "--node-rank", "--rdzv-endpoint", "--depth",
           "--no-repack"}


def flags_of_the_benchmark_scripts():
    return {f for p in (ROOT / "tests" / "bench").glob("*.py") for f in re.findall(r'add_argument\(\s*"(--[a-z][a-z0-9-]*)"', p.read_text())}


def test_every_flag_the_docs_show_exists():
    flags = set().union(*flags_of_every_command().values(), flags_of_the_benchmark_scripts())
    assert {"--rows", "--smoke", "--json"} <= flags_of_the_benchmark_scripts()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", page.read_text()))
        missing = sorted(shown - flags - FOREIGN)
        assert not missing, f"{page.name} shows flags no command has: {missing}"
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", (ROOT / "docs" / "teacher-cache.md").read_text()))
    assert {"--tensor-parallel-size", "--token-store", "--num-shards"} <= shown


def command_lines(text: str):
    """(command, flags) of every `distily COMMAND ...` the text shows, continuation lines joined, up to a pipe,
    `;`, `&&`, a comment or the end of the line or inline code span."""
    text = re.sub(r"\\\n\s*", " ", text)
    for m in re.finditer(r"(?<![\w/-])distily ([a-z][a-z-]*)([^\n`|;#&]*)", text):
        yield m.group(1), set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)))


def test_every_flag_is_shown_with_a_command_that_has_it():
    """A flag the docs show on a `distily COMMAND` line belongs to that command (not just to some command)."""
    flags = flags_of_every_command()
    checked = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for command, shown in command_lines(page.read_text()):
            if command not in flags:
                continue  # prose such as "distily exists", or a command's name in a sentence
            wrong = sorted(shown - flags[command] - FOREIGN)
            assert not wrong, f"{page.name}: `distily {command}` is shown with {wrong}, which it does not have"
            checked += len(shown)
    assert checked > 50
    assert list(command_lines("distily eval --model m \\\n   --limit 5 | tee x --nope")) == [("eval", {"--model", "--limit"})]


def test_help_prints_every_flag_name_whole_at_80_columns():
    """At 80 columns (a default terminal, a CI log) `--help` shows each flag's full name."""
    env = {**__import__("os").environ, "COLUMNS": "80"}
    for name, expected in flags_of_every_command().items():
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", name, "--help"], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.stdout))
        long_flags = {f for f in expected if f.startswith("--")}
        assert long_flags <= shown, (name, sorted(long_flags - shown))
        assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_a_mistyped_stage_one_option_is_refused_before_transformers_is_imported(tmp_path):
    """teacher-cache and generate judge their options, the teacher's path and (teacher-cache) the dataset's path
    before importing transformers (seconds) or converting a GGUF teacher, so a typo fails at once (in about a second
    for generate; teacher-cache's own torch import is the rest)."""
    code = (
        "import sys\n"
        "from pipeline.config import CaptureConfig, GenerateConfig\n"
        "from pipeline.errors import DistilyError\n"
        "from stage_teacher import capture, generate\n"
        "for fn, cfg in ((generate.prepare, GenerateConfig(output='o', generator='poetry')),\n"
        "                (capture.prepare, CaptureConfig(output='o', targets='foo')),\n"
        f"                (generate.prepare, GenerateConfig(output='o', teacher='{tmp_path}/no-such-teacher')),\n"
        f"                (capture.prepare, CaptureConfig(output='o', teacher='{tmp_path}/no-such.gguf')),\n"
        f"                (capture.prepare, CaptureConfig(output='o', dataset='{tmp_path}/no-such-*.jsonl'))):\n"
        "    try:\n"
        "        fn(cfg)\n"
        "    except DistilyError as e:\n"
        "        print(e)\n"
        "print(sorted(m for m in ('transformers', 'vllm') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 6, r.stderr[-2000:]
    assert lines[0].startswith("--generator 'poetry' is unknown") and lines[1].startswith("--targets 'foo' is unknown")
    assert lines[2] == f"model '{tmp_path}/no-such-teacher': no such directory or .gguf file, and not a hub id of the form org/name"
    assert lines[3] == f"model '{tmp_path}/no-such.gguf': no such GGUF file"
    assert lines[4] == f"--dataset '{tmp_path}/no-such-*.jsonl': no such file or directory"
    assert lines[5] == "[]"
