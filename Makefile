# Two commands do everything on a fresh Linux machine with python3 and make:
#   make train   -> .venv, install, train the default demo on the embedded digits data
#   make test    -> .venv, install with the test extra, run pytest
# and the asv suite (README "Tracking performance"):
#   make bench [BENCH=regex]                  quick run of the working tree
#   make bench-compare BASE=rev [BENCH=regex] fails when a benchmark slows by > FACTOR
#   make bench-report [SERVE=1]               offline dashboard in .asv/html
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

# --- asv --------------------------------------------------------------------
ASV    := $(VENV)/bin/asv
# Regex of benchmark names (asv --bench); empty runs the whole suite.
BENCH  ?=
# Revisions compared by bench-compare (any git revision: branch, tag, sha).
BASE   ?= main
HEAD   ?= HEAD
# A benchmark that got slower by more than FACTOR fails bench-compare. The
# suite's noise on a shared 2-core machine is measured in README.md.
FACTOR ?= 1.5
ROUNDS ?= 4
# Timing runs take this lock so that runs from several checkouts do not
# share the cores; empty when flock is missing.
BENCH_LOCK ?= $(if $(shell command -v flock),flock /tmp/fastkern-bench.lock)
ASV_BENCH := $(if $(BENCH),--bench "$(BENCH)")

$(HOME)/.asv-machine.json: | install
	$(ASV) machine --yes >/dev/null

bench: install | $(HOME)/.asv-machine.json
	$(BENCH_LOCK) $(ASV) run --python=same --quick --show-stderr $(ASV_BENCH)

# Builds BASE and HEAD into virtualenvs under .asv/env (numba and numpy are
# installed once per environment) and runs both with asv continuous, rounds
# of the two commits alternating. A benchmark slower by more than FACTOR (and
# significantly so) is measured again; the target fails when the second run
# confirms it (tools/bench_compare.py).
bench-compare: install | $(HOME)/.asv-machine.json
	$(BENCH_LOCK) $(PY) tools/bench_compare.py --asv $(ASV) --factor $(FACTOR) --rounds $(ROUNDS) \
	    $(if $(BENCH),--bench "$(BENCH)") $(BASE) $(HEAD)

# Static pages from every result in .asv/results, with jQuery, flot and
# bootstrap copied next to them (fetched once from npm into .asv/vendor), so
# .asv/html/index.html renders without network access.
bench-report: install
	$(ASV) publish
	$(PY) tools/asv_offline.py .asv/html
	@echo "dashboard: .asv/html/index.html (serve it: make bench-report SERVE=1)"
	$(if $(SERVE),$(ASV) preview)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
