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
import os
import sys
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
    meta, _, problems, _, offset = _parse(src, folder, options)
    if not problems:
        problems = check_rows(meta, offset)
    if problems:
        raise DataError(folder, problems)
    return meta


def _parse(src, folder: Path, options: dict):
    """The one path every layout's rows take: ``src.parse``, then every image path confined to the
    data folder (:func:`outside_rows`). (metadata or None, image per row, problems, the rows outside,
    file line of row 0); a row outside the folder is a problem, so its metadata is None."""
    meta, files, problems = src.parse(folder, **options)
    offset = getattr(src, "row_offset", lambda f, **o: 2)(folder, **options)  # file line of row 0
    image_root = meta.root if meta is not None else _image_root(src, folder, options)
    outside = outside_rows(folder, image_root, files)
    setting, allowed = _allow_outside_setting() if outside else ("", True)
    if not allowed:
        problems = problems + [f"row {i + offset}: {files[i]}: {_resolves(where)}, outside the data folder "
                               f"{Path(folder).resolve()}; a received metadata file (or a symbolic link in "
                               f"the folder) could name any file on this machine, so this is refused. If you "
                               f"trust it, set {setting}=1; or copy the image into the folder"
                               for i, where in outside.items()]
        problems.sort(key=_row_of)
        meta = None
    else:
        outside = {}
    return meta, files, problems, outside, offset


def _image_root(src, folder: Path, options: dict) -> Path:
    return getattr(src, "image_root", lambda f, **o: f)(folder, **options)


def _allow_outside_setting() -> tuple[str, bool]:
    """(name, value) of the user's explicit permission for paths outside the folder: the setting
    manifests read (``GRKD_ALLOW_OUTSIDE_PATHS=1``), read the same way."""
    from core.manifest import ALLOW_OUTSIDE_ENV  # one name for the setting; imports torch, so only here

    return ALLOW_OUTSIDE_ENV, os.environ.get(ALLOW_OUTSIDE_ENV, "") == "1"


def outside_rows(folder: str | Path, image_root: str | Path, files) -> dict[int, Path | str]:
    """Row -> resolved path of every image that does not lie inside ``folder`` once ``..``, absolute
    paths and symbolic links (of the file or any folder above it) are resolved; or the reason a
    path cannot be resolved (a NUL byte, a symbolic-link loop), which is not inside either.

    Each distinct parent folder is resolved once, then only the file itself is looked at (one
    ``lstat`` per row), so CelebA's 200k rows cost about what listing them does.
    """
    base = Path(folder).resolve()
    image_root = Path(image_root)
    parents: dict[Path, Path] = {}
    out: dict[int, Path] = {}
    for i, f in enumerate(files):
        if not f:
            continue  # an empty name is already a problem
        p = image_root / f
        try:
            if p.name in ("", ".", ".."):
                real = p.resolve()
            else:
                parent = parents.get(p.parent)
                if parent is None:
                    parent = parents[p.parent] = p.parent.resolve()
                real = parent / p.name
                if real.is_symlink():
                    real = real.resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symbolic-link loop
            out[i] = f"{type(e).__name__}: {e}"
            continue
        if not real.is_relative_to(base):
            out[i] = real
    return out


def _resolves(where: "Path | str") -> str:
    return f"resolves to {where}" if isinstance(where, Path) else f"cannot be resolved ({where})"


def _split_of(code) -> str:
    return SPLIT_NAMES.get(int(code), str(code))


def duplicate_problems(keys, split, names=None, offset: int = 2) -> list[str]:
    """Rows naming one image twice (``keys``: one comparable key per row, e.g. its normalised path).

    The same image in two splits is leakage (a test image trained on, a validation image both fit
    and selected on); twice in one split it is counted twice in the cache and in WGA. Both are
    refused, for every layout (CelebA's parser and the csv parser catch exact repeats of a name
    first; this also catches ``./a.png`` against ``a.png``).
    """
    names = keys if names is None else names
    first: dict = {}
    problems = []
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        if j == i:
            continue
        where = f"row {i + offset}: {names[i]}"
        if split[i] != split[j]:
            problems.append(f"{where}: the same image as row {j + offset} ({names[j]}) in two splits "
                            f"({_split_of(split[j])} and {_split_of(split[i])}): cross-split leakage "
                            f"(trained or selected on what is evaluated); list each image once, in one split")
        else:
            problems.append(f"{where}: image listed again (first at row {j + offset}, same split "
                            f"{_split_of(split[i])}): it would count twice in the cache and in WGA; "
                            f"list each image once")
    return problems


_EMPTY_MEANS = {
    "train": "training (ERM, the student) never sees it, and its accuracy is left to chance",
    "val": "validation WGA (model selection, DFR's balanced subsample) would be the minimum over the other "
           "groups only, hiding this one",
    "test": "test WGA would be the minimum over the other groups only, so the reported "
            "WGA leaves this group out",
}


def empty_group_problems(meta: "Metadata") -> list[str]:
    """One problem per (split, group) without rows: WGA over a split is then over fewer groups."""
    problems = []
    names = meta.group_names
    for split in SPLIT_CODES:
        counts = meta.group_counts(split)
        empty = [names[g] for g in range(meta.num_groups) if counts[g] == 0]
        if empty:
            problems.append(f"split {split}: no row in group(s) {', '.join(empty)} "
                            f"({int(counts.sum())} rows in the split): {_EMPTY_MEANS[split]}; "
                            f"add rows of that group to {split} (or choose other attributes)")
    return problems


def check_rows(meta: "Metadata | None", offset: int = 2) -> list[str]:
    """The checks every layout shares, on parsed metadata: duplicate images and cross-split leakage
    (by normalised path), and groups without rows in a split."""
    if meta is None:
        return []
    keys = [os.path.normcase(os.path.normpath(str(f))) for f in meta.filenames]
    return duplicate_problems(keys, meta.split, list(meta.filenames), offset) + empty_group_problems(meta)


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
            im = to_rgb(im, path)
            if hw is not None and im.size != (hw[1], hw[0]):
                im = im.resize((int(hw[1]), int(hw[0])), Image.BILINEAR)
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, FileNotFoundError):
            what = "missing image file"
        else:
            what = f"unreadable image ({type(e).__name__}: {e})"
        raise DataError(Path(path).parent,
                        [f"{path}: {what}; run `python cli.py data check` on the folder"]) from None


_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_rgb(im: Image.Image, path=None) -> Image.Image:
    """An opened image as 8-bit RGB, every mode decoded by its meaning.

    PIL's ``convert("RGB")`` clips 16-bit grayscale (``I;16``, or ``I`` on older Pillow) at 255, so
    such a PNG would become all white: it is scaled to 8 bits instead (``v * 255 / 65535``,
    rounded). Palette images (``P``, ``PA``) go through their palette. Modes with no 8-bit meaning
    (32-bit integers beyond 16 bits, floats) are a DataError naming the file.
    """
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(Path(path).parent if path else ".",
                            [f"{path}: {im.mode} image with values {a.min()}..{a.max()} beyond 16 bits; "
                             f"save it as 8-bit (or 16-bit) RGB or grayscale"])
        a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if im.mode == "F":
        raise DataError(Path(path).parent if path else ".",
                        [f"{path}: floating-point (mode F) image: no defined 8-bit "
                         "range; save it as 8-bit RGB"])
    if im.mode in ("P", "PA") and ("transparency" in im.info or im.mode == "PA"):
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _check_image(path: Path) -> tuple[str | None, str | None, str | None]:
    """(problem, warning, sha256 of the bytes) of one image file."""
    if not path.is_file():
        return "missing image file", None, None
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: truncated files fail here, not at training time
            mode, (w, h) = im.mode, im.size
            to_rgb(im, path)
    except DataError as e:
        return e.problems[0].split(": ", 1)[-1], None, None
    except Exception as e:  # PIL raises many types for bad files
        return f"unreadable image ({type(e).__name__}: {e})", None, None
    warning = None
    if min(w, h) <= 1:
        warning = (f"{w}x{h} pixel image ({mode}): resized to the views it is a flat colour; "
                   f"check that it is the image meant")
    try:
        digest = sha256_file(path)
    except OSError:
        digest = None
    return None, warning, digest


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_folder(root: str | Path, dataset: str = "waterbirds", workers: int = 8, progress: bool = True,
                 warn=_warn, **options) -> tuple[Metadata | None, list[str]]:
    """Validate a data folder: metadata columns and values, duplicate rows, cross-split leakage,
    empty groups, every image file (mode, decoding), unlisted images.

    Returns (metadata, or None when the metadata itself has problems; every problem found). The
    images are checked even when some metadata values are bad, so one run lists everything.
    Warnings (1-pixel images, the same bytes under two names) go to ``warn`` (stderr by default)
    as they do not make the folder unusable.
    """
    src = _source(dataset)
    try:
        folder = src.resolve_root(root, **options)
    except DataError as e:
        return None, e.problems
    from tqdm import tqdm


    meta, files, problems, outside, offset = _parse(src, folder, options)
    if meta is not None:
        problems += check_rows(meta, offset)  # the table stays: it shows an empty group
    image_root = meta.root if meta is not None else _image_root(src, folder, options)
    # an empty name is already a problem; a file outside the folder is never opened
    named = [(i, f) for i, f in enumerate(files) if f and i not in outside]
    paths = [image_root / f for _, f in named]
    if paths and not any(p.is_file() for p in paths[:1000]) and not image_root.is_dir():
        return meta, problems + [f"the image folder {image_root} does not exist ({len(paths)} images listed)"]
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(_check_image, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not progress, leave=False))
    problems += [f"row {i + offset}: {f}: {r}" for (i, f), (r, _, _) in zip(named, results) if r]
    problems.sort(key=_row_of)
    warnings = [f"row {i + offset}: {f}: {w}" for (i, f), (_, w, _) in zip(named, results) if w]
    by_digest: dict[str, int] = {}
    for k, ((i, f), (_, _, d)) in enumerate(zip(named, results)):
        j = by_digest.setdefault(d, k) if d else k
        if j != k:
            (i0, f0), s0 = named[j], (meta.split[named[j][0]] if meta is not None else None)
            s1 = meta.split[i] if meta is not None else None
            leak = (f" in two splits ({_split_of(s0)} and {_split_of(s1)}): a copy of "
                    f"one image on both sides leaks it" if s0 is not None and s0 != s1 else "")
            warnings.append(f"row {i + offset}: {f}: the same bytes as row {i0 + offset} ({f0}){leak}")
    for w in warnings[:50]:
        warn(w)
    if len(warnings) > 50:
        warn(f"... {len(warnings) - 50} more warning(s)")
    listed = {p.resolve() for p in paths}
    extra = sorted(p for p in _image_files(image_root) if p.resolve() not in listed)
    if extra and files:
        problems.append(f"{len(extra)} image file(s) not listed in the metadata, e.g. "
                        f"{extra[0].relative_to(image_root)}")
    return meta, problems


def _image_files(folder: Path):
    """The image files below ``folder``, not following symbolic links to folders (one may lead out
    of the data folder, or into a loop)."""
    for top, _, names in os.walk(folder, followlinks=False):
        yield from (Path(top) / n for n in names if Path(n).suffix.lower() in IMAGE_EXTS)


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
        raise DataError(path.parent,
                        [f"{path}: {what}; run `python cli.py data check` on the folder"]) from None


def fingerprint(meta: Metadata, workers: int = 8) -> str:
    """sha256 over the metadata rows and every image file's bytes (order of rows kept)."""
    h = hashlib.sha256()
    for f, y, a, s in zip(meta.filenames, meta.y, meta.attr, meta.split):
        h.update(f"{f},{y},{a},{s}\n".encode())
    with ThreadPoolExecutor(workers) as pool:
        for digest in pool.map(_image_digest, [meta.root / f for f in meta.filenames]):
            h.update(digest.encode())
    return h.hexdigest()
