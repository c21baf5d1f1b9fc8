# codestream developer commands. `make setup` once, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned for set-up so pip does not pull a newer multi-GB build; any torch >= 2.6 works.
TORCH ?= torch==2.13.0

.PHONY: setup test lint protos serve bench-bus

setup:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# checkov (the manifests' security scan) pins packages torch needs: a venv of its own.
	python3 -m venv .venv-scan
	.venv-scan/bin/pip install -q -r deploy/requirements-scan.txt

test: lint
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

protos:
	$(PY) -m protos.generate

serve:
	$(VENV)/bin/codestream serve

bench-bus:
	$(PY) -m benchmarks.bus
