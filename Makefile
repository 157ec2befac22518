# Two commands: `make quickstart` (set up, run the main job offline) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.utune-installed

.PHONY: install test lint quickstart bench clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstall when the dependencies change. torch/torchvision: the pair that installs from this
# machine's local wheels (see README, "Installing"); CPU and CUDA both run on it.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test,peft,tensorboard,deploy]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check utune tests bench quickstart
	$(VENV)/bin/ruff format --check utune tests bench quickstart
	$(VENV)/bin/mypy  # utune/graph, utune/tuners, utune/export (pyproject.toml [tool.mypy])

# two worker processes (each test runs on one torch thread): the suite in about half the time on 2 cores;
# a file's tests stay on one worker (module fixtures, the DDP tests' own two processes)
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

quickstart: $(STAMP)
	$(PY) quickstart/run.py $(QUICKSTART_ARGS)

# the README's tuner-kinds table, regenerated from the registry (tests/test_readme.py checks it)
docs: $(STAMP)
	$(PY) -c "from utune.tuners.registry import update_readme; update_readme('README.md')"

clean:
	rm -rf $(VENV) runs .pytest_cache
