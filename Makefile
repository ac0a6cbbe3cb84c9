# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-all lint

$(VENV)/.installed: pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/videodpo demo --out runs/videodpo-demo
	$(VENV)/bin/llmpost demo --out runs/llmpost-demo

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q
