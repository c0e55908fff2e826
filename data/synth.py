"""Synthetic Waterbirds: the embedded default data set, written in the real on-disk layout.

Each image is a "bird" (the core feature: its shape, disc for landbirds and a diamond-shaped
"swan" with a neck for waterbirds, and a colour leaning warm or cool by class) pasted on a
"land" or "water" background (the spurious feature: colour and texture). Group sizes follow real
Waterbirds (Sagawa et al., 2020) scaled by ``scale``, so in training 95% of landbirds stand on
land and 95% of waterbirds on water, while validation and test are group-balanced per class. The
validation split can be drawn ``val_factor`` times larger than the others (to measure how the
error of a concept eraser fit on it falls with its rows: docs/results.md#the-demo; the default
keeps 1, as its teachers' DFR heads are fit on it): its extra images come after every other row,
so the training and test images, and the first validation images of each group, are those of
``val_factor`` 1, byte for byte.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ConfigError
from data.folders import SPLIT_CODES
from data.waterbirds import METADATA_COLUMNS

# Real Waterbirds group counts per split: (landbird/land, landbird/water, waterbird/land,
# waterbird/water), from metadata.csv of waterbird_complete95_forest2water2.
WATERBIRDS_COUNTS = {
    "train": (3498, 184, 56, 1057),
    "val": (467, 466, 133, 133),
    "test": (2255, 2255, 642, 642),
}


SPEC_FILE = "synth_spec.json"  # the spec a generated folder was made with, written before its metadata


@dataclass(frozen=True)
class SynthSpec:
    """Knobs of the generator; the defaults make the pipeline run in minutes on a 2-core CPU."""

    scale: float = 0.25          # fraction of the real group counts
    size: int = 48               # image side in pixels
    seed: int = 0
    bird_size: tuple[float, float] = (0.28, 0.42)  # bird extent as a fraction of the side
    core_noise: float = 0.0      # probability that a bird is drawn with the other class's shape
    colour_shift: float = 100.0  # class-dependent shift of the bird colour (0: colour carries no label)
    pixel_noise: float = 12.0    # std of per-pixel Gaussian noise (0-255 scale)
    independent: bool = False    # every split's four groups of one size: birds independent of
                                 # backgrounds (a "pretraining" set, as ImageNet precedes Waterbirds)
    val_factor: float = 1.0      # the validation split's size relative to the others' (scaled) counts

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError(f"scale must be > 0 (a fraction of the real group counts), got {self.scale}")
        if self.size < 8:
            raise ConfigError(f"image size must be at least 8 px, got {self.size}")
        if not self.val_factor > 0:
            raise ConfigError(f"val_factor must be > 0 (the validation split's relative size), "
                              f"got {self.val_factor}")


def group_counts(scale: float, independent: bool = False,
                 val_factor: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Scaled group counts; every group keeps at least one image per split. ``independent``: each
    split's images spread evenly over the four groups (class and background independent).
    ``val_factor``: the validation split's counts scaled by ``scale * val_factor``."""
    counts = {s: (sum(cs) / 4,) * 4 if independent else cs for s, cs in WATERBIRDS_COUNTS.items()}
    return {s: tuple(max(1, round(c * scale * (val_factor if s == "val" else 1.0))) for c in cs)
            for s, cs in counts.items()}


def _background(rng: np.random.Generator, place: int, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n] / n
    img = np.empty((n, n, 3), dtype=np.float32)
    if place == 1:  # water: blue, horizontal waves
        base = np.array([40, 90, 170]) + rng.normal(0, 15, 3)
        phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(10, 16)
        wave = np.sin(freq * yy * np.pi + phase + 2 * np.sin(3 * xx * np.pi))
        img[:] = base + 30 * wave[..., None] * np.array([0.3, 0.6, 1.0])
    else:  # land: green/brown, blotchy
        base = np.array([80, 120, 50]) + rng.normal(0, 15, 3)
        blot = sum(np.sin(rng.uniform(4, 9) * (xx * np.cos(a) + yy * np.sin(a)) * np.pi
                          + rng.uniform(0, 6.3)) for a in rng.uniform(0, np.pi, 3))
        img[:] = base + 18 * blot[..., None] * np.array([1.0, 0.7, 0.3])
    return img


def _bird_mask(rng: np.random.Generator, y: int, n: int, spec: SynthSpec) -> np.ndarray:
    side = rng.uniform(*spec.bird_size) * n
    cy, cx = rng.uniform(side / 2 + 1, n - side / 2 - 1, 2)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dy, dx = (yy - cy) / (side / 2), (xx - cx) / (side / 2)
    if y == 0:  # landbird: round body
        return dx ** 2 + dy ** 2 <= 1.0
    # waterbird: diamond body plus a vertical neck
    neck = (np.abs(dx - 0.35) <= 0.15) & (dy >= -1.0) & (dy <= 0.0)
    return (np.abs(dx) + np.abs(dy) * 1.6 <= 1.0) | neck


def render_image(rng: np.random.Generator, y: int, place: int, spec: SynthSpec) -> np.ndarray:
    """One synthetic image [size, size, 3] uint8."""
    n = spec.size
    img = _background(rng, place, n)
    shape = 1 - y if rng.random() < spec.core_noise else y
    mask = _bird_mask(rng, shape, n, spec)
    # Landbirds lean warm, waterbirds cool: a small-area cue that pooled features keep, so a
    # last layer re-trained on balanced data can find it even in a from-scratch backbone.
    colour = rng.uniform(90, 230, 3) + spec.colour_shift * np.array([1.0, 0.0, -1.0]) * (1 - 2 * y)
    img[mask] = colour
    img += rng.normal(0, spec.pixel_noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _spec_json(spec: SynthSpec) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def made_with(folder: str | Path, spec: SynthSpec) -> bool:
    """Whether ``folder`` holds a complete data set generated with ``spec``. A spec file written
    before a knob existed reads as that knob's default (the generator then made the same bytes)."""
    folder = Path(folder)
    try:
        stored = json.loads((folder / SPEC_FILE).read_text())
        return ((folder / "metadata.csv").is_file()
                and {**_spec_json(SynthSpec()), **stored} == _spec_json(spec))
    except (OSError, ValueError, TypeError):
        return False


def _rows(spec: SynthSpec) -> list[tuple[int, str, int, int]]:
    """``(index, split, y, place)`` of every image: the rows of ``val_factor`` 1 in order of split,
    then group (the index is the position there, and seeds the image), then the validation split's
    extra images per group, indexed after them; with ``val_factor`` < 1 each validation group keeps
    its first images."""
    base = group_counts(spec.scale, spec.independent)
    want = group_counts(spec.scale, spec.independent, spec.val_factor)["val"]
    rows, extra, idx = [], [], 0
    for split, counts in base.items():
        for group, count in enumerate(counts):
            y, place = divmod(group, 2)
            keep = min(count, want[group]) if split == "val" else count
            rows += [(idx + i, split, y, place) for i in range(keep)]
            idx += count
            if split == "val":
                extra += [(split, y, place)] * max(0, want[group] - count)
    return rows + [(idx + i, *r) for i, r in enumerate(extra)]


def generate(out: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write ``metadata.csv`` + PNG images under ``out`` (the real Waterbirds layout).

    Deterministic: the same spec gives the same bytes. Rows are ordered by split, then group,
    except the extra validation images of a ``val_factor`` above 1, which come last (``_rows``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; choose another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for idx, split, y, place in _rows(spec):
        rng = np.random.default_rng([spec.seed, idx])
        species = "waterbird" if y else "landbird"
        rel = f"images/{species}/{idx:06d}.png"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_image(rng, y, place, spec)).save(path, optimize=False)
        records.append({"img_id": idx + 1, "img_filename": rel, "y": y,
                        "split": SPLIT_CODES[split], "place": place,
                        "place_filename": f"/{'w/water' if place else 'l/land'}/{idx:06d}.png"})
    (out / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), sort_keys=True) + "\n")
    tmp = out / "metadata.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, out / "metadata.csv")  # metadata last: a folder with it is complete
    return out
