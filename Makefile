# Every target creates .venv when it is missing, from requirements.lock: every package of the development and test
# environment pinned, so a fresh clone installs the same set today and in six months. The package itself keeps
# compatible ranges for users (pyproject.toml). `make lock` regenerates the lock from pip's own resolver;
# `make test-latest` runs the suite against the newest releases pyproject.toml allows, in an environment of its own.
# torch is pinned to 2.13.0 (the CPU wheel where one is at hand): an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
LATEST := .venv-latest
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench fuzz lock test-latest clean support

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest tests

# the support table (docs/support.md and the README's section) from the conformance matrix's results
support: setup
	rm -f .support.json
	WEIGHTSMITH_SUPPORT_JSON=.support.json $(PY) -m pytest tests/test_conformance.py -q
	$(PY) tools/support_table.py .support.json
	rm -f .support.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run_all.py

# The parsers' fuzzing with a longer budget (about 10 minutes here) than `make test` gives it, then the fault-injection
# tests; inputs that fail are saved to tests/fuzz_corpus/ and replayed by every later run. The figures (inputs tried,
# refusals, tracebacks, partial outputs, hangs, code executed, faults) go to bench/RESULTS.md.
fuzz: setup
	$(PY) bench/fuzz_figures.py

lock: setup
	$(PY) tools/lock.py $(TORCH_VERSION) > $(LOCK).new && mv $(LOCK).new $(LOCK)

test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	echo "torch==$(TORCH_VERSION)" > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install --quiet -c $(LATEST)/torch-pin.txt --upgrade --upgrade-strategy eager \
		-e ".[test,peers,dev]"
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) $(LATEST) .pytest_cache bench/_work
