"""Benchmark: the cached distillation step of every weighting mode against a plain ResNet-18 step.

Prints, measured side by side in one run (interleaved passes, best of each), the step time of:
  - plain: cross-entropy ResNet-18 step on the same batch (the floor);
  - cached steps (gamma 0.5 on layer4) with each weighting: aver, agre (per sample), cached,
    agre-batch with last / layer4 / all parameters (all = the study's method), and the study's
    straightforward agre-batch-all loop (T + 1 gradients, then a backward of the whole loss);
  - online: the study's loop (T ResNet-50 teachers + the biased model on every batch,
    agre-batch over all parameters), unless --skip-online.
Ratios are to the plain step. Goals: cached agre <= 1.10x; agre-batch all <= 3.5x on an H100
(4.79x before the fast path); online / cached agre-batch all >= 2x. Each step includes rendering
the batch's views from stored uint8 pixels on the device.

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

from core.models import FeatureResNet  # noqa: E402
from core.runtime import autocast, keep_freed_memory, memory_format_for, pick_device  # noqa: E402
from core.weighting import agre_batch_weights_from_grads, kd_per_teacher  # noqa: E402
from data.store import store_size_for  # noqa: E402
from data.views import eval_box, render  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.data import SplitData  # noqa: E402
from distill.losses import distillation_loss  # noqa: E402
from distill.student import Student  # noqa: E402
from distill.train import step  # noqa: E402

MODES = {"aver": dict(weighting="aver"), "agre": dict(weighting="agre"), "cached": dict(weighting="cached"),
         "batch-last": dict(weighting="agre-batch", agre_params="last"),
         "batch-layer4": dict(weighting="agre-batch", agre_params="layer4"),
         "batch-all": dict(weighting="agre-batch", agre_params="all")}


def synthetic_split(n, size, T, C, D, device) -> SplitData:
    """In-memory stand-in for a cached training split (random pixels and teacher outputs)."""
    g = torch.Generator().manual_seed(0)
    box = torch.tensor(eval_box()).repeat(n, 2, 1)
    return SplitData(
        rows=torch.arange(n, device=device),
        images=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device),
        hw=torch.full((n, 2), size, device=device), y=torch.randint(0, C, (n,), generator=g).to(device),
        group=torch.zeros(n, dtype=torch.long, device=device), box=box.to(device),
        flip=torch.zeros(n, 2, dtype=torch.bool, device=device),
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
    ap.add_argument("--repeats", type=int, default=2, help="interleaved passes; the best of each counts")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-online", action="store_true", help="the online step is slow on a CPU")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every command of cli.py does
    device = pick_device(args.device)
    torch.manual_seed(0)
    B, T, C, S = args.batch_size, args.teachers, 2, args.image_size
    data = synthetic_split(4 * B, store_size_for(S), T, C, 2048, device)
    idx, view = torch.arange(B, device=device), torch.zeros(B, dtype=torch.long, device=device)
    cl = dict(memory_format=memory_format_for(device))
    x_of = lambda: render(data.images[idx], data.box[idx, view], data.flip[idx, view], S, data.hw[idx])
    zt, zb = data.logits[idx, view], data.biased[idx, view]
    feats = {"layer4": data.feats["layer4"][idx, view].expand(-1, T, -1)}

    student = Student(C, {"layer4": 2048}).to(device).to(**cl)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)

    def cached_step(mode):
        cfg = DistillConfig(gamma=0.5, pretrained=False, **MODES[mode])
        cached = data.cached[idx, view] if mode == "cached" else None
        return lambda: step(student, opt, x_of(), data.y[idx], zt, zb, feats, cached, cfg, device)

    def report_loop():  # the study's code: T + 1 torch.autograd.grad calls, then the whole backward
        with autocast(device):
            logits, h, proj = student(x_of().contiguous(**cl))
        logits = logits.float()
        params = student.agre_params("all")
        g_b = torch.autograd.grad(kd_per_teacher(logits, zb[:, None], 4.0).mean(), params, retain_graph=True)
        g_t = [torch.autograd.grad(l, params, retain_graph=True) for l in kd_per_teacher(logits, zt, 4.0).mean(0)]
        w = agre_batch_weights_from_grads(g_t, g_b).unsqueeze(0).expand(B, T)
        out = distillation_loss(logits, data.y[idx], zt, w, 4.0, 1.0, projected=proj, teacher_feats=feats,
                                gammas={"layer4": 0.5})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    plain = FeatureResNet("resnet18", C).to(device).to(**cl)
    popt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)

    def plain_step():
        with autocast(device):
            logits, _ = plain(x_of().contiguous(**cl), layers=())
        loss = F.cross_entropy(logits.float(), data.y[idx])
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    steps = {"plain": plain_step, **{m: cached_step(m) for m in MODES}, "report-loop": report_loop}
    results = {}
    for _ in range(args.repeats):  # interleaved, so drift of a shared machine hits all alike
        for name, fn in steps.items():
            results.setdefault(name, []).append(timed(fn, args.steps, args.warmup, device))
    if not args.skip_online:
        teachers = [FeatureResNet("resnet50", C).to(device).eval().to(**cl) for _ in range(T + 1)]
        cfg = DistillConfig(gamma=0.5, pretrained=False)

        def online_step():
            x = x_of().contiguous(**cl)
            with torch.no_grad(), autocast(device):
                outs = [m(x, layers=("layer4",)) for m in teachers]
            zt_, zb_ = torch.stack([o[0].float() for o in outs[:-1]], 1), outs[-1][0].float()
            ft = {"layer4": torch.stack([o[1]["layer4"].float() for o in outs[:-1]], 1)}
            step(student, opt, x, data.y[idx], zt_, zb_, ft, None, cfg, device)

        results["online"] = [timed(online_step, max(2, args.steps // 4), 1, device)]
    best = {k: min(v) for k, v in results.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {B}, image {S}px, {T} teachers, gamma 0.5 on layer4")
    for k, v in best.items():
        print(f"  {k:<13} step {1000 * v:8.1f} ms  ({B / v:8.1f} img/s)  {v / best['plain']:5.2f}x plain")
    print(f"cached agre / plain: {best['agre'] / best['plain']:.3f}x (goal <= 1.10x); agre-batch all / plain: "
          f"{best['batch-all'] / best['plain']:.2f}x (goal <= 3.5x on an H100); the study's loop / fast path: "
          f"{best['report-loop'] / best['batch-all']:.2f}x")
    if "online" in best:
        print(f"online (report) / cached agre-batch all: {best['online'] / best['batch-all']:.2f}x; "
              f"online / cached agre: {best['online'] / best['agre']:.1f}x")


if __name__ == "__main__":
    main()
