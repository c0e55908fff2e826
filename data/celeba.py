"""CelebA folders: the official attribute and partition files -> rows (image, target, spurious, split).

The standard group-robustness setting is y = ``Blond_Hair`` and spurious attribute ``Male``
(options ``target`` and ``spurious``; any two different of the 40 attributes), both mapped from
the files' {-1, 1} to {0, 1}; group ``2 * y + attr``. Splits are the official partition (0 train
162,770 / 1 val 19,867 / 2 test 19,962 images). Both distributions of the official files are read:

* Kaggle: ``list_attr_celeba.csv`` (header ``image_id,5_o_Clock_Shadow,Arched_Eyebrows,...``,
  then ``000001.jpg,-1,1,...``) and ``list_eval_partition.csv`` (header ``image_id,partition``,
  then ``000001.jpg,0``); images in ``img_align_celeba/img_align_celeba/`` or ``img_align_celeba/``.
* original (Google Drive, torchvision): ``list_attr_celeba.txt`` (line 1 the number of images,
  line 2 the 40 attribute names, then ``000001.jpg -1  1 ...`` separated by whitespace) and
  ``list_eval_partition.txt`` (``000001.jpg 0``, no header); images in ``img_align_celeba/``.

The files may be in the given folder or in its subfolder ``celeba/`` (torchvision's layout). When
both a ``.csv`` and a ``.txt`` file are present the ``.csv`` one is read. The attribute file defines
the rows (in its order); the partition file is joined to it by image id. Row problems are numbered
by the attribute file's lines (``.csv``: header = row 1, first image row 2; ``.txt``: the count is
line 1, the names line 2, first image line 3; see :func:`row_offset`). Only the target and spurious
columns' values are checked; every row's number of values is. Every image must resolve inside the
folder holding the metadata files (a symbolic link out of it is refused:
:func:`data.folders.outside_rows`).
"""
from __future__ import annotations

import csv
import difflib
import os
from pathlib import Path

import numpy as np

from core.errors import ConfigError
from data.folders import SPLIT_CODES, DataError, Metadata

ATTR_FILES = ("list_attr_celeba.csv", "list_attr_celeba.txt")
PARTITION_FILES = ("list_eval_partition.csv", "list_eval_partition.txt")
SUBFOLDER = "celeba"
IMAGE_FOLDER = "img_align_celeba"  # Kaggle's zip nests it twice: img_align_celeba/img_align_celeba/
DEFAULT_TARGET = "Blond_Hair"
DEFAULT_SPURIOUS = "Male"
OFFICIAL_SPLIT_SIZES = {"train": 162_770, "val": 19_867, "test": 19_962}
VALUES = {"1": 1, "-1": 0}  # the files' -1 / 1 -> 0 / 1
PARTITIONS = {"0": 0, "1": 1, "2": 2}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
DOWNLOAD_HINT = ("download CelebA (Kaggle's celeba-dataset, or the official files as "
                 "torchvision.datasets.CelebA fetches them) and give the folder holding list_attr_celeba.csv "
                 "or list_attr_celeba.txt")


def _options(target=None, spurious=None, **other) -> tuple[str, str]:
    """(target, spurious) with the defaults filled in; any other option given is a ConfigError."""
    unknown = sorted(k for k, v in other.items() if v is not None)
    if unknown:
        raise ConfigError(f"--dataset celeba takes the options target and spurious, not {', '.join(unknown)}")
    target = DEFAULT_TARGET if target is None else target
    spurious = DEFAULT_SPURIOUS if spurious is None else spurious
    for name, value in (("target", target), ("spurious", spurious)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"--{name} must be a CelebA attribute name such as "
                              f"{DEFAULT_TARGET}, got {value!r}")
    return target, spurious


def _first(folder: Path, names) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def resolve_root(root: str | Path, **options) -> Path:
    """The folder holding the metadata files: ``root`` itself or its subfolder ``celeba/``.

    A folder with either file is accepted here, so that :func:`parse` can name the missing one.
    """
    _options(**options)
    root = Path(root)
    for names in (ATTR_FILES, PARTITION_FILES):  # prefer the folder with the attribute file
        for folder in (root, root / SUBFOLDER):
            if any((folder / n).is_file() for n in names):
                return folder
    if not root.exists():
        raise DataError(root, [f"folder {root} does not exist; {DOWNLOAD_HINT}"])
    raise DataError(root, [f"no CelebA metadata in {root} nor in {root / SUBFOLDER}: looked for "
                           f"{' or '.join(ATTR_FILES)} (attributes) and {' or '.join(PARTITION_FILES)} "
                           f"(official splits); {DOWNLOAD_HINT}"])


def _has_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(e.name.lower().endswith(IMAGE_EXTS) for e in it)
    except OSError:
        return False


def _image_root(folder: Path, files=()) -> Path:
    outer = folder / IMAGE_FOLDER
    nested = outer / IMAGE_FOLDER
    sample = [f for f in {*files[:1], *files[-1:]} if f]
    for cand in (nested, outer):
        if sample and all((cand / f).is_file() for f in sample):
            return cand
    if nested.is_dir() and not _has_images(outer):
        return nested
    return outer


def image_root(folder: str | Path, **options) -> Path:
    """The image folder: ``img_align_celeba/img_align_celeba/`` (Kaggle) if it holds the images, else
    ``img_align_celeba/``."""
    folder = Path(folder)
    attr_path = _first(folder, ATTR_FILES)
    files = []
    if attr_path is not None:  # the first image named, to see which folder holds it
        try:
            with open(attr_path, newline="", encoding="utf-8-sig") as f:
                _, rows, _ = _attr_rows(f, attr_path.suffix)
                files = [next((r[0].strip() for _, r in rows if r), "")]
        except (OSError, UnicodeDecodeError, csv.Error):
            pass
    return _image_root(folder, files)


def row_offset(folder: str | Path, **options) -> int:
    """Row number of the attribute file's first image row (``row_offset + i`` for row ``i``)."""
    attr_path = _first(Path(folder), ATTR_FILES)
    if attr_path is None or attr_path.suffix == ".csv":
        return 2
    with open(attr_path, encoding="utf-8-sig") as f:
        first = f.readline().strip()
    return 3 if first.isdigit() else 2


def _attr_rows(f, suffix: str):
    """(attribute names, iterator of (row number, fields), announced count or None) of an open attribute file.

    The names are None when the line meant to hold them starts with an image name (no header).
    """
    if suffix == ".csv":
        reader = csv.reader(f)
        header = next(reader, None) or []
        names = [n.strip() for n in header[1:]]
        if header and header[0].strip().lower().endswith(IMAGE_EXTS):
            names = None
        return names, enumerate(reader, 2), None
    first = f.readline()
    count = None
    if first.strip().isdigit():  # the original's line 1; tolerate copies without it
        count = int(first)
        header, start = f.readline(), 3
    else:
        header, start = first, 2
    names = header.split()
    if names and names[0].lower().endswith(IMAGE_EXTS):
        names = None
    elif len(names) > 1 and names[0].lower() in ("image_id", "image", "filename"):
        names = names[1:]
    return names, ((n, line.split()) for n, line in enumerate(f, start)), count


def _unknown_attribute(option: str, name: str, names: list[str], attr_file: str) -> str:
    close = [n for n in names if n.lower() == name.strip().lower()]
    if not close:  # the nearest spellings, within 0.1 of the best match
        ratio = {n: difflib.SequenceMatcher(None, name, n).ratio()
                 for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6)}
        close = [n for n, r in ratio.items() if r >= max(ratio.values()) - 0.1]
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return f"{attr_file}: no attribute {name!r} for --{option}{hint}; the attributes are {shown}"


def _read_partition(path: Path, problems: list[str]) -> dict[str, tuple[str, int]]:
    """image id -> (partition value as written, row number); file-level problems appended."""
    out: dict[str, tuple[str, int]] = {}
    dup = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        if path.suffix == ".csv":
            rows = enumerate(csv.reader(f), 1)
        else:
            rows = ((n, line.split()) for n, line in enumerate(f, 1))
        for n, rec in rows:
            if not rec:
                continue
            if n == 1 and not rec[0].strip().lower().endswith(IMAGE_EXTS):
                continue  # a header (Kaggle's image_id,partition)
            if len(rec) != 2:
                problems.append(f"{path.name} row {n}: {len(rec)} field(s), expected 2 "
                                "(image id and partition)")
                continue
            name = rec[0].strip()
            if name in out:
                dup.append((n, name))
                continue
            out[name] = (rec[1].strip(), n)
    for n, name in dup:
        problems.append(f"{path.name} row {n}: {name}: listed again (first at row {out[name][1]})")
    return out


def _read_attributes(attr_file, names, rows, options, files, rownums, ys, attrs, problems) -> None:
    """Append each row's image, row number, target and spurious value (None when bad) and its problems."""
    target, spurious = options
    expected = ("image_id,5_o_Clock_Shadow,Arched_Eyebrows,..." if attr_file.endswith(".csv") else
                "the number of images, then 5_o_Clock_Shadow Arched_Eyebrows ...")
    if names is None:
        problems.append(f"{attr_file}: the line naming the attributes is missing (expected {expected} "
                        f"before the first image)")
        names = []
    elif not names:
        problems.append(f"{attr_file}: no attribute names (expected {expected})")
    columns = {n: i + 1 for i, n in enumerate(names)}
    cols = []
    for option, name in (("target", target), ("spurious", spurious)):
        if name not in columns and names:
            problems.append(_unknown_attribute(option, name, names, attr_file))
        cols.append((name, columns.get(name), ys if option == "target" else attrs))
    width = len(names) + 1 if names else None
    seen: dict[str, int] = {}
    for n, rec in rows:
        if not rec:
            continue  # a blank line
        name = rec[0].strip()
        files.append(name)
        rownums.append(n)
        where = f"row {n}: {name}" if name else f"row {n}"
        if not name:
            problems.append(f"{where}: empty image_id")
        elif seen.setdefault(name, n) != n:
            problems.append(f"{where}: duplicate image id (first at row {seen[name]})")
        if width is not None and len(rec) != width:
            problems.append(f"{where}: {len(rec) - 1} attribute value(s), expected {len(names)}")
            ys.append(None)
            attrs.append(None)
            continue
        for attr, col, out in cols:
            v = None
            if col is not None:
                v = VALUES.get(rec[col].strip())
                if v is None:
                    problems.append(f"{where}: {attr}={rec[col]!r} is not -1 or 1")
            out.append(v)


def parse(folder: Path, **options) -> tuple[Metadata | None, list[str], list[str]]:
    """Read the attribute and partition files: (metadata or None if any problem, image per row, problems).

    The image names come back whenever the attribute file could be read, even when values are bad,
    so that the images can still be checked in the same pass.
    """
    target, spurious = _options(**options)
    folder = Path(folder)
    problems: list[str] = []
    attr_path, part_path = _first(folder, ATTR_FILES), _first(folder, PARTITION_FILES)
    if attr_path is None:
        problems.append(f"missing attribute file: looked for {' and '.join(ATTR_FILES)} in {folder}")
    if part_path is None:
        problems.append(f"missing partition file (the official splits): looked for "
                        f"{' and '.join(PARTITION_FILES)} in {folder}")
    if target == spurious:
        problems.append(f"--target and --spurious are both {target!r}: pick two different attributes "
                        f"(default {DEFAULT_TARGET} and {DEFAULT_SPURIOUS})")
    if attr_path is None:
        return None, [], problems
    attr_file = attr_path.name
    files: list[str] = []
    rownums: list[int] = []
    ys: list[int | None] = []
    attrs: list[int | None] = []
    try:
        with open(attr_path, newline="", encoding="utf-8-sig") as f:
            names, rows, count = _attr_rows(f, attr_path.suffix)
            _read_attributes(attr_file, names, rows, (target, spurious), files, rownums, ys, attrs, problems)
    except (UnicodeDecodeError, csv.Error) as e:
        problems.append(f"{attr_file}: not a readable text file ({type(e).__name__}: {e})")
        return None, files, problems
    if count is not None and count != len(files):
        problems.append(f"{attr_file}: line 1 announces {count} images but {len(files)} are listed "
                        f"(a truncated or edited file?)")
    if not files:
        problems.append(f"{attr_file} lists no images")
    splits: list[int | None] = []
    if part_path is not None:
        part_file = part_path.name
        try:
            partition = _read_partition(part_path, problems)
        except (UnicodeDecodeError, csv.Error) as e:
            problems.append(f"{part_file}: not a readable text file ({type(e).__name__}: {e})")
            partition = None
        if partition is not None:
            for name, n in zip(files, rownums):
                value, pn = partition.get(name, (None, 0))
                code = PARTITIONS.get(value) if value is not None else None
                if value is None:
                    if name:
                        problems.append(f"row {n}: {name}: not in {part_file}")
                elif code is None:
                    problems.append(f"row {n}: {name}: partition {value!r} ({part_file} row {pn}) is not "
                                    f"0 (train), 1 (val) or 2 (test)")
                splits.append(code)
            listed = set(files)
            only = [(pn, name) for name, (_, pn) in partition.items() if name not in listed]
            if only:
                only.sort()
                eg = ", ".join(f"{name} (row {pn})" for pn, name in only[:3])
                problems.append(f"{part_file}: {len(only)} image(s) not in {attr_file}, e.g. {eg}")
    if problems:
        return None, files, problems
    split = np.array(splits, dtype=np.int64)
    for s, code in SPLIT_CODES.items():
        if not (split == code).any():
            problems.append(f"{part_path.name}: no image in split {s} (partition {code}); the official "
                            f"files have {OFFICIAL_SPLIT_SIZES[s]}")
    if problems:
        return None, files, problems
    meta = Metadata(_image_root(folder, files), np.array(files), np.array(ys, dtype=np.int64),
                    np.array(attrs, dtype=np.int64), split, (f"not {target}", target),
                    (f"not {spurious}", spurious), "celeba", {"target": target, "spurious": spurious})
    return meta, files, problems
