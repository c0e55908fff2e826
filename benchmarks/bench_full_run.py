"""Benchmark (c): wall time of a full default distillation run, made for one GPU.

Builds, once, a Waterbirds-sized synthetic data set (scale 1: 4,795 training images), a
manifest of randomly initialised ResNet-50 teachers (5 distinct backbones, the biased model
sharing the first), and their cache with K random views; then times ``fit`` with the study's
defaults (AGRE-KD, gamma 0.5 on layer4, 30 epochs, batch 128, validation every epoch) and
prints the wall time (goal: under 60 s on one H100). Teacher quality does not matter for the
timing, so no teacher is trained.

    python benchmarks/bench_full_run.py [--scale 1.0] [--image-size 224] [--epochs 30] [--views 2]
    python benchmarks/bench_full_run.py --scale 0.02 --image-size 32 --epochs 1   # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.store import store_size_for  # noqa: E402
from data.synth import SynthSpec, generate  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.train import fit  # noqa: E402
from core.files import save_checkpoint
from core.models import FeatureResNet  # noqa: E402
from precompute.run import PrecomputeConfig, run_precompute  # noqa: E402
from precompute.teachers import import_teachers  # noqa: E402
from core.runtime import keep_freed_memory, pick_device  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None, help="reuse data, teachers and cache from an earlier call")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every command of cli.py does
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_full_"))
    cache = work / "cache.h5"
    t0 = time.perf_counter()
    if not (work / "data" / "metadata.csv").is_file():
        generate(work / "data", SynthSpec(scale=args.scale, size=store_size_for(args.image_size)))
    if not (work / "teachers" / "manifest.json").is_file():
        torch.manual_seed(0)
        files = []
        for b in range(5):
            files.append(str(work / f"teacher_{b}.pt"))
            save_checkpoint(FeatureResNet("resnet50", 2).net.state_dict(), files[-1])
        import_teachers(work / "teachers", files, files[0], image_size=args.image_size, pretrained=False,
                        progress=False)
    t1 = time.perf_counter()
    run_precompute(PrecomputeConfig(str(work / "data"), str(work / "teachers"), str(cache), random_views=args.views,
                                     layers=("layer4",), batch_size=256, device=args.device))
    t2 = time.perf_counter()
    cfg = DistillConfig(cache=str(cache), out=str(work / f"run_{int(time.time())}"), gamma=0.5,
                        epochs=args.epochs, batch_size=args.batch_size, pretrained=False, device=args.device)
    summary = fit(cfg, progress=False)
    t3 = time.perf_counter()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; workdir {work}")
    print(f"  data + random teachers : {t1 - t0:7.1f} s")
    print(f"  precompute (K={args.views}, layer4): {t2 - t1:7.1f} s")
    print(f"(c) distill, {args.epochs} epochs at {args.image_size}px, batch {args.batch_size}, val every epoch: "
          f"{t3 - t2:.1f} s wall (goal < 60 s on one H100); best-epoch test WGA "
          f"{100 * summary['test_best']['wga']:.1f}% (random teachers: timing only)")


if __name__ == "__main__":
    main()
