"""The image store's format and the checks every opened store passes before its tables are trusted.

A store is received with its cache, so nothing it declares is believed unread: its links,
filters, sizes and chunk counts go through core.h5safe, then its attributes, the dtype, shape and
chunking of each table, every image size, its offsets, rows and pixel count are range-checked
here (:func:`check_store`; :func:`open_checked` is every open of a store, merge parts included).
The layout itself is described in :mod:`data.store`, which builds, merges and reads stores.
"""
from __future__ import annotations

import h5py
import numpy as np

from core.errors import ToolError
from core.h5safe import auto_chunk_limit, chunk_count, open_untrusted
from core.h5safe import check_structure as check_h5

SCHEMA = "gr-kd-images"
SCHEMA_VERSION = 3
RESIZE_MODES = ("keep-aspect", "squash")
MAX_ASPECT = 2.0  # a longer side is squashed to MAX_ASPECT * S (build_store says how many)
DATASETS = ("pixels", "offset", "hw", "digest", "done")
DTYPES = {"pixels": np.uint8, "offset": np.int64, "hw": np.int32, "digest": np.uint8, "done": np.bool_}
MAX_SIZE = 4096          # the stored short side S at most (cache.limits.MAX_STORE_SIZE)
MAX_ROWS = 1 << 31       # with sides <= 2 * MAX_SIZE, offsets stay far inside int64


class StoreError(ToolError):
    """An image store that cannot be used for the data asked for."""


def ends_of(hw: np.ndarray) -> np.ndarray:
    """Each image's first byte in the whole data set's buffer, and the end of the last ([N + 1])."""
    sizes = 3 * hw[:, 0].astype(np.int64) * hw[:, 1]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # [N + 1]


def scalar_attr(f: h5py.File, key: str):
    """A root attribute as a plain Python scalar (None when absent or not a scalar)."""
    v = f.attrs.get(key)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    v = v.item() if isinstance(v, np.generic) else v
    return v if isinstance(v, (int, float, str)) else None


def check_attrs(f: h5py.File, path, fingerprint: str | None, size: int | None, resize: str | None) -> None:
    """The store's schema, version and fingerprint; and, those given, the folder, size and resize asked."""
    if scalar_attr(f, "schema") != SCHEMA:
        raise StoreError(f"{path} is not an image store (schema {str(f.attrs.get('schema'))[:40]!r})")
    version = scalar_attr(f, "schema_version")
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise StoreError(f"{path}: image store version {str(version)[:20]} is not supported (this tool "
                         f"reads version {SCHEMA_VERSION}, images at their own size); delete it and "
                         "`python cli.py precompute` rebuilds it")
    if not isinstance(scalar_attr(f, "fingerprint"), str):
        raise StoreError(f"{path}: attribute fingerprint is missing or not a string; delete it to rebuild")
    if fingerprint is not None and f.attrs["fingerprint"] != fingerprint:
        raise StoreError(f"{path} was built from another data folder (fingerprint "
                         f"{f.attrs['fingerprint'][:12]}, folder {fingerprint[:12]}); delete it to rebuild")
    if size is not None and scalar_attr(f, "size") != size:
        raise StoreError(f"{path} holds {f.attrs['size']}px images, {size}px asked; use another path")
    if resize is not None and scalar_attr(f, "resize") != resize:
        raise StoreError(f"{path} holds {f.attrs['resize']} images, {resize} asked; use another path")


def _int_attr(f: h5py.File, path, key: str, lo: int, hi: int) -> int:
    v = f.attrs.get(key)
    v = v.item() if isinstance(v, np.generic) else v
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise StoreError(f"{path}: attribute {key} is {str(v)[:40]}, not an integer in {lo}..{hi}: the store "
                         "is damaged or was not written by this tool; delete it to rebuild")
    return v


def written_as_built(name: str, ds: h5py.Dataset) -> bool:
    """What a store being built may hold unwritten: the pixels, digests and done flags (the
    sizes and offsets are written when it is made)."""
    return name in ("pixels", "digest", "done")


def check_store(f: h5py.File, path, building: bool = False) -> dict:
    """Everything an image store declares, checked before its tables are trusted (a store is
    received with its cache): links, filters, sizes and chunk counts (core.h5safe; ``building``:
    a store being built may hold unwritten pixels), then its attributes, the dtype, shape and
    chunking of each table, and the range of every image size (at least 1, short side S and long
    side at most ``MAX_ASPECT * S`` as :func:`data.store.resized_hw` makes them; S at most ``MAX_SIZE``),
    its offsets, its rows and its pixel count. Returns ``{"hw": [N, 2] int64, "ends": [N + 1],
    "row_start", "row_stop", "base"}``. Missing tables are a KeyError (killed while created)."""
    names = set(f.keys())  # link names only: nothing is followed before check_h5 has seen the links
    absent = [name for name in DATASETS if name not in names]
    if absent:
        raise KeyError(f"no {', '.join(absent)}: killed while being created?")
    check_h5(f, path, StoreError, allow_sparse=written_as_built if building else False)
    if not all(isinstance(f[name], h5py.Dataset) for name in DATASETS):
        raise KeyError(f"{', '.join(DATASETS)} must be datasets")
    size = _int_attr(f, path, "size", 1, MAX_SIZE)
    resize = scalar_attr(f, "resize")
    if resize not in RESIZE_MODES:
        raise StoreError(f"{path}: attribute resize is {str(resize)[:40]}, not one of "
                         f"{', '.join(RESIZE_MODES)}")
    n = _int_attr(f, path, "num_rows", 0, MAX_ROWS)
    lo = _int_attr(f, path, "row_start", 0, n)
    hi = _int_attr(f, path, "row_stop", lo, n)
    shapes = {"offset": (n,), "hw": (n, 2), "digest": (n, 32), "done": (n,)}
    for name in DATASETS:
        ds = f[name]
        shape = shapes.get(name, (ds.shape or (0,))[:1])
        if ds.dtype != DTYPES[name] or ds.shape != shape:
            want = "[P]" if name == "pixels" else shape
            raise StoreError(f"{path}: /{name} is {ds.dtype} {ds.shape}, an image store of {n} rows holds "
                             f"{np.dtype(DTYPES[name])} {want}; delete it to rebuild")
        if chunk_count(shape, ds.chunks) > auto_chunk_limit(shape, ds.dtype.itemsize):
            raise StoreError(f"{path}: /{name} is split into {chunk_count(shape, ds.chunks):,} chunks "
                             f"{ds.chunks}; the store is damaged or was not written by this tool; delete it "
                             "to rebuild")
    hw = f["hw"][:].astype(np.int64)
    cap = size if resize == "squash" else round(MAX_ASPECT * size)
    bad = np.flatnonzero((hw.min(axis=1, initial=size) != size) | (hw.max(axis=1, initial=size) > cap)) \
        if n else np.zeros(0, np.int64)
    if len(bad):
        r = int(bad[0])
        raise StoreError(f"{path}: image {r} has size {tuple(hw[r].tolist())}; {len(bad)} image(s) in all "
                         f"are not {resize} {size} px images (short side {size}, long side at most {cap}): "
                         "the store is damaged or was not written by this tool; delete it to rebuild")
    ends = ends_of(hw)
    if not np.array_equal(f["offset"][:], ends[:-1]):
        raise StoreError(f"{path}: its offsets do not follow its image sizes; delete it to rebuild")
    want = {"total_bytes": int(ends[-1]), "pixel_start": int(ends[lo]), "side": int(hw.max()) if n else 0}
    for key, v in want.items():
        _int_attr(f, path, key, v, v)
    if f["pixels"].shape != (max(1, int(ends[hi] - ends[lo])),):
        raise StoreError(f"{path}: {f['pixels'].shape[0]:,} pixel bytes, its images {lo}..{hi - 1} take "
                         f"{int(ends[hi] - ends[lo]):,}; delete it to rebuild")
    return {"hw": hw, "ends": ends, "row_start": lo, "row_stop": hi, "base": want["pixel_start"]}


def open_checked(path, building: bool = False, mode: str = "r") -> tuple[h5py.File, dict]:
    """An existing store, opened through core.h5safe and :func:`check_store` (closed again when
    a check fails): every open of a store, merge parts included."""
    f = open_untrusted(path, mode, StoreError, what="image store",
                       allow_sparse=written_as_built if building else False)
    try:
        check_attrs(f, path, None, None, None)
        return f, check_store(f, path, building)
    except KeyError as e:
        f.close()
        raise StoreError(f"{path} is not a readable image store ({e}); delete it to rebuild") from None
    except BaseException:
        f.close()
        raise

