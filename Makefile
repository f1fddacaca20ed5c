# icmlab — two commands: `make demo` and `make test` (both create .venv and install when needed).
VENV ?= .venv
PY := $(VENV)/bin/python
# Install torch FIRST: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
# On a GPU box prefer `conda env create -f environment.yml` (CUDA torch + flash-attn).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.icmlab-installed

.PHONY: install demo test lab clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[train,dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: install  ## run the whole pipeline headlessly on parameters/demo.yaml
	$(VENV)/bin/icmlab run parameters/demo.yaml

test: install  ## the full test suite (CPU, loopback only)
	$(PY) -m pytest -q

lab: install  ## JupyterLab on the notebooks
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/jupyter-lab --notebook-dir=notebooks

clean-runs:
	rm -rf runs/
