"""Does the synthetic default's teacher build depend on the machine's float rounding?

Builds the embedded default's teachers (from-scratch ERM backbone + DFR heads) twice per precision,
once with 1 and once with 2 CPU threads (another thread count changes how oneDNN splits its
reductions, so the rounding differs as it does on another CPU), and prints side by side: the
largest parameter difference of the two backbones relative to the parameter's scale, the share
of test images on which their teachers predict the same class, and each teacher's test WGA in
both builds. Same data, seeds and code; only the rounding differs.

    python benchmarks/bench_teacher_rounding.py --epochs 3          # the default's recipe
    python benchmarks/bench_teacher_rounding.py --epochs 1 --precisions float64
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(out: Path, precision: str, threads: int, epochs: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    subprocess.run([sys.executable, "cli.py", "teachers", "--out", str(out), "--precision", precision,
                    "--epochs", str(epochs)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def compare(a: Path, b: Path) -> dict:
    import numpy as np
    import torch

    from core.manifest import read_manifest

    sa = torch.load(a / "erm_seed0.pt", weights_only=True)
    sb = torch.load(b / "erm_seed0.pt", weights_only=True)
    rel = max(float((sa[k].double() - sb[k].double()).abs().max() / sa[k].double().abs().max().clamp_min(1e-30))
              for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)
    ma, mb = read_manifest(a / "manifest.json"), read_manifest(b / "manifest.json")
    wga = [(m.name, 100 * m.metrics["test"]["wga"], 100 * n.metrics["test"]["wga"])
           for m, n in zip(ma.models, mb.models)]
    accs = [(np.array(m.metrics["test"]["group_acc"]), np.array(n.metrics["test"]["group_acc"]))
            for m, n in zip(ma.models, mb.models)]
    same_groups = all(np.allclose(x, y) for x, y in accs)
    return {"rel": rel, "wga": wga, "same_group_accuracies": same_groups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--precisions", default="float32,float64")
    args = ap.parse_args()
    from experiments.pipeline import ensure_data

    ensure_data()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; ERM epochs {args.epochs}; threads 1 vs 2")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            a, b = Path(tmp) / f"{precision}_t1", Path(tmp) / f"{precision}_t2"
            ta, tb = build(a, precision, 1, args.epochs), build(b, precision, 2, args.epochs)
            c = compare(a, b)
            print(f"\n{precision}: built in {ta:.0f} s (1 thread) and {tb:.0f} s (2 threads); largest relative "
                  f"backbone parameter difference {c['rel']:.2e}; per-group test accuracies "
                  f"{'identical' if c['same_group_accuracies'] else 'DIFFER'}")
            print("model       test WGA 1 thread   2 threads")
            for name, x, y in c["wga"]:
                print(f"{name:<11} {x:>15.1f}   {y:>9.1f}")


if __name__ == "__main__":
    main()
