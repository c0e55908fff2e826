"""Full check of a cache file: structure, schema, layout, header digest, every block's digest and
checksum, the samples' ranges, (``expect``) the root digest its sender published, and the image
store beside it."""
from __future__ import annotations

import h5py
import numpy as np

from cache.integrity import bad_blocks
from cache.reader import (H5_ERRORS, SLAB_BYTES, check_digest_tables, check_header, check_structure, guarded,
                          layout_problems, open_h5)
from cache.schema import (SAMPLE_FIELDS, CacheError, check_schema, is_slotted, layout, meta_from_file, row_bytes,
                          train_positions)
from cache.integrity import digest_name
from cache.samples import sample_problems, samples_message
from cache.schema import store_path_for
from data.store import ImageStore, StoreError


def _verify_rows(read, n_rows: int, step: int, block: int, digests: np.ndarray | None, where: str):
    """Read rows 0..n_rows of one dataset (or one slot) through ``read(a, b)`` in whole blocks:
    HDF5 checks each chunk's fletcher32 on read, and each block is compared with its digest
    (which catches a damaged chunk index: no read error, wrong rows)."""
    unreadable, mismatched, nonfinite = [], [], 0
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        try:
            slab = read(lo, hi)
        except H5_ERRORS as e:  # a checksum failure somewhere in the slab: name the bad blocks
            for a in range(lo, hi, block):
                try:
                    read(a, min(a + block, hi))
                except H5_ERRORS:
                    unreadable.append((where, a, min(a + block, hi), (str(e).splitlines() or [type(e).__name__])[0]))
            continue
        if digests is not None:
            mismatched += [(where, b * block, min((b + 1) * block, hi)) for b in bad_blocks(slab, lo // block, digests, block)]
        if slab.dtype.kind == "f":
            nonfinite += int(slab.size - np.count_nonzero(np.isfinite(slab)))
    return unreadable, mismatched, nonfinite


def _verify_dataset(ds: h5py.Dataset, name: str, table: np.ndarray | None, block: int) -> list[str]:
    problems = []
    if not ds.fletcher32:
        problems.append(f"/{name} has no fletcher32 checksums; its integrity cannot be checked")
    slotted = is_slotted(name)
    step = max(1, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize, slotted), 1) // block) * block
    unreadable, mismatched, nonfinite = [], [], 0
    for k in range(ds.shape[0]) if slotted else [None]:
        read = (lambda a, b, k=k: ds[k, a:b]) if slotted else (lambda a, b: ds[a:b])
        u, m, n = _verify_rows(read, ds.shape[1] if slotted else ds.shape[0], step, block,
                               None if table is None else (table[k] if slotted else table),
                               f"slot {k} (view {k + 1}) " if slotted else "")
        unreadable, mismatched, nonfinite = unreadable + u, mismatched + m, nonfinite + n

    def where(spans):
        return ", ".join(f"{w}rows {a}..{b}" for w, a, b, *_ in spans[:5]) + (" ..." if len(spans) > 5 else "")
    if unreadable:
        problems.append(f"/{name}: {len(unreadable)} block(s) fail the checksum or cannot be read "
                        f"({where(unreadable)}; {unreadable[0][3]}): the file is corrupt; copy it again "
                        "or rebuild it with precompute")
    if mismatched:
        problems.append(f"/{name}: {len(mismatched)} block(s) do not match their digest ({where(mismatched)}): "
                        "the file is damaged; copy it again or rebuild it with precompute")
    if nonfinite:
        problems.append(f"/{name}: {nonfinite} non-finite values")
    return problems


def verify(path, fingerprint: str | None = None, expect: str | None = None) -> list[str]:
    """Full check of a cache file; returns the problems found (empty list: the file is sound).

    Re-reads every dataset completely, so every chunk's fletcher32 checksum and every block's
    digest is checked; also the file's structure (only datasets stored inside it), the schema,
    the header digest, the layout, the samples' ranges (cache.samples), completeness, with
    ``fingerprint`` that the file was made from that data set, and with ``expect`` that its root
    digest is the one its sender published (digests detect accidents; only the published root
    digest guards against a file that was altered and re-digested).
    """
    try:
        f = open_h5(path, "r")
    except CacheError as e:
        return [str(e)]
    with f:
        try:
            return guarded(path, "", lambda: _verify_open(f, path, fingerprint, expect))
        except CacheError as e:
            return [str(e)]


def _verify_open(f: h5py.File, path, fingerprint: str | None, expect: str | None) -> list[str]:
    check_structure(f, path)
    check_schema(f.attrs, path)
    root = check_header(f, path)
    meta, row_start, row_stop, shard = meta_from_file(f, path)
    R = row_stop - row_start
    Rt = len(train_positions(f["samples/split"][...])) if "samples/split" in f else 0
    names = list(layout(meta, R, Rt))
    problems = layout_problems(f, meta, R, Rt)
    if problems:
        return problems
    block = int(f.attrs.get("block_rows", 0))
    if not 1 <= block <= 1 << 20:
        return [f"block_rows {block} is not a block size: the file is damaged or was not written by this tool"]
    if root:
        check_digest_tables(f, path, names)
    tables = {n: f[digest_name(n)][...] for n in names} if root else {}
    for name in names:
        problems += _verify_dataset(f[name], name, tables.get(name), block)
    if not any(p.startswith("/samples/") for p in problems):  # readable and as digested: judge the values
        samples = {k: f[f"samples/{k}"][...] for k in SAMPLE_FIELDS}
        bad = sample_problems(samples, meta, row_start, row_stop, shard)
        problems += [samples_message(bad)] if bad else []
    if not any(p.startswith("/progress/done") for p in problems):
        done = f["progress/done"][...]
        if not done.all() or not root:
            problems.append(f"incomplete: {int(done.sum())} of {len(done)} rows done"
                            + (", digests not written yet" if done.all() else "")
                            + "; rerun precompute with the same arguments to finish it")
    if fingerprint is not None and fingerprint != meta.dataset_fingerprint:
        problems.append(f"cache made from another data set: file fingerprint "
                        f"{meta.dataset_fingerprint[:16]}, data folder {fingerprint[:16]}; "
                        "rerun precompute on this data folder or point to the right one")
    if expect is not None and (root or "") != expect.strip().lower():
        problems.append(f"root digest {root or '(none: the file is unfinished)'} is not the expected {expect.strip()}: "
                        "this is not the file that was published (altered, re-digested or another build); "
                        "do not use it, ask its sender for the file or the digest again")
    return problems + store_problems(path, meta)


def store_problems(path, meta) -> list[str]:
    """Problems of the image store beside the cache at ``path``: missing (when the header records
    one), not matching the cache's data and image size, an image not matching its digest, or a
    store other than the one the teacher outputs were computed from (``meta.store_digest``)."""
    sp = store_path_for(path)
    if not sp.is_file():
        if not meta.store_digest:
            return []  # a cache made without a store (by hand): nothing is bound to it
        return [f"{sp} is missing: the cache was copied without its image store: send {sp.name} with it "
                "(distill reads the images from it)"]
    try:
        store = ImageStore(sp, meta.dataset_fingerprint, meta.store_size, meta.view_spec.get("resize"))
    except StoreError as e:
        return [f"image store: {e}"]
    try:
        problems = store.verify()
        if not problems and meta.store_digest:
            got = store.store_digest()
            if got != meta.store_digest:
                problems.append(f"{sp} is not the image store this cache was computed from (store digest "
                                f"{got[:16]}, the cache's header records {meta.store_digest[:16]}): copy the "
                                f"cache's own {sp.name} beside it, or rebuild both with precompute")
    except (OSError, KeyError) as e:
        problems = [f"{sp}: unreadable ({type(e).__name__}: {e})"]
    finally:
        store.close()
    return problems
