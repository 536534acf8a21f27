# zero2all: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean

venv: $(STAMP)

# Re-install only when requirements change, so a second `make` starts in seconds.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo.py $(if $(FRESH),--fresh,)

# Fast core suite (slow end-to-end tests are marked `slow` and included here too unless FAST=1).
test: $(STAMP)
	$(PY) -m pytest -q $(if $(FAST),-m "not slow",) tests

clean:
	rm -rf $(VENV)
