# kh: every target is idempotent; `make demo` and `make test` do the set-up they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
KH := $(VENV)/bin/kh
VENV_STAMP := $(VENV)/.kh-installed
# Debian's python3 (tools/setup-apt installs it), not whatever python3 comes first on PATH.
PYTHON3 ?= /usr/bin/python3

.PHONY: setup apt venv images demo test lint unit integration bench clean-images check-fresh

setup: apt venv images

apt:
	@bash tools/setup-apt

$(VENV_STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV_STAMP)

images: apt venv
	@$(KH) images build

COUNT ?= 2
demo: setup
	@COUNT=$(COUNT) bash examples/demo.sh

lint: venv
	$(VENV)/bin/ruff check kh tests benchmarks
	$(VENV)/bin/mypy kh

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: setup
	$(VENV)/bin/pytest -q tests/integration

test: setup
	$(VENV)/bin/ruff check kh tests benchmarks
	$(VENV)/bin/mypy kh
	$(VENV)/bin/pytest -q -ra tests/unit tests/integration

bench: setup
	$(PY) -m benchmarks.boot
	$(PY) -m benchmarks.service
	$(PY) -m benchmarks.channel
	$(PY) -m benchmarks.chanapi
	$(PY) -m benchmarks.appliances
	$(PY) -m benchmarks.hostile
	$(PY) -m benchmarks.webfarm
	$(PY) -m benchmarks.intranet
	$(PY) -m benchmarks.metering
	$(PY) -m benchmarks.libvirt
	$(PY) -m benchmarks.twohost

clean-images:
	rm -rf images/out

# The README's two commands (make demo, then make test) as a newcomer runs them: in a clean
# Debian bookworm root, sharing only the image cache with this machine (tools/check-fresh).
check-fresh:
	@bash tools/check-fresh
