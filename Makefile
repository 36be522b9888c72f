# nbp_mega: `make demo` and `make test` each install what they need first (into .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export CUDA_HOME ?= /usr/local/cuda

.PHONY: install demo test lint clean

install: $(STAMP)

# Re-runs only when the dependency list or setup.py changes.
$(STAMP): requirements.txt setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps \
		--no-build-isolation -e .
	touch $(STAMP)

# Synthetic token shards -> ZeRO-3 on 2 CPU ranks -> validation loss vs unigram entropy.
demo: install
	$(BIN)/python -m nbp_mega.data.synthetic data/synthetic --grid 5 8 8 --vocab 64 --classes 4
	rm -rf runs/demo
	PYTHON=$(BIN)/python NPROC_PER_NODE=2 bash launch.sh configs/tiny.yaml run_dir=runs/demo
	$(BIN)/python tools/summarize_run.py runs/demo --manifest data/synthetic/manifest.json

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs build *.egg-info
