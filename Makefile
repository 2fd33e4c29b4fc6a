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

# Two pytest workers (pytest-xdist), one test file each at a time: much of a test's time is process
# start-up and waiting on `dvc`, so two workers keep 2 cores busy. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
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
