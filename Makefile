# The two commands the README opens with:
#   make lab    set up, then JupyterLab on the tour notebook
#   make test   set up, then the whole test suite
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup lab test bench clean

setup:
	@scripts/setup.sh

lab: setup
	$(VENV)/bin/jupyter lab notebooks/01-tour.ipynb

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/planner_speed.py

clean:
	rm -rf $(VENV) .pytest_cache
