# Two commands on a fresh machine with Python 3.11 and make:
#   make demo   set everything up, walk through the main job on a throwaway vault
#   make test   set everything up, run lint-free tests with coverage
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check -q

.PHONY: all demo test lint bench bench-access bench-agent bench-moving bench-postgres bench-refresh mutate ci clean

all: test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Editable installs, refreshed whenever pyproject.toml changes.
$(VENV)/.installed-base: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[ansible]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e ".[test,lint]"
	touch $@

# The benchmark measures what users install: a regular (not editable) install
# in a venv of its own, beside the peers it is compared with.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml $(wildcard keyring_hardened/*.py)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip --disable-pip-version-check -q install --upgrade pip
	$(BENCH_VENV)/bin/python -m pip --disable-pip-version-check -q install --force-reinstall --no-deps .
	$(BENCH_VENV)/bin/python -m pip --disable-pip-version-check -q install ".[bench]"
	touch $@

# Mutation testing of the security core (docs/testing.md); not part of test or CI.
# Its own venv: mutmut runs the suite against mutated copies in mutants/.
MUTATE_VENV ?= .venv-mutate
$(MUTATE_VENV)/.installed: pyproject.toml
	test -x $(MUTATE_VENV)/bin/python || $(PYTHON) -m venv $(MUTATE_VENV)
	$(MUTATE_VENV)/bin/python -m pip --disable-pip-version-check -q install --upgrade pip
	$(MUTATE_VENV)/bin/python -m pip --disable-pip-version-check -q install -e ".[test,mutate]"
	touch $@

demo: $(VENV)/.installed-base
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) demo/demo.py

test: $(VENV)/.installed-test
	rm -f .coverage .coverage.*
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" COVERAGE_PROCESS_START="$(CURDIR)/pyproject.toml" \
		$(PY) -m pytest -p no:cacheprovider -n 2 --cov --cov-branch --cov-report=
	# pytest-cov has usually combined everything already; combine what is left, if any.
	if ls .coverage.* >/dev/null 2>&1; then $(PY) -m coverage combine -q --append; fi
	# The gate: the whole package, CLI and backend included.
	$(PY) -m coverage report --fail-under=95 --include='keyring_hardened/*'
	# Measured, not gated: the Ansible plugins, run by real ansible-playbook processes.
	$(PY) -m coverage report --include='ansible_collection/*'

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check keyring_hardened tests bench demo mutate
	$(VENV)/bin/mypy

bench: $(BENCH_VENV)/.installed
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python run.py --out results/latest.md $(BENCH_ARGS)
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python access.py $(BENCH_ACCESS_ARGS)
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python agent.py $(BENCH_AGENT_ARGS)
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python moving.py $(BENCH_MOVING_ARGS)
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python refresh.py $(BENCH_REFRESH_ARGS)
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" nice -n 5 ../$(BENCH_VENV)/bin/python postgres.py $(BENCH_POSTGRES_ARGS)

# The unlock agent: cold keyring get through it, in-process get_password, 8 clients
bench-agent: $(BENCH_VENV)/.installed
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python agent.py $(BENCH_AGENT_ARGS)

# Access control alone: the audited get with 20 policies and 10 limits beside none, 8 readers
bench-access: $(BENCH_VENV)/.installed
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python access.py $(BENCH_ACCESS_ARGS)

# Import and online backup (issue 14); BENCH_MOVING_ARGS="--entries 10000 --credentials 100000"
bench-moving: $(BENCH_VENV)/.installed
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python moving.py $(BENCH_MOVING_ARGS)

# TTL and refresh (issue 13): a not-due TTL'd get beside a plain one; 8 waiters beside one refresher run
bench-refresh: $(BENCH_VENV)/.installed
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" ../$(BENCH_VENV)/bin/python refresh.py $(BENCH_REFRESH_ARGS)

# PostgreSQL beside SQLite (issue 15): get/set over the socket and TCP, 8 readers, 1k..100k
# credentials. Starts a private server; prints "skipped: ..." without PostgreSQL's binaries.
# BENCH_POSTGRES_ARGS="--quick" for a scaled-down run.
bench-postgres: $(BENCH_VENV)/.installed
	cd bench && PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" nice -n 5 ../$(BENCH_VENV)/bin/python postgres.py $(BENCH_POSTGRES_ARGS)

# make mutate                         every module (cached: a rerun tests what changed)
# make mutate MUTATE_ARGS="envelope"  some modules; --report-only prints the last report
mutate: $(MUTATE_VENV)/.installed
	PATH="$(CURDIR)/$(MUTATE_VENV)/bin:$$PATH" $(MUTATE_VENV)/bin/python mutate/run.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(MUTATE_VENV) mutants .coverage .coverage.* .mypy_cache .ruff_cache *.egg-info
