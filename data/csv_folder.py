"""Generic group-annotated image folders: ``metadata.csv`` -> rows (image, label, attribute, split).

The folder holds ``metadata.csv`` with exactly the columns ``image,label,attribute,split`` (any
order; a spreadsheet's byte-order mark is fine):

* ``image``: the image's path relative to the folder (e.g. ``images/cat_001.jpg``); not empty,
  not absolute, each listed once, and inside the folder once ``..`` and symbolic links are resolved
  (checked for every layout by :func:`data.folders.outside_rows`; ``GRKD_ALLOW_OUTSIDE_PATHS=1``
  allows others).
* ``label`` (the class ``y``) and ``attribute`` (the spurious attribute): either all integers
  (``0, 1, ...``: value ``i`` is class ``i``, named ``"0"``, ``"1"``, ...; every value from 0 to the
  largest must occur, ``1.0`` is read as ``1``) or all names (``cat``, ``dog``: the codes follow
  the sorted order of the distinct names, by Python's ``sorted``, so case-sensitive: ``"Dog"``
  comes before ``"cat"``). A column mixing the two is a problem. At least 2 classes; one attribute
  value is allowed (the groups are then the classes).
* ``split``: ``train``, ``val`` or ``test`` (any case) or ``0``, ``1``, ``2``; each split needs a row.

Group ``y * A + attribute`` for A attribute values, named ``"<label>/<attribute>"``. Rows are
numbered as a spreadsheet does (header = row 1). Other columns are reported as unexpected, as for
Waterbirds: the file is written for this tool, and a column the tool silently ignores (``group``,
a second label) would look used when it is not.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from data.folders import SPLIT_CODES, DataError, Metadata

METADATA_FILE = "metadata.csv"
COLUMNS = ["image", "label", "attribute", "split"]
SPLIT_VALUES = {**SPLIT_CODES, **{str(v): v for v in SPLIT_CODES.values()}}
_INT = re.compile(r"[+-]?\d+(\.0*)?")


def _options(**options) -> None:
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ConfigError(f"--dataset csv takes no options (got {', '.join(given)}): the label and attribute "
                          f"are the columns of metadata.csv")


def resolve_root(root: str | Path, **options) -> Path:
    """The folder holding ``metadata.csv`` (``root`` itself)."""
    _options(**options)
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        return root
    if not root.exists():
        raise DataError(root, [f"folder {root} does not exist (a csv data folder holds {METADATA_FILE} "
                               f"with columns {','.join(COLUMNS)} and the images)"])
    raise DataError(root, [f"no {METADATA_FILE} in {root}: a csv data folder holds "
                           f"{METADATA_FILE} with columns {','.join(COLUMNS)} (image paths "
                           "relative to the folder)"])


def image_root(folder: str | Path, **options) -> Path:
    """Image paths are relative to the folder holding ``metadata.csv``."""
    return Path(folder)


def row_offset(folder: str | Path, **options) -> int:
    """Row number of the first data row (header = row 1)."""
    return 2


def _codes(column: str, values: list[str], rows: list[int], where: list[str], problems: list[str],
           min_values: int) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Integer codes and names of a label/attribute column (see the module docstring)."""
    ints: dict[str, int] = {}
    first_int = first_name = None
    for v, n in zip(values, rows):
        if not v:
            continue
        if _INT.fullmatch(v):
            ints[v] = int(float(v))
            first_int = first_int or (v, n)
        else:
            first_name = first_name or (v, n)
    for v, w in zip(values, where):
        if not v:
            problems.append(f"{w}: empty {column}")
    if first_int and first_name:
        problems.append(f"{METADATA_FILE}: column {column} mixes integers (e.g. {first_int[0]!r} at row "
                        f"{first_int[1]}) and names (e.g. {first_name[0]!r} at row "
                        f"{first_name[1]}); use one kind")
        return None, ()
    if first_int:
        bad = sorted({v for v, i in ints.items() if i < 0}, key=lambda v: ints[v])
        if bad:
            problems.append(f"{METADATA_FILE}: column {column} has negative value(s) "
                            f"{', '.join(bad)}; integer values must be 0, 1, ..., n-1 (or use names)")
            return None, ()
        present = set(ints.values())
        names = tuple(str(i) for i in range(max(present) + 1))
        empty = [n for n in names if int(n) not in present]
        if empty:
            problems.append(f"{METADATA_FILE}: column {column} has no row with value(s) "
                            f"{', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}; integer values "
                            f"must be 0, 1, ..., n-1 with each used (or use names)")
            return None, ()
        lookup = ints
    else:
        names = tuple(sorted({v for v in values if v}))
        lookup = {v: i for i, v in enumerate(names)}
    if 0 < len(names) < min_values:
        problems.append(f"{METADATA_FILE}: column {column} has only {len(names)} distinct value "
                        f"({names[0]!r}); at least {min_values} are needed")
        return None, ()
    return np.array([lookup.get(v, -1) for v in values], dtype=np.int64), names


def parse(folder: Path, **options) -> tuple[Metadata | None, list[str], list[str]]:
    """Read ``folder/metadata.csv``: (metadata or None if any problem, image path per row, problems)."""
    _options(**options)
    folder = Path(folder)
    problems: list[str] = []
    files: list[str] = []
    labels: list[str] = []
    attrs: list[str] = []
    splits: list[int | None] = []
    rownums: list[int] = []
    where: list[str] = []
    try:
        with open(folder / METADATA_FILE, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [c.strip() for c in next(reader, [])]
            missing = [c for c in COLUMNS if c not in header]
            extra = [c for c in header if c not in COLUMNS]
            twice = sorted({c for c in header if header.count(c) > 1})
            if not header:
                problems.append(f"{METADATA_FILE} is empty (expected the header {','.join(COLUMNS)})")
                return None, files, problems
            if missing:
                hint = " (a Waterbirds folder? use --dataset waterbirds)" if "img_filename" in header else ""
                problems.append(f"{METADATA_FILE}: missing column(s) {', '.join(missing)} "
                                f"(expected {','.join(COLUMNS)}){hint}")
            if extra:
                shown = ", ".join(c or repr(c) for c in extra)  # an empty name: a trailing comma
                problems.append(f"{METADATA_FILE}: unexpected column(s) {shown} (expected "
                                f"only {','.join(COLUMNS)})")
            if twice:
                problems.append(f"{METADATA_FILE}: column(s) {', '.join(twice)} given more than once")
            if missing:
                return None, files, problems
            col = {c: header.index(c) for c in COLUMNS}
            width = len(header)
            seen: dict[str, int] = {}
            for n, rec in enumerate(reader, 2):
                if not rec:
                    continue  # a blank line
                if len(rec) != width:
                    problems.append(f"row {n}: {len(rec)} field(s), expected {width} ({','.join(header)})")
                    rec = rec + [""] * (width - len(rec))
                name = rec[col["image"]].strip()
                w = f"row {n}: {name}" if name else f"row {n}"
                files.append(name)
                rownums.append(n)
                where.append(w)
                if not name:
                    problems.append(f"{w}: empty image path")
                elif Path(name).is_absolute():
                    problems.append(f"{w}: image path must be relative to {folder}")
                elif seen.setdefault(name, n) != n:
                    problems.append(f"{w}: image listed again (first at row {seen[name]})")
                labels.append(rec[col["label"]].strip())
                attrs.append(rec[col["attribute"]].strip())
                raw = rec[col["split"]].strip()
                s = SPLIT_VALUES.get(raw.lower())
                if s is None:
                    problems.append(f"{w}: split={raw!r} is not one of train, val, test (or 0, 1, 2)")
                splits.append(s)
    except (UnicodeDecodeError, csv.Error) as e:
        problems.append(f"{METADATA_FILE}: not a readable UTF-8 CSV file ({type(e).__name__}: {e})")
        return None, files, problems
    if not files:
        problems.append(f"{METADATA_FILE} has no rows")
        return None, files, problems
    y, class_names = _codes("label", labels, rownums, where, problems, min_values=2)
    a, attr_names = _codes("attribute", attrs, rownums, where, problems, min_values=1)
    present = {s for s in splits if s is not None}
    for s, code in SPLIT_CODES.items():
        if code not in present:
            problems.append(f"{METADATA_FILE}: no row in split {s}; each of train, val and "
                            "test needs at least one")
    if problems:
        return None, files, problems
    meta = Metadata(folder, np.array(files), y, a, np.array(splits, dtype=np.int64), class_names, attr_names,
                    "csv", {})
    return meta, files, problems
