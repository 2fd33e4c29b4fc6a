# Two commands for a new user: `make repro` and `make test`. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test test-fast bench deps clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

repro: $(VENV)/.installed
	dvc repro
	@echo
	@tlpipe summary

# One pytest worker (pytest-xdist) per core and one more, one test file each at a time: the suite is
# CPU-bound (process start-up, torch imports), but tests also wait (dvc's queue, torchrun's rendezvous,
# kill-and-resume), and the extra worker fills those gaps. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= $(shell python3 -c "import os; print(len(os.sched_getaffinity(0)) + 1)")
test: $(VENV)/.installed
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10 -m "slow or not slow"

test-fast: $(VENV)/.installed
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

bench: $(VENV)/.installed
	python bench/all.py

# Rewrite each stage's code deps in dvc.yaml from its imports (tlpipe/tools/codedeps.py); the tests
# fail while they are stale.
deps: $(VENV)/.installed
	python -m tlpipe.tools.codedeps

clean-venv:
	rm -rf $(VENV)
