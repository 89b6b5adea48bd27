# backward-lab. `make run` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch: a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: help install run test bench experiments fingerprints reference gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

EXTRAS := dev,launchers,examples,trackers,frameworks

# pip takes the CPU torch from the machine's own file; uv installs the rest about five times faster than
# pip (9 s against 45 s here) and keeps that torch, which satisfies torch>=2.2. Without uv, pip does it all.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet uv || true
	$(PY) -m uv pip install --quiet --python $(PY) -e ".[$(EXTRAS)]" || \
	  $(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with a CPU torch where none is present, and the package

run: $(STAMP)  ## the default comparison: full vs sum vs accumulate, with verdicts (outputs/multiruns/<time>/)
	$(PY) -m runner -m experiment=default $(ARGS)

# Two test processes (pytest-xdist): most tests wait on a subprocess (Python, Hydra, torchrun start-up).
TEST_WORKERS ?= 2

test: $(STAMP)  ## run the test suite
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

bench: $(STAMP)  ## measure the runner's cost against hand-written loops and Hydra (bench.csv)
	$(PY) -m runner.bench $(ARGS)

EXPERIMENTS := $(basename $(notdir $(wildcard experiments/*.yaml)))
EXPERIMENTS_DIR ?= outputs/experiments/$(shell date +%Y-%m-%d_%H-%M-%S)

experiments: $(STAMP)  ## run every experiment in experiments/ and write a markdown report
	@status=0; for name in $(EXPERIMENTS); do \
	  echo "== experiment=$$name"; \
	  $(PY) -m runner -m experiment=$$name hydra.sweep.dir=$(EXPERIMENTS_DIR)/$$name $(ARGS) || status=1; \
	done; \
	$(PY) -m runner.report $(EXPERIMENTS_DIR) --out $(EXPERIMENTS_DIR)/report.md || status=1; \
	exit $$status

FINGERPRINTS_STAMP := $(shell date +%Y-%m-%d_%H-%M-%S)
FINGERPRINTS_DIR ?= outputs/fingerprints/$(FINGERPRINTS_STAMP)

fingerprints: $(STAMP)  ## fingerprint Lightning, Accelerate, the Trainer (and DeepSpeed where installed); rewrite docs/fingerprint.md's table
	$(PY) -m runner -m experiment=fingerprint loop=lightning,accelerate,hf_trainer hydra.sweep.dir=$(FINGERPRINTS_DIR)/frameworks
	@if $(PY) -c "import deepspeed" 2>/dev/null; then \
	  $(PY) -m runner -m experiment=fingerprint loop=deepspeed loop.zero_stage=0,1,2 hydra.sweep.dir=$(FINGERPRINTS_DIR)/deepspeed; fi
	$(PY) -m runner.analysis.fingerprints $(FINGERPRINTS_DIR)/frameworks $$(ls -d $(FINGERPRINTS_DIR)/deepspeed 2>/dev/null) \
	  --docs docs/fingerprint.md

reference: $(STAMP)  ## regenerate docs/reference.md and the README's groups table from the keys' declarations
	$(PY) -m runner.config.reference --write

gpu-check: $(STAMP)  ## on a CUDA machine: GPU tests and the precision, ddp, fsdp and memory experiments on cuda, with a markdown report
	$(PY) -m runner.gpu_check $(ARGS)

clean:  ## remove outputs, build leftovers and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
