# Two set-up commands, on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first so no other requirement can pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[hf]" $(TORCH)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev,hf]" $(TORCH)
	touch $@

# Large freed blocks stay on glibc's heap: without this, fresh pages fault in every step and timings
# swing by ±20% with allocation order (see benchmarks/common.py).
STABLE_MALLOC := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736

demo: $(VENV)/.installed
	$(STABLE_MALLOC) $(BIN)/python examples/quickstart.py
	$(BIN)/python examples/workflows.py
	$(STABLE_MALLOC) $(BIN)/python benchmarks/small.py --quick
	$(STABLE_MALLOC) $(BIN)/torchrun --nproc-per-node 2 examples/expert_parallel.py
	$(STABLE_MALLOC) $(BIN)/torchrun --nproc-per-node 2 examples/checkpoint.py
	$(STABLE_MALLOC) $(BIN)/torchrun --nproc-per-node 2 examples/adaptive_parallel.py
	$(BIN)/moecompile bench sim --quick
	$(STABLE_MALLOC) $(BIN)/python examples/compile_backend.py
	$(BIN)/moecompile viz hf:mixtral -o build/mixtral.html

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) build *.egg-info
