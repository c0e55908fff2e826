#!/usr/bin/env bash
# The GPU checks as one script, sized for ~8 minutes on one H100 (every figure names the device):
#   the step of every weighting mode against a plain ResNet-18 step, and the report's online step;
#   precompute / bare forward; the full default run (30 epochs, Waterbirds size, 224 px);
#   runs per hour with one and several runs at once on the GPU.
# CELEBA=1 adds precompute and one distill epoch at CelebA size (162,770 training images,
# generated; about 10 more minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m pytest -q tests/test_step.py tests/test_online.py -x 2>&1 | tail -2
python3 benchmarks/bench_distill.py --image-size 224 --batch-size 128 --steps 20
python3 benchmarks/bench_precompute.py --image-size 224 --scale 0.1 --views 2 --repeats 3
python3 benchmarks/bench_full_run.py --scale 1.0 --image-size 224 --epochs 30 --views 2 --workdir /tmp/full_run
python3 benchmarks/bench_sweep.py --workdir /tmp/sweep_bench --epochs 3 --runs 6 --jobs auto
if [ "${CELEBA:-0}" = "1" ]; then
  python3 benchmarks/bench_full_run.py --scale 33.9 --image-size 224 --epochs 1 --views 1 --workdir /tmp/celeba_size
fi
