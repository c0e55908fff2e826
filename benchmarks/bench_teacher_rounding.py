"""Does the synthetic default's ERM backbone depend on the machine's float rounding?

Trains the embedded default's from-scratch ERM backbone (train_erm, the teachers stage's own code
and settings) twice per precision, with 1 and then 2 CPU threads: another thread count changes how
the BLAS and oneDNN kernels split their reductions, so the rounding differs as it does on another
CPU. Prints side by side, per precision: the wall time of each, the largest parameter difference
of the two backbones relative to the largest magnitude in that tensor, the share of test images on
which the two ERM models predict the same class, and their test WGA. Same data, seed and code;
only the rounding differs.

    python benchmarks/bench_teacher_rounding.py                       # the default's recipe
    python benchmarks/bench_teacher_rounding.py --precisions float64 --arch resnet18
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


def main() -> None:
    import numpy as np
    import torch

    from core.models import build_model
    from data.folders import fingerprint, load_metadata
    from data.views import ViewSpec, sample_views
    from experiments import defaults
    from experiments.pipeline import ensure_data
    from precompute import teachers as T

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=defaults.TEACHERS_OVERRIDES["epochs"])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--precisions", default="float32,float64")
    args = ap.parse_args()

    root = ensure_data()
    meta = load_metadata(root)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}; {args.arch}, "
          f"{args.epochs} ERM epochs of the synthetic default; 1 vs 2 threads")
    size = defaults.IMAGE_SIZE
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            opts = {**defaults.TEACHERS_OVERRIDES, "epochs": args.epochs, "arch": args.arch, "precision": precision}
            cfg = T.TeacherConfig(str(root), tmp, progress=False, device="cpu", **opts)
            images, hw = T._prepare_images(cfg, meta, Path(tmp), fingerprint(meta))
            box, flip = sample_views(np.arange(len(meta)), ViewSpec(out_size=size), hw.numpy())
            states, times, preds, wgas = [], [], [], []
            try:
                for n in (1, 2):
                    torch.set_num_threads(n)
                    t0 = time.time()
                    states.append(T.train_erm(cfg, 0, images, hw, meta, Path(tmp) / f"{precision}_t{n}.pt"))
                    times.append(time.time() - t0)
            finally:
                torch.set_num_threads(threads)
            for state in states:
                model = build_model(args.arch, meta.num_classes)
                model.net.load_state_dict(state)
                logits, _ = T.embed(model, images, hw, box[:, 0], flip[:, 0], size, torch.device("cpu"))
                preds.append(logits.argmax(1).numpy()[meta.rows("test")])
                wgas.append(100 * T.evaluate_logits(logits, meta)["test"]["wga"])
            a, b = states
            rel = max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30))
                      for k in a if a[k].is_floating_point() and a[k].numel() > 1)
            print(f"{precision}: {times[0]:.0f} s (1 thread), {times[1]:.0f} s (2 threads); largest relative "
                  f"parameter difference {rel:.1e} (a float32 ulp: 6e-08 to 1.2e-07); same test prediction "
                  f"{100 * np.mean(preds[0] == preds[1]):.2f}%; ERM test WGA {wgas[0]:.1f} vs {wgas[1]:.1f}")


if __name__ == "__main__":
    main()
