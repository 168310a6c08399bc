#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, the CUDA-only tests (tests/gpu/test_cuda.py) and the 1B-class benchmark
# (benchmarks/overhead.py --device cuda --shape 1b), written to one markdown report. About 8 minutes at most.
# Usage: bash scripts/gpu-check.sh [--out FILE]    # default $OUT/gpu-check.md if OUT is set, else results/gpu-check.md
#        bash scripts/gpu-check.sh --dry-run       # count the work and estimate its time; runs nothing
# Installs nothing: set up first with `bash scripts/install.sh --test` (see README). Without a GPU it says so
# and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
