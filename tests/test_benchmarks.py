"""The benchmarks still run: `TINY=1 bash benchmarks/gpu_check.sh` on the CPU runs every benchmark
it calls at a toy size (a refactor once broke bench_distill's imports and, with it, the whole
script: the first GPU lent would have measured nothing); the step trace and the before/after
digests of benchmarks/trace_step.py and same_runs.py, at a tiny size."""
import os
import subprocess
import sys
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


def test_one_training_step_stays_within_eight_files_and_twenty_functions(tiny_cache, tmp_path):
    """The bound of issue 28, traced as docs/usage.md#reading-the-code-one-training-step says
    (cached teachers, the study's batch AGRE-KD, gamma 0.5): what a reader follows from the loop
    to opt.step()."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trace_step import count, trace_one_step

    files, functions, _ = count(trace_one_step(tiny_cache, tmp_path / "run"))
    assert ("distill/task.py", "DistillTask.step") in functions  # it traced the step
    assert len(files) <= 8, files
    assert len(functions) <= 20, functions


def test_same_runs_digest_is_reproducible_and_sees_a_change(tiny_cache, tiny_teachers, tmp_path):
    """benchmarks/same_runs.py, the before/after check of a refactor: the same run twice gives one
    digest, another learning rate another."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from same_runs import run_all

    configs = {"a": dict(weighting="agre-batch", gamma=0.5), "b": dict(weighting="agre-batch", gamma=0.5),
               "c": dict(weighting="agre-batch", gamma=0.5, lr=2e-2)}
    d = run_all(tiny_cache, tiny_teachers, tmp_path, configs, epochs=1)
    assert d["a"] == d["b"] != d["c"]
