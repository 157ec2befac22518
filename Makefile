# Two commands: `make quickstart` (set up, run the main job offline) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.utune-installed

.PHONY: install test test-fast lint quickstart bench clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstall when the dependencies change. torch/torchvision: the pair that installs from this
# machine's local wheels (see README, "Installing"); CPU and CUDA both run on it.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[test,peft,tensorboard,models,deploy]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check utune tests bench quickstart examples
	$(VENV)/bin/ruff format --check utune tests bench quickstart examples
	$(VENV)/bin/mypy  # the whole package (pyproject.toml [tool.mypy])

# two worker processes (each test runs on one torch thread): the suite in about half the time on 2 cores;
# a file's tests stay on one worker (module fixtures, the DDP tests' own two processes)
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# the tests that start no subprocess and no process group (tests/conftest.py marks the rest `slow`): a few
# minutes on 2 cores, for the edit-test loop; `make test` (what CI runs) is still the gate
test-fast: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# the installed command (from a wheel too: `pip install utune && utune quickstart`); runs quickstart/run.py
quickstart: $(STAMP)
	$(VENV)/bin/utune quickstart $(QUICKSTART_ARGS)

# the README's tuner-kinds table (tests/test_readme.py), docs/cli.md (tests/test_docs.py), and the built-in
# specs' counts (utune/_specs_index.json, a meta build of each spec: about a minute; tests/test_dist.py)
docs: $(STAMP)
	$(PY) -c "from utune.tuners.registry import update_readme; update_readme('README.md')"
	$(PY) -m utune.cli.reference > docs/cli.md
	$(PY) -m utune.runs.catalog

clean:
	rm -rf $(VENV) runs .pytest_cache
