# Everything runs from the project's own virtual environment, made on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test unit lint bench soak setup clean

## the main job: the seed's walk through the real daemon and CLI, in a sandbox (root)
demo: $(STAMP)
	$(VENV)/bin/netagent demo

## lint, type-check and the whole test suite (privileged tests need root)
test: $(TEST_STAMP) lint
	$(PY) -m pytest

## only the tests that need no root
unit: $(STAMP)
	$(PY) -m pytest -m "not privileged and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## the races and kill -9 cycles for minutes (not in CI): SOAK=seconds, 600 by default
soak: $(TEST_STAMP)
	NETAGENT_SOAK=$${SOAK:-600} $(PY) -m pytest -q -s tests/soak

## speed, measured in a sandbox, figures side by side in one run
bench: $(TEST_STAMP)
	$(PY) bench/run.py $(SECTIONS)

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh $(VENV)
	touch $@

## the tests drive container runtimes, CNI plugins and etcd: installed for them
$(TEST_STAMP): $(STAMP)
	scripts/setup.sh $(VENV) --test
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
