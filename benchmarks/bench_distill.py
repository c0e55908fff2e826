"""Benchmark: the distillation step of every weighting mode against a plain cross-entropy step.

Each step is built as ``distill.train`` builds it (``teacher_source`` -> ``DistillTask``; per
step ``distill.data.make_batch``, what ``Batches.epoch`` yields, then ``task.step``) on an
in-memory stand-in of a cached training split
(random uint8 pixels at the store size, random teacher outputs), and includes rendering the
batch's views from the stored pixels on the device. Prints, measured side by side in one run
(interleaved passes, the best of each counts), the step time of:
  - plain: a cross-entropy step of the student's backbone (--student-arch) on the same rendered
    batch (the floor);
  - cached steps (gamma 0.5 on layer4, teacher outputs read from the stand-in) with each
    weighting: aver, agre (per sample), cached, agre-batch with last / layer4 / all parameters
    (all = the study's method), and the study's straightforward agre-batch-all loop (T + 1
    ``autograd.grad`` calls, then a backward of the whole objective);
  - online (``--teachers-online``): the study's loop, T random-initialised --teacher-arch teachers
    (one backbone each, DFR-style heads) and the biased model (on the first backbone) run live on
    a fresh crop of every image, agre-batch over all parameters; unless --skip-online.
Ratios are to the plain step; every figure is printed with the device's name (the GPU's, or the
CPU model and torch threads). Goals (ResNet-18 student, ResNet-50 teachers, 224 px): cached agre
<= 1.10x; agre-batch all <= 3.5x on an H100 (4.79x before the fast path); online / cached
agre-batch all >= 2x.

    python benchmarks/bench_distill.py [--image-size 224] [--batch-size 128] [--steps 20]
        [--student-arch resnet18] [--teacher-arch resnet50] [--repeats 2] [--skip-online]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.schema import CacheMeta  # noqa: E402
from core.constants import ARCHS  # noqa: E402
from core.files import save_checkpoint  # noqa: E402
from core.manifest import Manifest, make_entry  # noqa: E402
from core.models import FEATURE_DIMS, FeatureResNet, build_model  # noqa: E402
from core.runtime import autocast, cpu_model, keep_freed_memory, memory_format_for, pick_device  # noqa: E402
from core.weighting import agre_batch_weights_from_grads, kd_per_teacher  # noqa: E402
from data.pixels import Pixels  # noqa: E402
from data.store import store_size_for  # noqa: E402
from data.views import eval_box, render  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.data import SplitData, View, make_batch  # noqa: E402
from distill.student import Student  # noqa: E402
from distill.task import DistillTask, feature_loss  # noqa: E402
from distill.teachers import teacher_source  # noqa: E402

MODES = {"aver": dict(weighting="aver"), "agre": dict(weighting="agre"), "cached": dict(weighting="cached"),
         "batch-last": dict(weighting="agre-batch", agre_params="last"),
         "batch-layer4": dict(weighting="agre-batch", agre_params="layer4"),
         "batch-all": dict(weighting="agre-batch", agre_params="all")}
C = 2  # classes (Waterbirds)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the torch threads the steps use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def stand_in_meta(n: int, T: int, D: int, store_size: int, out_size: int) -> CacheMeta:
    """The header of a cache of n rows, T teachers on T backbones (the biased model on the first)."""
    teachers = [{"name": f"dfr{t}", "role": "teacher", "sha256": f"{t:064x}", "backbone_id": f"erm{t}"}
                for t in range(T)]
    teachers.append({"name": "erm0", "role": "biased", "sha256": "f" * 64, "backbone_id": "erm0"})
    return CacheMeta(
        num_classes=C, class_names=["landbird", "waterbird"], attr_names=["land", "water"],
        dataset="synthetic", dataset_options={}, dataset_fingerprint="0" * 64, teachers=teachers,
        backbone_ids=[f"erm{t}" for t in range(T)], backbone_of_teacher=list(range(T)), biased_backbone=0,
        view_spec={"random_views": 1, "out_size": out_size, "seed": 0, "scale": [0.7, 1.0],
                   "resize": "keep-aspect"},
        store_size=store_size, teachers_pretrained=False, layers=["layer4"], feature_dims={"layer4": D},
        num_samples=n, tau_cached=4.0)


def stand_in_split(n: int, store_size: int, T: int, D: int, device) -> SplitData:
    """n training rows seen through one stored view, as ``InMemorySplit`` holds them on ``device``:
    random pixels and teacher outputs (features float16 per backbone, as the cache stores them)."""
    g = torch.Generator().manual_seed(0)
    L = store_size
    images = Pixels.from_images(list(torch.randint(0, 256, (n, 3, L, L), generator=g, dtype=torch.uint8)))
    return SplitData(
        rows=torch.arange(n, device=device), images=images.to(device),
        y=torch.randint(0, C, (n,), generator=g).to(device),
        group=torch.zeros(n, dtype=torch.long, device=device),
        view=View(box=torch.tensor(eval_box()).repeat(n, 1).to(device),
                  flip=torch.zeros(n, dtype=torch.bool, device=device),
                  logits=(3 * torch.randn(n, T, C, generator=g)).to(device),
                  biased=(3 * torch.randn(n, C, generator=g)).to(device),
                  cached=torch.full((n, T), 1.0 / T, device=device),
                  feats={"layer4": torch.randn(n, T, D, generator=g).half().to(device)}))


def online_manifest(folder: Path, T: int, arch: str, image_size: int) -> Path:
    """A teachers manifest as ``teachers`` writes one: T random-initialised backbones, each with a
    teacher head file, and the biased model (the first backbone with its own head)."""
    models = []
    for t in range(T):
        torch.manual_seed(100 + t)
        state = FeatureResNet(arch, C).net.state_dict()
        save_checkpoint(state, folder / f"erm{t}.pt")
        head = {k: torch.randn_like(state[k]) * 0.01 for k in ("fc.weight", "fc.bias")}
        save_checkpoint(head, folder / f"dfr{t}_head.pt")
        models.append(make_entry(f"dfr{t}", "teacher", folder / f"erm{t}.pt", arch, C,
                                 head_file=folder / f"dfr{t}_head.pt", root=folder))
    models.append(make_entry("erm0", "biased", folder / "erm0.pt", arch, C, root=folder))
    man = Manifest(models=models, num_classes=C, image_size=image_size, pretrained=False, root=folder)
    return man.save(folder / "manifest.json")


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
    ap.add_argument("--student-arch", choices=ARCHS, default="resnet18")
    ap.add_argument("--teacher-arch", choices=ARCHS, default="resnet50",
                    help="the teachers' architecture: their feature width, and what the online step runs")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every command of cli.py does
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as distill.train does: fixed input size
    torch.manual_seed(0)
    B, T, S = args.batch_size, args.teachers, args.image_size
    D = FEATURE_DIMS[args.teacher_arch]["layer4"]
    meta = stand_in_meta(4 * B, T, D, store_size_for(S), S)
    data = stand_in_split(meta.num_samples, meta.store_size, T, D, device)
    order = torch.randperm(len(data.y))  # on the host, as distill.data.epoch_order gives it
    batches = itertools.cycle([order[s:s + B] for s in range(0, len(order) - B + 1, B)])
    cl = dict(memory_format=memory_format_for(device))
    base = dict(gamma=0.5, pretrained=False, student_arch=args.student_arch, batch_size=B, image_size=S)

    def config(**kw) -> DistillConfig:
        return DistillConfig(**base, **kw)

    student = Student(C, {"layer4": D}, arch=args.student_arch).to(device).to(**cl)
    cfg0 = config()
    sgd = dict(lr=cfg0.lr, momentum=cfg0.momentum, weight_decay=cfg0.weight_decay)  # as distill.train's
    opt = torch.optim.SGD(student.parameters(), **sgd)

    def task_step(cfg: DistillConfig):
        teachers = teacher_source(meta, cfg, S, device)
        task = DistillTask(cfg, teachers, device)
        return lambda: task.step(student, opt, make_batch(data, next(batches), 0, teachers, S, device))

    study_cfg = config(**MODES["batch-all"])
    study_teachers = teacher_source(meta, study_cfg, S, device)

    def study_loop():  # the study's code: T + 1 torch.autograd.grad calls, then the whole backward
        batch = make_batch(data, next(batches), 0, study_teachers, S, device)
        with autocast(device):
            logits, h, projected = student(batch.x.contiguous(**cl))
        logits = logits.float()
        params = student.agre_params("all")
        zt, zb = batch.teacher_logits, batch.biased_logits
        g_b = torch.autograd.grad(kd_per_teacher(logits, zb[:, None], study_cfg.tau).mean(), params,
                                  retain_graph=True)
        g_t = [torch.autograd.grad(l, params, retain_graph=True)
               for l in kd_per_teacher(logits, zt, study_cfg.tau).mean(0)]
        w = agre_batch_weights_from_grads(g_t, g_b, logits.dtype).unsqueeze(0).expand(len(batch.y), T)
        kd = (w * kd_per_teacher(logits, zt, study_cfg.tau)).sum(1).mean()  # alpha 1: no CE
        loss = kd + study_cfg.gamma * feature_loss(projected["layer4"], batch.teacher_feats["layer4"], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain = build_model(args.student_arch, C).to(device).to(**cl)
    popt = torch.optim.SGD(plain.parameters(), **sgd)

    def plain_step():  # the same rendering as make_batch, no teacher output
        idx = next(batches)
        x = render(data.images, data.view.box[idx].to(device), data.view.flip[idx].to(device), S, index=idx)
        with autocast(device):
            logits, _ = plain(x.contiguous(**cl), layers=())
        loss = F.cross_entropy(logits.float(), data.y[idx].to(device))
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    steps = {"plain": plain_step, **{m: task_step(config(**kw)) for m, kw in MODES.items()},
             "study-loop": study_loop}
    counts = {name: (args.steps, args.warmup) for name in steps}
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        if not args.skip_online:
            manifest = online_manifest(Path(tmp), T, args.teacher_arch, S)
            steps["online"] = task_step(config(**MODES["batch-all"], teachers_online=str(manifest)))
            counts["online"] = (max(2, args.steps // 4), 1)
        results = {}
        for _ in range(args.repeats):  # interleaved, so drift of a shared machine hits all alike
            for name, fn in steps.items():
                results.setdefault(name, []).append(timed(fn, *counts[name], device))
    best = {k: min(v) for k, v in results.items()}
    dev = device_name(device)
    online = f" (online: {counts['online'][0]})" if "online" in counts else ""
    print(f"device {dev}: student {args.student_arch}, {T} teachers {args.teacher_arch}, batch {B}, "
          f"image {S} px, gamma 0.5 on layer4, best of {args.repeats} interleaved passes of {args.steps} "
          f"steps{online}")
    for k, v in best.items():
        print(f"  {k:<13} step {1000 * v:9.1f} ms  ({B / v:8.1f} img/s)  {v / best['plain']:5.2f}x plain"
              f"  [{dev}]")
    print(f"cached agre / plain: {best['agre'] / best['plain']:.3f}x (goal <= 1.10x)  [{dev}]")
    print(f"agre-batch all / plain: {best['batch-all'] / best['plain']:.2f}x (goal <= 3.5x on an H100)"
          f"  [{dev}]")
    print(f"the study's loop / agre-batch all (fast path): {best['study-loop'] / best['batch-all']:.2f}x"
          f"  [{dev}]")
    if "online" in best:
        print(f"online / cached agre-batch all: {best['online'] / best['batch-all']:.2f}x (goal >= 2x); "
              f"online / cached agre: {best['online'] / best['agre']:.1f}x  [{dev}]")


if __name__ == "__main__":
    main()
