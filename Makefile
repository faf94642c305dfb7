# `make test` and `make demo` work on a fresh machine with nothing but Python 3.10+.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: lint test test-all test-parallel demo bench bench-search bench-cuda gpu-check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is installed only when the venv has no torch (a CPU wheel lies on local disk here;
# any torch >= 2.6 works). The package itself is installed editable with its dev extras, then the
# demo (demo/: the demo models, digits DiT and assets, quality suite; its own project, not in the
# library's wheel), whose entry points give `viditq quantize --model demo|digits|tiny` and
# `viditq quality`.
$(STAMP): $(PY) pyproject.toml demo/pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,triton]"
	$(PY) -m pip install -q -e ./demo
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check viditq_compile tests benchmarks scripts demo
	$(PY) -m mypy viditq_compile

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# Tensor parallelism and FSDP2 of quantized layers on 2 CPU ranks (gloo on 127.0.0.1), slow ones too.
test-parallel: $(STAMP)
	$(PY) -m pytest -q tests/parallel

# The trained digits DiT: quantize with the default recipe (W8A8, calibrated on 4 sampled
# trajectories), report, output quality, speed at one CFG sampler step for 10 digits, artifact;
# then sample FP / naive W8A8 / W8A8 from the same noise: quality table and picture grid. The
# digits DiT (128 wide, 16 tokens per image) is too small for int8 to pay off, so the last step
# times the ~20 M-parameter PixArt-style demo DiT (384 wide, 256 tokens). About 3 minutes on 2 cores.
demo: $(STAMP)
	@echo "== 1/3 quantize the digits DiT (artifacts/demo/digits-w8a8)"
	$(VENV)/bin/viditq quantize --model digits --calibration 4 --batch 20 --out artifacts/demo/digits-w8a8
	@echo "== 2/3 quality: FP, naive W8A8, W8A8 on 20 digits from the same noise (artifacts/demo/grid.png)"
	$(VENV)/bin/viditq quality --recipes fp,w8a8-naive,w8a8 --per-class 2 --out artifacts/demo
	@echo "== 3/3 speed at DiT width: the PixArt-style demo DiT (artifacts/demo/pixart-demo-w8a8)"
	$(VENV)/bin/viditq quantize --model demo --out artifacts/demo/pixart-demo-w8a8

# One process per variant: variants measured in one process disturb each other (a viditq run
# after torchao's measured 1.6x slower than alone), so each gets a fresh interpreter.
BENCH_VARIANTS := fp32-eager bf16-eager fp32-inductor bf16-inductor torchao-int8-bf16 \
                  torchao-int8-fp32 viditq-w8a8-fp32 viditq-w8a8-bf16 \
                  viditq-w8a8-balanced-bf16 viditq-w4a8-balanced-bf16 viditq-w8a8-folded-bf16 \
                  viditq-w8a8-attn-bf16
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	rm -rf benchmarks/runs && mkdir -p benchmarks/runs
	for v in $(BENCH_VARIANTS); do \
	  $(PY) -m pytest -q benchmarks --benchmark-only -k "$$v" \
	    --benchmark-json=benchmarks/runs/$$v.json || exit 1; \
	done
	$(PY) benchmarks/report.py --readme README.md $(addprefix benchmarks/runs/,$(addsuffix .json,$(BENCH_VARIANTS)))

# Mixed-precision search: time on a PixArt-Σ-sized model (about 8 minutes) and quality on the
# outlier PixArt (about 2 minutes); the tables are printed and recorded in benchmarks/RESULTS.md.
bench-search: $(STAMP)
	mkdir -p benchmarks/runs
	$(PY) -m pytest -q -s benchmarks/test_bench_search.py --benchmark-only \
	  --benchmark-json=benchmarks/runs/search.json

# CUDA figures (issue 5, an H100): GEMM shapes, PixArt-Σ / STDiT3 blocks and the 28-block PixArt-Σ,
# then the speed-up tables as Markdown. No install step (the GPU machine is offline; see the
# docstring of benchmarks/test_bench_cuda.py): CUDA_PY is any Python with a CUDA torch and
# pytest-benchmark, by default the venv's when there is one. The tables are printed even when a
# test failed, and the target fails then. VIDITQ_BENCH_CUDA_SHAPES=quick measures 5 GEMM shapes.
# The venv's Python only when its torch sees a CUDA device: a CPU-only .venv in the checkout
# would skip every test.
CUDA_PY ?= $(shell if [ -x $(PY) ] && $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
             2>/dev/null; then echo $(PY); else echo python3; fi)
bench-cuda:
	mkdir -p benchmarks/runs && rm -f benchmarks/runs/cuda.json
	$(CUDA_PY) -m pytest -q benchmarks/test_bench_cuda.py --benchmark-only \
	  --benchmark-json=benchmarks/runs/cuda.json; status=$$?; \
	if [ -f benchmarks/runs/cuda.json ]; then \
	  $(CUDA_PY) benchmarks/cuda_ratios.py benchmarks/runs/cuda.json || exit $$?; \
	else echo "bench-cuda: no benchmark results (every test skipped?)"; fi; exit $$status

# Issue 16: everything a bare H100 / H200 (torch, triton, pytest; offline; nothing built) can say
# in at most 6 minutes: the CUDA tests, DiT-shape GEMMs (W8A8, W4A8, W4A4 against cuBLAS bf16 and
# torchao int8), one PixArt-Σ-width block and the 28-block stack built and quantized on the GPU.
# JSON + Markdown in $VIDITQ_GPU_OUT (default benchmarks/runs/gpu-check), written after each phase.
# Exit 0 all passed, 1 a phase failed, 3 no CUDA device (see benchmarks/gpu_check.py).
# GPU_CHECK_ARGS: e.g. --wheels DIR (offline wheels for a missing numpy / pyyaml).
gpu-check:
	timeout -k 10 360 $(CUDA_PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) artifacts .pytest_cache .benchmarks
