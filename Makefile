# tomd: two commands do all the set-up on a fresh machine with Python 3.11.
#   make demo   creates .venv, installs, runs the whole pipeline on embedded defaults
#   make test   installs test extras, makes sure PostgreSQL is up, runs the suite

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test install bench clean postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall when the dependency list changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[$*]'
	touch $@

install: $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/tomd demo

postgres:
	@scripts/ensure-postgres

# promtool (Debian's prometheus package) checks the alerting rules; optional.
$(BIN)/promtool: | $(BIN)/python
	@scripts/fetch-promtool $@

test: $(VENV)/.installed-test postgres $(BIN)/promtool
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed-test postgres
	$(BIN)/python bench/crossmatch.py

clean:
	rm -rf $(VENV) demo-work .pytest_cache
