# dsv3 — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# The tests use a few processes; keep them within the machine.
PYTEST_WORKERS ?= 2

.PHONY: install demo test bench clean

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

test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

bench: install
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
