"""Writing a cache file: created from its meta, filled row range by row range, resumable."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from cache.integrity import HEADER_KEY, write_digests
from cache.reader import READ_CACHE_BYTES, SLAB_BYTES, open_h5, read_checked
from cache.schema import (DEFAULT_GZIP_LEVEL, SAMPLE_FIELDS, CacheError, CacheMeta, chunk_rows,
                          encode_ids, layout, meta_attrs, parse_shard, row_bytes)
from core.errors import ConfigError
from core.provenance import settings_diff
from data.metrics import as_numpy

log = logging.getLogger(__name__)


def create_file(path: str, meta: CacheMeta, samples: dict, row_start: int, row_stop: int,
                shard: str, compression: int | None) -> h5py.File:
    """A new file with attrs, samples and empty (not done) row datasets, open for writing."""
    R = row_stop - row_start
    ids = encode_ids(samples["id"])
    f = h5py.File(path, "w-", rdcc_nbytes=READ_CACHE_BYTES)
    try:
        f.attrs.update(meta_attrs(meta, row_start, row_stop, shard))
        filters = {"fletcher32": True, "shuffle": compression is not None,
                   "compression": "gzip" if compression is not None else None,
                   "compression_opts": compression}
        for name, (shape, dtype) in layout(meta, R).items():
            dtype = ids.dtype if dtype is None else dtype
            chunks = (chunk_rows(row_bytes(shape, dtype.itemsize), R), *shape[1:])
            ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **filters)
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

        if not os.path.exists(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            f = create_file(path, meta, samples, row_start, row_stop, shard, compression)
            log.info("%s: new cache, %d rows to compute", path, R)
            return cls(path, f, meta, row_start, row_stop, shard, resumed=False)

        # Checked read-only first: a finished file that matches is left untouched (not even its
        # modification time changes); anything else is reopened for writing.
        f = open_h5(path, "r")
        try:
            old, old_start, old_stop, old_shard, done, finished = read_checked(f, path, require_complete=False)
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
                raise CacheError(f"{path} already exists and was made for other inputs ("
                                 + "; ".join(diff) + "). Pass --overwrite to rebuild it, or choose another --out")
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
        names = list(layout(self.meta, self.num_rows))
        write_digests(self._f, names, lambda ds: max(1, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize), 1)))
        self._f.flush()

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

    def write_rows(self, start: int, stop: int, box, flip, teacher_logits, biased_logits,
                   features: dict, agre_cached) -> None:
        """Write file rows ``[start, stop)`` (n = stop - start), flush, then mark them done.

        Args:
            box: [n, V, 4] relative (top, left, height, width); flip: [n, V] bool.
            teacher_logits: [n, V, T, C]; biased_logits: [n, V, C].
            features: ``{layer: [n, V, B, D_layer]}`` for every layer (stored as float16).
            agre_cached: [n, V, T] per-sample cached AGRE weights.
        Numpy arrays or CPU/GPU tensors. Non-finite values are refused (CacheError).
        """
        if not 0 <= start < stop <= self.num_rows:
            raise ValueError(f"rows {start}..{stop} outside this file's 0..{self.num_rows}")
        unknown = set(features) - set(self.meta.layers)
        missing = set(self.meta.layers) - set(features)
        if unknown or missing:
            raise ValueError(f"features must hold exactly the layers {self.meta.layers}; "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        given = {"views/box": box, "views/flip": flip, "logits/teachers": teacher_logits,
                 "logits/biased": biased_logits, "weights/agre_cached": agre_cached,
                 **{f"features/{l}": v for l, v in features.items()}}
        shapes = layout(self.meta, stop - start)
        arrays = {}
        for name, value in given.items():
            shape, dtype = shapes[name]
            a = as_numpy(value).astype(dtype, copy=False)
            if a.shape != shape:
                raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
            if dtype.kind == "f" and not np.isfinite(a).all():
                hint = " (float16 overflow: |x| > 65504?)" if dtype == np.float16 else ""
                raise CacheError(f"{self.path}: {name}: non-finite values in rows {start}..{stop}{hint}; "
                                 "the teachers produce NaN or inf on these images")
            arrays[name] = a
        for name, a in arrays.items():
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
