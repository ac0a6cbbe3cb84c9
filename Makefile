# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test test-fast lint

$(VENV)/.installed: pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh

setup: $(VENV)/.installed

# Both demos, one seed each, side by side (one core each); logs in runs/*-demo.log, their
# tables and claims printed at the end. About 5 to 7 minutes on an idle 2-core machine.
# The README's 3-seed tables: `videodpo demo --seeds 3`, `llmpost demo --seeds 3`.
demo: setup
	@echo "make demo: the video demo (noisy-caption tiny Wan base, then SFT / Flow-DPO / Reg-DPO /"
	@echo "  Reg-DPO on annotated pairs) and the LLM demo (RedOne 2.0 three stages vs SFT baselines,"
	@echo "  full and half data, in and out of distribution), 1 seed each, in parallel on two cores:"
	@echo "  about 5 to 7 minutes on an idle 2-core machine. Logs: runs/videodpo-demo.log, runs/llmpost-demo.log"
	@mkdir -p runs; rm -f runs/videodpo-demo/report.txt runs/llmpost-demo/report.txt
	@$(VENV)/bin/videodpo demo --out runs/videodpo-demo > runs/videodpo-demo.log 2>&1 & video=$$!; \
	$(VENV)/bin/llmpost demo --out runs/llmpost-demo > runs/llmpost-demo.log 2>&1; llm=$$?; \
	wait $$video; video=$$?; \
	cat runs/videodpo-demo/report.txt runs/llmpost-demo/report.txt 2>/dev/null; \
	if [ $$video -ne 0 ]; then tail -20 runs/videodpo-demo.log; fi; \
	if [ $$llm -ne 0 ]; then tail -20 runs/llmpost-demo.log; fi; \
	test $$video -eq 0 -a $$llm -eq 0

lint: setup
	$(VENV)/bin/ruff check .

# Everything, the multi-rank and end-to-end tests marked `slow` included (what CI runs).
test: lint
	$(PY) -m pytest -q

# The quick loop while developing: leaves out the tests marked `slow`.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"
