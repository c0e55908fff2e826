"""Benchmark: the image store at its images' own size (schema 3) against the v2 L x L canvases.

Writes a folder of CUB-like JPEGs (Waterbirds: mostly 500x375 and 375x500, some near-square, a
few beyond 2:1), builds the store for 224 px views (S = 256) and for 24 px views (S = 27), then
prints side by side in one run:
  - bytes per image on disk and in memory, against the resized images' own bytes (3 * h * w),
    for this store and for the v2 canvases it replaces (N * 3 * L * L, L the longest side);
  - a streamed read of random single images: bytes read per image byte and MB/s, for the store's
    contiguous pixels (with and without its sha256 check) and for a 16 KiB-chunked fletcher32
    flat buffer (the alternative measured before choosing);
  - render of B = 128 views: v2 (canvases + grid_sample) against the gather on Pixels, at 24 and
    224 px, and Pixels[idx] of 128 / 512 images.

    python benchmarks/bench_store.py [--images 200] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtime import keep_freed_memory  # noqa: E402
from data.folders import Metadata, fingerprint  # noqa: E402
from data.store import ImageStore, Pixels, build_store, store_size_for  # noqa: E402
from data.views import ViewSpec, pixel_boxes, render, sample_views  # noqa: E402

# (width, height) and share: Waterbirds' CUB images are mostly 500 px on the long side
CUB_LIKE = [((500, 375), 0.40), ((375, 500), 0.25), ((500, 333), 0.10), ((400, 400), 0.10),
            ((500, 470), 0.08), ((600, 250), 0.04), ((500, 200), 0.03)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def make_folder(root: Path, n: int) -> Metadata:
    rng = np.random.default_rng(0)
    sizes, shares = zip(*CUB_LIKE)
    pick = rng.choice(len(sizes), n, p=np.array(shares) / sum(shares))
    root.mkdir(parents=True)
    names = []
    for i, k in enumerate(pick):
        w, h = sizes[k]
        # smooth content (JPEG-friendly) plus noise: decoding cost like a photo's
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (c + 1) + yy * (3 - c) + 40 * i) % 256 for c in range(3)], -1)
        img = (img + rng.integers(0, 24, img.shape)).clip(0, 255).astype(np.uint8)
        names.append(f"{i:04d}.jpg")
        Image.fromarray(img).save(root / names[-1], quality=90)
    return Metadata(root=root, filenames=np.array(names), y=np.arange(n) % 2, attr=(np.arange(n) // 2) % 2,
                    split=np.zeros(n, np.int64))


def old_render(images, box, flip, out_size, hw):
    """The v2 render: canvases [B, 3, L, L] + grid_sample (copied from data/views.py before v3)."""
    b, _, size, _ = images.shape
    hw = hw.to(images.device, torch.float32)
    px = pixel_boxes(box.to(images.device, torch.float32), hw)

    def coords(start, length):
        j = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
        src = j[None, :] * (length[:, None] / out_size) - 0.5
        src = torch.minimum(src.clamp(min=0), length[:, None] - 1) + start[:, None]
        return (2 * src + 1) / size - 1

    gy, gx = coords(px[:, 0], px[:, 2]), coords(px[:, 1], px[:, 3])
    gx = torch.where(flip.to(images.device)[:, None], gx.flip(1), gx)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def canvases(pixels: Pixels, side: int) -> torch.Tensor:
    out = torch.zeros(len(pixels), 3, side, side, dtype=torch.uint8)
    for i in range(len(pixels)):
        im = pixels.image(i)
        out[i, :, :im.shape[1], :im.shape[2]] = im
    return out


def best_of(fns, repeats: int, device) -> list[float]:
    """Best time of each of ``fns``, run interleaved (a busy machine slows them alike)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


def random_reads(store: ImageStore, rows, check: bool, repeats: int = 3) -> tuple[float, float]:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for r in rows:
            store.load([r], check=check)
        best = min(best, time.perf_counter() - t)
    return store.nbytes_of(rows) / best / 1e6, 1.0  # contiguous: reads its bytes only


def chunked_reads(path: Path, pixels: Pixels, rows, chunk: int) -> tuple[float, float]:
    with h5py.File(path, "w") as f:
        f.create_dataset("pixels", data=pixels.flat.numpy(), chunks=(chunk,), fletcher32=True)
    off, size = pixels.offset.numpy(), pixels.sizes()
    touched = sum(((o + s - 1) // chunk - o // chunk + 1) * chunk for o, s in zip(off[rows], size[rows]))
    with h5py.File(path, "r", rdcc_nbytes=0) as f:  # no chunk cache: a stream of random images
        ds, dt = f["pixels"], float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for r in rows:
                ds[off[r]:off[r] + size[r]]
            dt = min(dt, time.perf_counter() - t)
    return size[rows].sum() / dt / 1e6, touched / size[rows].sum()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a "
                    "shared CPU, 1 keeps other processes from stalling every op's thread barrier")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every command of cli.py does (else each batch page-faults its buffers again)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        meta = make_folder(tmp / "cub_like", args.images)
        fp = fingerprint(meta)
        stores = {}
        print(f"\n{args.images} CUB-like images; bytes per image / the resized image's own bytes (3*h*w):")
        print(f"{'views':>6} {'S':>4} {'L':>4} {'own KiB/img':>12} {'v3 disk':>8} {'v3 memory':>10} {'v2 canvas':>10}")
        for out in (224, 24):
            S = store_size_for(out)
            t = time.perf_counter()
            path = build_store(meta, tmp / f"store_{S}.h5", S, fp, workers=4, progress=False)
            build_s = time.perf_counter() - t
            store = ImageStore(path, fp, S)
            pixels = store.load_all()
            own = store.nbytes
            canvas = len(meta) * 3 * store.side ** 2
            stores[out] = (store, pixels)
            print(f"{out:>6} {S:>4} {store.side:>4} {own / len(meta) / 1024:>12.1f} {path.stat().st_size / own:>8.3f} "
                  f"{pixels.nbytes / own:>10.3f} {canvas / own:>10.3f}   (built in {build_s:.1f} s)")

        store, pixels = stores[224]
        rows = np.random.default_rng(1).permutation(len(meta))
        print("\nstreamed read of random single images (S = 256; page cache warm): MB/s, bytes read / image bytes")
        for name, (mbs, amp) in [("v3 contiguous, sha256 checked", random_reads(store, rows, True)),
                                 ("v3 contiguous, unchecked", random_reads(store, rows, False)),
                                 ("16 KiB chunks, fletcher32", chunked_reads(tmp / "c16.h5", pixels, rows, 16384)),
                                 ("32 KiB chunks, fletcher32", chunked_reads(tmp / "c32.h5", pixels, rows, 32768))]:
            print(f"  {name:<32} {mbs:8.0f} MB/s   {amp:.3f}x")

        B = args.batch_size
        print(f"\nrender B = {B} (best of {args.repeats}), ms: v2 canvas + grid_sample vs v3 gather on Pixels")
        for out in (24, 224):
            store, pixels = stores[out]
            idx = torch.from_numpy(np.random.default_rng(2).integers(0, len(meta), B))
            box, flip = sample_views(idx.numpy(), ViewSpec(random_views=1, out_size=out), store.hw[idx.numpy()])
            box, flip = torch.from_numpy(box[:, 1]).to(device), torch.from_numpy(flip[:, 1]).to(device)
            canv = canvases(pixels, store.side)[idx].to(device)
            hw = torch.from_numpy(store.hw[idx.numpy()]).to(device)
            batch = pixels[idx].to(device)
            old, new = best_of([lambda: old_render(canv, box, flip, out, hw),
                                lambda: render(batch, box, flip, out, normalize=False)], args.repeats, device)
            diff = (old_render(canv, box, flip, out, hw) - render(batch, box, flip, out, normalize=False)).abs().max()
            print(f"  out {out:>3}: v2 {1e3 * old:8.1f}   v3 {1e3 * new:8.1f}   v3/v2 {new / old:5.2f}x   "
                  f"batch bytes v2 {canv.numel() / 2**20:6.1f} MiB, v3 {batch.nbytes / 2**20:6.1f} MiB   "
                  f"max |v3 - v2| {diff:.1e} (v2's own coordinate rounding)")
        store, pixels = stores[224]
        on = pixels.to(device)
        for n in (128, 512):
            idx = torch.from_numpy(np.random.default_rng(3).integers(0, len(meta), n))
            t, = best_of([lambda: on[idx]], args.repeats, device)
            print(f"  Pixels[idx] of {n} images (S = 256): {1e3 * t:.2f} ms")


if __name__ == "__main__":
    main()
