# dro_fast: `make demo` and `make test` set up .venv/ on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo bench-kernels bench-step-cpu bench-cpu-forms test test-fast check-install bazel clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -c requirements/constraints.txt -e ".[test,hf,tpu]"
	touch $(STAMP)

# The main job on its embedded default: DRO-V on the synthetic task with a
# tiny T5 (workdir runs/demo; rerunning resumes). The kernel benchmark:
# `make bench-kernels`.
demo: $(STAMP)
	$(BIN)/python -m dro_fast.train

# Benchmarks run as modules of the benchmarks package, from the repository
# root, over the installed dro_fast.
bench-kernels: $(STAMP)
	$(BIN)/python -m benchmarks.kernel_time \
	  --flagfile=benchmarks/configs/kernels_cpu.flags

# The DRO-V train step against the same step in PyTorch / transformers
# (benchmarks/torch_step.py) on the CPU, timed interleaved, with unrolled
# layers (the faster choice on a CPU); every other measurement's command is
# beside its figure in benchmarks/RESULTS.md.
bench-step-cpu: $(STAMP)
	$(BIN)/python -m benchmarks.step_time --compare_torch --dtype=float32 \
	  --remat=none --size=small --batch_size=8 --input_length=128 \
	  --target_length=64 --implementation=chunked_xla,xla --steps=1 \
	  --repeats=5 --noscan_layers --torch_host_memory=same,system

# Each CPU-only form of dro_fast against its removal, paired in one process
# (benchmarks/RESULTS.md#cpu-forms). Run it on a quiet machine.
bench-cpu-forms: $(STAMP)
	$(BIN)/python -m benchmarks.cpu_forms --repeats=9

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q
	$(MAKE) --no-print-directory check-install

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# A wheel (not the editable install) imports dro_fast.kernels, from outside
# the repository, and ships no top-level `kernels` package.
check-install: $(STAMP)
	rm -rf build/wheel build/site
	$(BIN)/python -m pip wheel --quiet --no-deps -w build/wheel .
	$(PIP_INSTALL) --no-deps --target build/site build/wheel/dro_fast-*.whl
	cd /tmp && PYTHONPATH=$(CURDIR)/build/site $(CURDIR)/$(BIN)/python \
	  $(CURDIR)/tests/check_wheel.py $(CURDIR)/build/site $(CURDIR)/build/wheel

bazel:
	bazel build //...

clean:
	rm -rf $(VENV) build dist *.egg-info bazel-*
