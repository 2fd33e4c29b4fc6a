# Two commands for a new user: `make repro` and `make test`. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test test-fast bench clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

repro: $(VENV)/.installed
	dvc repro
	@echo
	@tlpipe summary

test: $(VENV)/.installed
	pytest -m "slow or not slow"

test-fast: $(VENV)/.installed
	pytest -m "not slow"

bench: $(VENV)/.installed
	python bench/all.py

clean-venv:
	rm -rf $(VENV)
