"""Group-annotated image folders: the metadata every stage reads, whatever layout it came from.

A data set is rows of (image file, class ``y``, spurious attribute ``attr``, split). Its group is
``y * A + attr`` for A attribute values (Waterbirds: ``2 * y + place``), named
``"<class>/<attribute>"``. Row ``i`` of the metadata is index ``i`` everywhere (store, cache).
The layouts it can read (``DATASETS``) are parsed by one module each: :mod:`data.waterbirds`,
:mod:`data.celeba`, :mod:`data.csv_folder`; each gives ``resolve_root(root, **options)`` and
``parse(root, **options) -> (Metadata or None, image path per row, problems)``.
"""
from __future__ import annotations

import hashlib
import importlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ConfigError, ToolError
from core.files import sha256_file
from core.tables import format_table

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}
DATASETS = {"waterbirds": "data.waterbirds", "celeba": "data.celeba", "csv": "data.csv_folder"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


class DataError(ToolError):
    """A data folder that cannot be used; the message lists every problem found."""

    def __init__(self, root, problems: list[str]):
        self.problems = problems
        head = f"{root}: {len(problems)} problem(s) found"
        super().__init__("\n  ".join([head] + problems[:50] + (["..."] if len(problems) > 50 else [])))


@dataclass
class Metadata:
    """The rows of a data set; arrays are indexed by row (the dataset index)."""

    root: Path              # images are root / filenames[i]
    filenames: np.ndarray   # [N] str, relative to root
    y: np.ndarray           # [N] int64 in [0, len(class_names))
    attr: np.ndarray        # [N] int64 in [0, len(attr_names)): the spurious attribute
    split: np.ndarray       # [N] int64 (0 train, 1 val, 2 test)
    class_names: tuple = ("landbird", "waterbird")
    attr_names: tuple = ("land", "water")
    dataset: str = "waterbirds"
    options: dict = field(default_factory=dict)  # what the parser was asked (e.g. CelebA's target)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.class_names) * len(self.attr_names)

    @property
    def group(self) -> np.ndarray:
        return self.y * len(self.attr_names) + self.attr

    @property
    def group_names(self) -> tuple[str, ...]:
        return group_names(self.class_names, self.attr_names)

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_CODES[split])

    def group_counts(self, split: str) -> np.ndarray:
        return np.bincount(self.group[self.rows(split)], minlength=self.num_groups)


def group_names(class_names, attr_names) -> tuple[str, ...]:
    """``"<class>/<attribute>"`` for group ``y * A + a``."""
    return tuple(f"{c}/{a}" for c in class_names for a in attr_names)


def _source(dataset: str):
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return importlib.import_module(DATASETS[dataset])


def load_metadata(root: str | Path, dataset: str = "waterbirds", **options) -> Metadata:
    """Parse and validate a data folder's metadata; raises DataError listing every bad row or column."""
    src = _source(dataset)
    folder = src.resolve_root(root, **options)
    meta, _, problems = src.parse(folder, **options)
    if problems:
        raise DataError(folder, problems)
    return meta


def read_image(path: Path, size: int | None = None, hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image to RGB uint8 [H, W, 3], resized to (size, size) or to ``hw`` = (height,
    width) when given.

    PIL's bilinear resize (antialiased) matches torchvision's ``Resize`` on a PIL image.
    A missing or unreadable file is a DataError naming it.
    """
    if size is not None:
        hw = (size, size)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if hw is not None and im.size != (hw[1], hw[0]):
                im = im.resize((int(hw[1]), int(hw[0])), Image.BILINEAR)
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        what = "missing image file" if isinstance(e, FileNotFoundError) else f"unreadable image ({type(e).__name__}: {e})"
        raise DataError(Path(path).parent, [f"{path}: {what}; run `python cli.py data check` on the folder"]) from None


def _check_image(path: Path) -> str | None:
    if not path.is_file():
        return "missing image file"
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: truncated files fail here, not at training time
    except Exception as e:  # PIL raises many types for bad files
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def check_folder(root: str | Path, dataset: str = "waterbirds", workers: int = 8, progress: bool = True,
                 **options) -> tuple[Metadata | None, list[str]]:
    """Validate a data folder: metadata columns and values, every image file, unlisted images.

    Returns (metadata, or None when the metadata itself has problems; every problem found). The
    images are checked even when some metadata values are bad, so one run lists everything.
    """
    src = _source(dataset)
    try:
        folder = src.resolve_root(root, **options)
    except DataError as e:
        return None, e.problems
    from tqdm import tqdm


    meta, files, problems = src.parse(folder, **options)
    image_root = meta.root if meta is not None else getattr(src, "image_root", lambda f, **o: f)(folder, **options)
    offset = getattr(src, "row_offset", lambda f, **o: 2)(folder, **options)  # file line of row 0
    named = [(i, f) for i, f in enumerate(files) if f]  # an empty name is already a problem
    paths = [image_root / f for _, f in named]
    if paths and not any(p.is_file() for p in paths[:1000]) and not image_root.is_dir():
        return meta, problems + [f"the image folder {image_root} does not exist ({len(paths)} images listed)"]
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_check_image, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not progress, leave=False))
    problems += [f"row {i + offset}: {f}: {r}" for (i, f), r in zip(named, results) if r]
    problems.sort(key=_row_of)
    listed = {p.resolve() for p in paths}
    extra = sorted(p for p in image_root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.resolve() not in listed)
    if extra and files:
        problems.append(f"{len(extra)} image file(s) not listed in the metadata, e.g. {extra[0].relative_to(image_root)}")
    return meta, problems


def _row_of(problem: str) -> int:
    # file-level problems first, then by row
    if problem.startswith("row "):
        return int(problem[4:].split(":", 1)[0])
    return 0


def count_table(meta: Metadata) -> str:
    """Split x group count table, as text."""
    rows = [[name, *(int(v) for v in c), int(c.sum())]
            for name, c in ((name, meta.group_counts(name)) for name in SPLIT_CODES)]
    return format_table(["split", *meta.group_names, "total"], rows, style="text")


def _image_digest(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        what = "missing image file" if isinstance(e, FileNotFoundError) else f"unreadable ({e.strerror or e})"
        raise DataError(path.parent, [f"{path}: {what}; run `python cli.py data check` on the folder"]) from None


def fingerprint(meta: Metadata, workers: int = 8) -> str:
    """sha256 over the metadata rows and every image file's bytes (order of rows kept)."""
    h = hashlib.sha256()
    for f, y, a, s in zip(meta.filenames, meta.y, meta.attr, meta.split):
        h.update(f"{f},{y},{a},{s}\n".encode())
    with ThreadPoolExecutor(workers) as pool:
        for digest in pool.map(_image_digest, [meta.root / f for f in meta.filenames]):
            h.update(digest.encode())
    return h.hexdigest()
