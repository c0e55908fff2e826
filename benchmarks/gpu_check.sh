#!/usr/bin/env bash
# The GPU checks of the distill and precompute issues as one script (sized for ~10 min on one H100):
# the unit tests on the device's python, then benchmarks (a), (b), precompute/bare, and (c).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m pytest -q tests/test_distill.py tests/test_precompute.py -x 2>&1 | tail -3
python3 benchmarks/bench_distill.py --image-size 224 --batch-size 128 --steps 20
python3 benchmarks/bench_precompute.py --image-size 224 --scale 0.1 --views 2 --repeats 3
python3 benchmarks/bench_full_run.py --scale 1.0 --image-size 224 --epochs 30 --views 2
