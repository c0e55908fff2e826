"""The GPU check still runs: `TINY=1 bash benchmarks/gpu_check.sh` on the CPU runs every benchmark
it calls at a toy size (a refactor once broke bench_distill's imports and, with it, the whole
script: the first GPU lent would have measured nothing)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_benchmark_at_a_tiny_size(tmp_path):
    env = {**os.environ, "TINY": "1", "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    out = r.stdout
    for step in ("plain", "aver", "agre", "cached", "batch-all", "online"):  # bench_distill's rows
        assert step in out, (step, out[-2000:])
    assert "ratio precompute / bare forward" in out  # bench_precompute
    assert "distill, 1 epochs" in out                # bench_full_run
    assert "runs/hour" in out                        # bench_sweep
