#!/usr/bin/env bash
# The GPU checks as one script (every figure names the device), sized for ~8 minutes on one H100
# before the demo (whose GPU wall time has not been measured yet; its last line prints it):
#   the step of every weighting mode against a plain ResNet-18 step (224 px, batch 128, 20 steps,
#   5 teachers), and the study's online step (the 5 ResNet-50 teachers run live);
#   precompute / bare forward; the full default run (30 epochs, Waterbirds size, 224 px);
#   runs per hour with one and several runs at once on the GPU;
#   last, `python3 cli.py demo` from scratch (it deletes artifacts/default first), its wall time.
# CELEBA=1 adds precompute and one distill epoch at CelebA size (162,770 training images,
# generated; about 10 more minutes).
# TINY=1 runs every step at a toy size on whatever device there is (the suite runs it on the CPU,
# tests/test_benchmarks.py), so that a refactor cannot break the script before a GPU is lent; it
# skips the demo and keeps its scratch folders under ${TMPDIR:-/tmp}.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
W=${TMPDIR:-/tmp}
if [ "${TINY:-0}" = "1" ]; then
  python3 benchmarks/bench_distill.py --image-size 16 --batch-size 8 --steps 1 --repeats 1 --warmup 0 \
    --student-arch resnet18-w16 --teacher-arch resnet18-w16
  python3 benchmarks/bench_precompute.py --image-size 16 --scale 0.02 --views 1 --repeats 1 --backbones 1 \
    --workdir "$W/tiny_precompute"
  python3 benchmarks/bench_full_run.py --scale 0.02 --image-size 16 --epochs 1 --views 1 --workdir "$W/tiny_full"
  python3 benchmarks/bench_sweep.py --workdir "$W/tiny_sweep" --scale 0.02 --image-size 16 --epochs 1 --runs 2 \
    --jobs 1
  exit 0
fi
python3 -m pytest -q tests/test_step.py tests/test_online.py -x 2>&1 | tail -2
python3 benchmarks/bench_distill.py --image-size 224 --batch-size 128 --steps 20
python3 benchmarks/bench_precompute.py --image-size 224 --scale 0.1 --views 2 --repeats 3
python3 benchmarks/bench_full_run.py --scale 1.0 --image-size 224 --epochs 30 --views 2 \
  --workdir /tmp/full_run
python3 benchmarks/bench_sweep.py --workdir /tmp/sweep_bench --epochs 3 --runs 6 --jobs auto
if [ "${CELEBA:-0}" = "1" ]; then
  python3 benchmarks/bench_full_run.py --scale 33.9 --image-size 224 --epochs 1 --views 1 \
    --workdir /tmp/celeba_size
fi
# the demo from scratch on the device it picks (the GPU), its wall time printed with that device's name
DEVICE=$(python3 -c 'import torch; c = torch.cuda; print(c.get_device_name() if c.is_available() else "CPU")')
rm -rf artifacts/default
TIMEFORMAT="demo wall %R s on ${DEVICE}"
time python3 cli.py demo
