# The README's two commands: `make quickstart` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test clean

setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

quickstart: setup
	$(VENV)/bin/tkllm quickstart

test: setup
	$(PY) -m pytest -q -ra

clean:
	rm -rf runs .pytest_cache
