# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv if needed, installs st2he, runs the end-to-end demo
#   make test   creates .venv if needed, installs st2he with its test extras, runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.st2he-installed
DATA ?=
OUT ?= st2he_output

.PHONY: demo test docs bench env clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the release the package index serves for this machine
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e ".[test,doc,bench]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/st2he-demo $(if $(DATA),--data $(DATA)) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rasterize.py

clean:
	rm -rf $(OUT) docs/_build docs/generated
