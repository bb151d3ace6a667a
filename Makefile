# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-gpu lint bench analysis

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's Chromium through Playwright (never `playwright install`: it downloads).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(PY) app.py

lint: install
	$(PY) -m ruff check .

# One pytest worker per core (pytest-xdist), each test file on one worker so that a file's shared fixtures (an ONNX
# export, a served app) are made once; the 15 slowest tests are listed at the end.
test: install browser lint
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15

# On a machine with an NVIDIA GPU, in a Python that has a CUDA build of torch (not .venv's CPU wheel): the CUDA
# tests, tests/test_cuda.py. bench/gpu_check.py runs them with the CUDA benchmarks.
GPU_PYTHON ?= python3
test-gpu:
	$(GPU_PYTHON) -m pytest -q -m cuda

bench: install
	$(PY) bench/train_step.py --preset mnist --batch-size 16

# The analyses of the bundled models that the README and the app's Analyses tab show (docs/analysis/NAME/): the full
# suite on each model's test set (a model is analysed on the data set of its name), e.g.
#   make analysis ANALYSED_MODELS=fashion-mnist
ANALYSED_MODELS ?= mnist fashion-mnist
analysis: install
	for name in $(ANALYSED_MODELS); do \
		$(PY) -m nvae_hub.analysis all --model $$name --dataset $$name --output-dir docs/analysis/$$name || exit 1; \
	done
