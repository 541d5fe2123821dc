# Two commands on a fresh machine with Python 3.11:  make demo  |  make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install slurm demo test test-fast lint format docs bench gpu-wheels gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install when the dependency list changes. torch comes from PyPI (do not pin the local
# CPU wheel: no torchvision works with it here).
# DeepSpeed's CPU ops are compiled here, once, not inside the first DeepSpeed job (or test).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python tools/build_deepspeed_ops.py
	touch $(STAMP)

install: $(STAMP)

# Debian's slurmctld/slurmd/slurm-client/munge for the SLURM tests (tests/test_slurm.py); needs
# root or passwordless sudo, otherwise those tests fail and say how to install them.
slurm:
	@bash tools/local_slurm.sh install || echo "warning: SLURM not installed; tests/test_slurm.py will fail"

demo: install
	$(BIN)/clipscale demo $(DEMO_ARGS)

# pytest-xdist: one worker per core (at most 4); a test file stays on one worker, so its module
# fixtures (the local SLURM cluster, saved runs) are built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= auto --maxprocesses=4
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install slurm
	$(BIN)/python -m pytest -q --durations=25 $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

# ruff (settings in pyproject.toml): lint and format check; `make format` applies both fixes
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# the config reference (docs/config.md) from the config sections' field docstrings
docs: install
	$(BIN)/clipscale config --write-docs

# clipscale vs OpenCLIP's own trainer on the same job (creates .ref-venv with webdataset 0.2.86 on first use)
bench: install
	$(BIN)/python benchmarks/vs_openclip.py $(BENCH_ARGS)

# The GPU check (docs/gpu.md). gpu-wheels, where PyPI is reachable: the wheels a GPU image lacks, into
# gpu-wheels/. gpu-check, on one GPU without network: installs them into .gpu-site (no registry, no
# dependencies: the image has torch and the rest), then the GPU tier, the MFU table, the exact loss at
# B = 2^20 and the side-by-side with open_clip_train, into gpu-check/gpu-check.json.
GPU_PYTHON ?= python3
gpu-wheels: install
	$(BIN)/python benchmarks/gpu_wheels.py --dest gpu-wheels

gpu-check:
	@test -d gpu-wheels || { echo "gpu-check: no gpu-wheels/ here; run 'make gpu-wheels' where PyPI is reachable"; exit 2; }
	@$(GPU_PYTHON) -c 'import sys; want = open("gpu-wheels/PYTHON_VERSION").read().strip(); have = "%d.%d" % sys.version_info[:2]; sys.exit(0 if want == have else f"gpu-check: the wheels are for Python {want}, $(GPU_PYTHON) is {have}: set GPU_PYTHON or run gpu_wheels.py --python-version {have}")'
	$(GPU_PYTHON) -m pip install --quiet --upgrade --no-index --no-deps --target .gpu-site gpu-wheels/*.whl
	$(GPU_PYTHON) -m pip install --quiet --upgrade --no-index --no-deps --target .gpu-ref-site gpu-wheels/ref/*.whl
	PYTHONPATH=$(CURDIR)/.gpu-site:$(CURDIR)/src $(GPU_PYTHON) benchmarks/gpu_check.py --out gpu-check \
		--ref-path $(CURDIR)/.gpu-ref-site $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .ref-venv .bench runs .pytest_cache .gpu-site .gpu-ref-site gpu-check
