# `make run` and `make test` each create the virtualenv they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test flush status clean

$(BIN)/kmagent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/kmagent  ## the agent, in the foreground, on the default SQLite spool
	$(BIN)/kmagent run

test: $(BIN)/kmagent  ## the whole test suite
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
