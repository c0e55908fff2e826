"""Reading a cache file: checked on open, read lazily by view (eval view of any rows, one slot)."""
from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np

from cache.integrity import DIGESTS_KEY, HEADER_KEY, digest_name, bad_blocks, digests_digest, header_digest
from cache.limits import MAX_ID_BYTES
from cache.samples import sample_problems, samples_message
from cache.schema import (EVAL, RANDOM, SAMPLE_FIELDS, VIEW_FIELDS, CacheError, CacheMeta, check_schema,
                          chunks_of, is_slotted, layout, meta_from_file, row_bytes, train_positions)
from core.h5safe import auto_chunk_limit, chunk_count
from core.h5safe import check_structure as check_h5
from data.folders import SPLIT_CODES

# Bulk reads go through slabs of at most this size, so peak memory stays bounded.
SLAB_BYTES = 64 * 1024 * 1024
READ_CACHE_BYTES = 16 * 1024 * 1024
FIELDS = tuple(VIEW_FIELDS)  # box, flip, logits, biased, weights


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


def _written_row_by_row(name: str, ds: h5py.Dataset) -> bool:
    """The datasets a resumed file may hold unwritten (sparse) chunks of: the views, written as
    rows are computed (the samples and progress flags are written when the file is made, the
    digest tables whole when it is finished)."""
    return ds.chunks is not None and name.startswith((EVAL + "/", RANDOM + "/"))


def check_structure(f: h5py.File, path, resuming: bool = False) -> None:
    """An untrusted file holds only datasets stored inside it, through the writer's filters, of
    sizes and chunk counts the file can back (core.h5safe); ``resuming``: a partly written file,
    whose views may have unwritten chunks (then bounded by :func:`layout_problems`)."""
    check_h5(f, path, CacheError, allow_sparse=_written_row_by_row if resuming else False)


def layout_problems(f: h5py.File, meta: CacheMeta, R: int, Rt: int) -> list[str]:
    """Every dataset the header implies is there with its shape, dtype and at most the chunks the
    writer makes (``cache.schema.chunks_of``; metadata only, nothing is read)."""
    problems = []
    for name, (shape, dtype) in layout(meta, R, Rt).items():
        if name not in f or not isinstance(f[name], h5py.Dataset):
            problems.append(f"dataset /{name} is missing")
            continue
        ds = f[name]
        if ds.shape != shape:
            problems.append(f"/{name} has shape {ds.shape}, expected {shape}")
            continue
        ok = ds.dtype.kind == "S" if dtype is None else ds.dtype == dtype
        if not ok:
            problems.append(f"/{name} has dtype {ds.dtype}, expected {dtype or 'utf-8 string'}")
            continue
        if dtype is None and ds.dtype.itemsize > MAX_ID_BYTES:
            problems.append(f"/{name} holds {ds.dtype.itemsize:,}-byte strings (image paths of at most "
                            f"{MAX_ID_BYTES:,} bytes)")
            continue
        n, most = chunk_count(shape, ds.chunks), chunk_count(shape, chunks_of(name, shape, ds.dtype.itemsize))
        if n > most:
            problems.append(f"/{name} is split into {n:,} chunks {ds.chunks}, the writer makes at most "
                            f"{most:,}")
    return problems


def digest_table_problems(f: h5py.File, names: list[str], block: int) -> list[str]:
    """Every digest table is there with the shape its dataset and ``block`` imply, uint8, and
    h5py's own chunking at most (checked before a table is read)."""
    problems = []
    for name in names:
        rows = f[name].shape[1 if is_slotted(name) else 0]
        shape = ((f[name].shape[0],) if is_slotted(name) else ()) + (-(-rows // block), 32)
        path = digest_name(name)
        if path not in f or not isinstance(f[path], h5py.Dataset):
            problems.append(f"dataset /{path} is missing")
            continue
        ds = f[path]
        if ds.shape != shape or ds.dtype != np.uint8:
            problems.append(f"/{path} is {ds.dtype} {ds.shape}, expected uint8 {shape}")
        elif chunk_count(shape, ds.chunks) > auto_chunk_limit(shape, 1):
            problems.append(f"/{path} is split into {chunk_count(shape, ds.chunks):,} chunks {ds.chunks}")
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


def check_header(f: h5py.File, path) -> str | None:
    """The root digest of a finished file whose attributes match their digest; None for an
    unfinished one. Checked before the attributes are parsed, so that damage is named as damage."""
    if HEADER_KEY not in f.attrs:
        return None
    root = header_digest(f.attrs)
    if str(f.attrs[HEADER_KEY]) != root:
        raise CacheError(f"{path}: the header (root attributes) does not match its digest: it was edited "
                         "or damaged after precompute wrote it. Copy the file again or rebuild it with precompute")
    return root


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def check_digest_tables(f: h5py.File, path, names: list[str]) -> dict:
    """The digest tables of a finished file match the digest its (checked) header holds.
    Returns the sha256 of each table, per slot for a slotted dataset: ``{(name, slot): hex}``
    (slot None for per-row datasets), so that a reader can load one slot's table later, alone."""
    problems = digest_table_problems(f, names, _block_rows(f, path))
    if problems:
        raise CacheError(f"{path}: " + "; ".join(problems) + ". The file is damaged or was not written by "
                         "this tool; copy it again or rebuild it with precompute")
    try:
        tables = {name: f[digest_name(name)][...] for name in names}
    except H5_ERRORS as e:
        raise CacheError(f"{path}: the digest tables are missing or unreadable ({e}); the file is damaged. "
                         "Copy it again or rebuild it with precompute") from None
    if digests_digest(tables) != str(f.attrs.get(DIGESTS_KEY)):
        raise CacheError(f"{path}: the digest tables do not match the header; the file is damaged. "
                         "Copy it again or rebuild it with precompute")
    out = {}
    for name, t in tables.items():
        if is_slotted(name):
            out.update({(name, k): _sha(t[k]) for k in range(len(t))})
        else:
            out[(name, None)] = _sha(t)
    return out


def read_samples(f: h5py.File, path, block: int, table_sha: dict | None) -> dict:
    """Every ``/samples`` array of an open file (ids as bytes); in a finished file each block is
    checked against its digest first, so that damage is named as damage before the values are
    judged (:func:`cache.samples.sample_problems`)."""
    out = {}
    for k in SAMPLE_FIELDS:
        name = f"samples/{k}"
        a = guarded(path, name, lambda: f[name][...])
        if table_sha is not None:
            t = guarded(path, digest_name(name), lambda: f[digest_name(name)][...])
            bad = bad_blocks(a, 0, t, block) if _sha(t) == table_sha.get((name, None)) else [0]
            if bad:
                raise CacheError(f"{path}: rows "
                                 f"{bad[0] * block}..{min(len(a), (bad[0] + 1) * block)} of /{name} do not "
                                 "match their digest: the file is damaged. Run `cache verify` on it, then "
                                 "copy it again or rebuild it with precompute")
        out[k] = a
    return out


def read_checked(f: h5py.File, path, require_complete: bool, resuming: bool = False) -> dict:
    """Structure, schema, header, digests, layout and sample-range checks of an open file -> the
    keyword arguments of :class:`CacheReader` but its path (``resuming``: the writer's check of a
    partly written file before it reopens it for writing)."""
    check_structure(f, path, resuming)
    check_schema(f.attrs, path)
    root = check_header(f, path)
    meta, row_start, row_stop, shard = meta_from_file(f, path)
    R = row_stop - row_start
    block = _block_rows(f, path)

    def refuse(problems):
        if problems:
            raise CacheError(f"{path}: " + "; ".join(problems) + ". The file is damaged or was not "
                             "written by this tool; delete it and rerun precompute")
    refuse(layout_problems(f, meta, R, 0))  # all but /random (whose shapes need Rt), before any read
    Rt = len(train_positions(guarded(path, "samples/split", lambda: f["samples/split"][...])))
    refuse(layout_problems(f, meta, R, Rt))
    tables = check_digest_tables(f, path, list(layout(meta, R, Rt))) if root else None
    problems = sample_problems(read_samples(f, path, block, tables), meta, row_start, row_stop, shard)
    if problems:
        raise CacheError(f"{path}: {samples_message(problems)}")
    done = guarded(path, "progress/done", lambda: f["progress/done"][...])
    if require_complete and not (done.all() and root):
        raise CacheError(f"{path}: incomplete: {int(done.sum())} of {len(done)} rows done"
                         + ("" if not done.all() else ", digests not written yet")
                         + "; rerun precompute with the same arguments to finish it")
    return dict(meta=meta, row_start=row_start, row_stop=row_stop, shard=shard, done=done,
                root_digest=root, block_rows=block, table_sha=tables)


def _block_rows(f: h5py.File, path) -> int:
    """The root attribute ``block_rows``: rows per digest block, 1..2^20."""
    try:
        block = int(f.attrs.get("block_rows", 0))
    except (TypeError, ValueError):
        block = 0
    if not 1 <= block <= 1 << 20:
        raise CacheError(f"{path}: block_rows {str(f.attrs.get('block_rows'))[:40]} is not a block size; the "
                         "file is damaged or was not written by this tool")
    return block


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
            e = int(np.searchsorted(rows[a:b], rows[a] + max_rows, side="left")) + a
            e = max(e, a + 1)
            out.append((a, e))
            a = e
    return out


def _increasing(rows, n: int, what: str) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= n):
        raise ValueError(f"{what} must be increasing and in 0..{n - 1}")
    return rows


class CacheReader:
    """Read side of a cache. The HDF5 file is opened on first access, once per process, so a
    reader can be handed to other processes (pickled or forked).

    Row arguments are file rows (dataset rows for a full file); ``positions`` index
    :attr:`train_rows`. Every block a read touches is checked against its digest first.
    ``bytes_read`` counts the bytes read from datasets (slabs and digest tables).
    """

    def __init__(self, path, meta: CacheMeta, row_start: int, row_stop: int, shard: str,
                 done: np.ndarray, root_digest: str | None, block_rows: int, table_sha: dict | None):
        self.path, self.meta, self.shard = str(path), meta, shard
        self.row_start, self.row_stop = row_start, row_stop
        self.done, self.root_digest, self.block_rows = done, root_digest, block_rows
        self._table_sha = table_sha
        self.bytes_read = 0
        self._file, self._pid, self._samples, self._tables = None, None, None, {}

    @property
    def finished(self) -> bool:
        """Every row done and the digests written."""
        return self.root_digest is not None

    def _h5(self) -> h5py.File:
        # A handle inherited through fork must not be used by the child: reopen per process.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open_h5(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None, "_tables": {}}

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
        return (f"CacheReader({self.path!r}, rows={self.num_rows}, train rows={len(self.train_rows)}, "
                f"random views={self.meta.random_views}, teachers={self.meta.num_teachers}, "
                f"layers={self.meta.layers})")

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    def digests(self, name: str, slot: int | None = None) -> np.ndarray | None:
        """The block digest table of dataset ``name`` (of random slot ``slot`` for a /random
        one): [n_blocks, 32]; None for an unfinished file. Checked against the table digests
        taken on open; read once."""
        if self._table_sha is None:
            return None
        key = (name, slot)
        if key not in self._tables:
            f = self._h5()
            t = guarded(self.path, digest_name(name),
                        lambda: f[digest_name(name)][slot] if slot is not None else f[digest_name(name)][...])
            if _sha(t) != self._table_sha.get(key):
                raise CacheError(f"{self.path}: the digest table of /{name} changed "
                                 "since the file was opened or is damaged; run `cache verify` on it, then "
                                 "copy it again or rebuild it")
            self.bytes_read += t.nbytes
            self._tables[key] = t
        return self._tables[key]

    def load(self, name: str, rows: np.ndarray, slot: int | None = None) -> np.ndarray:
        """``ds[rows]`` (``ds[slot, rows]`` for a /random dataset) for increasing ``rows``, read as
        contiguous slabs of whole digest blocks, every block checked against its digest."""
        f = self._h5()
        return guarded(self.path, name, lambda: self._gather(f[name], name, np.asarray(rows, np.int64), slot))

    def _gather(self, ds: h5py.Dataset, name: str, rows: np.ndarray, slot) -> np.ndarray:
        slotted = slot is not None
        n_rows = ds.shape[1] if slotted else ds.shape[0]
        digests, block = self.digests(name, slot), self.block_rows
        max_rows = max(block, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize, slotted), 1))
        chunk = ds.chunks[1 if slotted else 0] if ds.chunks else 1
        gap = max(chunk, block if digests is not None else 1)
        pieces = []
        for a, b in _spans(rows, gap, max_rows):
            lo, hi = int(rows[a]), int(rows[b - 1]) + 1
            if digests is not None:  # whole blocks, so that each one can be checked
                lo, hi = lo // block * block, min(n_rows, -(-hi // block) * block)
            slab = ds[slot, lo:hi] if slotted else ds[lo:hi]
            self.bytes_read += slab.nbytes
            if digests is not None:
                bad = (bad_blocks(slab, lo // block, digests, block) or [None])[0]
                if bad is not None:
                    where = f"slot {slot} (view {slot + 1}) of " if slotted else ""
                    raise CacheError(f"{self.path}: rows "
                                     f"{bad * block}..{min(n_rows, (bad + 1) * block)} of {where}/{name} do "
                                     "not match their digest: the file is damaged (its chunk index?). Run "
                                     "`cache verify` on it, then copy it again or rebuild it with precompute")
            pieces.append(slab[rows[a:b] - lo])
        if pieces:
            return np.concatenate(pieces)
        return ds[slot, 0:0] if slotted else ds[0:0]

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

    @property
    def train_rows(self) -> np.ndarray:
        """File rows that hold random view slots (the training rows), increasing."""
        return train_positions(self.split)

    def _check(self, fields, layers) -> tuple[tuple, list]:
        fields, layers = tuple(fields), list(layers)
        bad = [k for k in fields if k not in VIEW_FIELDS]
        if bad:
            raise ValueError(f"unknown fields {bad}; a view holds {list(VIEW_FIELDS)}")
        unknown = [l for l in layers if l not in self.meta.layers]
        if unknown:
            raise CacheError(f"{self.path} holds features of {self.meta.layers}, not {unknown}; "
                             f"rerun precompute with --layers including {','.join(unknown)}")
        return fields, layers

    def _view(self, part: str, index: np.ndarray, slot, rows: np.ndarray, fields, layers) -> dict:
        def get(sub):
            return self.load(f"{part}/{sub}", index, slot)
        return {"rows": rows, **{k: self.sample(k)[rows] for k in SAMPLE_FIELDS},
                **{k: get(VIEW_FIELDS[k]) for k in fields},
                "features": {l: get(f"features/{l}") for l in layers}}

    def read_eval(self, rows=None, split=None, fields=FIELDS, layers=()) -> dict:
        """View 0 (the eval view) of some rows; only the asked fields and layers are read.

        Args:
            rows: increasing file rows; or ``split``: a split code or name; neither: all rows.
        Returns:
            ``{"rows": [n] file rows, "id", "y", "attr", "group", "split": [n], and of the asked
            fields "box": [n, 4], "flip": [n], "logits": [n, T, C], "biased": [n, C],
            "weights": [n, T], "features": {layer: [n, B, D]}}``.
        """
        fields, layers = self._check(fields, layers)
        if rows is None:
            rows = np.arange(self.num_rows) if split is None else self.split_rows(split)
        rows = _increasing(rows, self.num_rows, "rows")
        return self._view(EVAL, rows, None, rows, fields, layers)

    def read_slot(self, slot: int, layers=(), fields=FIELDS, positions=None) -> dict:
        """View ``slot`` of the training rows: slot 0 their eval view, 1..K random slot k - 1.

        Args:
            positions: increasing indices into :attr:`train_rows` (None: all of them).
        Returns:
            the keys of :meth:`read_eval` (``rows`` = ``train_rows[positions]``) and
            ``"positions"``, each [n, ...]. One slot of /random is one contiguous read.
        """
        fields, layers = self._check(fields, layers)
        K = self.meta.random_views
        if not 0 <= int(slot) <= K:
            raise ValueError(f"slot must be in 0..{K} (0 the eval view, 1..{K} the random views), got {slot}")
        slot, train = int(slot), self.train_rows
        positions = (np.arange(len(train)) if positions is None
                     else _increasing(positions, len(train), "positions"))
        rows = train[positions]
        if slot == 0:
            d = self._view(EVAL, rows, None, rows, fields, layers)
        else:  # slot >= 1 exists only with K >= 1; no training row at all: empty arrays
            d = self._view(RANDOM, positions, slot - 1, rows, fields, layers) if len(train) else \
                self._view(EVAL, rows, None, rows, fields, layers)
        d["positions"] = positions
        return d


def open_cache(path, require_complete: bool = True) -> CacheReader:
    """Check a cache file and return a lazy :class:`CacheReader` on it.

    Checks: readable HDF5 holding only its own datasets, schema name and version (an older
    version is refused with the command that rebuilds it), header (and its digest), the digest
    tables against the header, every dataset present with the shape the header implies, the
    samples in range (classes, attributes, groups, split codes, no id twice: cache.samples), and
    (``require_complete``) every row done and the digests written. Every later read is checked
    against the block digests. Any failure is a CacheError that names the file and says what to
    do; the file is not kept open.
    """
    with open_h5(path, "r") as f:
        checked = guarded(path, "", lambda: read_checked(f, path, require_complete))
    return CacheReader(path, **checked)
