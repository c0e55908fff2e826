"""View presets: the eval view and recordable random crops, replayable at any stored resolution.

A view is a box ``(top, left, height, width)`` relative to an image as the store holds it
(:mod:`data.store`: resized so that its short side is S = 256 for 224 px views, keeping its
aspect ratio, or squashed to S x S), plus a horizontal-flip flag. View 0 is the eval view: the
central ``CenterCrop(224)`` of it, i.e. ``Resize(256)`` + ``CenterCrop(224)`` (the study's
evaluation) or ``Resize((256, 256))`` + ``CenterCrop(224)`` (DFR's). Views 1..K are
``RandomResizedCrop(scale=(0.7, 1), ratio=(3/4, 4/3))`` + flip of the whole stored image (area
and aspect ratio in its pixels, as torchvision draws them), from a generator seeded per (seed,
sample row, view), so any shard or any resolution replays the same views.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE = 256
EVAL_CROP = 224


@dataclass(frozen=True)
class ViewSpec:
    """How views are drawn and rendered; stored in the cache so a reader can replay them."""

    random_views: int = 0            # K random views besides the eval view (view 0)
    out_size: int = EVAL_CROP        # rendered view side in pixels
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    resize: str = "keep-aspect"      # how the store resized the images (data.store.RESIZE_MODES)
    random_rows: str = "train"       # the rows given random views; the others' views 1..K are view 0

    def to_dict(self) -> dict:
        return asdict(self)


def eval_box() -> tuple[float, float, float, float]:
    """Relative box of CenterCrop(224) after Resize((256, 256)) (a square image)."""
    side = EVAL_CROP / EVAL_RESIZE
    off = (1.0 - side) / 2
    return (off, off, side, side)


def eval_boxes(hw: np.ndarray, out_size: int) -> np.ndarray:
    """[n, 4] relative boxes of ``CenterCrop(out_size)`` on stored images of [n, 2] (height,
    width) pixels, with torchvision's rounding of the offsets (``int(round((h - out) / 2))``), so
    that :func:`pixel_boxes` gives back exactly its pixel crop."""
    hw = np.asarray(hw, dtype=np.float64).reshape(-1, 2)
    crop = np.minimum(out_size, hw)
    offset = np.array([[int(round((n - c) / 2.0)) for n, c in zip(row, crow)] for row, crow in zip(hw, crop)])
    return np.concatenate([offset / hw, crop / hw], axis=1).astype(np.float32).reshape(-1, 4)


def _random_box(rng: np.random.Generator, scale, ratio,
                aspect: float = 1.0) -> tuple[float, float, float, float]:
    # RandomResizedCrop.get_params in relative units of an image of aspect ratio W / H: area
    # fraction in scale, log-uniform aspect ratio of the crop in pixels, ten tries, then the
    # whole image clamped to the ratio range as fallback.
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(*log_r))
        w, h = math.sqrt(area * r / aspect), math.sqrt(area * aspect / r)
        if 0 < w <= 1 and 0 < h <= 1:
            return (rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w)
    if aspect < ratio[0]:
        w, h = 1.0, aspect / ratio[0]
    elif aspect > ratio[1]:
        w, h = ratio[1] / aspect, 1.0
    else:
        w, h = 1.0, 1.0
    return ((1 - h) / 2, (1 - w) / 2, h, w)


def sample_views(rows: np.ndarray, spec: ViewSpec,
                 hw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and flips for dataset rows.

    Args:
        rows: [N] dataset rows (they seed the random views).
        hw: [N, 2] (height, width) of the stored images; None for square images (squashed), whose
            eval view is :func:`eval_box`.
    Returns:
        box [N, K+1, 4] float32 (top, left, height, width), flip [N, K+1] bool; view 0 is the
        eval view (never flipped).
    """
    rows = np.asarray(rows, dtype=np.int64)
    box = np.empty((len(rows), spec.random_views + 1, 4), dtype=np.float32)
    flip = np.zeros((len(rows), spec.random_views + 1), dtype=bool)
    box[:, 0] = eval_box() if hw is None else eval_boxes(hw, spec.out_size)
    aspect = (np.ones(len(rows)) if hw is None
              else np.asarray(hw, dtype=np.float64)[:, 1] / np.asarray(hw)[:, 0])
    for i, row in enumerate(rows):
        for v in range(1, spec.random_views + 1):
            rng = np.random.default_rng([spec.seed, int(row), v])
            box[i, v] = _random_box(rng, spec.scale, spec.ratio, float(aspect[i]))
            flip[i, v] = rng.random() < 0.5
    return box, flip


def pixel_box(box, size) -> tuple[int, int, int, int]:
    """Integer (top, left, height, width) of a relative box on an image of ``size`` pixels (an
    int for a square image, or (height, width))."""
    H, W = (size, size) if np.isscalar(size) else size
    top, left, h, w = (float(b) for b in box)
    hp = min(H, max(1, round(h * H)))
    wp = min(W, max(1, round(w * W)))
    tp = min(H - hp, max(0, round(top * H)))
    lp = min(W - wp, max(0, round(left * W)))
    return tp, lp, hp, wp


def pixel_boxes(box: torch.Tensor, hw) -> torch.Tensor:
    """Vectorised ``pixel_box``: [B, 4] relative -> [B, 4] integer-valued float (t, l, h, w), on
    images of ``hw`` pixels: an int (square) or a [B, 2] tensor of (height, width)."""
    if not torch.is_tensor(hw) or hw.dim() == 0:
        hw = torch.full((box.shape[0], 2), float(hw), dtype=box.dtype, device=box.device)
    hw = hw.to(box.device, box.dtype)
    size = torch.round(box[:, 2:] * hw).clamp(min=1)
    size = torch.minimum(size, hw)
    tl = torch.minimum(torch.round(box[:, :2] * hw).clamp(min=0), hw - size)
    return torch.cat([tl, size], dim=1)


def _axis_taps(start, length, out_size: int):
    """Bilinear taps along one axis of ``F.interpolate(crop, out_size, bilinear,
    align_corners=False)`` on crops [start, start + length) of a [B] batch, as PyTorch computes
    them (``area_pixel_compute_source_index`` and ``guard_index_and_lambda``, in float32): source
    ``(j + 0.5) * (length / out) - 0.5`` (rounded once, as the kernel's fused multiply-add does),
    clamped at 0, taps i0 = floor (at most length - 1) and
    i1 = min(i0 + 1, length - 1), weight of i1 ``lam``. Returned as absolute int64 indices
    ``start + i`` and float32 weights (1 - lam, lam), each [B, out]."""
    j = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    scale = (length / out_size).double()  # float32 scale; product and shift rounded once (an FMA)
    src = (scale[:, None] * j.double()[None, :] - 0.5).float().clamp(min=0)
    last = (length - 1)[:, None]
    i0 = torch.minimum(src.floor(), last)
    lam = (src - i0).clamp(0, 1)
    i1 = torch.minimum(i0 + 1, last)
    s = start[:, None]
    return (i0 + s).long(), (i1 + s).long(), 1 - lam, lam


PIXEL_BLOCK = 1 << 20  # output pixels rendered at a time: bounds the index and blend tensors (~100 MB)


def _as_flat(images, hw, index):
    """(flat HWC buffer, first pixel [B], pixels per row [B], (h, w) [B, 2] float, the width of the
    buffer's last image) of Pixels (the images ``index`` of them, or all), or of [B, 3, H, W]
    canvases holding images of ``hw`` [B, 2] in their top-left corner (``hw`` None: the whole
    canvas; the canvases are made pixel-interleaved, a copy)."""
    if hasattr(images, "flat"):  # data.pixels.Pixels: drawn from in place, no copy of the images
        dev = images.flat.device
        hwl, first = images.hw.to(dev), images.offset.to(dev) // 3
        if index is not None:
            pick = index.to(dev)
            hwl, first = hwl[pick], first[pick]
        last_width = int(images._hw[-1, 1]) if len(images._hw) else 2
        return images.flat, first, hwl[:, 1], hwl.float(), last_width
    if index is not None:
        raise ValueError("render: index selects among Pixels only; index the canvases instead")
    b, _, H, W = images.shape
    dev = images.device
    flat = images.permute(0, 2, 3, 1).contiguous().reshape(-1)
    hw = torch.tensor([[H, W]], device=dev, dtype=torch.float32).expand(b, 2) if hw is None else \
        hw.to(dev, torch.float32)
    return flat, torch.arange(b, device=dev) * (H * W), torch.full((b,), W, device=dev), hw, W


def render(images, box: torch.Tensor, flip: torch.Tensor, out_size: int, hw: torch.Tensor | None = None,
           normalize: bool = True, index: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild views from stored images in one batched gather (CPU or GPU).

    Equals ``F.resized_crop(img, *pixel_box(box, (h, w)), [out, out], antialias=False)`` (+ hflip)
    for each sample, then ImageNet normalisation. The images are pixel-interleaved (HWC); each
    output pixel gathers its two source rows as two 6-byte windows (pixels x0 and x0 + 1, all
    three channels) and blends them in float32 in the order PyTorch's kernel does, so the two
    differ by float32 rounding only. Rendered in blocks of images of ``PIXEL_BLOCK`` output pixels.

    Args:
        images: :class:`data.pixels.Pixels` (each image its own h x w), or [B, 3, L, L'] uint8
            (or float in [0, 255]) canvases, each image in its top-left ``hw`` pixels.
        box: [B, 4] relative boxes (of the h x w image); flip: [B] bool.
        hw: [B, 2] (h, w) of each canvas's image (None: the whole canvas); Pixels carry their own.
        index: [B] the Pixels images to draw (None: all, B = len(images)), drawn where they are:
            the result of ``render(images[index], ...)`` without the copy.
    Returns:
        [B, 3, out_size, out_size] float32 on the images' device.
    """
    flat, first, row, hwf, last_width = _as_flat(images, hw, index)
    dev, b = flat.device, first.shape[0]
    if last_width < 2:  # the buffer's last pixel, of a 1-pixel-wide image, starts a window: pad it
        flat = torch.cat([flat, flat.new_zeros(3)])
    npix = flat.numel() // 3
    # window k: pixels k and k + 1 (6 bytes), a view (no copy)
    windows = flat.as_strided((max(npix - 1, 0), 6), (3, 1), flat.storage_offset())
    px = pixel_boxes(box.to(dev, torch.float32), hwf)
    y0, y1, wy0, wy1 = _axis_taps(px[:, 0], px[:, 2], out_size)       # [B, out]
    x0, x1, wx0, wx1 = _axis_taps(px[:, 1], px[:, 3], out_size)
    # x taps as one window each: at a crop's edge (x1 == x0) the window ends at x0 (or starts
    # there, in column 0) and the pixel's whole weight moves onto it
    edge = x1 == x0
    left = edge & (x0 > 0)
    xs = x0 - left.long()
    ws = wx0 + wx1
    wa = torch.where(edge, torch.where(left, torch.zeros_like(ws), ws), wx0)
    wb = torch.where(edge, torch.where(left, ws, torch.zeros_like(ws)), wx1)
    f = flip.to(dev)[:, None]
    xs, wa, wb = (torch.where(f, t.flip(1), t) for t in (xs, wa, wb))
    rows = torch.stack([first[:, None] + y * row[:, None] for y in (y0, y1)], 1)  # [B, 2, out] tap rows
    wa, wb = wa[:, None, None, None, :], wb[:, None, None, None, :]                 # [B, 1, 1, 1, out]
    wy0, wy1 = wy0[:, None, :, None], wy1[:, None, :, None]                         # [B, 1, out, 1]
    out = torch.empty(b, 3, out_size, out_size, device=dev, dtype=torch.float32)
    step = max(1, PIXEL_BLOCK // (2 * out_size * out_size))
    for s in range(0, b, step):
        e = min(b, s + step)
        t = _taps(windows, rows[s:e], xs[s:e], wa[s:e], wb[s:e])         # [n, 2, 3, out, out]
        torch.add(t[:, 0].mul_(wy0[s:e]), t[:, 1].mul_(wy1[s:e]), out=out[s:e])
    if normalize:
        mean, std = _mean_std(dev)
        out.sub_(mean).div_(std)
    return out


def _taps(windows, rows, xs, wa, wb) -> torch.Tensor:
    # both tap rows of every output pixel, each blended along x: p(x0) * (1 - lam) + p(x1) * lam;
    # the gathered [n, 2, out, out, 6] bytes are made planar ([n, 2, 6, out, out] float32, one
    # pass) so that the blend runs along contiguous rows
    n, _, out = rows.shape
    idx = (rows[:, :, :, None] + xs[:, None, None, :]).reshape(-1)
    p = windows.index_select(0, idx).view(n, 2, out, out, 6).permute(0, 1, 4, 2, 3)
    q = torch.empty(n, 2, 6, out, out, device=p.device, dtype=torch.float32).copy_(p)
    return q[:, :, :3].mul_(wa).add_(q[:, :, 3:].mul_(wb))


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a host-to-GPU copy every call would synchronise every step.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std
