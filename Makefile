# The two set-up commands of README.md: `make demo` and `make test`.
# Everything installs into a virtual environment (.venv) from PyPI, with the pinned versions of
# requirements.lock; torch==2.13.0 (CPU wheel) is installed first so that no CUDA build is pulled.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: demo test install install-test system-deps lint clean

install: $(VENV)/.deps
	$(BIN)/pip install --quiet --no-deps --no-build-isolation .

$(VENV)/.deps: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps requirements-test.lock
	$(BIN)/pip install --quiet -r requirements-test.lock
	touch $@

install-test: install $(VENV)/.test-deps system-deps

# Docker engine, debootstrap and Chromium for the container and browser tests (needs root).
system-deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    docker.io debootstrap chromium chromium-driver >/dev/null; \
	else echo "not root: skipping apt packages (container and browser tests will skip)"; fi

demo: install
	rm -rf $(DEMO)
	$(BIN)/spineqprep-synth $(DEMO)/bids --subjects 6 --sites 2 --sessions 2 --seed 1 --size small
	$(BIN)/spineqprep $(DEMO)/bids $(DEMO)/derivatives participant -w $(DEMO)/work
	# group level on the participant level's atlas-space maps (6 subjects: no covariates)
	$(BIN)/spineqprep $(DEMO)/bids $(DEMO)/derivatives group -w $(DEMO)/work \
	  --group-covariates --group-site none --group-permutations 200
	# voxel-wise group statistics on a simulated 40-subject, two-site atlas-space study
	$(BIN)/python -m spineqprep.synth.groupmaps $(DEMO)/study $(DEMO)/study_derivatives \
	  --subjects 40 --sites 2 --sessions 2 --seed 1
	$(BIN)/spineqprep $(DEMO)/study $(DEMO)/study_derivatives group -w $(DEMO)/work \
	  --group-permutations 500
	@echo "open $(DEMO)/derivatives/sub-*.html, $(DEMO)/derivatives/group.html and $(DEMO)/study_derivatives/group.html"

test: install-test
	$(BIN)/ruff check spineqprep tests benchmarks
	$(BIN)/python -m pytest -v

lint:
	$(BIN)/ruff check spineqprep tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
