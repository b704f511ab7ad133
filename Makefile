# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install clipfind into it first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-postgres test-slow test-all lint bench install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clipfind demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not postgres" -q

# The store tests on PostgreSQL: they start their own server (needs PostgreSQL's server binaries).
test-postgres: $(STAMP)
	$(VENV)/bin/python -m pytest -m "postgres and not slow" -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check retrieval tests bench cli.py
	$(VENV)/bin/lint-imports
