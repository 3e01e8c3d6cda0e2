# Two entry points for a fresh machine: `make demo` (set up, run the main job) and `make test`.
# CPU torch is installed where no NVIDIA GPU is present (torch==2.13.0 is the CPU build in this
# project's machines' wheel cache); set TORCH to choose another, e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/poise demo

test: setup
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# tests/reliability alone (also part of `make test`); RELIABILITY_FULL=1: the soak variants
RELIABILITY_FULL ?=
.PHONY: reliability
reliability: setup
	POISE_RELIABILITY_FULL=$(RELIABILITY_FULL) $(VENV)/bin/pytest -q tests/reliability $(PYTEST_ARGS)

# The probe-study notebooks (notebooks/README.md): capture the tiny reasoner's rollouts (resumes,
# or only checks, a capture already there), then build notebooks/*.ipynb from their jupytext
# sources notebooks/NN_*.py and execute them, saving the outputs.
# The training-ablation notebook (04) reads `poise ablate` runs (6 arms x 3 seeds; finished runs
# are kept, so a rerun only summarises) and a `poise value-bench` study.
# NB_RUN: a trainer run directory for the calibration notebook's "over training steps" section.
NB_DATA ?= notebooks/data/tiny_capture
NB_RUN ?=
NB_JOBS ?= 2
# the tiny reasoner's scale for the value benchmark: a critic lr that moves in 10 passes, and
# Hista's state grid and distance clamp for 5-30-token responses (docs/methods/hista.md)
NB_VB_TINY ?= critic.lr=1e-4 hista.min_interval=4 hista.mean_window=2 hista.min_d=0.001
.PHONY: notebooks
notebooks: setup
	$(VENV)/bin/poise probe capture --tasks arith,boolean,code_output --prompts 200 --samples 4 \
		--out $(NB_DATA)
	$(VENV)/bin/poise ablate --out notebooks/data/ablation --jobs $(NB_JOBS)
	$(VENV)/bin/poise value-bench --out notebooks/data/value_bench $(NB_VB_TINY)
	$(PY) notebooks/build.py --execute --data $(NB_DATA) $(if $(NB_RUN),--run $(NB_RUN))

# the vLLM rollout engine's own environment and tests (make vllm-env, make test-vllm)
include Makefile.vllm

# the verl integration's own environment and tests (make verl-env, make test-verl)
include Makefile.verl
