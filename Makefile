# The two commands a newcomer needs (README):
#   make demo   run the whole job flow against the embedded GoFlow simulator (tiny model, CPU)
#   make test   install everything from this repo's files, lint, type-check and run all tests
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-light demo test lint typecheck pytest clean

setup:
	scripts/setup.sh

setup-light:
	scripts/setup.sh --light

demo: setup
	$(VENV)/bin/goflow-gpu demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

pytest: setup
	$(PY) -m pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
