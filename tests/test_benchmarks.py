"""The benchmarks still run: bench_distill builds the current training step for every weighting
mode and the online loop (a refactor once broke its imports and, with it, every GPU check)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_distill_runs_every_step_at_a_tiny_size():
    args = ["--image-size", "16", "--batch-size", "8", "--steps", "1", "--repeats", "1", "--warmup", "0",
            "--student-arch", "resnet18-w16", "--teacher-arch", "resnet18-w16"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_distill.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("plain", "aver", "agre", "cached", "batch-all", "online"):
        assert row in r.stdout, (row, r.stdout[-2000:])
