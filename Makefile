# dsv3 — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# The tests use a few processes; keep them within the machine.
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast bench gpu-check clean

install: $(STAMP)

# Idempotent: re-runs only when the package metadata changes. torch is
# installed first and pinned, so no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e ".[test]" $(TORCH)
	touch $(STAMP)

demo: install
	$(VENV)/bin/dsv3 train

# The whole suite (what CI runs); prints its 25 slowest tests.
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=25 tests

# The edit loop: every test not marked slow.
test-fast: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow" --durations=10 tests

bench: install
	$(PY) bench/train_step.py

# On a GPU machine: FP8 GEMM/Linear, MFU and memory vs the plan, the prefetcher, speculative decoding;
# a markdown table for BENCHMARKS.md (< 8 minutes on one H100; every part skips without CUDA).
gpu-check: install
	$(PY) bench/gpu_check.py --json gpu-check.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
