# The two commands the README opens with:
#   make lab    set up, then JupyterLab on the tour notebook
#   make test   set up, then the whole test suite (with llama.cpp's own tools built to check against)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup tools lab lint test bench clean

setup:
	@scripts/setup.sh

# llama-server, llama-bench and llama-fit-params from the vendored source: the real consumers
# the tests check exports, results and the fit policy against (built once per build key)
tools: setup
	@PY=$(PY) scripts/llama-tools.sh >/dev/null

lab: setup
	@scripts/lab.sh notebooks/01-tour.ipynb

# ruff and mypy, configured in pyproject.toml (seconds; `make test` runs it first)
lint: setup
	$(PY) -m ruff check gpulab tests bench
	$(PY) -m mypy

test: setup lint tools
	$(PY) -m pytest

bench: setup
	$(PY) bench/planner_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
