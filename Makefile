# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast test-interpret docs docs-serve clean

setup:
	@bash scripts/setup.sh

demo:
	@bash scripts/setup.sh bench
	$(PY) examples/demo.py

# The suite on CPU tensors (pure-PyTorch backend), then the Triton kernels on CPU tensors through
# Triton's interpreter at small sizes.
test:
	@bash scripts/setup.sh test
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests

test-fast:
	$(PY) -m pytest -q -x tests

test-interpret:
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton tests

# The documentation site (docs/ + mkdocs.yml, API pages from the docstrings); --strict fails on any warning.
docs:
	@bash scripts/setup.sh docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve:
	@bash scripts/setup.sh docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf .venv build dist *.egg-info site .pytest_cache
