#!/usr/bin/env bash
# The CUDA path in one command (issue 22): tests/test_cuda.py, then benchmarks/bench_gpu.py,
# within a time budget (default 480 s: the tests get 60% of it, the benchmark the rest, and the
# report is written even when time runs out); writes DIR/gpu_check.md and DIR/gpu_check.json
# (device, torch/CUDA versions, each check's outcome and figures, the benchmark table).
#
#   bash benchmarks/gpu_check.sh [--device cuda|cuda:N|cpu] [--quick] [--out DIR] [--budget SECONDS] [--data-dir DIR]
#
#   bash benchmarks/gpu_check.sh --device cpu --quick     # the same logic on the CPU, tiny sizes
#                                                         # (tests/test_gpu_check.py runs it)
# Default DIR: results/gpu_check. Run from anywhere; it uses the repository it lives in.
#
# Needs: Python 3.11+ with PyTorch, numpy, scipy, matplotlib, tqdm, and pytest (to run the
# tests; without it they are reported as not run). Nothing else: no mnist1d, no network. The
# corpus is Tiny Shakespeare where train.py finds it (--data-dir, $REPRO_DATA_DIR, ./data),
# else a stand-in made on the spot (the report says which). Python: $PYTHON, else `python3`
# (an active virtual environment's, else the machine's own).
# Exit status: 0 every check passed and the benchmark ran; 1 otherwise (the report says what).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export MPLBACKEND="${MPLBACKEND:-Agg}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
