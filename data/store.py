"""Pre-decoded image store: every image of a data folder as uint8, resized once, in one HDF5 file.

Rows are dataset rows (metadata order). The file carries the fingerprint of the folder it was
built from, so training never decodes an image file per epoch and never reads a stale store.
Each image is resized as the view's first transform would: ``keep-aspect`` (torchvision's
``Resize(S)``: the short side to S, the long side to ``int(S * long / short)``, capped at
``MAX_ASPECT * S``; the study's evaluation) or ``squash`` (``Resize((S, S))``; DFR's), with PIL's
antialiased bilinear filter, and stored at its own size: its bytes, pixel-interleaved (HWC, as
decoded), back to back with the others' in one flat buffer (no canvas, no padding), so the store
takes the images' own bytes:

```
/pixels [P] uint8      image r's HWC bytes at offset[r] - pixel_start, 3 * h * w of them
                       (contiguous storage: reading one image reads exactly its bytes)
/offset [N] int64      each image's first byte in the whole data set's buffer
/hw     [N, 2] int32   each image's (height, width)
/digest [N, 32] uint8  sha256 of each image's bytes (checked on load and by ``verify``)
/done   [N] bool       resume; a finished store has all its rows True
attrs: schema "gr-kd-images", schema_version 3, fingerprint, size (S), resize, side (longest
       side), num_rows, total_bytes, row_start, row_stop, pixel_start (the rows it holds: all of
       them, or one torchrun part's range, put together by ``merge_stores``)
```

Every open checks what the file declares before its tables are used (a store is received with its
cache): :mod:`data.store_checks` holds those checks and the format's names and limits.

In memory the images are :class:`Pixels` (the same flat layout), rendered by
``data.views.render`` (HWC, not CHW: one gather fetches a pixel's three channels and its right
neighbour's, 6x fewer gathers; ``benchmarks/bench_store.py`` measures it).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from core.errors import ConfigError
from data.folders import DataError, Metadata, read_image
from data.pixels import Pixels
from data.store_checks import (DATASETS, MAX_ASPECT, RESIZE_MODES, SCHEMA, SCHEMA_VERSION, StoreError,
                               check_attrs, check_store, ends_of, open_checked, scalar_attr)

CHUNK_ROWS = 64          # images decoded and marked done together
COPY_BYTES = 64 << 20    # merge_stores and verify read at most this much at a time


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
        raise DataError(path.parent,
                        [f"{path}: {what}; run `python cli.py data check` on the folder"]) from None


def _create(f: h5py.File, attrs: dict, hw: np.ndarray, lo: int, hi: int) -> None:
    """The datasets of a new store holding rows [lo, hi) of a data set of images ``hw``."""
    ends = ends_of(hw)
    f.attrs.update(attrs, schema=SCHEMA, schema_version=SCHEMA_VERSION, num_rows=len(hw),
                   side=int(hw.max()) if len(hw) else 0, total_bytes=int(ends[-1]),
                   row_start=lo, row_stop=hi, pixel_start=int(ends[lo]))
    f.create_dataset("hw", data=hw.astype(np.int32), fletcher32=True)
    f.create_dataset("offset", data=ends[:-1], fletcher32=True)
    # contiguous: a read of any image reads just its bytes (allocated on the first write)
    f.create_dataset("pixels", (max(1, int(ends[hi] - ends[lo])),), np.uint8)
    f.create_dataset("digest", (len(hw), 32), np.uint8, fletcher32=True,
                     chunks=(max(1, min(len(hw), 4096)), 32))
    f.create_dataset("done", (len(hw),), bool, fillvalue=False)


def build_store(meta: Metadata, path: str | Path, size: int, fingerprint: str, resize: str = "keep-aspect",
                workers: int = 4, progress: bool = True, rows: range | None = None) -> Path:
    """Build (or finish building) the store; a complete matching store is reused as it is.

    ``rows``: decode only these dataset rows (one process's part under torchrun; the file then
    holds only their pixels, and the parts are put together by :func:`merge_stores`). Every
    image's size comes from its header, so all parts agree on the offsets.
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
        # new; anything else must match
        if len(f) == 0 and scalar_attr(f, "schema") in (SCHEMA, None):
            paths = [meta.root / name for name in meta.filenames]
            with ThreadPoolExecutor(8) as pool:  # headers only: sizes without decoding
                hw = np.array([resized_hw(*wh, size, resize) for wh in pool.map(_image_size, paths)],
                              dtype=np.int64).reshape(-1, 2)
            capped = int(sum(1 for (h, w) in hw
                             if max(h, w) >= round(MAX_ASPECT * size) and resize != "squash"))
            if capped and progress:
                cap = round(MAX_ASPECT * size)
                tqdm.write(f"{capped} image(s) have an aspect ratio beyond {MAX_ASPECT:g}:1: their long side "
                           f"is squashed to {cap} px (view 0 is no longer Resize({size}) + CenterCrop for "
                           "them)")
            _create(f, dict(fingerprint=fingerprint, size=size, resize=resize), hw, wanted.start, wanted.stop)
        check_attrs(f, path, fingerprint, size, resize)
        try:  # a store this folder's may still be a received one: checked as any other
            c = check_store(f, path, building=True)
        except KeyError:
            raise StoreError(f"{path} is a damaged image store (killed while being created?); "
                             "delete it to rebuild") from None
        a0, b0 = c["row_start"], c["row_stop"]
        lo, hi = wanted.start, wanted.stop
        if lo < a0 or hi > b0 or len(c["hw"]) != n:
            raise StoreError(f"{path} holds rows {a0}..{b0 - 1} of {len(c['hw'])}, rows {lo}..{hi - 1} "
                             f"of {n} asked (another torchrun layout?); delete it to rebuild")
        done, hw, ends, base = f["done"][:], c["hw"], c["ends"], c["base"]
        todo = [(a, min(a + CHUNK_ROWS, hi)) for a in range(lo, hi, CHUNK_ROWS)
                if not done[a:min(a + CHUNK_ROWS, hi)].all()]
        bar = tqdm(total=hi - lo, initial=hi - lo - sum(b - a for a, b in todo), desc="image store",
                   unit="img", disable=not progress or not todo)

        def decode(r):
            img = np.ascontiguousarray(read_image(meta.root / meta.filenames[r],
                                                  hw=tuple(hw[r])))  # [h, w, 3]
            return img, np.frombuffer(hashlib.sha256(img).digest(), np.uint8)

        with ThreadPoolExecutor(workers) as pool:
            for start, stop in todo:
                imgs, digests = zip(*pool.map(decode, range(start, stop)))
                f["pixels"][ends[start] - base:ends[stop] - base] = \
                    np.concatenate([im.reshape(-1) for im in imgs])
                f.flush()  # pixels on disk before the rows are marked done
                f["digest"][start:stop] = np.stack(digests)
                f["done"][start:stop] = True
                f.flush()
                bar.update(stop - start)
        bar.close()
    return path


def _is_complete(path: Path, fingerprint: str, size: int, resize: str, rows: range) -> bool:
    """True for an existing store of this folder and size whose ``rows`` are all done
    (mismatches raise StoreError)."""
    if not path.is_file():
        return False
    try:
        f = h5py.File(path, "r")
    except OSError:
        return False  # let the writer path report what is wrong with the file
    with f:
        if "done" not in f:
            return False
        check_attrs(f, path, fingerprint, size, resize)
        try:
            c = check_store(f, path, building=True)
        except KeyError:
            return False  # killed while being created: the writer path says so
        if rows.start < c["row_start"] or rows.stop > c["row_stop"]:
            return False  # the writer path says which rows it holds
        return bool(f["done"][rows.start:rows.stop].all())


def merge_stores(out: str | Path, parts: list[str | Path]) -> Path:
    """One store from parts that each hold some rows of the same data set (written with
    ``build_store(..., rows=...)``): every row must be done in one of them. Written under
    :class:`core.files.OutputLock` on ``out`` to an exclusive temporary beside it, fsynced and
    renamed (``out`` never holds a half-written store)."""
    from core.files import OutputLock

    out, parts = Path(out), [Path(p) for p in parts]
    with OutputLock(out, "the image store"):
        return _merge_stores(out, parts)


def _merge_stores(out: Path, parts: list[Path]) -> Path:
    import contextlib
    import os
    import tempfile

    from core.files import ensure_dir, fsync_dir, fsync_file

    ref, c = open_checked(parts[0])
    with ref:
        keep = ("fingerprint", "size", "resize")
        attrs, hw = {k: scalar_attr(ref, k) for k in keep}, c["hw"]
    n, ends = len(hw), c["ends"]
    ensure_dir(out.parent, "output folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        _copy_parts(tmp, parts, attrs, hw, n, ends)
        fsync_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)
    return out


def _copy_parts(tmp, parts: list[Path], attrs: dict, hw: np.ndarray, n: int, ends: np.ndarray) -> None:
    with h5py.File(tmp, "w") as f:
        _create(f, attrs, hw, 0, n)
        done = np.zeros(n, bool)
        for p in parts:  # each part checked as a received store: no bytes from outside it
            src, c = open_checked(p)
            with src:
                check_attrs(src, p, attrs["fingerprint"], attrs["size"], attrs["resize"])
                if not np.array_equal(c["hw"], hw):
                    raise StoreError(f"the store parts {parts[0]} and {p} disagree on the image sizes")
                base = c["base"]
                mine = np.zeros(n, bool)
                mine[c["row_start"]:c["row_stop"]] = src["done"][c["row_start"]:c["row_stop"]]
                mine &= ~done
                for a, b in _runs(np.flatnonzero(mine), ends):
                    f["pixels"][ends[a]:ends[b]] = src["pixels"][ends[a] - base:ends[b] - base]
                    f["digest"][a:b] = src["digest"][a:b]
                done |= mine
        if not done.all():
            raise StoreError(f"the store parts {', '.join(map(str, parts))} miss {int((~done).sum())} rows")
        f["done"][:] = True


def _runs(rows: np.ndarray, ends: np.ndarray):
    """Increasing ``rows`` as (a, b) ranges of consecutive rows, each of at most COPY_BYTES
    (or one image)."""
    if not len(rows):
        return
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, cut):
        a, stop = int(run[0]), int(run[-1]) + 1
        while a < stop:
            b = max(a + 1, min(stop, int(np.searchsorted(ends, ends[a] + COPY_BYTES, "right")) - 1))
            yield a, b
            a = b


class ImageStore:
    """Read side of the store. Opens the file lazily (read-only), so it can be sent to DataLoader
    workers."""

    def __init__(self, path: str | Path, fingerprint: str | None = None, size: int | None = None,
                 resize: str | None = None, rows: range | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"no image store at {self.path}; it is built by `python cli.py precompute`")
        try:
            with h5py.File(self.path, "r") as f:
                check_attrs(f, self.path, None, None, None)
                c = check_store(f, self.path)  # a received store: checked before its tables are used
                check_attrs(f, self.path, fingerprint, size, resize)
                done = f["done"][:]
                self.hw, self._ends = c["hw"], c["ends"]  # [N, 2] (height, width) of each image; [N + 1]
                self.size, self.num_rows = scalar_attr(f, "size"), len(self.hw)
                self.side, self.resize = scalar_attr(f, "side"), scalar_attr(f, "resize")
                self.fingerprint = scalar_attr(f, "fingerprint")
                self.row_start, self.row_stop, self._base = c["row_start"], c["row_stop"], c["base"]
        except (OSError, KeyError) as e:
            raise StoreError(f"{self.path} is not a readable image store ({e}); "
                             "delete it to rebuild") from None
        lo, hi = (self.row_start, self.row_stop) if rows is None else (rows.start, rows.stop)
        if lo < self.row_start or hi > self.row_stop or not done[lo:hi].all():
            have = int(done[self.row_start:self.row_stop].sum())
            raise StoreError(f"{self.path} is incomplete ({have} of {len(done)} rows); "
                             "rerun the command that builds it to finish")
        self._file, self._pixels, self._digests, self._raw, self._pool = None, None, None, None, None

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pixels": None, "_raw": None, "_pool": None}

    def _open(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._pixels = self._file["pixels"]  # kept: h5py's lookup by name costs ~0.3 ms a call
            self._raw = self._raw_range(self._pixels)
        return self._file

    def _raw_range(self, pixels: h5py.Dataset):
        """(fd, file offset) of the pixel bytes when they lie contiguous and unfiltered in the file,
        else None. Reading them with ``os.pread`` reads exactly the bytes asked: HDF5's own reads
        of scattered small slices pull a 64 KiB sieve window each (18x the bytes of random
        240-byte images, benchmarks/bench_stream.py)."""
        offset = pixels.id.get_offset()
        nbytes = pixels.shape[0] * pixels.dtype.itemsize
        if offset is None or pixels.chunks is not None or pixels.compression or \
                offset + nbytes > os.path.getsize(self.path):
            return None
        return os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), int(offset)

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Pixel bytes [start, stop) of this file's buffer."""
        if self._raw is None:
            return self._pixels[start:stop]
        fd, base = self._raw
        out = np.empty(stop - start, np.uint8)
        if os.preadv(fd, [memoryview(out)], base + start) != stop - start:
            raise StoreError(f"{self.path}: truncated (pixel bytes {start}..{stop} cut short); copy it again "
                             "or delete it to rebuild")
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the pixels this file holds."""
        return int(self._ends[self.row_stop] - self._ends[self.row_start])

    def nbytes_of(self, rows) -> int:
        """Bytes the images ``rows`` take (3 * h * w each), repeats counted."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return int((self._ends[rows + 1] - self._ends[rows]).sum())

    def load(self, rows, check: bool = True) -> Pixels:
        """The images ``rows`` (any order, repeats allowed) as :class:`Pixels` in that order.
        ``check``: each image read must match its sha256 digest (a StoreError if not)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            return Pixels._pack(torch.empty(0, dtype=torch.uint8), np.zeros((0, 2), np.int64))
        unique, inverse = np.unique(rows, return_inverse=True)
        if unique[0] < self.row_start or unique[-1] >= self.row_stop:
            raise StoreError(f"{self.path} holds rows {self.row_start}..{self.row_stop - 1}; "
                             f"rows {unique[0]}..{unique[-1]} asked")
        self._open()
        cut = np.flatnonzero(np.diff(unique) != 1) + 1  # consecutive rows are one read
        first, last = np.concatenate([[0], cut]), np.concatenate([cut - 1, [len(unique) - 1]])
        pieces = [self._read(a, b) for a, b in zip((self._ends[unique[first]] - self._base).tolist(),
                                                    (self._ends[unique[last] + 1] - self._base).tolist())]
        buf = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        at = np.concatenate([[0], np.cumsum(self._ends[unique + 1] - self._ends[unique])])
        if check:
            self._check(buf, at, unique)
        out = Pixels._pack(torch.from_numpy(buf), self.hw[unique])
        if len(unique) == len(rows) and (unique == rows).all():
            return out
        return out[inverse.reshape(-1)]

    def load_all(self, check: bool = True) -> Pixels:
        """Every image this file holds (all rows, or its part's), in row order."""
        return self.load(np.arange(self.row_start, self.row_stop), check=check)

    def _check(self, buf: np.ndarray, at: np.ndarray, rows: np.ndarray) -> None:
        if self._digests is None:
            self._digests = self._open()["digest"][:]
        views = [buf[at[i]:at[i + 1]] for i in range(len(rows))]
        # large images: hashlib lets go of the GIL
        if len(rows) > 8 and len(buf) > 64 * 1024 * len(rows) // 8:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(4)
            got = list(self._pool.map(lambda v: hashlib.sha256(v).digest(), views))
        else:  # small ones: a thread hand-off costs more than the hash
            got = [hashlib.sha256(v).digest() for v in views]
        bad = [int(r) for r, g in zip(rows, got) if g != self._digests[r].tobytes()]
        if bad:
            raise StoreError(f"{self.path}: {len(bad)} image(s) do not match their sha256 digest (rows "
                             f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}): the file is "
                             "damaged; delete it to rebuild")

    def store_digest(self) -> str:
        """One sha256 (hex) over the store's attributes and its tables (offsets, sizes, done
        flags and every image's digest): equal digests, equal stores."""
        f = self._open()
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic)
                     else v) for k, v in f.attrs.items()}
        h = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=str).encode())
        for name in ("offset", "hw", "done", "digest"):
            h.update(name.encode())
            h.update(np.ascontiguousarray(f[name][:]).tobytes())
        return h.hexdigest()

    def verify(self) -> list[str]:
        """Problems found reading every image of the store against its digest (empty: sound)."""
        problems = []
        try:
            f = self._open()
            extra = sorted(set(f) - set(DATASETS))
            if extra:
                problems.append(f"{self.path}: objects that are no part of an image store: "
                                f"{', '.join(extra)}")
            want = int(self._ends[self.row_stop] - self._ends[self.row_start])
            if f["pixels"].shape[0] != max(1, want):
                problems.append(f"{self.path}: {f['pixels'].shape[0]} pixel bytes, its images take {want}")
                return problems
            digests = f["digest"][:]
            rows = np.arange(self.row_start, self.row_stop)
            bad = []
            for a, b in _runs(rows, self._ends):
                buf = f["pixels"][self._ends[a] - self._base:self._ends[b] - self._base]
                at = self._ends[a:b + 1] - self._ends[a]
                bad += [r for r in range(a, b)
                        if hashlib.sha256(buf[at[r - a]:at[r - a + 1]]).digest() != digests[r].tobytes()]
            if bad:
                problems.append(f"{self.path}: {len(bad)} image(s) do not match their sha256 digest (rows "
                                f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
        except (OSError, KeyError) as e:
            problems.append(f"{self.path}: unreadable ({type(e).__name__}: {e})")
        return problems

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._pixels = None, None
        if self._raw is not None:
            os.close(self._raw[0])
            self._raw = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
