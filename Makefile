# Keybearer: every command a developer or CI needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE ?= .keybearer

.PHONY: install run test lint format bench system-deps clean

# The virtualenv with the package and its test dependencies; redone when pyproject.toml changes.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Serve config/example.yaml on the embedded SQLite store. A random salt is made
# once and kept in $(STATE)/salt so that stored secrets stay readable.
run: install
	@mkdir -p $(STATE) && chmod 700 $(STATE)
	@test -s $(STATE)/salt || $(PY) -c 'import secrets; print(secrets.token_urlsafe(48))' > $(STATE)/salt
	KEYBEARER_SALT_FILE=$(STATE)/salt $(VENV)/bin/keybearer serve --config config/example.yaml

# System packages the tests and benchmarks need, installed only when missing.
system-deps:
	@tests/system-deps.sh

test: install system-deps
	@$(PY) tests/services.py
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	@tests/system-deps.sh bench
	$(PY) tests/bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
