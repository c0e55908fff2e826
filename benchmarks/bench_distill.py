"""Benchmark: a cached distillation step against (a) the online approach and (b) plain CE.

Prints ratios measured side by side in one run (not a timed test):
  (a) online step of the user's report (T ResNet-50 teachers + the biased model run on every
      batch, agre-batch weights over all student parameters) / cached step (agre, gamma 0.5).
      Goal: >= 8x.
  (b) cached step / plain cross-entropy ResNet-18 step on the same batch. Goal: <= 1.10x.
Each step includes rebuilding the batch's views from stored uint8 pixels on the device.

    python benchmarks/bench_distill.py [--image-size 224] [--batch-size 128] [--steps 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.store import store_size_for  # noqa: E402
from data.views import eval_box, render  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.student import Student  # noqa: E402
from distill.data import SplitData
from distill.train import train_step  # noqa: E402
from core.weighting import kd_per_teacher, teacher_weights  # noqa: E402
from distill.losses import distillation_loss  # noqa: E402
from core.models import FeatureResNet  # noqa: E402
from core.runtime import autocast, keep_freed_memory, pick_device  # noqa: E402


def synthetic_split(n, size, T, C, D, device) -> SplitData:
    """In-memory stand-in for a cached training split (random pixels and teacher outputs)."""
    g = torch.Generator().manual_seed(0)
    box = torch.tensor(eval_box()).repeat(n, 2, 1)
    return SplitData(
        images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device),
        y=torch.randint(0, C, (n,), generator=g).to(device), group=torch.zeros(n, dtype=torch.long, device=device),
        box=box.to(device), flip=torch.zeros(n, 2, dtype=torch.bool, device=device),
        logits=torch.randn(n, 2, T, C, generator=g).to(device), biased=torch.randn(n, 2, C, generator=g).to(device),
        cached=torch.full((n, 2, T), 1.0 / T, device=device),
        feats={"layer4": torch.randn(n, 2, 1, D, generator=g).half().to(device)})


def timed(fn, steps, warmup, device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--teachers", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-online", action="store_true", help="only (b): the online step is slow on a CPU")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every command of cli.py does
    device = pick_device(args.device)
    torch.manual_seed(0)
    B, T, C, S = args.batch_size, args.teachers, 2, args.image_size
    data = synthetic_split(4 * B, store_size_for(S), T, C, 2048, device)
    idx, view = torch.arange(B, device=device), torch.zeros(B, dtype=torch.long, device=device)
    backbone = torch.zeros(T, dtype=torch.long, device=device)
    cl = dict(memory_format=torch.channels_last)

    cfg = DistillConfig(weighting="agre", gamma=0.5, pretrained=False)
    student = Student(C, {"layer4": 2048}).to(device).to(**cl)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    cached_step = lambda: train_step(student, opt, data, idx, view, cfg, S, backbone, device)

    plain = FeatureResNet("resnet18", C).to(device).to(**cl)
    popt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

    def plain_step():
        x = render(data.images[idx], data.box[idx, view], data.flip[idx, view], S)
        with autocast(device):
            logits, _ = plain(x.contiguous(**cl), layers=())
        loss = F.cross_entropy(logits.float(), data.y[idx])
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    results = {}
    # interleave the measurements so drift of a shared machine hits all of them alike
    for _ in range(2):
        results.setdefault("plain", []).append(timed(plain_step, args.steps, args.warmup, device))
        results.setdefault("cached", []).append(timed(cached_step, args.steps, args.warmup, device))
    if not args.skip_online:
        teachers = [FeatureResNet("resnet50", C).to(device).eval().to(**cl) for _ in range(T + 1)]

        def online_step():
            x = render(data.images[idx], data.box[idx, view], data.flip[idx, view], S).contiguous(**cl)
            with torch.no_grad(), autocast(device):
                outs = [m(x, layers=("layer4",)) for m in teachers]
            zt = torch.stack([o[0].float() for o in outs[:-1]], 1)
            zb, ft = outs[-1][0].float(), torch.stack([o[1]["layer4"].float() for o in outs[:-1]], 1)
            with autocast(device):
                logits, h, proj = student(x)
            logits = logits.float()
            params = [p for p in student.backbone.parameters()]
            w = teacher_weights("agre-batch", student_logits=logits, teacher_logits=zt, biased_logits=zb, tau=4.0,
                                agre_params="all", teacher_losses=list(kd_per_teacher(logits, zt, 4.0).mean(0)),
                                biased_loss=kd_per_teacher(logits, zb[:, None], 4.0).mean(), params=params)
            out = distillation_loss(logits, data.y[idx], zt, w, 4.0, 1.0, projected=proj,
                                    teacher_feats={"layer4": ft}, gammas={"layer4": 0.5})
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()

        results["online"] = [timed(online_step, max(2, args.steps // 4), 1, device)]
    best = {k: min(v) for k, v in results.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {B}, image {S}px, {T} teachers")
    for k, v in best.items():
        print(f"  {k:<7} step {1000 * v:8.1f} ms   ({B / v:7.1f} img/s)")
    print(f"(b) cached / plain CE step: {best['cached'] / best['plain']:.3f}x   (goal <= 1.10x)")
    if "online" in best:
        print(f"(a) online / cached step:   {best['online'] / best['cached']:.1f}x   (goal >= 8x)")


if __name__ == "__main__":
    main()
