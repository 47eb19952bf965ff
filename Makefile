# Set-up is part of every target: a fresh clone needs only python3 (3.11) and make.
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: run test bench
run: $(VENV)/.installed   ## the server on the bundled default model, 127.0.0.1:8000
	$(VENV)/bin/turboserve serve

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[peers]'
	$(PY) benchmarks/encoder.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/generate.py
