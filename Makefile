# fwdgrad: make setup | make test | make demo | make bench
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

# Re-install whenever the pins or the package's dependencies change. The torch pins first (requirements.txt),
# then fwdgrad itself, editable, with the experiments extra (Hydra, plots, datasets) and the dev extra (pytest,
# ruff, hypothesis, expecttest) from pyproject.toml.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e ".[experiments,dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m fwdgrad.perf.bench

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
