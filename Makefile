# `make test` and `make demo` work on a fresh machine with nothing but Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-all demo bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is installed only when the venv has no torch (a CPU wheel lies on local disk here;
# any torch >= 2.6 works). The package itself is installed editable with its dev extras.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,triton]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/viditq quantize --out artifacts/demo-w8a8

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results.json
	$(PY) benchmarks/report.py benchmarks/results.json

clean:
	rm -rf $(VENV) artifacts .pytest_cache .benchmarks
