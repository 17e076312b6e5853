# Two entry points: `make demo` (the whole pipeline on the embedded default) and `make test`.
# Both create .venv and install the project into it on first use.
#
# torch is pinned here, not in pyproject.toml: on this project's CPU machines
# `pip install torch==2.13.0` takes a local CPU wheel, while an unpinned torch pulls several GB of
# CUDA packages. The package itself only asks for a range (torch>=2.2,<3).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,openvino,serve]"
	touch $@

demo: $(STAMP)
	$(BIN)/alexnet-deploy demo

# Two processes: OpenVINO's objects crash the interpreter at shutdown when they share a process
# with the rest of the suite (tests/backends/test_openvino.py says more).
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not openvino"
	$(BIN)/python -m pytest -q -rs -m openvino

# Everything that needs an NVIDIA GPU (GPU tests, CUDA training, TensorRT engines, bench), with
# one report in gpu-check/gpu-check.md. Install TensorRT and pycuda first (the README's GPU
# section says how); without them the TensorRT steps are skipped and reported as such.
gpu-check: $(STAMP)
	scripts/gpu-check.sh gpu-check

lint: $(STAMP)
	$(BIN)/ruff check alexnet_deploy tests benchmarks

clean:
	rm -rf $(VENV) demo-report gpu-check
