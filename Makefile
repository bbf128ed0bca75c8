# Diffcast -- one command each to set up, check, test, benchmark.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := zstd bsdiff xdelta3 espeak-ng chromium chromium-driver

.PHONY: help install system-deps demo demo-diffs check test test-slow bench-codec format clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

# setup.py and diffs/_native.c: the compiled diff kernels, rebuilt when they change.
$(STAMP): pyproject.toml setup.py diffs/_native.c
	@scripts/install-build-deps $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the project with its dev tools

system-deps:  ## Install the Debian packages the benchmarks and the browser test use (needs root)
	@scripts/install-debian-packages $(DEBIAN_PACKAGES)

demo: $(STAMP) asr-deps  ## The main job: train 3 updates, publish, release, a fleet of 24 converges; report in demo-output/
	$(BIN)/python scripts/demo.py

demo-diffs: $(STAMP)  ## A walk through the diff library with the CLI (no server)
	BIN=$(BIN) scripts/demo-diffs.sh

check: $(STAMP)  ## ruff (lint + format) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) system-deps  ## The default test suite (a few minutes on 2 cores)
	$(BIN)/pytest -m "not slow and not docker" -q

test-slow: $(STAMP)  ## Long fuzzing and stress tests
	$(BIN)/pytest -m slow -q

bench-codec: $(STAMP) system-deps  ## Diff codec vs zstd --patch-from, bsdiff, xdelta3
	$(BIN)/python bench/diff_codec.py

format: $(STAMP)  ## Reformat the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: bench-server
bench-server: $(STAMP)  ## Server load (polls, plans, blobs) on SQLite and PostgreSQL, with wrk
	@scripts/install-debian-packages wrk
	$(BIN)/python bench/server_load.py

.PHONY: bench-agent
bench-agent: $(STAMP)  ## Device apply time and peak RSS (anon vs file) for 1M/10M/100M models, 1%/10% diffs, 5-step chains
	$(BIN)/python bench/agent_apply.py

.PHONY: docker-test
docker-test: $(STAMP)  ## PostgreSQL + S3 + two server replicas + a device fleet in Docker, end to end (needs root)
	scripts/docker-test

.PHONY: bench-quality
bench-quality: $(STAMP) asr-deps  ## Five consecutive updates: full fine-tune vs sparse/hashed/top-k at 1/2/5/10% (under an hour)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/update_quality.py

.PHONY: asr-deps train-base
asr-deps:  ## Install espeak-ng, the synthesizer of the ASR corpus (Debian; needs root)
	@scripts/install-debian-packages espeak-ng

train-base: $(STAMP) asr-deps  ## Train the reference ASR base model (deterministic, 2 threads; corpus cached in .cache/asr-corpus)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/diffcast asr train-base --out asr/checkpoints/base.safetensors
