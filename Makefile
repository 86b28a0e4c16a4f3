# Two entry points (see README): `make demo` and `make test`. Each creates .venv and
# installs what it needs on first use; pip takes torch + torchvision from PyPI as a pair.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/wsss demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
