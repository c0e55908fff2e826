"""Reading a cache file: checked on open, read lazily by rows (whole splits or row chunks)."""
from __future__ import annotations

import os

import h5py
import numpy as np

from cache.integrity import (BLOCK_ROWS, DIGESTS_KEY, HEADER_KEY, digests_digest, bad_blocks,
                             header_digest, read_digest_tables)
from cache.schema import (ROW_DATASETS, SAMPLE_FIELDS, CacheError, CacheMeta, check_schema, layout,
                          meta_from_file, row_bytes)
from data.folders import SPLIT_CODES

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


# What h5py raises on a damaged file, depending on which structure the damage hit.
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, UnicodeDecodeError)


def guarded(path, name: str, read):
    """Run ``read()``; a failed read (checksum mismatch, damaged structure, truncated data)
    becomes a CacheError naming the file and what to do."""
    try:
        return read()
    except CacheError:
        raise
    except H5_ERRORS as e:
        raise CacheError(f"{path}: cannot read /{name} ({type(e).__name__}: {str(e)[:200]}); the file is "
                         "corrupt. Run `cache verify` on it, then copy it again or rebuild it with precompute") from None


def check_header(f: h5py.File, path) -> bool:
    """True for a finished file whose attributes match their digest; False for an unfinished one.

    Checked before the attributes are parsed, so that damage is named as damage. A finished file
    whose header or digest tables do not match is damaged: CacheError.
    """
    if HEADER_KEY not in f.attrs:
        return False
    if str(f.attrs[HEADER_KEY]) != header_digest(f.attrs):
        raise CacheError(f"{path}: the header (root attributes) does not match its digest: it was edited "
                         "or damaged after precompute wrote it. Copy the file again or rebuild it with precompute")
    return True


def check_digest_tables(f: h5py.File, path, names: list[str]) -> None:
    """The digest tables of a finished file match the digest its (checked) header holds."""
    try:
        tables = read_digest_tables(f, names)
    except H5_ERRORS as e:
        raise CacheError(f"{path}: the digest tables are missing or unreadable ({e}); the file is damaged. "
                         "Copy it again or rebuild it with precompute") from None
    if digests_digest(tables) != str(f.attrs.get(DIGESTS_KEY)):
        raise CacheError(f"{path}: the digest tables do not match the header; the file is damaged. "
                         "Copy it again or rebuild it with precompute")


def read_checked(f: h5py.File, path, require_complete: bool):
    """Schema, header, digests and layout checks of an open file
    -> (meta, row_start, row_stop, shard, done, finished)."""
    check_schema(f.attrs, path)
    finished = check_header(f, path)
    meta, row_start, row_stop, shard = meta_from_file(f, path)
    problems = layout_problems(f, meta, row_stop - row_start)
    if problems:
        raise CacheError(f"{path}: " + "; ".join(problems) + ". The file is damaged or was not "
                         "written by this tool; delete it and rerun precompute")
    if finished:
        check_digest_tables(f, path, list(layout(meta, row_stop - row_start)))
    done = guarded(path, "progress/done", lambda: f["progress/done"][...])
    if require_complete and not (done.all() and finished):
        raise CacheError(f"{path}: incomplete: {int(done.sum())} of {len(done)} rows done"
                         + ("" if not done.all() else ", digests not written yet")
                         + "; rerun precompute with the same arguments to finish it")
    return meta, row_start, row_stop, shard, done, finished


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


def gather(ds: h5py.Dataset, rows: np.ndarray, views=None, digests: np.ndarray | None = None,
           path="") -> np.ndarray:
    """``ds[rows]`` (then the view axis selected: None all, an int, or an index array) for sorted
    ``rows``, read as contiguous slabs. With ``digests`` (the dataset's block digest table) every
    block read is checked against it first; a mismatch is a CacheError."""
    max_rows = max(BLOCK_ROWS, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize), 1))
    gap = max(ds.chunks[0] if ds.chunks else 1, BLOCK_ROWS if digests is not None else 1)
    pieces = []
    for a, b in _spans(rows, gap, max_rows):
        lo, hi = int(rows[a]), int(rows[b - 1]) + 1
        if digests is not None:  # whole blocks, so that each one can be checked
            lo, hi = lo // BLOCK_ROWS * BLOCK_ROWS, min(ds.shape[0], -(-hi // BLOCK_ROWS) * BLOCK_ROWS)
        slab = ds[lo:hi]
        if digests is not None:
            bad = (bad_blocks(slab, lo // BLOCK_ROWS, digests) or [None])[0]
            if bad is not None:
                raise CacheError(f"{path}: rows {bad * BLOCK_ROWS}..{min(ds.shape[0], (bad + 1) * BLOCK_ROWS)} "
                                 f"of /{ds.name.lstrip('/')} do not match their digest: the file is damaged "
                                 "(its chunk index?). Run `cache verify` on it, then copy it again or rebuild "
                                 "it with precompute")
        block = slab[rows[a:b] - lo]
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
                 done: np.ndarray, finished: bool):
        self.path, self.meta, self.shard = str(path), meta, shard
        self.row_start, self.row_stop = row_start, row_stop
        self.done, self.finished = done, finished
        self._file, self._pid, self._samples, self._digests = None, None, None, None

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

    def digests(self, name: str) -> np.ndarray | None:
        """The block digest table of dataset ``name`` (None for an unfinished file)."""
        if not self.finished:
            return None
        if self._digests is None:
            f = self._h5()
            names = list(layout(self.meta, self.num_rows))
            self._digests = guarded(self.path, "digests", lambda: read_digest_tables(f, names))
        return self._digests[name]

    def load(self, name: str, rows: np.ndarray, views=None) -> np.ndarray:
        """Rows of one dataset, every block read checked against its digest."""
        f = self._h5()
        return guarded(self.path, name, lambda: gather(f[name], rows, views, self.digests(name), self.path))

    def sample(self, key: str) -> np.ndarray:
        """``samples/<key>`` of every file row ("id" as an object array of str)."""
        if self._samples is None:
            everything = np.arange(self.num_rows)
            self._samples = {k: self.load(f"samples/{k}", everything) for k in SAMPLE_FIELDS}
            self._samples["id"] = np.char.decode(self._samples["id"], "utf-8").astype(object)
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
            ``{"rows": [n] file rows, "id", "y", "attr", "group", "split": [n],
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
        return {"rows": rows, **{k: self.sample(k)[rows] for k in SAMPLE_FIELDS},
                **{key: self.load(name, rows, views) for key, name in ROW_DATASETS.items()},
                "features": {l: self.load(f"features/{l}", rows, views) for l in layers}}


    def read_views(self, rows, views, layers=None) -> dict:
        """Like :meth:`read` for increasing ``rows`` but one view per row (``views`` [n]): the
        view axis keeps length 1 (``"box": [n, 1, 4]``, ...). Each row is read whole (all its
        views: the unit its digest covers) and the view picked in memory."""
        d = self.read(rows=rows, layers=layers)
        pick = (np.arange(len(d["rows"])), np.asarray(views, dtype=np.int64))
        for key in ROW_DATASETS:
            d[key] = d[key][pick][:, None]
        d["features"] = {l: v[pick][:, None] for l, v in d["features"].items()}
        return d


def open_cache(path, require_complete: bool = True) -> CacheReader:
    """Check a cache file and return a lazy :class:`CacheReader` on it.

    Checks: readable HDF5, schema name and version, header (and its digest), every dataset
    present with the shape the header implies, and (``require_complete``) every row done and the
    digests written. Every later read is checked against the block digests. Any failure is a CacheError
    that names the file and says what to do; the file is not kept open.
    """
    with open_h5(path, "r") as f:
        checked = guarded(path, "", lambda: read_checked(f, path, require_complete))
    return CacheReader(path, *checked)
