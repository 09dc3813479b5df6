# StepX. `make demo` and `make test` set everything up on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast bench lint model

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk. An unpinned torch would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/pytest -m ""

test-fast: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench.run

# Train (or resume training) the embedded model, export it and its reference image.
model: setup
	$(BIN)/stepx train-shapes --resume
	$(BIN)/python -m shapes.reference

PORT ?= 8501

demo: setup
	@echo "StepX dashboard: http://localhost:$(PORT)  (the curated gallery builds behind it: its progress is on the"
	@echo "Gallery page and runs appear as they finish; a generation worker runs beside it)"
	@mkdir -p "$${STEPX_STORE:-data/store}/logs"
	$(BIN)/streamlit run dashboard/app.py --server.headless true --server.port $(PORT) \
		--browser.gatherUsageStats false & dash=$$!; \
	trap 'kill $$dash $$gallery $$worker 2>/dev/null' EXIT INT TERM; \
	$(BIN)/stepx gallery build 2>"$${STEPX_STORE:-data/store}/logs/gallery-build.log" & gallery=$$!; \
	$(BIN)/stepx worker & worker=$$!; \
	wait $$dash
