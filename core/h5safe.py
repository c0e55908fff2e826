"""HDF5 files received from someone else: refuse links out of the file and implausible declared sizes.

A cache or image store from a collaborator is untrusted input. HDF5 can make a name in one file
read (or, opened for writing, write) another file: soft and external links, virtual datasets and
external raw storage. It can also declare a dataset of 10^12 rows in an 8 KB file, which a reader
that trusts ``shape`` turns into a MemoryError or an endless walk. :func:`check_structure` walks
every object of an open file and refuses all of these with ``error_cls`` and a message naming the
object; :func:`open_untrusted` opens a file and checks it before anything else reads it.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from core.errors import ToolError

MAX_OBJECTS = 10_000     # groups + datasets walked in one file
MAX_RATIO = 1100         # declared bytes per allocated byte: deflate's ceiling is about 1032:1


def _fail(error_cls, path, message: str):
    return error_cls(f"{path}: {message}; this file is not one the tool wrote (damaged or crafted): do not use it, "
                     f"get a fresh copy or rebuild it")


def _check_dataset(ds: h5py.Dataset, name: str, path, file_size: int, error_cls, allow_sparse: bool) -> None:
    if ds.is_virtual:
        raise _fail(error_cls, path, f"dataset /{name} is a virtual dataset (it reads other files)")
    if ds.external is not None:
        raise _fail(error_cls, path, f"dataset /{name} keeps its data in external file(s) "
                                     f"{', '.join(str(e[0]) for e in ds.external)[:200]}")
    shape = ds.shape or ()
    declared = int(np.prod(shape, dtype=object)) * int(ds.dtype.itemsize) if shape is not None else 0
    stored = int(ds.id.get_storage_size())
    if stored > file_size:
        raise _fail(error_cls, path, f"dataset /{name} claims {stored:,} bytes of storage in a file of "
                                     f"{file_size:,} bytes")
    if allow_sparse and ds.chunks is not None:
        return  # a chunked dataset being written: unwritten chunks read as its fill value
    if declared > max(stored, 1) * MAX_RATIO:
        raise _fail(error_cls, path, f"dataset /{name} declares shape {shape} ({declared:,} bytes) but holds "
                                     f"{stored:,} bytes: more than {MAX_RATIO}x any compression")


def check_structure(f: h5py.File, path=None, error_cls: type[Exception] = ToolError,
                    max_objects: int = MAX_OBJECTS, allow_sparse: bool = False) -> int:
    """Refuse (``error_cls``) soft links, external links, virtual datasets, external raw storage and
    datasets whose declared size the file cannot hold; returns the number of objects walked.

    A dataset's allocated storage must fit in the file, and its declared bytes must not exceed
    ``MAX_RATIO`` times that storage (at least 1 byte). ``allow_sparse`` waives the ratio for
    chunked datasets (a partly written file the caller is about to resume, whose expected shapes it
    checks itself against its header); never for a file only read.
    """
    path = path if path is not None else f.filename
    try:
        file_size = os.path.getsize(f.filename)
    except OSError:
        file_size = 0
    if f.driver == "core":  # an in-memory file: no size on disk to compare with
        file_size = max(file_size, int(f.id.get_filesize()))
    seen = 0
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
                _check_dataset(obj, name, path, file_size, error_cls, allow_sparse)
            elif isinstance(obj, h5py.Group):
                stack.append((f"{name}/", obj))
            else:
                raise _fail(error_cls, path, f"/{name} is neither a group nor a dataset ({type(obj).__name__})")
    return seen


def open_untrusted(path, mode: str = "r", error_cls: type[Exception] = ToolError, what: str = "HDF5 file",
                   allow_sparse: bool = False, max_objects: int = MAX_OBJECTS, **kwargs) -> h5py.File:
    """``h5py.File(path, mode)`` after :func:`check_structure`; a file HDF5 cannot open is ``error_cls``
    naming it. The file is closed again when the check fails."""
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
