# Longhaul developer commands (see CONTRACT.md "Commands and processes").
#
#   make install      the virtual environment (.venv/) with the project and its dev tools
#   make services     RabbitMQ, Redis and PostgreSQL reachable (started or installed)
#   make migrate      the database schema up to date
#   make up           everything above, then api + worker + ws_gateway until Ctrl-C
#   make test         lint, then the whole test suite (the browser test included)
#   make lint         ruff check, ruff format --check, mypy
#   make lock         constraints.txt from the installed versions (after a dependency change)
#   make bench        the benchmark suite (bench-quick: a short run)
#   make clean        caches and test artifacts (distclean: also .venv/ and .run/)

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# Steps of `make test` and `make up` must run in order even under `make -j`.
.NOTPARALLEL:

VENV := .venv
PY := $(VENV)/bin/python
# Written after a successful install; older than pyproject.toml means "install again".
STAMP := $(VENV)/.longhaul-installed
ARTIFACTS := test-artifacts
CHROMIUM := /usr/bin/chromium
# Extra arguments: `make test PYTEST_ARGS='-k outbox -x'`, `make up UP_ARGS='--tasks my.mod'`.
PYTEST_ARGS ?=
UP_ARGS ?=
# pytest-xdist processes; each test file runs whole on one of them, with its own fixtures
# (0: one process). Every run has its own database, queues and keys, so two can share
# the services. Measured on 2 cores: 3 were no faster than 2, which save a fifth.
TEST_WORKERS ?= 2

.PHONY: help install services migrate up test test-servers lint lock bench bench-quick chromium clean distclean

help:
	@sed -n 's/^#   //p' Makefile

install: $(STAMP)

# With the interpreter scripts/find-python.sh picks (3.12 where there is one; 3.11 or
# newer otherwise; LONGHAUL_PYTHON overrides).
# A venv without pip (made where ensurepip was missing) is made again, not kept broken.
$(STAMP): pyproject.toml constraints.txt
	@if ! $(PY) -m pip --version >/dev/null 2>&1; then \
	  rm -rf $(VENV); \
	  py=$$(bash scripts/find-python.sh); \
	  echo "creating $(VENV) with $$py"; \
	  "$$py" -m venv $(VENV) || { rm -rf $(VENV); \
	    echo "make install: $$py cannot make a virtual environment (Debian: apt-get install python3-venv)" >&2; \
	    exit 1; }; \
	fi
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	@touch $@

services:
	@bash scripts/ensure-services.sh

migrate: install services
	$(VENV)/bin/longhaul migrate

up: install services migrate
	@exec $(PY) scripts/up.py $(UP_ARGS)

# The browser test drives Debian's Chromium through Playwright.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  echo "installing chromium (apt-get)"; \
	  sudo=; [ "$$(id -u)" -eq 0 ] || sudo="sudo -n"; \
	  $$sudo apt-get update -q >/dev/null; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; \
	fi

lock: install
	@{ sed -n '1,2p' constraints.txt; $(PY) -m pip freeze --exclude-editable; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The servers the tests use (LONGHAUL_TEST_*), and what the tests' private ones need.
test-servers: install
	@bash scripts/ensure-services.sh --test
	@$(PY) -c 'import sys; from tests.faults.private import missing_for_private_servers as m; \
	  sys.exit(f"make test: {w}" if (w := m()) else 0)'

# pytest exits 5 when it collected nothing: a suite that tests nothing must not pass.
test: install chromium lint test-servers
	@mkdir -p $(ARTIFACTS)
	@rc=0; $(VENV)/bin/pytest -p no:cacheprovider -ra -n $(TEST_WORKERS) --dist loadfile \
	  --junitxml=$(ARTIFACTS)/junit.xml $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# The benchmark's own addresses (LONGHAUL_BENCH_*_URL), not the services' ones.
bench: install
	@bash scripts/ensure-services.sh --bench
	$(PY) -m bench

bench-quick: install
	@bash scripts/ensure-services.sh --bench
	$(PY) -m bench --quick

clean:
	rm -rf $(ARTIFACTS) .mypy_cache .ruff_cache .pytest_cache build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .run
