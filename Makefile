# Two-command quick start: `make demo` (install + run the main job on the tiny embedded default)
# and `make test` (install + run the test suite). Both create or reuse .venv.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	# On a GPU machine, run `TORCH_SPEC=torch make ...` to take the plain (CUDA) wheel instead.
	$(PY) -m pip install -q "$${TORCH_SPEC:-torch==2.13.0}"
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# fetch_models: BlazePose/BlazeFace into ~/.cache/human-animation/mediapipe (skipped when present, sha256 checked)
demo: $(STAMP)
	$(PY) -m ray_jobs.fetch_models
	$(PY) -m ray_jobs.pipeline

test: $(STAMP)
	$(PY) -m ray_jobs.fetch_models
	$(PY) -m pytest tests

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf outputs .pytest_cache
