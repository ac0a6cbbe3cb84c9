# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast lint

$(VENV)/.installed: pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/videodpo demo --out runs/videodpo-demo
	$(VENV)/bin/llmpost demo --out runs/llmpost-demo

lint: setup
	$(VENV)/bin/ruff check .

# Everything, the multi-rank and end-to-end tests marked `slow` included (what CI runs).
test: lint
	$(PY) -m pytest -q

# The quick loop while developing: leaves out the tests marked `slow`.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"
