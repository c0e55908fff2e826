"""Pre-decoded image store: every image of a data folder as uint8, resized once, in one HDF5 file.

Rows are dataset rows (metadata order). The file carries the fingerprint of the folder it was
built from, so training never decodes an image file per epoch and never reads a stale store.
Each image is resized as the view's first transform would: ``keep-aspect`` (torchvision's
``Resize(S)``: the short side to S, the long side to ``int(S * long / short)``, capped at
``MAX_ASPECT * S``; the report's evaluation) or ``squash`` (``Resize((S, S))``; DFR's), with PIL's
antialiased bilinear filter, and stored in the top-left corner of an L x L canvas (L = S for
``squash``, else the longest resized side of the data set):

```
/images [N, 3, L, L] uint8   (row-chunked, fletcher32; zeros outside each image)
/hw     [N, 2] int32         (each image's height and width in the canvas)
/done   [N] bool             (resume; a finished store has all True)
attrs: schema "gr-kd-images", schema_version 2, fingerprint, size (S), resize, side (L), num_rows
```
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from core.errors import ConfigError, ToolError
from data.folders import DataError, Metadata, read_image

SCHEMA = "gr-kd-images"
SCHEMA_VERSION = 2
CHUNK_ROWS = 64          # images decoded and marked done together
CHUNK_BYTES = 256 * 1024  # HDF5 chunks of at most this size: a streamed row reads little more than itself
RESIZE_MODES = ("keep-aspect", "squash")
MAX_ASPECT = 2.0  # a longer side is squashed to MAX_ASPECT * S (build_store says how many)


class StoreError(ToolError):
    """An image store that cannot be used for the data asked for."""


def store_size_for(out_size: int) -> int:
    """Stored short side so that the eval view (Resize 256, CenterCrop 224) renders ``out_size``."""
    return round(out_size * 256 / 224)


def resized_hw(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """(height, width) of an image after ``Resize(size)`` (keep-aspect, torchvision's rule) or
    ``Resize((size, size))`` (squash), the long side capped at ``MAX_ASPECT * size``."""
    if resize == "squash":
        return size, size
    cap = round(MAX_ASPECT * size)
    if width <= height:
        return min(cap, int(size * height / width)), size
    return size, min(cap, int(size * width / height))


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        what = "missing image file" if isinstance(e, FileNotFoundError) else f"unreadable image ({e})"
        raise DataError(path.parent, [f"{path}: {what}; run `python cli.py data check` on the folder"]) from None


def _check_attrs(f: h5py.File, path, fingerprint: str | None, size: int | None, resize: str | None) -> None:
    if f.attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path} is not an image store (schema {f.attrs.get('schema')!r})")
    if int(f.attrs["schema_version"]) != SCHEMA_VERSION:
        raise StoreError(f"{path}: image store version {f.attrs['schema_version']} is not supported "
                         f"(this tool reads version {SCHEMA_VERSION}); delete it to rebuild it")
    if fingerprint is not None and f.attrs["fingerprint"] != fingerprint:
        raise StoreError(f"{path} was built from another data folder (fingerprint "
                         f"{f.attrs['fingerprint'][:12]}, folder {fingerprint[:12]}); delete it to rebuild")
    if size is not None and int(f.attrs["size"]) != size:
        raise StoreError(f"{path} holds {f.attrs['size']}px images, {size}px asked; use another path")
    if resize is not None and str(f.attrs["resize"]) != resize:
        raise StoreError(f"{path} holds {f.attrs['resize']} images, {resize} asked; use another path")


def build_store(meta: Metadata, path: str | Path, size: int, fingerprint: str, resize: str = "keep-aspect",
                workers: int = 4, progress: bool = True, rows: range | None = None) -> Path:
    """Build (or finish building) the store; a complete matching store is reused as it is.

    ``rows``: decode only these dataset rows (one process's part under torchrun; the parts are
    put together by :func:`merge_stores`). The canvas side comes from every image's header, so
    all parts agree on it.
    """
    from tqdm import tqdm

    if resize not in RESIZE_MODES:
        raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(meta)
    wanted = range(n) if rows is None else rows
    if _is_complete(path, fingerprint, size, resize, wanted):
        return path  # reused read-only: readers of the same store may be open meanwhile
    try:
        f = h5py.File(path, "a")
    except OSError as e:
        raise StoreError(f"{path} is not a readable HDF5 file ({e}); delete it to rebuild") from None
    with f:
        if len(f) == 0 and f.attrs.get("schema", SCHEMA) == SCHEMA:  # new; anything else must match
            paths = [meta.root / name for name in meta.filenames]
            with ThreadPoolExecutor(8) as pool:  # headers only: sizes without decoding
                hw = np.array([resized_hw(*wh, size, resize) for wh in pool.map(_image_size, paths)],
                              dtype=np.int32).reshape(-1, 2)
            side = int(hw.max())
            capped = int(sum(1 for (h, w) in hw if max(h, w) >= round(MAX_ASPECT * size) and resize != "squash"))
            if capped and progress:
                tqdm.write(f"{capped} image(s) have an aspect ratio beyond {MAX_ASPECT:g}:1: their long side is "
                           f"squashed to {round(MAX_ASPECT * size)} px (view 0 is no longer Resize({size}) + "
                           "CenterCrop for them)")
            f.attrs.update(schema=SCHEMA, schema_version=SCHEMA_VERSION, fingerprint=fingerprint,
                           size=size, resize=resize, side=side, num_rows=n)
            f.create_dataset("hw", data=hw, fletcher32=True)
            f.create_dataset("images", (n, 3, side, side), np.uint8, chunks=(_chunk_rows(side, n), 3, side, side),
                             fletcher32=True)
            f.create_dataset("done", (n,), bool, fillvalue=False)
        _check_attrs(f, path, fingerprint, size, resize)
        if "images" not in f or "done" not in f or "hw" not in f:
            raise StoreError(f"{path} is a damaged image store (killed while being created?); delete it to rebuild")
        done, hw, side = f["done"][:], f["hw"][:], int(f.attrs["side"])
        lo, hi = wanted.start, wanted.stop
        todo = [(a, min(a + CHUNK_ROWS, hi)) for a in range(lo, hi, CHUNK_ROWS) if not done[a:min(a + CHUNK_ROWS, hi)].all()]
        bar = tqdm(total=hi - lo, initial=hi - lo - sum(b - a for a, b in todo), desc="image store",
                   unit="img", disable=not progress or not todo)

        def canvas(r):
            img = read_image(meta.root / meta.filenames[r], hw=tuple(hw[r]))
            out = np.zeros((side, side, 3), np.uint8)
            out[:img.shape[0], :img.shape[1]] = img
            return out

        with ThreadPoolExecutor(workers) as pool:
            for start, stop in todo:
                imgs = list(pool.map(canvas, range(start, stop)))
                f["images"][start:stop] = np.stack(imgs).transpose(0, 3, 1, 2)
                f.flush()  # pixels on disk before the rows are marked done
                f["done"][start:stop] = True
                f.flush()
                bar.update(stop - start)
        bar.close()
    return path


def _chunk_rows(side: int, n: int) -> int:
    return max(1, min(CHUNK_ROWS, n, CHUNK_BYTES // (3 * side * side)))


def _is_complete(path: Path, fingerprint: str, size: int, resize: str, rows: range) -> bool:
    """True for an existing store of this folder and size whose ``rows`` are all done
    (mismatches raise StoreError)."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if "done" not in f:
                return False
            _check_attrs(f, path, fingerprint, size, resize)
            return bool(f["done"][rows.start:rows.stop].all())
    except OSError:
        return False  # let the writer path report what is wrong with the file


def merge_stores(out: str | Path, parts: list[str | Path]) -> Path:
    """One store from parts that each hold some rows of the same data set (written with
    ``build_store(..., rows=...)``): every row must be done in one of them. Written to
    ``out.tmp`` and renamed."""
    out, parts = Path(out), [Path(p) for p in parts]
    with h5py.File(parts[0], "r") as ref:
        attrs, hw, n, side = dict(ref.attrs), ref["hw"][:], int(ref.attrs["num_rows"]), int(ref.attrs["side"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        f.create_dataset("hw", data=hw, fletcher32=True)
        images = f.create_dataset("images", (n, 3, side, side), np.uint8, chunks=(_chunk_rows(side, n), 3, side, side),
                                  fletcher32=True)
        done = np.zeros(n, bool)
        for p in parts:
            with h5py.File(p, "r") as src:
                _check_attrs(src, p, attrs["fingerprint"], int(attrs["size"]), str(attrs["resize"]))
                mine = src["done"][:] & ~done
                for a in range(0, n, CHUNK_ROWS):
                    sel = np.flatnonzero(mine[a:a + CHUNK_ROWS])
                    if len(sel):
                        block = src["images"][a:a + CHUNK_ROWS]
                        images[a + sel] = block[sel] if len(sel) < len(block) else block
                done |= mine
        if not done.all():
            raise StoreError(f"the store parts {', '.join(map(str, parts))} miss {int((~done).sum())} rows")
        f.create_dataset("done", data=done)
    tmp.replace(out)
    return out


class ImageStore:
    """Read side of the store. Opens the file lazily, so it can be sent to DataLoader workers."""

    def __init__(self, path: str | Path, fingerprint: str | None = None, size: int | None = None,
                 resize: str | None = None, rows: range | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"no image store at {self.path}; it is built by `python cli.py precompute`")
        try:
            with h5py.File(self.path, "r") as f:
                _check_attrs(f, self.path, fingerprint, size, resize)
                done = f["done"][:]
                self.hw = f["hw"][:].astype(np.int64)  # [N, 2] (height, width) of each image
                self.size, self.num_rows = int(f.attrs["size"]), int(f.attrs["num_rows"])
                self.side, self.resize = int(f.attrs["side"]), str(f.attrs["resize"])
                self.fingerprint = str(f.attrs["fingerprint"])
        except (OSError, KeyError) as e:
            raise StoreError(f"{self.path} is not a readable image store ({e}); delete it to rebuild") from None
        needed = done if rows is None else done[rows.start:rows.stop]
        if not needed.all():
            raise StoreError(f"{self.path} is incomplete ({int(done.sum())} of {len(done)} rows); "
                             "rerun the command that builds it to finish")
        self._file = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None}

    @property
    def images(self) -> h5py.Dataset:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file["images"]

    def load(self, rows) -> np.ndarray:
        """uint8 [len(rows), 3, L, L] canvases in the order of ``rows`` (repeats allowed); image r
        fills the top-left ``hw[r]`` pixels."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty((0, 3, self.side, self.side), np.uint8)
        # h5py reads only strictly increasing indices: read each row once, then scatter
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.images[unique][inverse.reshape(-1)]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def load_all(self) -> np.ndarray:
        return self.images[:]
