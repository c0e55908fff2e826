"""Waterbirds folders: metadata, groups, image files, folder checks and the data fingerprint.

Reads ``metadata.csv`` with the real columns ``img_id,img_filename,y,split,place,place_filename``
(split 0 train / 1 val / 2 test; y 1 = waterbird; place 1 = water) from the original
``waterbird_complete95_forest2water2`` folder, WILDS' ``waterbirds_v1.0`` or the synthetic
generator's output (same layout). Row ``i`` of the metadata is index ``i`` everywhere.
"""
from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import ToolError
from core.files import sha256_file
from core.tables import format_table
from data.metrics import GROUP_NAMES, NUM_GROUPS

METADATA_COLUMNS = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = {v: k for k, v in SPLIT_CODES.items()}
KNOWN_SUBFOLDERS = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")


class DataError(ToolError):
    """A data folder that cannot be used; the message lists every problem found."""

    def __init__(self, root, problems: list[str]):
        self.problems = problems
        head = f"{root}: {len(problems)} problem(s) found"
        super().__init__("\n  ".join([head] + problems[:50] + (["..."] if len(problems) > 50 else [])))


@dataclass
class Metadata:
    """The rows of ``metadata.csv``; arrays are indexed by row (the dataset index)."""

    root: Path
    filenames: np.ndarray   # [N] str, relative to root
    y: np.ndarray           # [N] int64
    place: np.ndarray       # [N] int64
    split: np.ndarray       # [N] int64 (0 train, 1 val, 2 test)

    @property
    def group(self) -> np.ndarray:
        return 2 * self.y + self.place

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_CODES[split])

    def group_counts(self, split: str) -> np.ndarray:
        return np.bincount(self.group[self.rows(split)], minlength=NUM_GROUPS)


def resolve_root(root: str | Path) -> Path:
    """The folder holding ``metadata.csv``: ``root`` itself or a known Waterbirds subfolder."""
    root = Path(root)
    if (root / "metadata.csv").is_file():
        return root
    for sub in KNOWN_SUBFOLDERS:
        if (root / sub / "metadata.csv").is_file():
            return root / sub
    if not root.exists():
        raise DataError(root, [f"folder {root} does not exist (generate one with `python cli.py data synth --out {root}`)"])
    raise DataError(root, [f"no metadata.csv in {root} nor in {' or '.join(KNOWN_SUBFOLDERS)} below it"])


def _parse_int(value: str, field: str, allowed, where: str, problems: list[str]):
    try:
        v = int(float(value))
        if v in allowed and float(value) == v:
            return v
    except (TypeError, ValueError, OverflowError):
        pass
    problems.append(f"{where}: {field}={value!r} is not one of {sorted(allowed)}")
    return None


def _parse_metadata(root: Path) -> tuple[Metadata | None, list[str], list[str]]:
    """Read ``root/metadata.csv``: (metadata or None if any problem, img_filename per row, problems).

    Every bad column or value is a problem naming its row (as a spreadsheet numbers it: header
    = row 1) and file. The filenames come back even when values are bad, so that the images can
    still be checked in the same pass.
    """
    problems: list[str] = []
    files, ys, places, splits = [], [], [], []
    try:
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        with open(root / "metadata.csv", newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in METADATA_COLUMNS if c not in columns]
            extra = [c for c in columns if c not in METADATA_COLUMNS]
            if missing:
                problems.append(f"metadata.csv: missing column(s) {', '.join(missing)} (expected {','.join(METADATA_COLUMNS)})")
            if extra:
                problems.append(f"metadata.csv: unexpected column(s) {', '.join(extra)}")
            if missing:
                return None, files, problems
            for i, rec in enumerate(reader):
                name = rec["img_filename"] or ""
                where = f"row {i + 2}: {name}" if name else f"row {i + 2}"
                files.append(name)
                if not name:
                    problems.append(f"{where}: empty img_filename")
                ys.append(_parse_int(rec["y"], "y", {0, 1}, where, problems))
                places.append(_parse_int(rec["place"], "place", {0, 1}, where, problems))
                splits.append(_parse_int(rec["split"], "split", set(SPLIT_NAMES), where, problems))
    except (UnicodeDecodeError, csv.Error) as e:
        problems.append(f"metadata.csv: not a readable UTF-8 CSV file ({type(e).__name__}: {e})")
        return None, files, problems
    if not files:
        problems.append("metadata.csv has no rows")
    if problems:
        return None, files, problems
    meta = Metadata(root, np.array(files), np.array(ys, dtype=np.int64), np.array(places, dtype=np.int64),
                    np.array(splits, dtype=np.int64))
    return meta, files, problems


def load_metadata(root: str | Path) -> Metadata:
    """Parse and validate ``metadata.csv``; raises DataError listing every bad row or column."""
    root = resolve_root(root)
    meta, _, problems = _parse_metadata(root)
    if problems:
        raise DataError(root, problems)
    return meta


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """Decode an image to RGB uint8 [H, W, 3], resized to (size, size) when given.

    PIL's bilinear resize (antialiased) matches torchvision's ``Resize((size, size))`` on PIL.
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


def _check_image(path: Path) -> str | None:
    if not path.is_file():
        return "missing image file"
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: truncated files fail here, not at training time
    except Exception as e:  # PIL raises many types for bad files
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def check_folder(root: str | Path, workers: int = 8, progress: bool = True) -> tuple[Metadata | None, list[str]]:
    """Validate a data folder: metadata columns and values, every image file, unlisted images.

    Returns (metadata, or None when the metadata itself has problems; every problem found). The
    images are checked even when some metadata values are bad, so one run lists everything.
    """
    try:
        root = resolve_root(root)
    except DataError as e:
        return None, e.problems
    from tqdm import tqdm

    meta, files, problems = _parse_metadata(root)
    named = [(i, f) for i, f in enumerate(files) if f]  # an empty name is already a problem
    paths = [root / f for _, f in named]
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_check_image, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not progress, leave=False))
    problems += [f"row {i + 2}: {f}: {r}" for (i, f), r in zip(named, results) if r]
    problems.sort(key=_row_of)
    listed = {p.resolve() for p in paths}
    image_exts = {".jpg", ".jpeg", ".png"}
    extra = sorted(p for p in root.rglob("*") if p.suffix.lower() in image_exts and p.resolve() not in listed)
    if extra and files:
        problems.append(f"{len(extra)} image file(s) not listed in metadata.csv, e.g. {extra[0].relative_to(root)}")
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
    return format_table(["split", *GROUP_NAMES, "total"], rows, style="text")


def fingerprint(meta: Metadata, workers: int = 8) -> str:
    """sha256 over the metadata rows and every image file's bytes (order of rows kept)."""
    h = hashlib.sha256()
    for f, y, p, s in zip(meta.filenames, meta.y, meta.place, meta.split):
        h.update(f"{f},{y},{p},{s}\n".encode())
    with ThreadPoolExecutor(workers) as pool:
        for digest in pool.map(sha256_file, [meta.root / f for f in meta.filenames]):
            h.update(digest.encode())
    return h.hexdigest()

