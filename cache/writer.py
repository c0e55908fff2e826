"""Writing a cache file: created from its meta, filled row range by row range, resumable."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from cache.integrity import BLOCK_ROWS, HEADER_KEY, write_digests
from cache.reader import READ_CACHE_BYTES, SLAB_BYTES, open_h5, read_checked
from cache.samples import sample_problems
from cache.schema import (DEFAULT_GZIP_LEVEL, EVAL, RANDOM, SAMPLE_FIELDS, CacheError, CacheMeta, chunks_of,
                          encode_ids, has_random, header_attrs, is_slotted, layout, parse_shard, row_bytes,
                          train_positions, view_datasets)
from core.errors import ConfigError
from core.provenance import settings_diff
from data.metrics import as_numpy

log = logging.getLogger(__name__)


def slab_rows(ds: h5py.Dataset) -> int:
    """Rows of ``ds`` (of one slot for a /random dataset) in one bulk read or write of SLAB_BYTES."""
    one_row = row_bytes(ds.shape, ds.dtype.itemsize, is_slotted(ds.name.lstrip("/")))
    return max(1, SLAB_BYTES // max(one_row, 1))


def create_file(path: str, meta: CacheMeta, samples: dict, row_start: int, row_stop: int,
                shard: str, compression: int | None) -> h5py.File:
    """A new file with attrs, samples and empty (not done) view datasets, open for writing.

    Uncompressed, every chunk is allocated (and zero-filled, checksummed) now, dataset by
    dataset and slot by slot, so that one slot of a /random dataset is one contiguous byte range
    whatever order the rows are written in. A gzip chunk's size is only known when it is written,
    so a compressed file allocates as it goes.
    """
    R = row_stop - row_start
    Rt = len(train_positions(samples["split"]))
    ids = encode_ids(samples["id"])
    try:  # "w-" is O_CREAT | O_EXCL: a name taken meanwhile, or a link planted there, is not followed
        f = h5py.File(path, "w-", rdcc_nbytes=READ_CACHE_BYTES)
    except FileExistsError:
        what = "a symbolic link" if os.path.islink(path) else "a file"
        raise CacheError(f"{path} already exists as {what} (a dangling link, or made meanwhile by another "
                         "process); it is neither followed nor replaced: remove it and run again") from None
    try:
        f.attrs.update(header_attrs(meta, row_start, row_stop, shard, BLOCK_ROWS))
        filters = {"fletcher32": True, "shuffle": compression is not None,
                   "compression": "gzip" if compression is not None else None,
                   "compression_opts": compression}
        for name, (shape, dtype) in layout(meta, R, Rt).items():
            dtype = ids.dtype if dtype is None else dtype
            early = {}
            if compression is None:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                early = {"dcpl": dcpl, "fill_time": "alloc"}
            chunks = chunks_of(name, shape, dtype.itemsize)
            ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **filters, **early)
            if name.startswith("samples/"):
                key = name.split("/")[1]
                ds[...] = ids if key == "id" else np.asarray(samples[key], dtype=np.int64)
            elif name == "progress/done":
                ds[...] = False  # allocates the chunks now, so a crash cannot leave "missing" ones
        f.flush()
    except BaseException:
        f.close()
        os.remove(path)  # a half-made file would only be refused on the next run
        raise
    return f


def _nonfinite_source(meta: CacheMeta, key: str, a: np.ndarray) -> str:
    """Which model produced the first non-finite value of view array ``a`` (key as the reader's)."""
    bad = np.argwhere(~np.isfinite(a))[0]
    if key in ("logits", "weights"):
        t = int(bad[-2] if key == "logits" else bad[-1])
        return f"teacher {meta.teacher_entries[t]['name']!r}"
    if key == "biased":
        return f"the biased model {meta.biased_entry['name']!r}"
    if key.startswith("features/"):
        b = int(bad[-2])
        return f"backbone {meta.backbone_ids[b]!r} (of {', '.join(meta.backbone_users(b))})"
    return "the view sampler"


def made_for_other_inputs(path, diff: list[str]) -> CacheError:
    """The one refusal of an existing cache made from other inputs, naming what differs."""
    return CacheError(f"{path} already exists and was made for other inputs ({'; '.join(diff)}). Pass "
                      "--overwrite to rebuild it, or choose another --out")


class CacheWriter:
    """Writes rows of a cache file in place, resumable: a row is marked done only after its data
    is written and flushed, so an interrupted run restarts where it stopped.

    Use :meth:`create_or_resume`, then write every range of :meth:`pending_chunks`.
    """

    def __init__(self, path: str, f: h5py.File, meta: CacheMeta, row_start: int, row_stop: int,
                 shard: str, resumed: bool):
        self.path, self._f, self.meta, self.shard = path, f, meta, shard
        self.row_start, self.row_stop = row_start, row_stop
        self.resumed = resumed
        self._done = f["progress/done"][...]
        train = np.zeros(row_stop - row_start, dtype=bool)
        train[train_positions(f["samples/split"][...])] = True
        self._is_train = train
        self._position = np.concatenate([[0], np.cumsum(train)])  # file row -> index into train_rows

    @classmethod
    def create_or_resume(cls, path, meta: CacheMeta, samples: dict, row_start: int = 0,
                         row_stop: int | None = None, shard: str = "",
                         compression: int | None = DEFAULT_GZIP_LEVEL) -> "CacheWriter":
        """Open ``path`` for writing dataset rows ``[row_start, row_stop)`` (default: all N).

        Args:
            meta: what the file is made from; on resume it must equal the file's (provenance aside).
            samples: ``{"id": [R] str, "y", "attr", "group", "split": [R] int}`` for these rows.
            shard: ``"i/n"`` for one of n shard files, ``""`` for a full file.
            compression: gzip level (1-9; 1 is nearly as small as 9 on float data and much
                faster) or None (about 20% larger, reads ~10x faster). Used only when creating.
        Raises:
            CacheError: the file exists but was made for other inputs, or cannot be opened.
        """
        path = str(path)
        N = meta.num_samples
        row_stop = N if row_stop is None else int(row_stop)
        row_start = int(row_start)
        if not 0 <= row_start < row_stop <= N:
            raise ConfigError(f"rows {row_start}..{row_stop} must satisfy 0 <= start < stop <= {N}")
        if shard:
            parse_shard(shard)
        elif (row_start, row_stop) != (0, N):
            raise ConfigError("a file holding part of the rows needs a shard name 'i/n'")
        if compression is not None and not 1 <= int(compression) <= 9:
            raise ConfigError(f"gzip level must be in 1..9 or None, got {compression}")
        R = row_stop - row_start
        bad = [k for k in SAMPLE_FIELDS if k not in samples or len(samples[k]) != R]
        if bad:
            raise ValueError(f"samples must hold {SAMPLE_FIELDS} with {R} entries each; wrong or "
                             f"missing: {bad}")
        bad = sample_problems(samples, meta, row_start, row_stop, shard)  # what every reader would refuse
        if bad:
            raise ValueError("samples to write: " + "; ".join(bad))

        if not os.path.exists(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            f = create_file(path, meta, samples, row_start, row_stop, shard, compression)
            log.info("%s: new cache, %d rows to compute", path, R)
            return cls(path, f, meta, row_start, row_stop, shard, resumed=False)

        # Checked read-only first: a finished file that matches is left untouched (not even its
        # modification time changes); anything else is reopened for writing.
        f = open_h5(path, "r")
        try:
            c = read_checked(f, path, require_complete=False, resuming=True)  # checked read-only first
            old, old_start, old_stop, old_shard = c["meta"], c["row_start"], c["row_stop"], c["shard"]
            done, finished = c["done"], c["root_digest"] is not None
            diff = settings_diff(old.identity(), meta.identity(), names=("file", "now"))
            if (old_start, old_stop, old_shard) != (row_start, row_stop, shard):
                diff.append(f"rows/shard: file {old_start}..{old_stop} {old_shard!r}, now "
                            f"{row_start}..{row_stop} {shard!r}")
            if not diff:
                same = (f["samples/id"].asstr()[...].tolist() == [str(s) for s in samples["id"]]
                        and all(np.array_equal(f[f"samples/{k}"][...], np.asarray(samples[k]))
                                for k in SAMPLE_FIELDS[1:]))
                if not same:
                    diff.append("samples (ids, labels, attributes, groups or splits) differ")
            if diff:
                raise made_for_other_inputs(path, diff)
        except BaseException:
            f.close()
            raise
        if not (finished and done.all()):
            f.close()
            f = open_h5(path, "r+")
        log.info("%s: resuming, %d of %d rows already done", path, int(done.sum()), R)
        return cls(path, f, old, row_start, row_stop, shard, resumed=True)

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def finished(self) -> bool:
        """Every row done and the digests written: nothing left to do."""
        return bool(self._done.all()) and HEADER_KEY in self._f.attrs

    def finalize(self) -> None:
        """Once every row is done: read every dataset back and write its block digests, then the
        digest and header attributes (cache.integrity). A kill before the end leaves an
        unfinished file that the next run finalizes again."""
        if not self._done.all():
            raise ValueError(f"{self.path}: {self.num_rows - self.num_done} rows are not done yet")
        if HEADER_KEY in self._f.attrs:
            del self._f.attrs[HEADER_KEY]  # unfinished until the new digests are all written
        write_digests(self._f, list(self._layout()), slab_rows, is_slotted, BLOCK_ROWS)
        self._f.flush()

    def _layout(self, R: int | None = None, Rt: int | None = None) -> dict:
        R = self.num_rows if R is None else R
        return layout(self.meta, R, int(self._is_train.sum()) if Rt is None else Rt)

    @property
    def num_done(self) -> int:
        return int(self._done.sum())

    @property
    def done(self) -> np.ndarray:
        """[R] bool copy of the progress flags (file rows)."""
        return self._done.copy()

    def pending_chunks(self, chunk: int) -> list[tuple[int, int]]:
        """``(start, stop)`` file-row ranges, at most ``chunk`` long and aligned to multiples
        of it, that together cover exactly the rows not done yet. Dataset row = row_start + file row.
        """
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        out = []
        for lo in range(0, self.num_rows, chunk):
            todo = ~self._done[lo:lo + chunk]
            if not todo.any():
                continue
            # runs of not-done rows inside this block (usually the whole block)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], todo.astype(np.int8), [0]])))
            out += [(lo + int(a), lo + int(b)) for a, b in zip(edges[::2], edges[1::2])]
        return out

    def write_rows(self, start: int, stop: int, eval: dict, random: dict | None = None) -> None:
        """Write file rows ``[start, stop)`` (n = stop - start), flush, then mark them done.

        Args:
            eval: view 0 of every row: ``{"box": [n, 4] relative (top, left, height, width),
                "flip": [n] bool, "logits": [n, T, C], "biased": [n, C], "weights": [n, T]
                (cached AGRE weights), "features": {layer: [n, B, D_layer]}}`` (features stored
                as float16).
            random: the K random views of the training rows among them (nt of them, in row
                order), the same keys with a leading [K, nt] (slot, row); None when K = 0 or nt = 0.
        Numpy arrays or CPU/GPU tensors. Non-finite values are refused (CacheError naming the
        dataset and the model that produced them).
        """
        if not 0 <= start < stop <= self.num_rows:
            raise ValueError(f"rows {start}..{stop} outside this file's 0..{self.num_rows}")
        p0, p1 = int(self._position[start]), int(self._position[stop])
        parts = [(EVAL, eval, stop - start, p1 - p0)]
        if has_random(self.meta, p1 - p0):
            if random is None:
                raise ValueError(f"rows {start}..{stop} hold {p1 - p0} training rows: their random views "
                                 "are needed")
            parts.append((RANDOM, random, stop - start, p1 - p0))
        arrays = {}
        for part, given, n, nt in parts:
            layers, expected = set(given.get("features", {})), set(self.meta.layers)
            unknown, missing = layers - expected, expected - layers
            if unknown or missing:
                raise ValueError(f"{part}: features must hold exactly the layers {self.meta.layers}; "
                                 f"missing {sorted(missing)}, unknown {sorted(unknown)}")
            flat = {**{k: given.get(k) for k in ("box", "flip", "logits", "biased", "weights")},
                    **{f"features/{l}": v for l, v in given["features"].items()}}
            shapes = self._layout(n, nt)
            for key, name in view_datasets(self.meta, part).items():
                shape, dtype = shapes[name]
                if flat[key] is None:
                    raise ValueError(f"{part}: {key!r} is missing")
                with np.errstate(over="ignore"):  # float16 overflow becomes inf: refused below
                    a = as_numpy(flat[key]).astype(dtype, copy=False)
                if a.shape != shape:
                    raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
                if dtype.kind == "f" and not np.isfinite(a).all():
                    hint = " (float16 overflow: |x| > 65504?)" if dtype == np.float16 else ""
                    source = _nonfinite_source(self.meta, key, a)
                    raise CacheError(f"{self.path}: /{name}: non-finite values from {source} in file rows "
                                     f"{start}..{stop}{hint}; the teachers produce NaN or inf on these "
                                     "images")
                arrays[name] = a
        for name, a in arrays.items():
            if is_slotted(name):
                self._f[name][:, p0:p1] = a
            else:
                self._f[name][start:stop] = a
        self._f.flush()  # data on disk before the rows are claimed done
        self._f["progress/done"][start:stop] = True
        self._f.flush()
        self._done[start:stop] = True

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
