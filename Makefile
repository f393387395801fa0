# rlhf-overlay — every target is thin: it calls setup.sh, training_scripts/*.sh or `python -m rlhf_overlay...`.
# `make` (or `make help`) lists the targets: the text after `##` on a target's line is its help, and a `## vars:` line
# right above it names the variables it takes (tests/test_make_quoting.py checks them against what reaches the program).
# Variables use ?= so the environment and the command line override them, e.g. `make rm-llama2 MODEL=/path`.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV       ?= .venv
# the interpreter that runs the project's modules (every target; training_scripts/lib.sh and setup.sh read it alike):
# the venv's once setup made it, else python3
PYTHON     ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
# setup: the interpreter that creates the venv (empty = python3); `make setup PYTHON=...` still works, with a note
BASE_PYTHON ?=
UPSTREAM_MIRROR ?=
# 1 = move user edits inside upstream/ to a backup folder instead of refusing
FORCE      ?= 0
# policy / reward base model folder or hub id (empty = embedded tiny model)
MODEL      ?=
# DeepSpeed-Chat step 3 actor (empty = embedded tiny LLaMA)
ACTOR      ?=
# DeepSpeed-Chat step 3 critic = a step-2 reward model (empty = train/use the tiny one)
CRITIC     ?=
# trlx PPO reward checkpoint / eval-rm reward model folder. make predefines RM = "rm -f"; drop that default
# so only a value from the command line or the environment reaches the scripts.
ifeq ($(origin RM),default)
RM :=
endif
# ppo-smoke-test reward: rule (learnable rule; the default when empty) or model (untrained value-head RM)
REWARD     ?=
# preference / prompt data file or folder (empty = embedded synthetic data)
DATA       ?=
# run folder (empty = a new folder under runs/)
OUTPUT     ?=
# 1 = allow writing into a non-empty OUTPUT
OVERWRITE  ?= 0
# DeepSpeed ZeRO stage (empty = 0 on CPU, the upstream recipe's on GPU)
ZERO_STAGE ?=
# LoRA rank (empty = the recipe's default)
LORA_DIM   ?=
# ranks per node (CPU: processes)
NUM_GPUS   ?=
# DeepSpeed-format hostfile (`host slots=N`) for multi-node
HOSTFILE   ?=
# 1 = every rank writes what it trained on and its optimizer-state size to <run>/ranks/*.json
RANK_REPORT ?= 0
# 1 = train a MODEL whose architecture is not the target's (LLaMA for *-llama2, BLOOM / GPT-J for the trlx ones)
ALLOW_ARCH ?= 0
# resumable checkpoints into <run>/checkpoints/step-N (ppo-smoke-test, ppo-bloom, ppo-gptj): every N steps (empty = the
# target's default, 0 = by time only), every M minutes (empty = 30), how many kept (empty = 2); RESUME=<run folder>
# continues that run from its newest checkpoint (see README "Long runs")
CHECKPOINT_EVERY ?=
CHECKPOINT_MINUTES ?=
KEEP_CHECKPOINTS ?=
# PPO health guards (NaN/inf, KL per token, degenerate answers, reward collapse): stop | warn (empty = stop with your
# own MODEL, warn on the tiny defaults)
ON_UNHEALTHY ?=
# ppo-join: this machine's rank (its line in HOSTFILE, counting from 0) in the run RUN started on the first host
MACHINE_RANK ?=
# accelerate-config: base accelerate config (cpu, multi_gpu, zero2 or a YAML file) and the folder to write into
BASE       ?= zero2
OUT        ?=
# chat: answer this prompt once and exit (empty = interactive)
PROMPT     ?=
# run folder(s) for `make report`
RUN        ?=
PYTEST_ARGS ?=
# pipeline-*: the Megatron SFT checkpoint to start from (empty = the pre-trained tiny base as a Megatron checkpoint),
# the HF tokenizer folder for its conversion, and an earlier pipeline folder to continue (done stages are skipped)
MEGATRON_SFT ?=
TOKENIZER  ?=
RESUME     ?=
# 1 = rm-/ppo-/dpo-llama2 run the llama2-7b recipe's DeepSpeed settings on the tiny LLaMA, 2 CPU ranks
RECIPE_AT_TINY_SCALE ?=

# Every value a user gives reaches the programs through the environment (recipes say "$$MODEL", never $(MODEL)),
# so the shell never parses it: `;`, quotes, backticks, spaces and newlines arrive as they were typed. List
# variables (RUN, CONVERT_FLAGS, PYTEST_ARGS) are split by rlhf_overlay.runtime.make_args, not by the shell. make itself
# expands `$` in command-line and environment values (`DATA='$(x)'` would arrive empty), so such values are
# refused here, before anything runs.
USER_VARS := PYTHON VENV BASE_PYTHON UPSTREAM_MIRROR FORCE MODEL ACTOR CRITIC RM REWARD DATA OUTPUT OVERWRITE ZERO_STAGE LORA_DIM RECIPE_AT_TINY_SCALE \
             NUM_GPUS HOSTFILE RANK_REPORT ALLOW_ARCH MACHINE_RANK BASE OUT PROMPT RUN PYTEST_ARGS SOURCE TARGET TP PP MODEL_NAME \
             EXTRA_VOCAB_SIZE CONVERT_FLAGS MEGATRON_SFT TOKENIZER RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS ON_UNHEALTHY
$(foreach v,$(.VARIABLES),$(if $(or $(filter command line,$(origin $(v))),$(and $(filter $(v),$(USER_VARS)),$(filter \
  environment%,$(origin $(v))))),$(if $(findstring $$,$(value $(v))),$(error $(v)=$(value $(v)) contains '$$', which \
  make would expand before any program sees it — give the value without '$$': let your shell expand it first, e.g. \
  $(v)="$$HOME/x"))))
export $(USER_VARS)
# setup.sh runs the modules with the venv it makes, so the default PYTHON does not go to it; a PYTHON the user gave
# does (setup.sh takes it as BASE_PYTHON, with a note, or with --upstream-only as the prepared environment's python)
SETUP_SH = $(if $(filter file,$(origin PYTHON)),env -u PYTHON )bash setup.sh

.PHONY: help
help: ## List the targets, each with the variables it takes: make TARGET VAR=value
	@echo "Every target also takes PYTHON (the interpreter that runs the project's modules; default: the venv's) and VENV."
	@awk 'BEGIN {FS = ":.*## "} /^## vars:/ {sub(/^## vars: */, ""); vars = $$0; next} \
	     /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2; \
	                              if (vars != "") printf "  %-22s \033[2mvars: %s\033[0m\n", "", vars; vars = ""}' $(MAKEFILE_LIST)

# ---------------------------------------------------------------- foundation
.PHONY: setup upstream verify lock assets test upstream-tests
## vars: BASE_PYTHON UPSTREAM_MIRROR FORCE
setup: ## Create .venv with pinned deps, clone upstreams at the pin, apply overlays
	$(SETUP_SH)

## vars: UPSTREAM_MIRROR FORCE
upstream: ## Only the git + overlay part of setup (no pip): clone/verify pins and apply overlays
	$(SETUP_SH) --upstream-only

verify: ## Check each upstream work tree is exactly pin + overlays and report drifted overlays/patches
	"$$PYTHON" -m rlhf_overlay.engine.setup_engine verify

lock: ## Recompute the digests and upstream bases of every overlay file and patch into upstream.lock
	"$$PYTHON" -m rlhf_overlay.engine.setup_engine lock

assets: ## Build the embedded tiny models, tokenizers and synthetic data into assets/ (deterministic, offline)
	"$$PYTHON" -m rlhf_overlay.data.tiny_assets

## vars: PYTEST_ARGS BASE_PYTHON UPSTREAM_MIRROR
test: ## Run the test suite (sets up the env; upstream tests run when a mirror or the setup cache is present)
	$(SETUP_SH) --for-tests
	@# the tests' own `make` calls use the venv setup just made: PYTHON was fixed when this make started (and
	@# exported), when a fresh clone had no .venv yet, so it would name the system python3 (CI failed that way)
	PYTHON="$$(cd "$$VENV" && pwd)/bin/python" "$$VENV/bin/python" -m rlhf_overlay.runtime.make_args --append PYTEST_ARGS -- \
	    "$$VENV/bin/python" -m pytest

## vars: OUTPUT
upstream-tests: ## The upstreams' own test suites (trlx tests/, DeepSpeed-Chat tests/test_training.py on OPT + LLaMA) on our patched tree, offline on tiny stand-ins: per-file table + junit
	"$$PYTHON" -m rlhf_overlay.engine.upstream_tests

# ---------------------------------------------------------------- training targets
# Each calls training_scripts/<name>.sh; a missing script means the target is not implemented yet.
TRAINING_TARGETS := rm-llama2 ppo-llama2 rm-bloom rm-gptj ppo-bloom ppo-gptj ppo-smoke-test dpo-llama2 eval-rm chat
.PHONY: $(TRAINING_TARGETS) ppo-join accelerate-config
## vars: MODEL DATA OUTPUT OVERWRITE ZERO_STAGE LORA_DIM NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT RECIPE_AT_TINY_SCALE ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
rm-llama2: ## DeepSpeed-Chat step 2: LLaMA2 reward model
	@bash training_scripts/run.sh rm_llama2
## vars: ACTOR CRITIC DATA OUTPUT OVERWRITE ZERO_STAGE LORA_DIM NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT RECIPE_AT_TINY_SCALE ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
ppo-llama2: ## DeepSpeed-Chat step 3: LLaMA2 PPO with LoRA
	@bash training_scripts/run.sh ppo_llama2
## vars: MODEL DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
rm-bloom: ## trlx recipe: BLOOM value-head reward model
	@bash training_scripts/run.sh rm_bloom
## vars: MODEL DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
rm-gptj: ## trlx recipe: GPT-J value-head reward model
	@bash training_scripts/run.sh rm_gptj
## vars: MODEL RM DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
ppo-bloom: ## trlx PPO on BLOOM with a trained reward model
	@bash training_scripts/run.sh ppo_bloom
## vars: MODEL RM DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
ppo-gptj: ## trlx PPO on GPT-J with a trained reward model
	@bash training_scripts/run.sh ppo_gptj
## vars: MODEL REWARD RM DATA OUTPUT OVERWRITE ZERO_STAGE NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
ppo-smoke-test: ## PPO alone (no SFT, no RM training) on the pre-trained tiny BLOOM; passes on reward rise, fluency, KL
	@bash training_scripts/run.sh ppo_smoke_test
## vars: RUN MACHINE_RANK
ppo-join: ## Join a several-node trlx PPO run (HOSTFILE) started on the first host
	$(if $(RUN),,$(error ppo-join needs RUN=<the run folder printed on the first host>))$(if $(MACHINE_RANK),,$(error ppo-join needs MACHINE_RANK=<this host's line in HOSTFILE, from 0>))
	"$$PYTHON" -m rlhf_overlay.trlx_jobs.ppo --join "$$RUN" --machine-rank "$$MACHINE_RANK"
## vars: HOSTFILE BASE OUT
accelerate-config: ## One accelerate config per machine of HOSTFILE, into OUT (BASE=cpu|multi_gpu|zero2|file.yaml)
	$(if $(HOSTFILE),,$(error accelerate-config needs HOSTFILE=<DeepSpeed hostfile>))$(if $(OUT),,$(error accelerate-config needs OUT=<folder>))
	"$$PYTHON" -m rlhf_overlay.runtime.hostfile accelerate-config --hostfile "$$HOSTFILE" --base "$$BASE" --out "$$OUT"
## vars: MODEL DATA OUTPUT OVERWRITE ZERO_STAGE LORA_DIM NUM_GPUS HOSTFILE ALLOW_ARCH RANK_REPORT RECIPE_AT_TINY_SCALE ON_UNHEALTHY RESUME CHECKPOINT_EVERY CHECKPOINT_MINUTES KEEP_CHECKPOINTS
dpo-llama2: ## DeepSpeed-Chat DPO on LLaMA2
	@bash training_scripts/run.sh dpo_llama2
## vars: RM DATA OUTPUT OVERWRITE
eval-rm: ## Evaluate a reward model on preference data: accuracy, margin, histogram
	@bash training_scripts/run.sh eval_rm
## vars: MODEL PROMPT
chat: ## Chat with a trained actor; PROMPT="..." answers once and exits
	@bash training_scripts/run.sh chat

# two "nodes" on this machine for trying HOSTFILE runs by hand (root; rlhf_overlay/runtime/cluster.py, used by the tests)
.PHONY: cluster-up cluster-down
cluster-up: ## Test cluster: node-b = a network namespace + sshd, node-a = this machine (installs pdsh, openssh-server)
	"$$PYTHON" -m rlhf_overlay.runtime.cluster up
cluster-down: ## Remove everything cluster-up made (namespace, veth, /etc/hosts block, keys, sshd); safe to repeat
	"$$PYTHON" -m rlhf_overlay.runtime.cluster down

# ---------------------------------------------------------------- whole chain
.PHONY: pipeline-llama2 pipeline-bloom
## vars: MEGATRON_SFT TOKENIZER DATA OUTPUT RESUME NUM_GPUS
pipeline-llama2: ## Megatron SFT -> HF -> rm-llama2 -> ppo-llama2 -> Megatron (input's TP/PP), logits checked
	@bash training_scripts/pipeline_llama2.sh
## vars: MEGATRON_SFT TOKENIZER DATA OUTPUT RESUME NUM_GPUS
pipeline-bloom: ## Megatron SFT -> HF -> rm-bloom -> ppo-bloom -> Megatron (input's TP/PP), logits checked
	@bash training_scripts/pipeline_bloom.sh

# ---------------------------------------------------------------- reports
.PHONY: report
## vars: RUN
report: ## Curves (report.png) and summary.md for one or more run folders
	"$$PYTHON" -m rlhf_overlay.runtime.make_args --append RUN -- "$$PYTHON" -m rlhf_overlay.tools.report

# ---------------------------------------------------------------- converters (toolkits/)
# >>> converters
# Megatron checkpoint (mg2hf: root, iter_*/ or release/) or HF model folder (hf2mg) to convert
SOURCE     ?=
# folder to create; must be empty or absent unless OVERWRITE=1
TARGET     ?=
# tensor / pipeline parallel sizes to write (hf2mg; mg2hf reads them from the checkpoint)
TP         ?= 1
PP         ?= 1
# LLaMA size preset that fills what a checkpoint lacks: llama2-7b, llama2-13b, llama2-70b, llama-7b, ... (empty = none)
MODEL_NAME ?=
# mg2hf: trained rows after the vocabulary to keep (empty = the checkpoint's); hf2mg: rows to add for new tokens
EXTRA_VOCAB_SIZE ?=
# more flags for python -m toolkits.megatron_hf.convert, e.g. CONVERT_FLAGS="--dtype bf16 --tokenizer /path"
CONVERT_FLAGS ?=

# values go as "$$VAR" (the environment), CONVERT_FLAGS is split by rlhf_overlay.runtime.make_args (see USER_VARS above)
convert_py = "$$PYTHON" -m rlhf_overlay.runtime.make_args --append CONVERT_FLAGS -- "$$PYTHON" -m toolkits.megatron_hf.convert
convert_common = $(if $(SOURCE),,$(error $@ needs SOURCE=<folder to convert>))$(if $(TARGET),,$(error $@ needs TARGET=<folder to create>))--source "$$SOURCE" --target "$$TARGET" $(if $(EXTRA_VOCAB_SIZE),--extra-vocab-size "$$EXTRA_VOCAB_SIZE") $(if $(filter 1,$(OVERWRITE)),--overwrite)
llama_model_name = $(if $(MODEL_NAME),--model-name "$$MODEL_NAME")

.PHONY: convert-llama2-mg2hf convert-llama2-hf2mg convert-bloom-mg2hf convert-bloom-hf2mg
## vars: SOURCE TARGET MODEL_NAME EXTRA_VOCAB_SIZE OVERWRITE CONVERT_FLAGS
convert-llama2-mg2hf: ## Megatron -> HF, LLaMA family; legacy, Megatron-Core or torch_dist, detected
	$(convert_py) mg2hf --model llama2 $(llama_model_name) $(convert_common)
## vars: SOURCE TARGET TP PP MODEL_NAME EXTRA_VOCAB_SIZE OVERWRITE CONVERT_FLAGS
convert-llama2-hf2mg: ## HF -> Megatron-Core torch_dist; CONVERT_FLAGS="--format torch|legacy": TP x PP rank files
	$(convert_py) hf2mg --model llama2 --tp "$$TP" --pp "$$PP" $(llama_model_name) $(convert_common)
## vars: SOURCE TARGET EXTRA_VOCAB_SIZE OVERWRITE CONVERT_FLAGS
convert-bloom-mg2hf: ## Megatron -> HF BLOOM
	$(convert_py) mg2hf --model bloom $(convert_common)
## vars: SOURCE TARGET TP PP EXTRA_VOCAB_SIZE OVERWRITE CONVERT_FLAGS
convert-bloom-hf2mg: ## HF -> Megatron BLOOM at TP x PP
	$(convert_py) hf2mg --model bloom --tp "$$TP" --pp "$$PP" $(convert_common)
# <<< converters
