# `make run` trains the default stages.yaml; `make test` runs the test suite, `make test-fast` the tests
# that do not train.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,dali,torchcodec,export,tensorboard]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m pipeline run stages.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the edit loop's tier: every test that does not train (those that would are skipped)
test-fast: $(VENV)/.installed
	PIPELINE_TESTS=fast $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/loader_backends.py

clean:
	rm -rf $(VENV) runs
