"""Benchmark: sweep throughput, runs per hour, with one run at a time against N at once on one device.

Builds, once, a synthetic data set, randomly initialised ResNet-50 teachers (5 backbones, the
biased model sharing the first) and their cache, as ``bench_full_run.py`` does; then trains the
same ``--runs`` runs (the study's method at gamma 0.5, one seed each) twice into fresh folders:
with ``jobs=N`` (N processes at once, ``--jobs auto`` picks N from the free GPU memory) and with
``jobs=1`` (one after the other, in this process), and prints runs per hour for both with the
device next to every figure. On a GPU it also prints the peak memory of one run (from the
jobs=1 pass) next to the per-run estimate ``jobs=auto`` divides the free memory by.

    python benchmarks/bench_sweep.py                          # GPU: Waterbirds-sized, 5 epochs, 8 runs
    python benchmarks/bench_sweep.py --scale 0.02 --image-size 32 --epochs 1 --runs 4 --jobs 2 --device cpu
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.files import save_checkpoint  # noqa: E402
from core.models import FeatureResNet  # noqa: E402
from core.runtime import keep_freed_memory, pick_device  # noqa: E402
from data.store import store_size_for  # noqa: E402
from data.synth import SynthSpec, generate  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from experiments.jobs import GiB, resolve_jobs, run_memory_bytes  # noqa: E402
from experiments.sweep import expand_grid, run_sweep  # noqa: E402
from precompute.run import PrecomputeConfig, run_precompute  # noqa: E402
from precompute.teachers import import_teachers  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} threads)"


def build_cache(work: Path, scale: float, image_size: int, views: int, device: str) -> Path:
    """Synthetic data, random teachers and their cache in ``work`` (kept for a later call)."""
    cache = work / "cache.h5"
    if not (work / "data" / "metadata.csv").is_file():
        generate(work / "data", SynthSpec(scale=scale, size=store_size_for(image_size)))
    if not (work / "teachers" / "manifest.json").is_file():
        torch.manual_seed(0)
        files = [str(work / f"teacher_{b}.pt") for b in range(5)]
        for f in files:
            save_checkpoint(FeatureResNet("resnet50", 2).net.state_dict(), f)
        import_teachers(work / "teachers", files, files[0], image_size=image_size, pretrained=False, progress=False)
    if not cache.is_file():
        run_precompute(PrecomputeConfig(str(work / "data"), str(work / "teachers"), str(cache), random_views=views,
                                        layers=("layer4",), batch_size=256, device=device))
    return cache


def timed_sweep(cache: Path, out: Path, runs: list[dict], base: dict, jobs: int) -> float:
    start = time.perf_counter()
    counts = run_sweep(str(cache), str(out), runs, base=base, jobs=jobs)
    wall = time.perf_counter() - start
    if counts["finished"] != len(runs):
        raise SystemExit(f"jobs={jobs}: {counts}; see the failed runs' summary.json under {out}")
    return wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="data set size, 1 = Waterbirds")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--jobs", default="auto", help="N for the side-by-side pass, or auto")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None, help="reuse data, teachers and cache from an earlier call")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every command of cli.py does
    device = pick_device(args.device)
    name = device_name(device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = build_cache(work, args.scale, args.image_size, args.views, args.device)
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "pretrained": False, "device": args.device}
    runs = expand_grid(gamma=0.5, seed=list(range(42, 42 + args.runs)))
    configs = [DistillConfig.from_settings({**base, **r, "cache": str(cache)}) for r in runs]
    n = resolve_jobs(args.jobs, configs)  # before this process holds GPU memory of its own
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # jobs=N first: the jobs=1 pass trains in this process, whose allocator keeps its memory.
    # each pass in its own folder (with jobs auto on a CPU both are jobs=1: one folder would skip the runs)
    wall_n = timed_sweep(cache, work / f"pass1_jobs{n}_{stamp}", runs, base, n)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall_1 = timed_sweep(cache, work / f"pass2_jobs1_{stamp}", runs, base, 1)

    print(f"\nworkdir {work}; {args.runs} runs of {args.epochs} epoch(s), {args.image_size}px, batch "
          f"{args.batch_size}, data scale {args.scale}")
    for jobs, wall in ((1, wall_1), (n, wall_n)):
        print(f"  jobs={jobs:<3} {args.runs / wall * 3600:8.1f} runs/hour  ({wall:7.1f} s wall)  [{name}]")
    print(f"  speed-up of jobs={n}: x{wall_1 / wall_n:.2f}  [{name}]")
    if device.type == "cuda":
        compute, data = run_memory_bytes(configs[0])
        peak = torch.cuda.max_memory_reserved(device)
        print(f"  one run's peak GPU memory (reserved, jobs=1 pass): {peak / GiB:.1f} GiB; jobs=auto's estimate: "
              f"{(compute + (data or 0)) / GiB:.1f} GiB ({compute / GiB:.1f} compute + "
              f"{(data or 0) / GiB:.1f} data; the compute part counts ~1 GiB of CUDA context and workspaces "
              f"that the measured figure does not)  [{name}]")


if __name__ == "__main__":
    main()
