# cva — Confidential Volume Agent. `make setup`, `make lint`, `make test`, `make demo`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
APT_PKGS := $(shell grep -v '^\s*\#' deps/apt-packages.txt | grep -v '^\s*$$')
PKGS := agent evidence luks

.PHONY: setup apt venv lint test test-host vm-test proto proto-check demo bench dist rootfs clean help

help:
	@echo "make setup | lint | test | test-host | vm-test | demo | bench | proto | dist | rootfs"

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
	$(BIN)/lint-imports

# Every suite: unit, integration (swtpm, libcryptsetup on image files, loopback KBS), the VM suite.
test: setup test-host vm-test

test-host: venv
	$(BIN)/pytest -q -m 'not vm' tests

# The qemu guest suite (tests/vm, tests/guest). A missing host tool: one line naming the
# package; that fails in CI (CI=true) and skips elsewhere. Knobs: tests/vm/README.md.
vm-test: venv
	@rc=0; $(PY) -m tests.vm.preflight || rc=$$?; \
	if [ $$rc = 3 ]; then exit 0; elif [ $$rc != 0 ]; then exit $$rc; fi; \
	$(BIN)/pytest -q -m vm tests/vm

proto: venv
	$(PY) -m tests.tools.gen_proto

proto-check: venv
	$(PY) -m tests.tools.gen_proto --check

demo: setup
	$(PY) -m tests.vm.demo

# Benchmarks (not tests): host ones plus the storage ones in the qemu guest; ~10-15 min on 2 cores.
# Writes bench/results.json and bench/REPORT.md (logs in bench/logs/).
bench: venv
	$(PY) -m bench

# The cva wheel, its dependencies' wheels for the guest's CPython and the hash-pinned locks
# (image/dist.py). GUEST_PYTHON: the guest's Python (X.Y; the host's must match for tpm2-pytss).
GUEST_PYTHON ?= 3.11
DIST ?= dist
dist: venv
	$(PY) image/dist.py --out $(DIST) --python-version $(GUEST_PYTHON)

# Install cva into a guest root file system directory, as root (README "Building cva into a
# guest image"): make rootfs ROOTFS=DIR TEE=tdx|snp|tpm [CONFIG=FILE]
rootfs: dist
	@[ -n "$(ROOTFS)" ] && [ -n "$(TEE)" ] || { echo "usage: make rootfs ROOTFS=DIR TEE=tdx|snp|tpm [CONFIG=FILE]" >&2; exit 2; }
	image/install.sh --rootfs "$(ROOTFS)" --dist "$(DIST)" --tee "$(TEE)" $(if $(CONFIG),--config "$(CONFIG)")

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info dist
