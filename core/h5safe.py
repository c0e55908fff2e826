"""HDF5 files received from someone else: refuse links out of the file, foreign filters and declared
sizes (bytes or chunks) the file cannot back.

A cache or image store from a collaborator is untrusted input. HDF5 can make a name in one file
read (or, opened for writing, write) another file: soft and external links, virtual datasets and
external raw storage. It can declare a dataset of 10^12 rows in an 8 KB file, which a reader that
trusts ``shape`` turns into a MemoryError or an endless walk; and it can split a small dataset
into a million one-byte chunks: HDF5 keeps about 5 KB of bookkeeping per chunk a read touches,
allocated or not, so a 32 KB file of 500,000 declared chunks cost 2.6 GB to read. It also runs any
filter a dataset names, looking in its plugin folder for one it does not know.

:func:`check_structure` walks every object of an open file, from metadata only (no dataset value
is read), and refuses all of these with ``error_cls`` and a message naming the object;
:func:`open_untrusted` opens a file and checks it before anything else reads it. What a schema
knows on top (exact shapes, the writer's own chunk shapes) its reader checks with
:func:`chunk_count` and :func:`auto_chunk_limit` before it reads a dataset.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Union

import h5py
from h5py import h5pl, h5z

from core.errors import ToolError

MAX_OBJECTS = 10_000     # groups + datasets walked in one file
MAX_RATIO = 1100         # declared bytes per allocated byte: deflate's ceiling is about 1032:1
# Chunks: an allocated chunk takes at least its 8-byte address in the chunk index (plus its bytes),
# so a file of S bytes holds at most S / 8 of them; FREE_CHUNKS more are allowed whatever the file
# size (HDF5's ~5 KB of bookkeeping each: about 20 MB). Per dataset and over the whole file.
CHUNK_INDEX_BYTES = 8
FREE_CHUNKS = 4096
MAX_CHUNK_BYTES = 64 << 20   # one chunk is decompressed whole to read any element of it
# The only filters the tool writes (cache/writer.py, data/store.py): any other id is refused
# before a value is read, so HDF5 never looks for a plugin to run on a received file's bytes.
ALLOWED_FILTERS = {h5z.FILTER_DEFLATE: "gzip", h5z.FILTER_SHUFFLE: "shuffle",
                   h5z.FILTER_FLETCHER32: "fletcher32"}


def _fail(error_cls, path, message: str):
    return error_cls(f"{path}: {message}; this file is not one the tool wrote (damaged or "
                     f"crafted): do not use it, get a fresh copy or rebuild it")


def chunk_count(shape, chunks) -> int:
    """Chunks a dataset of ``shape`` split into ``chunks`` declares (Python ints: no overflow);
    1 for a contiguous or compact one (``chunks`` None)."""
    if chunks is None:
        return 1
    return math.prod(-(-int(s) // max(int(c), 1)) for s, c in zip(shape, chunks))


def auto_chunk_limit(shape, itemsize: int) -> int:
    """At most the chunks h5py's own chunk guess makes for ``shape`` (its chunks hold at least
    4 KiB or the whole array; this allows half that): the bound of a dataset the writer created
    without a chunk shape of its own (digest tables, the image store's tables)."""
    return 1 + math.prod(int(s) for s in shape) * int(itemsize) // 2048


def disable_plugins() -> None:
    """Empty HDF5's plugin search path for this process: the tool never reads a filter it does not
    write itself, so no plugin library is ever loaded to decode a received file (the allow-list
    refuses such a dataset first; this is the second lock)."""
    try:
        while h5pl.size():
            h5pl.remove(0)
    except Exception:  # an HDF5 built without plugin support: nothing to search
        pass


def filters_of(ds: h5py.Dataset) -> list[tuple[int, str]]:
    """(filter id, name) of every filter in a dataset's pipeline, read from its creation
    properties (nothing is decoded, no plugin is looked for)."""
    dcpl = ds.id.get_create_plist()
    out = []
    for i in range(dcpl.get_nfilters()):
        code, _flags, _values, name = dcpl.get_filter(i)
        out.append((int(code), name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)))
    return out


def _check_dataset(ds: h5py.Dataset, name: str, path, file_size: int, error_cls, sparse: bool) -> int:
    """Refuse what one dataset must not be; returns the chunks it declares."""
    if ds.is_virtual:
        raise _fail(error_cls, path, f"dataset /{name} is a virtual dataset (it reads other files)")
    if ds.external is not None:
        raise _fail(error_cls, path, f"dataset /{name} keeps its data in external file(s) "
                                     f"{', '.join(str(e[0]) for e in ds.external)[:200]}")
    foreign = ", ".join(f"{c} ({n or 'unnamed'})" for c, n in filters_of(ds) if c not in ALLOWED_FILTERS)
    if foreign:
        raise _fail(error_cls, path, f"dataset /{name} is stored through HDF5 filter(s) {foreign[:200]}; "
                                     f"the tool writes only {', '.join(ALLOWED_FILTERS.values())} and reads "
                                     "nothing else")
    shape = tuple(ds.shape or ())
    itemsize = int(ds.dtype.itemsize)
    declared = math.prod(shape) * itemsize
    chunks = ds.chunks
    if chunks is not None:
        if len(chunks) != len(shape) or any(int(c) > max(int(s), 1) for c, s in zip(chunks, shape)):
            raise _fail(error_cls, path, f"dataset /{name} has chunks {tuple(chunks)} larger than its "
                                         f"shape {shape}")
        if math.prod(chunks) * itemsize > MAX_CHUNK_BYTES:
            raise _fail(error_cls, path, f"dataset /{name} has chunks of {math.prod(chunks) * itemsize:,} "
                                         f"bytes (at most {MAX_CHUNK_BYTES:,})")
    n_chunks = chunk_count(shape, chunks)
    stored = int(ds.id.get_storage_size())
    if stored > file_size:
        raise _fail(error_cls, path, f"dataset /{name} claims {stored:,} bytes of storage in a file of "
                                     f"{file_size:,} bytes")
    if sparse:
        return 0  # being written: unwritten chunks read as the fill value; the caller bounds it
    limit = chunk_limit(file_size)
    if n_chunks > limit:
        raise _fail(error_cls, path, f"dataset /{name} declares {n_chunks:,} chunks (shape {shape}, chunks "
                                     f"{tuple(chunks)}) in a file of {file_size:,} bytes, which can index at "
                                     f"most {limit:,} (reading it would cost about "
                                     f"{n_chunks * 5 // 1024:,} MB)")
    if declared > max(stored, 1) * MAX_RATIO:
        raise _fail(error_cls, path, f"dataset /{name} declares shape {shape} ({declared:,} bytes) but holds "
                                     f"{stored:,} bytes: more than {MAX_RATIO}x any compression")
    return n_chunks


def chunk_limit(file_size: int) -> int:
    """Chunks a file of ``file_size`` bytes can index (per dataset and in all)."""
    return FREE_CHUNKS + max(int(file_size), 0) // CHUNK_INDEX_BYTES


# allow_sparse: True for every chunked dataset, or a predicate (name, dataset) naming them
Sparse = Union[bool, Callable[[str, h5py.Dataset], bool]]


def _is_sparse(allow_sparse, name: str, ds: h5py.Dataset) -> bool:
    if callable(allow_sparse):
        return bool(allow_sparse(name, ds))
    return bool(allow_sparse) and ds.chunks is not None


def check_structure(f: h5py.File, path=None, error_cls: type[Exception] = ToolError,
                    max_objects: int = MAX_OBJECTS, allow_sparse: Sparse = False) -> int:
    """Refuse (``error_cls``) soft links, external links, virtual datasets, external raw storage,
    filters the tool does not write, and datasets whose declared size or chunk count the file
    cannot back; returns the number of objects walked. Reads metadata only.

    A dataset's allocated storage must fit in the file, its declared bytes must not exceed
    ``MAX_RATIO`` times that storage (at least 1 byte), its chunks must not exceed its shape nor
    ``MAX_CHUNK_BYTES``, and the chunks it declares (allocated or not) must not exceed
    :func:`chunk_limit` of the file's size; nor may all of them together. ``allow_sparse`` waives
    the ratio and chunk-count bounds for chunked datasets (True) or for those a predicate
    ``(name, dataset) -> bool`` names: a partly written file the caller is about to resume, whose
    shapes and chunks it bounds itself from its header; never for a file only read.
    """
    disable_plugins()
    path = path if path is not None else f.filename
    try:
        file_size = os.path.getsize(f.filename)
    except OSError:
        file_size = 0
    if f.driver == "core":  # an in-memory file: no size on disk to compare with
        file_size = max(file_size, int(f.id.get_filesize()))
    seen, total, limit = 0, 0, chunk_limit(file_size)
    stack = [("", f)]
    while stack:
        prefix, group = stack.pop()
        for key in group:
            name = f"{prefix}{key}"
            seen += 1
            if seen > max_objects:
                raise _fail(error_cls, path, f"more than {max_objects:,} objects")
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise _fail(error_cls, path, f"/{name} is an external link to {link.filename}:{link.path}")
            if isinstance(link, h5py.SoftLink):
                raise _fail(error_cls, path, f"/{name} is a soft link to {link.path}")
            if not isinstance(link, h5py.HardLink):
                raise _fail(error_cls, path, f"/{name} is a link of an unknown kind ({type(link).__name__})")
            obj = group.get(key)
            if isinstance(obj, h5py.Dataset):
                total += _check_dataset(obj, name, path, file_size, error_cls,
                                        _is_sparse(allow_sparse, name, obj))
                if total > limit:
                    raise _fail(error_cls, path, f"its datasets declare more than {limit:,} chunks in all "
                                                 f"(at /{name}), more than a file of {file_size:,} bytes "
                                                 "can index")
            elif isinstance(obj, h5py.Group):
                stack.append((f"{name}/", obj))
            else:
                raise _fail(error_cls, path,
                            f"/{name} is neither a group nor a dataset ({type(obj).__name__})")
    return seen


def open_untrusted(path, mode: str = "r", error_cls: type[Exception] = ToolError, what: str = "HDF5 file",
                   allow_sparse: Sparse = False, max_objects: int = MAX_OBJECTS, **kwargs) -> h5py.File:
    """``h5py.File(path, mode)`` after :func:`check_structure`; a file HDF5 cannot open is ``error_cls``
    naming it. The file is closed again when the check fails."""
    disable_plugins()
    try:
        f = h5py.File(path, mode, **kwargs)
    except FileNotFoundError:
        raise error_cls(f"{path}: no such {what}") from None
    except OSError as e:
        raise error_cls(f"{path}: not a readable {what} ({e})") from None
    try:
        check_structure(f, path, error_cls, max_objects, allow_sparse)
    except BaseException:
        f.close()
        raise
    return f
