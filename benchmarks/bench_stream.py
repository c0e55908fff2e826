"""Benchmark: one distillation epoch in memory against one streamed, time and bytes read (issue 18).

For each data set (the demo cache, when it exists, and a generated CelebA-size set: 162,770 /
19,867 / 19,962 rows, K = 2 random views, layer4 of one backbone (D = 2048, float16), T = 5
teachers, C = 2, 10 x 8 px images, so the image store is ~49 MB), runs in one process,
interleaved (memory, stream, memory, stream, ...; the best of each counts), one training epoch
plus the validation pass of the distillation loop, built as ``distill.train._fit`` builds it
(``open_inputs``, ``load_split`` / ``StreamedSplit``, ``Slots``, ``Batches``, ``DistillTask``), and
prints per mode:

  - setup: opening the inputs and, in memory, loading the splits' images (once per run);
  - epoch s: reading the epoch's slot + ``train_one_epoch`` + ``evaluate`` on the validation split;
  - bytes read during the epoch: the ``rchar`` delta of /proc/self/io (every byte the process
    asked the kernel for, page-cache hits included: bytes requested), and the cache reader's
    own ``bytes_read`` counter;
  - bytes the epoch uses: its training images once, one slot of the training rows' teacher
    outputs (the fields and layers the run reads), the validation images once and the
    validation rows' eval view (box, flip); read / used; epoch time against the in-memory one.

Goals (issue 18): streamed epoch <= 1.1x the in-memory epoch on the CPU; bytes read by a
streamed epoch <= 1.3x what it uses.

The student is a tiny CNN by default (``--student tiny``: one 3x3 convolution, pooled, a linear
head and the layer4 adapter), so that an epoch over 162,770 rows takes seconds on a 2-core CPU
and what is measured is the data path; ``--student resnet18`` runs the tool's ResNet-18
(minutes per CelebA-size epoch on a CPU). Both modes must give the same loss bit for bit
(printed). The generated set is written once under ``--work`` and reused.

Like cli.py, it calls ``core.runtime.keep_freed_memory()`` first. Per pass it also prints the
epoch's CPU time (all threads) and minor page faults.

    python benchmarks/bench_stream.py [--max-rows 20000] [--repeats 2] [--student tiny|resnet18]
                                      [--threads N] [--demo-cache artifacts/default/cache.h5] [--skip-demo]
"""
from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.schema import RANDOM, EVAL, CacheMeta, store_path_for, view_datasets  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402
from core.distributed import Dist  # noqa: E402
from core.runtime import cpu_model, keep_freed_memory  # noqa: E402
from data.folders import SPLIT_CODES  # noqa: E402
from data.store import SCHEMA as STORE_SCHEMA, SCHEMA_VERSION as STORE_VERSION, _create  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.data import Batches, InMemorySplit, Slots, load_split, open_inputs, data_device  # noqa: E402
from distill.stream import StreamedSplit  # noqa: E402
from distill.student import Student  # noqa: E402
from distill.task import DistillTask  # noqa: E402
from distill.teachers import teacher_source  # noqa: E402
from distill.train import evaluate, train_one_epoch  # noqa: E402

CELEBA_SPLITS = (162_770, 19_867, 19_962)
MODES = ("memory", "stream")


# --------------------------------------------------------------------------------------------
# the machine and the counters

def machine() -> str:
    model = cpu_model()
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
            f"{torch.__version__}, h5py {h5py.__version__}; load average at start {load}")


def rchar() -> int:
    """Bytes this process (all its threads) asked read() / pread() for so far."""
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("rchar:"))


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


# --------------------------------------------------------------------------------------------
# the generated CelebA-size set

def _meta(n_rows: int, T: int, C: int, D: int, K: int, size: int, fingerprint: str) -> CacheMeta:
    teachers = [{"name": f"dfr{t}", "role": "teacher", "sha256": f"{t:064x}", "backbone_id": "erm0"} for t in range(T)]
    teachers.append({"name": "erm0", "role": "biased", "sha256": "f" * 64, "backbone_id": "erm0"})
    return CacheMeta(
        num_classes=C, class_names=["not_blond", "blond"][:C] + [f"c{i}" for i in range(2, C)],
        attr_names=["female", "male"], dataset="celeba", dataset_options={}, dataset_fingerprint=fingerprint,
        teachers=teachers, backbone_ids=["erm0"], backbone_of_teacher=[0] * T, biased_backbone=0,
        view_spec={"random_views": K, "out_size": size, "seed": 0, "scale": [0.7, 1.0], "resize": "keep-aspect"},
        store_size=size, teachers_pretrained=False, layers=["layer4"], feature_dims={"layer4": D},
        num_samples=n_rows, tau_cached=4.0)


def _write_store(path: Path, n: int, hw: tuple[int, int], fingerprint: str, size: int, seed: int) -> None:
    """An image store file laid out as ``data.store.build_store`` writes it (schema 3), filled
    with random pixels instead of decoded image files (200k PNGs would take long to decode)."""
    hws = np.tile(np.array(hw, np.int64), (n, 1))
    per = 3 * hw[0] * hw[1]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, n * per, dtype=np.uint8)
    digests = np.stack([np.frombuffer(hashlib.sha256(pixels[i * per:(i + 1) * per]).digest(), np.uint8)
                        for i in range(n)])
    with h5py.File(path, "w") as f:
        _create(f, dict(fingerprint=fingerprint, size=size, resize="keep-aspect"), hws, 0, n)
        f["pixels"][...] = pixels
        f["digest"][...] = digests
        f["done"][...] = True
    with h5py.File(path, "r") as f:  # as the store's reader will check
        assert f.attrs["schema"] == STORE_SCHEMA and int(f.attrs["schema_version"]) == STORE_VERSION


def make_celeba_set(work: Path, splits: tuple[int, int, int], K: int, T: int, C: int, D: int,
                    hw: tuple[int, int], seed: int = 0) -> Path:
    """cache.h5 + cache.images.h5 of a CelebA-like set (rows ordered train, val, test as CelebA's
    list_eval_partition is), reused when made before with the same settings."""
    spec = dict(splits=list(splits), K=K, T=T, C=C, D=D, hw=list(hw), seed=seed, version=1)
    name = "celeba_" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = work / name
    cache_path, done = folder / "cache.h5", folder / "made.json"
    if done.is_file() and json.loads(done.read_text()) == spec:
        return cache_path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    n = sum(splits)
    rng = np.random.default_rng(seed)
    split = np.repeat([SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]], splits)
    y = (rng.random(n) < 0.15).astype(np.int64)  # ~15% blond, as CelebA
    attr = rng.integers(0, 2, n)
    samples = {"id": [f"{i + 1:06d}.jpg" for i in range(n)], "y": y, "attr": attr, "group": 2 * y + attr,
               "split": split}
    fingerprint = "bench-stream-" + name
    size = min(hw)
    meta = _meta(n, T, C, D, K, size, fingerprint)
    _write_store(store_path_for(cache_path), n, hw, fingerprint, size, seed)
    # features: a random block of post-ReLU-like float16 vectors, shifted per chunk (writing 2 GB
    # of fresh normals would dominate the set-up on a small CPU)
    block = np.abs(rng.standard_normal((4096, 1, D), dtype=np.float32)).astype(np.float16)
    train_pos = np.concatenate([[0], np.cumsum(split == SPLIT_CODES["train"])])

    def view(m: int, lead: tuple, k: int) -> dict:
        r = np.random.default_rng(seed * 1000 + k)
        top, left = r.uniform(0, 0.15, (2, *lead, m))
        side = r.uniform(0.7, 0.85, (*lead, m))
        reps = -(-m // len(block))
        feats = np.tile(block, (reps, 1, 1))[:m] + np.float16(0.01 * (k % 97))
        return {"box": np.stack([top, left, side, side], -1).astype(np.float32),
                "flip": r.random((*lead, m)) < 0.5,
                "logits": r.normal(size=(*lead, m, T, C)).astype(np.float32),
                "biased": r.normal(size=(*lead, m, C)).astype(np.float32),
                "weights": np.full((*lead, m, T), 1.0 / T, np.float32),
                "features": {"layer4": np.ascontiguousarray(np.broadcast_to(feats, (*lead, m, 1, D)))}}

    with CacheWriter.create_or_resume(cache_path, meta, samples, compression=None) as w:
        for i, (a, b) in enumerate(w.pending_chunks(8192)):
            nt = int(train_pos[b] - train_pos[a])
            ev = view(b - a, (), 2 * i)
            rnd = view(nt, (K,), 2 * i + 1) if nt and K else None
            w.write_rows(a, b, eval=ev, random=rnd)
        w.finalize()
    done.write_text(json.dumps(spec))
    print(f"  generated {cache_path} ({mib(cache_path.stat().st_size)}) and its store "
          f"({mib(store_path_for(cache_path).stat().st_size)}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return cache_path


# --------------------------------------------------------------------------------------------
# the students

class TinyStudent(nn.Module):
    """The Student interface (``forward -> (logits, h, {layer: P h})``) at a tiny cost: one 3x3
    convolution, global average pool, a linear head and one bias-free adapter per layer."""

    def __init__(self, num_classes: int, teacher_dims: dict[str, int], width: int = 16):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
        self.adapters = nn.ModuleDict({l: nn.Linear(width, d, bias=False) for l, d in teacher_dims.items()})

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(h), h, {l: a(h) for l, a in self.adapters.items()}


def student(kind: str, C: int, dims: dict) -> nn.Module:
    return TinyStudent(C, dims) if kind == "tiny" else Student(C, dims, pretrained=False)


# --------------------------------------------------------------------------------------------
# one epoch in one mode

def bytes_used(cache, store, slots: Slots, val) -> dict:
    """What one epoch uses: train images once, one slot of the training rows' teacher outputs
    (the fields and layers the run reads), validation images once + their eval view (box, flip)."""
    meta, Rt = cache.meta, len(cache.train_rows)
    part = RANDOM if meta.random_views > 0 else EVAL
    names = view_datasets(meta, part)
    f = h5py.File(cache.path, "r")
    try:
        per_row = sum(int(np.prod(f[names[k]].shape[2 if part == RANDOM else 1:])) * f[names[k]].dtype.itemsize
                      for k in list(slots.fields) + [f"features/{l}" for l in slots.layers])
        eval_names = view_datasets(meta, EVAL)
        view0 = sum(int(np.prod(f[eval_names[k]].shape[1:])) * f[eval_names[k]].dtype.itemsize
                    for k in ("box", "flip"))
    finally:
        f.close()
    train_rows = cache.train_rows + cache.row_start
    val_rows = cache.split_rows("val") + cache.row_start
    out = {"train images": store.nbytes_of(train_rows), "slot": per_row * Rt,
           "val images": store.nbytes_of(val_rows), "val view 0": view0 * len(val_rows)}
    out["total"] = sum(out.values())
    return out


def run_mode(cache_path: str, mode: str, args, out_dir: str) -> dict:
    cfg = DistillConfig(cache=cache_path, out=out_dir, gamma=0.5, weighting="aver", epochs=1,
                        batch_size=args.batch_size, image_size=args.image_size, data_mode=mode,
                        pretrained=False, device="cpu", seed=42)
    gc.collect()
    io0, t0 = rchar(), time.perf_counter()
    cache, store = open_inputs(cfg)
    meta, device = cache.meta, torch.device("cpu")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    image_size = cfg.image_size or meta.out_size
    if mode == "stream":
        place = data_device(device, 0)
        train, val = (StreamedSplit(cache, store, s, device) for s in ("train", "val"))
    else:
        place = data_device(device, 0)
        train, val = (InMemorySplit(load_split(cache, store, s, place)) for s in ("train", "val"))
    slots = Slots(cache, cfg.needs, place, sample_views=cfg.sample_views, epochs=cfg.epochs)
    train_counts = torch.bincount(train.group.cpu(), minlength=meta.num_groups).numpy()
    teachers = teacher_source(meta, cfg, image_size, device)
    batches = Batches(train, slots, teachers, image_size, device, seed=cfg.seed, batch_size=cfg.batch_size,
                      epochs=cfg.epochs, dist=Dist())
    task = DistillTask(cfg, teachers, device, Dist())
    model = student(args.student, meta.num_classes, {l: teachers.feature_dims[l] for l in cfg.active_layers})
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    setup_s, setup_read, cache0 = time.perf_counter() - t0, rchar() - io0, cache.bytes_read

    io1, t1, cpu1 = rchar(), time.perf_counter(), time.process_time()
    flt1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    slots.view(0)  # read here to time it; the epoch's batches see the slot held
    t_slot = time.perf_counter() - t1
    tr = train_one_epoch(model, functools.partial(task.step, model, opt), batches, 0)
    t_train = time.perf_counter() - t1 - t_slot
    vm = evaluate(model, val, image_size, device, train_counts)
    epoch_s, cpu_s = time.perf_counter() - t1, time.process_time() - cpu1
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt1
    epoch_read, cache_read = rchar() - io1, cache.bytes_read - cache0
    used = bytes_used(cache, store, slots, val)
    batches.close()
    cache.close()
    store.close()
    return {"mode": mode, "setup_s": setup_s, "setup_read": setup_read, "epoch_s": epoch_s, "slot_s": t_slot,
            "train_s": t_train, "cpu_s": cpu_s, "faults": faults, "val_s": epoch_s - t_slot - t_train, "read": epoch_read, "cache_read": cache_read,
            "used": used, "loss": tr["loss"], "val_wga": vm["wga"],
            "rows": (len(train), len(val)), "image_size": image_size}


def bench(title: str, cache_path: str, args) -> None:
    print(f"\n== {title}: {cache_path}", flush=True)
    results: dict[str, list] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        for rep in range(args.repeats):  # interleaved: drift of a shared machine hits both alike
            for mode in MODES:
                r = run_mode(cache_path, mode, args, os.path.join(tmp, f"{mode}{rep}"))
                results[mode].append(r)
                print(f"  pass {rep + 1} {mode:<6}: setup {r['setup_s']:6.2f} s, epoch {r['epoch_s']:6.2f} s "
                      f"(slot {r['slot_s']:.2f} + train {r['train_s']:.2f} + val {r['val_s']:.2f}), "
                      f"read {mib(r['read'])}; CPU {r['cpu_s']:.2f} s, {r['faults']:,} minor page faults", flush=True)
    best = {m: min(rs, key=lambda r: r["epoch_s"]) for m, rs in results.items()}
    mem = best["memory"]
    u = mem["used"]
    n_train, n_val = mem["rows"]
    print(f"  {n_train:,} training rows, {n_val:,} validation rows, {mem['image_size']} px views, batch "
          f"{args.batch_size}, student {args.student}; an epoch uses {mib(u['total'])}: "
          + ", ".join(f"{k} {mib(v)}" for k, v in u.items() if k != "total"))
    head = ("mode", "setup s", "setup read", "epoch s", "bytes read", "(cache ctr)", "bytes used", "read/used",
            "vs memory")
    rows = []
    for m in MODES:
        r = best[m]
        rows.append((m, f"{r['setup_s']:.2f}", mib(r["setup_read"]), f"{r['epoch_s']:.2f}", mib(r["read"]),
                     mib(r["cache_read"]), mib(r["used"]["total"]), f"{r['read'] / r['used']['total']:.2f}x",
                     f"{r['epoch_s'] / mem['epoch_s']:.2f}x"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    s = best["stream"]
    same = all(r["loss"] == mem["loss"] for rs in results.values() for r in rs)
    print(f"  final training loss: memory {mem['loss']!r}, stream {s['loss']!r} -> "
          f"{'equal in every pass' if same else 'DIFFERENT'}; val WGA {mem['val_wga']:.4f} / {s['val_wga']:.4f}")
    t_ratio, b_ratio = s["epoch_s"] / mem["epoch_s"], s["read"] / s["used"]["total"]
    print(f"  goals: streamed epoch {t_ratio:.2f}x the in-memory one (goal <= 1.10x: "
          f"{'met' if t_ratio <= 1.1 else 'missed'}); streamed bytes read {b_ratio:.2f}x used (goal <= 1.30x: "
          f"{'met' if b_ratio <= 1.3 else 'missed'})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-cache", default="artifacts/default/cache.h5")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-celeba", action="store_true")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="subsample the CelebA-size set to about this many rows (same split shares)")
    ap.add_argument("--views", type=int, default=2, help="K random views of the generated set")
    ap.add_argument("--teachers", type=int, default=5)
    ap.add_argument("--feature-dim", type=int, default=2048)
    ap.add_argument("--hw", default="10,8", help="height,width of the generated images")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=None, help="student input; default the cache's view size")
    ap.add_argument("--student", choices=("tiny", "resnet18"), default="tiny")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved passes per mode; the best counts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default torch's); on an oversubscribed CPU 2 threads made the "
                         "in-memory steps cost 5-8x the CPU of the same steps at 1 thread")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_stream"),
                    help="where the generated set is written (and reused)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as every command of cli.py does (else glibc hands batch buffers back)
    print(f"machine: {machine()}; glibc keeps freed memory: {kept}")
    demo = Path(args.demo_cache)
    if args.skip_demo:
        pass
    elif demo.is_file():
        bench("demo cache", str(demo), args)
    else:
        print(f"\n== demo cache: {demo} not found; skipped (make it with `python cli.py precompute`, "
              "or pass --demo-cache PATH)")
    if not args.skip_celeba:
        splits = CELEBA_SPLITS
        if args.max_rows:
            f = min(1.0, args.max_rows / sum(CELEBA_SPLITS))
            splits = tuple(max(2, round(n * f)) for n in CELEBA_SPLITS)
        hw = tuple(int(v) for v in args.hw.split(","))
        path = make_celeba_set(Path(args.work), splits, args.views, args.teachers, 2, args.feature_dim, hw)
        bench(f"generated CelebA-size set ({' / '.join(f'{n:,}' for n in splits)} rows, K = {args.views}, "
              f"T = {args.teachers}, layer4 D = {args.feature_dim}, {hw[0]}x{hw[1]} px)", str(path), args)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
