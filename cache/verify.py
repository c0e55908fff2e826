"""Full check of a cache file: schema, layout, header digest, every block's digest and checksum."""
from __future__ import annotations

import h5py
import numpy as np

from cache.integrity import BLOCK_ROWS, bad_blocks, read_digest_tables
from cache.reader import (H5_ERRORS, SLAB_BYTES, check_digest_tables, check_header, guarded, layout_problems,
                          open_h5)
from cache.schema import CacheError, check_schema, layout, meta_from_file, row_bytes


def _verify_dataset(ds: h5py.Dataset, name: str, digests: np.ndarray | None) -> list[str]:
    """Read every block of ``ds``: HDF5 checks each chunk's fletcher32 on read, and each block is
    compared with its digest (which catches a damaged chunk index: no read error, wrong rows)."""
    problems = []
    if not ds.fletcher32:
        problems.append(f"/{name} has no fletcher32 checksums; its integrity cannot be checked")
    step = max(1, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize), 1) // BLOCK_ROWS) * BLOCK_ROWS
    unreadable, mismatched, nonfinite = [], [], 0
    for lo in range(0, ds.shape[0], step):
        hi = min(lo + step, ds.shape[0])
        try:
            slab = ds[lo:hi]
        except H5_ERRORS as e:  # a checksum failure somewhere in the slab: name the bad blocks
            for a in range(lo, hi, BLOCK_ROWS):
                try:
                    ds[a:min(a + BLOCK_ROWS, hi)]
                except H5_ERRORS:
                    unreadable.append((a, min(a + BLOCK_ROWS, hi), (str(e).splitlines() or [type(e).__name__])[0]))
            continue
        if digests is not None:
            mismatched += [(b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, hi))
                           for b in bad_blocks(slab, lo // BLOCK_ROWS, digests)]
        if slab.dtype.kind == "f":
            nonfinite += int(slab.size - np.count_nonzero(np.isfinite(slab)))

    def where(spans):
        return ", ".join(f"rows {a}..{b}" for a, b, *_ in spans[:5]) + (" ..." if len(spans) > 5 else "")
    if unreadable:
        problems.append(f"/{name}: {len(unreadable)} block(s) fail the checksum or cannot be read "
                        f"({where(unreadable)}; {unreadable[0][2]}): the file is corrupt; copy it again "
                        "or rebuild it with precompute")
    if mismatched:
        problems.append(f"/{name}: {len(mismatched)} block(s) do not match their digest ({where(mismatched)}): "
                        "the file is damaged; copy it again or rebuild it with precompute")
    if nonfinite:
        problems.append(f"/{name}: {nonfinite} non-finite values")
    return problems


def verify(path, fingerprint: str | None = None) -> list[str]:
    """Full check of a cache file; returns the problems found (empty list: the file is sound).

    Re-reads every dataset completely, so every chunk's fletcher32 checksum and every block's
    digest is checked; also the schema, the header digest, the layout, completeness and, with
    ``fingerprint``, that the file was made from that data set.
    """
    try:
        f = open_h5(path, "r")
    except CacheError as e:
        return [str(e)]
    with f:
        try:
            return guarded(path, "", lambda: _verify_open(f, path, fingerprint))
        except CacheError as e:
            return [str(e)]


def _verify_open(f: h5py.File, path, fingerprint: str | None) -> list[str]:
    check_schema(f.attrs, path)
    finished = check_header(f, path)
    meta, row_start, row_stop, _ = meta_from_file(f, path)
    names = list(layout(meta, row_stop - row_start))
    problems = layout_problems(f, meta, row_stop - row_start)
    if problems:
        return problems
    if finished:
        check_digest_tables(f, path, names)
    tables = read_digest_tables(f, names) if finished else {}
    for name in names:
        problems += _verify_dataset(f[name], name, tables.get(name))
    if not any(p.startswith("/progress/done") for p in problems):
        done = f["progress/done"][...]
        if not done.all() or not finished:
            problems.append(f"incomplete: {int(done.sum())} of {len(done)} rows done"
                            + (", digests not written yet" if done.all() else "")
                            + "; rerun precompute with the same arguments to finish it")
    if fingerprint is not None and fingerprint != meta.dataset_fingerprint:
        problems.append(f"cache made from another data set: file fingerprint "
                        f"{meta.dataset_fingerprint[:16]}, data folder {fingerprint[:16]}; "
                        "rerun precompute on this data folder or point to the right one")
    return problems
