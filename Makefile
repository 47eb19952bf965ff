# Set-up is part of every target: a fresh clone needs only python3 (3.11) and make.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: run test bench
run: $(VENV)/.installed   ## embed texts from stdin with the default model
	$(VENV)/bin/turboserve embed

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/encoder.py
