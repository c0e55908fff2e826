"""View presets: the eval view and recordable random crops, replayable at any stored resolution.

A view is a box ``(top, left, height, width)`` relative to an image as the store holds it
(:mod:`data.store`: resized so that its short side is S = 256 for 224 px views, keeping its
aspect ratio, or squashed to S x S), plus a horizontal-flip flag. View 0 is the eval view: the
central ``CenterCrop(224)`` of it, i.e. ``Resize(256)`` + ``CenterCrop(224)`` (the report's
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
import torch.nn.functional as F

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


def _random_box(rng: np.random.Generator, scale, ratio, aspect: float = 1.0) -> tuple[float, float, float, float]:
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


def sample_views(rows: np.ndarray, spec: ViewSpec, hw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
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
    aspect = np.ones(len(rows)) if hw is None else np.asarray(hw, dtype=np.float64)[:, 1] / np.asarray(hw)[:, 0]
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


def _axis_coords(start, length, out_size: int, size: int) -> torch.Tensor:
    # Bilinear resize without antialias samples source pixel (j + 0.5) * length / out - 0.5 inside
    # the crop, clamped to the crop (F.interpolate sees only the cropped pixels). Returned in
    # grid_sample's normalised coordinates (align_corners=False).
    j = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    src = j[None, :] * (length[:, None] / out_size) - 0.5
    src = torch.minimum(src.clamp(min=0), length[:, None] - 1) + start[:, None]
    return (2 * src + 1) / size - 1


def render(images: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, out_size: int,
           hw: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """Rebuild views from stored images in one batched op (CPU or GPU).

    Equals ``F.resized_crop(img, *pixel_box(box, (h, w)), [out, out], antialias=False)`` (+ hflip)
    for each sample, then ImageNet normalisation.

    Args:
        images: [B, 3, L, L] uint8 (or float in [0, 255]) stored images, each in the top-left
            (h, w) pixels of its L x L canvas.
        box: [B, 4] relative boxes (of the h x w image); flip: [B] bool.
        hw: [B, 2] (h, w) of each image; None: the whole canvas.
    Returns:
        [B, 3, out_size, out_size] float32.
    """
    b, _, size, size_w = images.shape
    if size != size_w:
        raise ValueError(f"stored canvases must be square, got {size}x{size_w}")
    hw = size if hw is None else hw.to(images.device, torch.float32)
    px = pixel_boxes(box.to(images.device, torch.float32), hw)
    gy = _axis_coords(px[:, 0], px[:, 2], out_size, size)           # [B, out]
    gx = _axis_coords(px[:, 1], px[:, 3], out_size, size)
    gx = torch.where(flip.to(images.device)[:, None], gx.flip(1), gx)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                      align_corners=False)
    if normalize:
        mean, std = _mean_std(x.device)
        x = (x - mean) / std
    return x


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a host-to-GPU copy every call would synchronise every step.
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std
