# icmlab — two commands: `make demo` and `make test` (both create .venv and install when needed).
# Installs come from the lock files in requirements/ (see docs/install.md); `make lock` refreshes them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.icmlab-installed
GPU_STAMP := $(VENV)/.icmlab-installed-gpu
# The targets below use whichever install this venv has: the CUDA one after `make install-gpu`.
INSTALLED = $(if $(wildcard $(GPU_STAMP)),$(GPU_STAMP),$(STAMP))

# uv, not pip or pip-tools: it installs the ~150 locked packages in parallel from one shared cache
# (cold: 38-51 s against pip's 2 min 28 s here; warm: 18-27 s), `uv pip compile` resolves in seconds, and
# it writes pip-readable locks, so pip and conda use the same files. Pinned, and put into the venv by
# pip, so nothing beyond Python is needed first.
UV_VERSION ?= 0.13.9
UV := $(VENV)/bin/uv

# Python for new venvs: the locks are resolved for CPython >= $(LOCK_PYTHON) < 3.12 on Linux x86_64.
ifndef PYTHON
PYTHON := $(shell command -v python3.11 2>/dev/null || echo python3)
endif
LOCK_PYTHON ?= 3.11.5
LOCK_PLATFORM ?= x86_64-manylinux_2_28
LOCK_CPU := requirements/lock-cpu.txt
LOCK_GPU := requirements/lock-gpu.txt
# `make lock` moves every pin to the newest release pyproject.toml allows; `make lock UPGRADE=` only
# adds/removes what a changed pyproject.toml needs and keeps the other pins.
UPGRADE ?= 1

# torch, the one locked package not on PyPI: its CPU build (version from requirements/cpu.in) comes from
# a local wheel where pip is configured with one (PIP_FIND_LINKS or pip.conf's find-links), else TORCH_INDEX.
TORCH_VERSION := $(shell sed -n 's/^torch==\([0-9.]*\)+cpu.*/\1/p' requirements/cpu.in)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_CPU_WHEEL = $(firstword $(foreach d,$(TORCH_WHEELS),$(wildcard $(d)/torch-$(TORCH_VERSION)+cpu-*.whl)))
TORCH_CPU_SOURCE = $(if $(TORCH_CPU_WHEEL),--no-index --find-links $(dir $(TORCH_CPU_WHEEL)),--index-url $(TORCH_INDEX))
TORCH_LOCK_SOURCE = $(if $(TORCH_CPU_WHEEL),--find-links $(dir $(TORCH_CPU_WHEEL)),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match)
# GPU: the CUDA build of the same torch from the PyTorch index; it pins its CUDA wheels and triton
# exactly, its other requirements get the lock's pins from PyPI (or your default index). TORCH_CUDA=cu128
# needs a CUDA 12 driver, cu130 a driver >= 580. PyPI's plain torch==X on Linux is the cu130 build:
# TORCH_INDEX_GPU=https://pypi.org/simple TORCH_GPU_SPEC=torch==$(TORCH_VERSION).
TORCH_CUDA ?= cu128
TORCH_INDEX_GPU ?= https://download.pytorch.org/whl/$(TORCH_CUDA)
TORCH_GPU_SPEC ?= torch==$(TORCH_VERSION)+$(TORCH_CUDA)
# flash-attn imports torch in its build, so it is built --no-build-isolation against the installed one.
FLASH_ATTN_SPEC ?= flash-attn==2.8.3.post2

LINT_PATHS := icmlab tests benchmarks tools

.PHONY: install install-gpu flash-attn lock demo test test-fast lint format lab lab-check clean-runs

define bootstrap_uv
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || echo "warning: $(PY) is not CPython 3.11, the version requirements/lock-*.txt are resolved for" >&2
	@test "$$($(UV) --version 2>/dev/null | cut -d' ' -f2)" = "$(UV_VERSION)" || $(PY) -m pip install --quiet "uv==$(UV_VERSION)"
endef

$(STAMP): pyproject.toml $(LOCK_CPU)
	$(bootstrap_uv)
	@rm -f $(GPU_STAMP)
	$(UV) pip install --quiet --python $(PY) --no-deps $(TORCH_CPU_SOURCE) "torch==$(TORCH_VERSION)+cpu"
	DS_BUILD_OPS=0 $(UV) pip install --quiet --python $(PY) --exact --no-deps --build-constraints $(LOCK_CPU) -r $(LOCK_CPU) -e .
	$(UV) pip check --quiet --python $(PY)
	$(PY) -m icmlab.inputs.kernels
	@touch $(STAMP)

install: $(STAMP)  ## CPU: exactly requirements/lock-cpu.txt + this project (editable)

$(GPU_STAMP): pyproject.toml $(LOCK_GPU)
	$(bootstrap_uv)
	@rm -f $(STAMP)
	$(UV) pip install --quiet --python $(PY) --reinstall-package torch -c $(LOCK_GPU) \
	  --extra-index-url $(TORCH_INDEX_GPU) --index-strategy unsafe-best-match "$(TORCH_GPU_SPEC)"
	DS_BUILD_OPS=0 $(UV) pip install --quiet --python $(PY) --no-deps --build-constraints $(LOCK_GPU) -r $(LOCK_GPU) -e .
	$(UV) pip check --quiet --python $(PY)
	$(PY) -m icmlab.inputs.kernels
	@touch $(GPU_STAMP)
	@$(MAKE) --no-print-directory flash-attn VENV=$(VENV)

install-gpu: $(GPU_STAMP)  ## CUDA Linux box: CUDA torch, requirements/lock-gpu.txt, then flash-attn (optional)

# Optional; with conda: `make flash-attn VENV="$$CONDA_PREFIX"`. Uses pip, which every env has.
flash-attn:  ## build flash-attn against the installed torch; on failure training uses sdpa
	@if $(PY) -m pip install -c $(LOCK_GPU) -r requirements/gpu.in \
	 && $(PY) -m pip install --no-build-isolation -c $(LOCK_GPU) "$(FLASH_ATTN_SPEC)" \
	 && $(PY) -c 'import flash_attn'; then \
	  echo "flash-attn installed: hardware.attn_implementation auto uses flash_attention_2 on CUDA"; \
	else \
	  echo "NOTE: flash-attn did not install (see above; it compiles with nvcc against torch when no prebuilt"; \
	  echo "      wheel fits). Training falls back to PyTorch sdpa attention. Retry: make flash-attn"; \
	fi

lock:  ## re-resolve requirements/lock-*.txt from pyproject.toml (latest allowed; UPGRADE= keeps pins)
	$(bootstrap_uv)
	$(UV) pip compile --quiet pyproject.toml requirements/cpu.in --extra train --extra dev \
	  --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) $(TORCH_LOCK_SOURCE) \
	  $(if $(UPGRADE),--upgrade) --annotation-style line --custom-compile-command "make lock" -o $(LOCK_CPU)
	$(UV) pip compile --quiet pyproject.toml requirements/cpu.in requirements/gpu.in --extra train --extra dev \
	  --python-version $(LOCK_PYTHON) --python-platform $(LOCK_PLATFORM) $(TORCH_LOCK_SOURCE) \
	  -c $(LOCK_CPU) --no-emit-package torch --annotation-style line --custom-compile-command "make lock" -o $(LOCK_GPU)

demo: $(INSTALLED)  ## run the whole pipeline headlessly on parameters/demo.yaml
	$(VENV)/bin/icmlab run parameters/demo.yaml

test: $(INSTALLED)  ## the full test suite (CPU, loopback only)
	$(PY) -m pytest -q --durations=30

test-fast: $(INSTALLED)  ## the suite without slow end-to-end and multi-process tests
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not multiprocess"

lint: $(INSTALLED)  ## ruff lint + format check (no changes)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(INSTALLED)  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

# jupyter_server_config.py roots Lab at the repository (runs/ and parameters/ open in it, the file
# browser starts in notebooks/), strips outputs when a committed notebook is saved, and allows root.
lab: $(INSTALLED)  ## JupyterLab on the repository, opened at notebooks/
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/jupyter-lab --config=$(CURDIR)/jupyter_server_config.py $(LAB_ARGS)

# Neither chromium nor playwright is in the lock (a browser check, not the workbench): installed here
# when missing (chromium with apt as root; playwright drives it, it downloads no browser of its own).
lab-check: $(INSTALLED)  ## Run All of every notebook in a real JupyterLab in headless Chromium (tools/lab_check.py)
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "lab-check: installing chromium (apt)"; apt-get install -y -qq chromium >/dev/null; \
	  else echo "lab-check: needs chromium (e.g. sudo apt-get install chromium); skipped"; exit 0; fi; }
	@$(PY) -c 'import playwright' 2>/dev/null || { echo "lab-check: installing playwright (not in the lock)"; \
	  $(UV) pip install --quiet --python $(PY) playwright; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) tools/lab_check.py $(LAB_CHECK_ARGS)

clean-runs:
	rm -rf runs/
