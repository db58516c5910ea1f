# facelab — the two Quickstart commands (`make quickstart`, `make test`) and their set-up.
# Each target creates .venv on first use; nothing needs installing by hand.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PORT ?= 8000
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: quickstart keyframe-quickstart test test-all lint format install data check-lock clean-runs

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0     # the CPU wheel; see pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	dvc repro

# Build the data with DVC, run the quickstart sweep (2 trials), promote the best trial,
# serve it with Ray Serve and answer one request.
quickstart: data
	facelab sweep sweeps/quickstart.yaml
	facelab promote quickstart || echo "(promotion refused: the current champion stays)"
	@set -e; facelab serve --port $(PORT) > .serve.log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT; \
	facelab request "I am so happy to see you again!" --url http://127.0.0.1:$(PORT) --wait 180 \
	  || { cat .serve.log; exit 1; }; \
	echo; echo "Review the runs in MLflow:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns.db"; \
	echo "  then open the experiment link the sweep printed (…/#/experiments/ID?workflowType=machine_learning):"; \
	echo "  the 'quickstart' training runs (parent run + one child run per trial)."

# KeyframeFace: train + promote the text–motion evaluator, the LoRA quickstart sweep scored through
# it, Tables 2–4, promote the adapter, serve it and ask for two keyframes.
keyframe-quickstart: data
	facelab sweep sweeps/keyframe_evaluator.yaml --set train.epochs=20 --set data.train_subset=600
	facelab promote keyframe-evaluator || echo "(promotion refused: the current evaluator champion stays)"
	facelab sweep sweeps/keyframe_quickstart.yaml --set eval.evaluator=keyframe-evaluator@champion
	facelab report keyframe-quickstart
	facelab promote keyframe-quickstart || echo "(promotion refused: the current champion stays)"
	@set -e; facelab serve --model keyframe-tiny --port $(PORT) > .serve.log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT; \
	facelab request-keyframes --url http://127.0.0.1:$(PORT) --wait 180 \
	  --background "A student waits outside an interview room and tries to hide their anxiety." \
	  --emotion "Anxiety concealed by a restrained smile." \
	  --keyframe "The gaze is lowered, the inner brows lift slightly, and the lips press together." \
	  --keyframe "The gaze rises and both mouth corners form a small restrained smile." \
	  || { cat .serve.log; exit 1; }

# The test suite CI runs (`.ci/run`): everything but GPU-only tests; the 15 slowest are listed at the end.
# TEST_WORKERS > 0 runs the test files in that many pytest-xdist processes (--dist loadfile keeps a
# module's fixtures in one process): for machines with cores to spare. On 2 cores it does not pay (the
# suite is CPU-bound there: 36 min with 2 processes, as with one), so the default is one process.
TEST_WORKERS ?= 0
test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" -q -n $(TEST_WORKERS) --dist loadfile

# Lint, format check and the import layers (`.ci/run` runs it before the tests).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The committed dvc.lock is complete and current: `dvc repro` in a fresh clone of HEAD rebuilds every
# stage's output with the same content hash and leaves `git status` clean (`.ci/run` runs it).
check-lock: $(STAMP)
	@set -e; d=$$(mktemp -d); trap 'rm -rf "$$d"' EXIT; \
	git clone -q . "$$d/p"; cd "$$d/p"; \
	PYTHONPATH="$$d/p/platform" HF_HUB_DISABLE_PROGRESS_BARS=1 dvc repro -q >/dev/null; \
	if ! git diff --exit-code --stat dvc.lock || [ -n "$$(git status --porcelain)" ]; then \
	  git status --short; echo "dvc.lock is stale: run 'dvc repro' and commit dvc.lock"; exit 1; fi; \
	echo "dvc.lock: complete and current ($$(grep -c '^  [a-z_]*:$$' dvc.lock) stages)"

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-runs:
	rm -rf mlruns.db mlartifacts ray_results .serve.log
