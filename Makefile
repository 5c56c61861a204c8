# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   set everything up, walk through the main job on a throwaway vault
#   make test   set everything up, run lint-free tests with coverage
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check -q

.PHONY: all demo test lint bench ci clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Editable installs, refreshed whenever pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[test,lint]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[bench]"
	touch $@

demo: $(VENV)/.installed-base
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) demo/demo.py

test: $(VENV)/.installed-test
	rm -f .coverage .coverage.*
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" COVERAGE_PROCESS_START="$(CURDIR)/pyproject.toml" \
		$(PY) -m pytest -p no:cacheprovider --cov --cov-branch --cov-report=
	$(PY) -m coverage combine -q || true
	$(PY) -m coverage report --fail-under=95 --omit='keyring_hardened/backend.py,keyring_hardened/cli.py,keyring_hardened/__main__.py'

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check keyring_hardened tests bench demo
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-test $(VENV)/.installed-bench
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/run.py

clean:
	rm -rf $(VENV) .coverage .coverage.* .mypy_cache .ruff_cache *.egg-info
