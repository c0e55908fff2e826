"""Reading a cache file: checked on open, read lazily by rows (whole splits or row chunks)."""
from __future__ import annotations

import os

import h5py
import numpy as np

from cache.schema import (ROW_DATASETS, SAMPLE_FIELDS, CacheError, CacheMeta, check_schema, layout,
                          meta_from_file, row_bytes)
from data.waterbirds import SPLIT_CODES

# Bulk reads go through slabs of at most this size, so peak memory stays bounded.
SLAB_BYTES = 64 * 1024 * 1024
READ_CACHE_BYTES = 16 * 1024 * 1024


def open_h5(path, mode: str = "r") -> h5py.File:
    """h5py.File with the errors a user meets turned into CacheError."""
    path = str(path)
    if mode != "w-" and not os.path.isfile(path):
        raise CacheError(f"{path}: no such cache file; build it with `precompute` or check the path")
    try:
        return h5py.File(path, mode, rdcc_nbytes=READ_CACHE_BYTES)
    except (OSError, ValueError) as e:
        if isinstance(e, BlockingIOError) or "unable to lock file" in str(e):
            raise CacheError(f"{path}: the file is open for writing in another process (a running "
                             "precompute?); wait for it to finish or stop it") from None
        if "already open" in str(e):
            raise CacheError(f"{path}: already open in this process in another mode ({e}); close "
                             "the reader or writer on it first") from None
        raise CacheError(f"{path}: not a readable HDF5 file ({e}). It is truncated or corrupt (an "
                         "interrupted copy or write?); copy it again or delete it and rerun "
                         "precompute") from None


def layout_problems(f: h5py.File, meta: CacheMeta, R: int) -> list[str]:
    problems = []
    for name, (shape, dtype) in layout(meta, R).items():
        if name not in f:
            problems.append(f"dataset /{name} is missing")
            continue
        ds = f[name]
        if ds.shape != shape:
            problems.append(f"/{name} has shape {ds.shape}, expected {shape}")
        ok = ds.dtype.kind == "S" if dtype is None else ds.dtype == dtype
        if not ok:
            problems.append(f"/{name} has dtype {ds.dtype}, expected {dtype or 'utf-8 string'}")
    return problems


def guarded(path, name: str, read):
    """Run ``read()``; a failed read (checksum mismatch, truncated data) becomes a CacheError."""
    try:
        return read()
    except OSError as e:
        raise CacheError(f"{path}: cannot read /{name} ({e}); the file is corrupt. Run `cache "
                         "verify` on it, then copy it again or rebuild it with precompute") from None


def read_checked(f: h5py.File, path, require_complete: bool):
    """Schema, header and layout checks of an open file -> (meta, row_start, row_stop, shard, done)."""
    check_schema(f.attrs, path)
    meta, row_start, row_stop, shard = meta_from_file(f, path)
    problems = layout_problems(f, meta, row_stop - row_start)
    if problems:
        raise CacheError(f"{path}: " + "; ".join(problems) + ". The file is damaged or was not "
                         "written by this tool; delete it and rerun precompute")
    done = guarded(path, "progress/done", lambda: f["progress/done"][...])
    if require_complete and not done.all():
        raise CacheError(f"{path}: incomplete: {int(done.sum())} of {len(done)} rows done; rerun "
                         "precompute with the same arguments to resume")
    return meta, row_start, row_stop, shard, done


def _spans(rows: np.ndarray, gap: int, max_rows: int) -> list[tuple[int, int]]:
    """Split sorted ``rows`` into index ranges whose rows are read as one contiguous slab: a new
    slab starts where the gap exceeds a chunk (rows in between would cost extra chunks) or where
    the slab would exceed ``max_rows`` (memory)."""
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows) > gap) + 1
    out = []
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]])):
        a, b = int(a), int(b)
        while a < b:
            # furthest index whose row still fits in max_rows from rows[a]
            e = int(np.searchsorted(rows[a:b], rows[a] + max_rows, side="left")) + a
            e = max(e, a + 1)
            out.append((a, e))
            a = e
    return out


def gather(ds: h5py.Dataset, rows: np.ndarray, views=None) -> np.ndarray:
    """``ds[rows]`` (then the view axis selected: None all, an int, or an index array) for sorted
    ``rows``, read as contiguous slabs."""
    max_rows = max(1, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize), 1))
    pieces = []
    for a, b in _spans(rows, ds.chunks[0] if ds.chunks else 1, max_rows):
        lo, hi = int(rows[a]), int(rows[b - 1]) + 1
        block = ds[lo:hi][rows[a:b] - lo]
        pieces.append(block if views is None else block[:, views])
    if pieces:
        return np.concatenate(pieces)
    empty = ds[0:0]
    return empty if views is None else empty[:, views]


class CacheReader:
    """Read side of a cache. The HDF5 file is opened on first access, once per process, so a
    reader can be handed to other processes (pickled or forked).

    Row arguments are file rows (dataset rows for a full file).
    """

    def __init__(self, path, meta: CacheMeta, row_start: int, row_stop: int, shard: str,
                 done: np.ndarray):
        self.path, self.meta, self.shard = str(path), meta, shard
        self.row_start, self.row_stop = row_start, row_stop
        self.done = done
        self._file, self._pid, self._samples = None, None, None

    def _h5(self) -> h5py.File:
        # A handle inherited through fork must not be used by the child: reopen per process.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open_h5(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"CacheReader({self.path!r}, rows={self.num_rows}, views={self.meta.views_per_row}, "
                f"teachers={self.meta.num_teachers}, layers={self.meta.layers})")

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    def sample(self, key: str) -> np.ndarray:
        """``samples/<key>`` of every file row ("id" as an object array of str)."""
        if self._samples is None:
            f = self._h5()
            self._samples = guarded(self.path, "samples", lambda: {
                "id": f["samples/id"].asstr()[...].astype(object),
                **{k: f[f"samples/{k}"][...] for k in SAMPLE_FIELDS[1:]}})
        return self._samples[key]

    @property
    def y(self) -> np.ndarray:
        return self.sample("y")

    @property
    def group(self) -> np.ndarray:
        return self.sample("group")

    @property
    def split(self) -> np.ndarray:
        return self.sample("split")

    def split_rows(self, split) -> np.ndarray:
        """File rows of a split given by code (0/1/2) or name ("train", "val", "test")."""
        code = SPLIT_CODES[split] if isinstance(split, str) else int(split)
        return np.flatnonzero(self.split == code)

    def read(self, rows=None, split=None, views=None, layers=None) -> dict:
        """Everything for some rows, in memory, read slab by slab.

        Args:
            rows: sorted file rows; or ``split``: a split code or name; neither: all rows.
            views: None (all V views), an int (view axis dropped) or a list of views.
            layers: feature layers to load; None for all, [] for none.
        Returns:
            ``{"rows": [n] file rows, "id", "y", "place", "group", "split": [n],
            "box": [n, v, 4], "flip": [n, v], "logits": [n, v, T, C], "biased": [n, v, C],
            "weights": [n, v, T], "features": {layer: [n, v, B, D]}}`` (no v axis for an int view).
        """
        if rows is None:
            rows = np.arange(self.num_rows) if split is None else self.split_rows(split)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.num_rows):
            raise ValueError(f"rows must be increasing file rows in 0..{self.num_rows - 1}")
        if views is not None and not np.isscalar(views):
            views = np.asarray(views, dtype=np.int64)
        layers = self.meta.layers if layers is None else list(layers)
        unknown = [l for l in layers if l not in self.meta.layers]
        if unknown:
            raise CacheError(f"{self.path} holds features of {self.meta.layers}, not {unknown}; "
                             f"rerun precompute with --layers including {','.join(unknown)}")
        f = self._h5()

        def load(name):
            return guarded(self.path, name, lambda: gather(f[name], rows, views))

        return {"rows": rows, **{k: self.sample(k)[rows] for k in SAMPLE_FIELDS},
                **{key: load(name) for key, name in ROW_DATASETS.items()},
                "features": {l: load(f"features/{l}") for l in layers}}


def open_cache(path, require_complete: bool = True) -> CacheReader:
    """Check a cache file and return a lazy :class:`CacheReader` on it.

    Checks: readable HDF5, schema name and version, header, every dataset present with the shape
    the header implies, and (``require_complete``) every row done. Any failure is a CacheError
    that names the file and says what to do; the file is not kept open.
    """
    with open_h5(path, "r") as f:
        try:
            meta, row_start, row_stop, shard, done = read_checked(f, path, require_complete)
        except (OSError, RuntimeError) as e:  # HDF5 failures not caught more precisely above
            raise CacheError(f"{path}: cannot read the file ({e}); it is corrupt. Copy it again "
                             "or delete it and rerun precompute") from None
    return CacheReader(path, meta, row_start, row_stop, shard, done)
