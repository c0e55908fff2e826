"""Benchmark: precompute throughput against a bare forward pass of the same backbones.

Builds a synthetic data folder and a manifest of randomly initialised ResNet-50 teachers (by
default the study's layout: 5 teachers with distinct backbones, the biased model sharing the
first one's), then measures side by side in one run:
  - the full ``run_precompute`` (reading the image store, rendering views, forward of every
    distinct backbone, heads, static weights, writing the cache), images x views per second;
  - a bare forward of the same distinct backbones on the same, already rendered, images.
Each of ``--repeats`` precompute passes is compared with the mean of the bare passes just before
and after it; prints the median ratio (goal >= 0.9: writing the cache must not be the bottleneck)
and the cache's bytes per image per view.

    python benchmarks/bench_precompute.py [--image-size 224] [--scale 0.1] [--views 2] [--backbones 5] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.store import ImageStore, build_store, store_size_for  # noqa: E402
from data.synth import SynthSpec, generate  # noqa: E402
from data.views import ViewSpec, render, sample_views  # noqa: E402
from data.folders import SPLIT_CODES, fingerprint, load_metadata  # noqa: E402
from core.files import save_checkpoint
from core.models import FeatureResNet  # noqa: E402
from cache.schema import store_path_for
from core.constants import LAYERS
from core.ensemble import Ensemble  # noqa: E402
from precompute.run import PrecomputeConfig, run_precompute  # noqa: E402
from core.manifest import read_manifest  # noqa: E402
from precompute.teachers import import_teachers  # noqa: E402
from core.runtime import autocast, keep_freed_memory, memory_format_for, pick_device  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--scale", type=float, default=0.1, help="synthetic data set size (fraction of Waterbirds)")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--backbones", type=int, default=5, help="distinct teacher backbones (5 teachers)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5, help="precompute passes, each bracketed by bare passes")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every command of cli.py does
    device = pick_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_precompute_"))
    data = generate(work / "data", SynthSpec(scale=args.scale, size=max(48, args.image_size)))
    torch.manual_seed(0)
    files = []
    for b in range(args.backbones):
        files.append(work / f"teacher_{b}.pt")
        save_checkpoint(FeatureResNet("resnet50", 2).net.state_dict(), files[-1])
    teacher_files = [str(files[t % args.backbones]) for t in range(5)]
    # distinct heads on shared backbones: perturb fc of files that are reused
    import_teachers(work / "teachers", teacher_files, str(files[0]), image_size=args.image_size, progress=False)
    man = read_manifest(work / "teachers")
    meta = load_metadata(data)
    fp = fingerprint(meta)
    size = store_size_for(args.image_size)
    cache = work / "cache.h5"
    build_store(meta, store_path_for(cache), size, fp, progress=False)

    # bare forward: the same distinct backbones on the same rendered views, nothing else
    ens = Ensemble(man).to(device).eval().to(memory_format=memory_format_for(device))
    store = ImageStore(store_path_for(cache))
    rows = np.arange(len(meta))
    box, flip = sample_views(rows, ViewSpec(random_views=args.views, out_size=args.image_size))
    images = store.load_all()  # Pixels
    store.close()
    # the (row, view) pairs precompute computes: every view of a training row, the eval view of the rest
    pairs = [(r, v) for r in rows for v in range(args.views + 1 if meta.split[r] == SPLIT_CODES["train"] else 1)]
    batches = []
    for s in range(0, len(pairs), args.batch_size):
        r, v = (torch.tensor(c) for c in zip(*pairs[s:s + args.batch_size]))
        batches.append(render(images[r], torch.from_numpy(box)[r, v], torch.from_numpy(flip)[r, v], args.image_size)
                       .contiguous(memory_format=memory_format_for(device)))
    n_img = len(pairs)

    def bare_forward(batches=batches) -> float:
        with torch.inference_mode():
            sync(device)
            t = time.perf_counter()
            for x in batches:
                x = x.to(device, non_blocking=True)
                with autocast(device):
                    for bb in ens.backbones:
                        bb(x, layers=LAYERS)
            sync(device)
            return time.perf_counter() - t

    def precompute() -> float:
        cache.unlink(missing_ok=True)  # a fresh cache each time (the image store is kept)
        t = time.perf_counter()
        run_precompute(PrecomputeConfig(str(data), str(work / "teachers"), str(cache), random_views=args.views,
                                        batch_size=args.batch_size, device=args.device, progress=False))
        return time.perf_counter() - t

    # Each precompute pass is bracketed by two bare passes and compared with their mean; the median
    # of these ratios counts. A shared machine's speed drifts and jumps (1.5x measured here within
    # a minute), so only passes adjacent in time are compared.
    bare_forward([batches[0], batches[-1]])  # warm-up: both batch shapes
    bare_times, full_times = [bare_forward()], []
    for _ in range(args.repeats):
        full_times.append(precompute())
        bare_times.append(bare_forward())
    ratios = [(b0 + b1) / 2 / f for b0, b1, f in zip(bare_times, bare_times[1:], full_times)]
    bare, full = float(np.median(bare_times)), float(np.median(full_times))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}; {len(rows)} images, {n_img} image-views ({args.views} random views of each training "
          f"image + the eval view of every image) at {args.image_size}px; "
          f"{len(ens.backbones)} distinct backbones for 5 teachers + biased")
    print(f"  bare forward : {n_img / bare:8.1f} img/s (median of {len(bare_times)} passes)")
    print(f"  precompute   : {n_img / full:8.1f} img/s (median of {len(full_times)}; whole command: store read, "
          f"views, heads, weights, write)")
    print(f"ratio precompute / bare forward: {np.median(ratios):.3f}   (goal >= 0.9; median over {len(ratios)} "
          f"precompute passes, each against the mean of the bare passes before and after it: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")
    slots = len(rows) * (args.views + 1)  # every row keeps K + 1 view slots (eval rows repeat view 0)
    print(f"cache: {cache.stat().st_size / slots / 1024:.1f} KiB per stored (row, view) slot "
          f"({cache.stat().st_size / 2**20:.1f} MiB for {len(rows)} rows x {args.views + 1} slots; "
          f"layers {', '.join(LAYERS)})")


if __name__ == "__main__":
    main()
