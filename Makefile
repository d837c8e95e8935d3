# gpt2tune developer entry points. Everything runs inside .venv, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install test test-gpu demo bench clean

help:
	@echo "make demo   - install into .venv, train the quickstart recipe, print generated poems"
	@echo "make test   - install into .venv and run the test suite"
	@echo "make test-gpu - the GPU tests (CUDA torch; 2-GPU equivalence when two GPUs are present)"
	@echo "make bench  - speed benchmarks against plain Hugging Face (see BENCHMARKS.md)"
	@echo "make clean  - remove .venv and runs/"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[builtin,dev,serve,bench,hf,tensorboard,mlflow,wandb,trl]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# GPU users: install the CUDA build of torch into .venv first (README), then this
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/gpt2tune train recipes/quickstart.yaml --overwrite
	$(BIN)/gpt2tune generate runs/quickstart --form qiyan-lvshi --prompt 白日 --num-return-sequences 3 --seed 1
	$(BIN)/gpt2tune generate runs/quickstart --form qiyan-jueju --acrostic 春夏秋冬 --rhyme --seed 2

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs
