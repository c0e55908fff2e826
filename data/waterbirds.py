"""Waterbirds folders: ``metadata.csv`` -> rows (image, bird class, place, split).

Reads the real columns ``img_id,img_filename,y,split,place,place_filename`` (split 0 train /
1 val / 2 test; y 1 = waterbird; place 1 = water) from the original
``waterbird_complete95_forest2water2`` folder, WILDS' ``waterbirds_v1.0`` or the synthetic
generator's output (same layout). The spurious attribute is the place: group ``2 * y + place``.
``img_filename`` is relative to the folder holding ``metadata.csv`` and must resolve inside it
(``..``, absolute paths and symbolic links included; :func:`data.folders.outside_rows`).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from data.folders import SPLIT_NAMES, DataError, Metadata

METADATA_COLUMNS = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
KNOWN_SUBFOLDERS = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")
CLASS_NAMES = ("landbird", "waterbird")
ATTR_NAMES = ("land", "water")


def resolve_root(root: str | Path, **options) -> Path:
    """The folder holding ``metadata.csv``: ``root`` itself or a known Waterbirds subfolder."""
    root = Path(root)
    if (root / "metadata.csv").is_file():
        return root
    for sub in KNOWN_SUBFOLDERS:
        if (root / sub / "metadata.csv").is_file():
            return root / sub
    if not root.exists():
        raise DataError(root,
                        [f"folder {root} does not exist (generate one with `python cli.py "
                         f"data synth --out {root}`)"])
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


def parse(root: Path, **options) -> tuple[Metadata | None, list[str], list[str]]:
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
                problems.append(f"metadata.csv: missing column(s) {', '.join(missing)} (expected "
                                f"{','.join(METADATA_COLUMNS)})")
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
                    np.array(splits, dtype=np.int64), CLASS_NAMES, ATTR_NAMES, "waterbirds")
    return meta, files, problems
