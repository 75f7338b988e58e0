# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv and install into it: torch
# first (TORCH, from TORCH_INDEX if set), then the package with its [dev] extra (tests, examples, ruff, mypy).
#   make test                                                      # torch 2.13.0, the release CI tests
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu     # its CPU-only build (no CUDA wheels)
#   make test TORCH=torch                                          # the newest release pip can find
# A different TORCH or TORCH_INDEX than .venv was made with recreates .venv; a changed pyproject.toml reinstalls the
# package into it.
#   make test-compat                                               # the suite on each supported stack (tools/compat.py)
#   make test-compat-core                                          # the core tests on each stack (CI runs this)
#   make test-compat COMPAT_STACKS="floor py313"                   # named stacks (`python3 tools/compat.py --list`)
# Each stack gets its own venv under .venv-compat/; results and logs go to compat-results/ (docs/compatibility.md).
#   make docs                                                      # the docs site (mkdocs.yml, docs/) into site/, strict
#   make gpu-check                                                 # the GPU check (benchmarks/gpu_check.sh), no install
#   make gpu-check GPU_CHECK_ARGS="--cpu"                          # its dry run on the CPU
#   make dist                                                      # sdist + wheel into dist/ (offline), twine check
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
# The torch choice .venv holds, as a stamp named by a checksum of it.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s|%s' '$(TORCH)' '$(TORCH_INDEX)' | cksum | cut -d' ' -f1)
INSTALLED := $(VENV)/.installed
COMPAT_STACKS ?=

.PHONY: demo test test-compat test-compat-core lint format docs clean gpu-check dist

$(TORCH_STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	touch $@

$(INSTALLED): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(INSTALLED)
	$(BIN)/python examples/demo.py

test: $(INSTALLED)
	$(BIN)/python -m pytest

# Needs only a python3 to run the script; each stack's venv is made with that stack's Python.
test-compat:
	$(PYTHON) tools/compat.py $(if $(TORCH_INDEX),--torch-index "$(TORCH_INDEX)") $(COMPAT_STACKS)

test-compat-core:
	$(PYTHON) tools/compat.py --core $(if $(TORCH_INDEX),--torch-index "$(TORCH_INDEX)") $(COMPAT_STACKS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# --strict: any warning (a broken link or anchor, a page missing from the nav, an unresolved reference) fails it.
docs: $(INSTALLED)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Installs nothing: it runs with .venv if it exists, else the machine's python3 (see the script's header).
gpu-check:
	benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

dist: $(INSTALLED)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

clean:
	rm -rf $(VENV) .venv-compat compat-results .pytest_cache .ruff_cache lightning_logs *.egg-info build dist site
