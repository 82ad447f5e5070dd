# Two commands do everything on a fresh Linux machine with python3 and make:
#   make train   -> .venv, install, train the default demo on the embedded digits data
#   make test    -> .venv, install with the test extra, run pytest
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
THREADS ?= 2
# Torch is only an optional test oracle and benchmark peer. It is installed when a
# local CPU wheel is present (a plain `pip install torch` would pull CUDA builds).
TORCH_WHEELS ?= /opt/wheels

.PHONY: install train test bench bench-compare bench-report clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet -e ".[test,train,bench]"
	@if ls $(TORCH_WHEELS)/torch-*cpu*.whl >/dev/null 2>&1; then \
	    $(PIP) install --quiet --find-links $(TORCH_WHEELS) "torch==2.13.0" || echo "torch oracle not installed; its tests will skip"; \
	else echo "no local CPU torch wheel in $(TORCH_WHEELS); torch-oracle tests will skip"; fi
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m models.train --out runs/default --threads $(THREADS)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
