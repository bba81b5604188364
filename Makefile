# cva — Confidential Volume Agent. `make setup`, `make lint`, `make test`, `make demo`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
APT_PKGS := $(shell grep -v '^\s*\#' deps/apt-packages.txt | grep -v '^\s*$$')
PKGS := agent evidence luks

.PHONY: setup apt venv lint test test-host vm-test proto proto-check demo bench clean help

help:
	@echo "make setup | lint | test | test-host | vm-test | demo | bench | proto"

setup: apt venv

# Installs the Debian packages the tests need, idempotently (only what is missing).
apt:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make setup: missing Debian packages (run as root): $$missing" >&2; exit 1; fi; \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(PKGS)

# Every suite: unit, integration (swtpm, libcryptsetup on image files, loopback KBS), the VM suite.
test: setup test-host vm-test

test-host: venv
	$(BIN)/pytest -q -m 'not vm' tests

vm-test: venv
	$(BIN)/pytest -q -m vm tests/vm || { rc=$$?; [ $$rc = 5 ] && echo "vm-test: no VM tests yet"; [ $$rc = 5 ]; }

proto: venv
	$(PY) -m tests.tools.gen_proto

demo: venv
	$(PY) -m tests.vm.demo

bench: venv
	@echo "make bench: not yet available"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
