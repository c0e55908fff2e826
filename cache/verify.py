"""Full check of a cache file: schema, layout, every chunk's checksum, completeness, data set."""
from __future__ import annotations

import h5py
import numpy as np

from cache.reader import SLAB_BYTES, layout_problems, open_h5
from cache.schema import CacheError, check_schema, layout, meta_from_file, row_bytes


def _chunk_ranges(ds: h5py.Dataset) -> list[tuple[int, int]]:
    step = ds.chunks[0] if ds.chunks else ds.shape[0]
    return [(a, min(a + step, ds.shape[0])) for a in range(0, ds.shape[0], max(step, 1))]


def _verify_dataset(ds: h5py.Dataset, name: str) -> list[str]:
    """Read every chunk of ``ds`` (HDF5 checks each chunk's fletcher32 on read)."""
    problems = []
    if not ds.fletcher32:
        problems.append(f"/{name} has no fletcher32 checksums; its integrity cannot be checked")
    bad, nonfinite = [], 0
    slab = max(1, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize), 1))
    chunks = _chunk_ranges(ds)
    per_slab = max(1, slab // max(chunks[0][1] - chunks[0][0], 1)) if chunks else 1
    for i in range(0, len(chunks), per_slab):
        group = chunks[i:i + per_slab]
        try:
            parts = [ds[group[0][0]:group[-1][1]]]
        except OSError:
            # a failure somewhere in the slab: read chunk by chunk to name the bad rows
            parts = []
            for a, b in group:
                try:
                    parts.append(ds[a:b])
                except OSError as e:
                    bad.append((a, b, str(e).splitlines()[0]))
        for p in parts:
            if p.dtype.kind == "f":
                nonfinite += int(p.size - np.count_nonzero(np.isfinite(p)))
    if bad:
        where = ", ".join(f"rows {a}..{b}" for a, b, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        problems.append(f"/{name}: {len(bad)} chunk(s) fail the checksum or cannot be read ({where}; "
                        f"{bad[0][2]}): the file is corrupt; copy it again or rebuild it with precompute")
    if nonfinite:
        problems.append(f"/{name}: {nonfinite} non-finite values")
    return problems


def verify(path, fingerprint: str | None = None) -> list[str]:
    """Full check of a cache file; returns the problems found (empty list: the file is sound).

    Re-reads every dataset completely, so every chunk's fletcher32 checksum is checked; also the
    schema, the layout, completeness and, with ``fingerprint``, that the file was made from that
    data set.
    """
    try:
        f = open_h5(path, "r")
    except CacheError as e:
        return [str(e)]
    with f:
        try:
            check_schema(f.attrs, path)
            meta, row_start, row_stop, _ = meta_from_file(f, path)
        except CacheError as e:
            return [str(e)]
        except (OSError, RuntimeError) as e:
            return [f"{path}: cannot read the header ({e}); the file is corrupt"]
        problems = layout_problems(f, meta, row_stop - row_start)
        present = [n for n in layout(meta, row_stop - row_start) if n in f]
        for name in present:
            problems += _verify_dataset(f[name], name)
        if "progress/done" in f and not any(p.startswith("/progress/done") for p in problems):
            done = f["progress/done"][...]
            if not done.all():
                problems.append(f"incomplete: {int(done.sum())} of {len(done)} rows done; rerun "
                                "precompute with the same arguments to resume")
        if fingerprint is not None and fingerprint != meta.dataset_fingerprint:
            problems.append(f"cache made from another data set: file fingerprint "
                            f"{meta.dataset_fingerprint[:16]}, data folder {fingerprint[:16]}; "
                            "rerun precompute on this data folder or point to the right one")
    return problems
