"""Merging shard files (written with ``--shard i/n``) into one full cache file."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from cache.integrity import BLOCK_ROWS, write_digests
from cache.reader import open_cache
from cache.schema import (SAMPLE_FIELDS, CacheError, is_slotted, layout, parse_shard, store_path_for,
                          train_positions)
from cache.writer import create_file, slab_rows
from core.files import OutputLock, fsync_dir, fsync_file
from core.provenance import PROVENANCE_FIELDS, settings_diff, utc_now
from data.store import ImageStore, StoreError, merge_stores

log = logging.getLogger(__name__)


def merge(out_path, shard_paths, lock: bool = True) -> None:
    """Combine complete shard files into one full file, equal in content to a single-process run
    (same datasets, chunking and attributes except ``created``, ``shard`` and the row range), and
    the image stores of the shards (each holds its rows) into the cache's store.

    The shards must come from the same inputs (fingerprint, teachers, views, layers, schema, N,
    shard count) and cover rows 0..N exactly once. Written to ``out_path + ".tmp"`` and renamed,
    so ``out_path`` never holds a half-written file (an existing one is replaced only when the
    merge succeeded). Provenance attributes that differ between shards are recorded as
    ``"mixed: a, b"``. ``lock``: hold :class:`core.files.OutputLock` on ``out_path`` meanwhile (a
    second merge into it is refused); False for a caller that holds it.
    """
    if lock:
        with OutputLock(out_path, "the cache"):
            return merge(out_path, shard_paths, lock=False)
    out_path = str(out_path)
    paths = [str(p) for p in shard_paths]
    if not paths:
        raise CacheError("merge needs at least one shard file")
    if any(os.path.abspath(p) == os.path.abspath(out_path) for p in paths):
        raise CacheError(f"{out_path}: the merged file cannot be one of the shards; choose another --out")
    shards = [open_cache(p, require_complete=True) for p in paths]
    ref = shards[0]
    listing = ", ".join(f"{s.path}: {s.shard}" for s in shards)
    counts = set()
    for s in shards:
        if not s.shard:
            raise CacheError(f"{s.path}: a full file (no shard attribute), not a shard; merge only "
                             "files written with --shard i/n")
        counts.add(parse_shard(s.shard)[1])
        diff = settings_diff(_unbound(ref.meta), _unbound(s.meta), names=(ref.path, s.path))
        if diff:
            raise CacheError(f"{s.path} does not belong with {ref.path}: " + "; ".join(diff)
                             + ". Merge only shards written with the same arguments")
    if len(counts) > 1:
        raise CacheError(f"shards were written for different shard counts {sorted(counts)} "
                         f"({listing}); rerun them with one n")
    n = counts.pop()
    if len({s.shard for s in shards}) != len(shards):
        raise CacheError(f"the same shard is given twice: {listing}")
    shards.sort(key=lambda s: s.row_start)
    N, expected = ref.meta.num_samples, 0
    for prev, s in zip([None, *shards], shards):
        if s.row_start < expected:
            raise CacheError(f"{s.path} (rows {s.row_start}..{s.row_stop}) overlaps {prev.path} "
                             f"(rows {prev.row_start}..{prev.row_stop}); merge each shard once")
        if s.row_start > expected:
            raise CacheError(f"rows {expected}..{s.row_start} are in none of the shards; run the "
                             f"missing shard(s) of {n} and merge again")
        expected = s.row_stop
    if expected != N:
        raise CacheError(f"rows {expected}..{N} are in none of the shards; run the missing "
                         f"shard(s) of {n} and merge again")

    prov = {k: sorted({getattr(s.meta, k) for s in shards})
            for k in PROVENANCE_FIELDS if k != "created"}
    stores = [store_path_for(s.path) for s in shards]  # in row order, as the shards now are
    missing = [str(p) for p in stores if not p.is_file()]
    try:  # the stores first: the merged header records the merged store's digest
        store_digest = "" if missing else _merge_stores(out_path, shards, stores)
    except BaseException:
        for s in shards:
            s.close()
        raise
    meta = dataclasses.replace(ref.meta, created=utc_now(), store_digest=store_digest,
                               **{k: v[0] if len(v) == 1 else "mixed: " + ", ".join(v)
                                  for k, v in prov.items()})
    samples = {k: np.concatenate([s.sample(k) for s in shards]) for k in SAMPLE_FIELDS}
    ds0 = ref._h5()["eval/logits/teachers"]
    compression = ds0.compression_opts if ds0.compression == "gzip" else None
    names = list(layout(meta, N, len(train_positions(samples["split"]))))
    tmp = out_path + ".tmp"
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(tmp):  # left over from an interrupted merge; a link is removed, never followed
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            raise CacheError(f"{tmp} is a folder; move it away and merge again")
        os.unlink(tmp)
    try:
        with create_file(tmp, meta, samples, 0, N, "", compression) as out:
            for name in names:
                if name.startswith("samples/") or name == "progress/done":
                    continue
                step = slab_rows(out[name])
                if not is_slotted(name):
                    for s in shards:
                        for a in range(0, s.num_rows, step):  # read through the digest checks
                            b = min(a + step, s.num_rows)
                            out[name][s.row_start + a:s.row_start + b] = s.load(name, np.arange(a, b))
                    continue
                p0 = 0  # a shard's training rows follow the previous shards' in train_rows
                for s in shards:
                    nt = len(s.train_rows)
                    for k in range(out[name].shape[0]) if nt else []:
                        for a in range(0, nt, step):
                            b = min(a + step, nt)
                            out[name][k, p0 + a:p0 + b] = s.load(name, np.arange(a, b), slot=k)
                    p0 += nt
            out.flush()
            out["progress/done"][...] = True
            write_digests(out, names, slab_rows, is_slotted, BLOCK_ROWS)
        fsync_file(tmp)  # on disk before it takes the real name
        os.replace(tmp, out_path)
        fsync_dir(Path(out_path).parent)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        for s in shards:
            s.close()
    if missing:  # the cache is complete; training needs the store too
        log.warning("the image store of %s was not made: %s missing (copy the shards' stores beside them "
                    "and merge again)", out_path, ", ".join(missing))
    log.info("merged %d shards into %s (%d rows)", len(shards), out_path, N)


def _unbound(meta) -> dict:
    """A shard's identity without its image store's digest (each shard has a store of its rows)."""
    return {k: v for k, v in meta.identity().items() if k != "store_digest"}


def _merge_stores(out_path, shards, stores) -> str:
    """Merge the shards' image stores beside ``out_path`` (each checked against the digest its
    shard's header records) and return the merged store's digest."""
    for s, p in zip(shards, stores):
        if not s.meta.store_digest:  # nothing binds the store to the shard: it is not merged unchecked
            raise CacheError(f"{s.path}: its header records no image store digest, so {p} cannot be checked "
                             "against it; rebuild the shard with precompute (which binds its store), or move "
                             f"{p.name} away to merge the caches without their stores")
        if _digest_of(p) != s.meta.store_digest:
            raise CacheError(f"{p} is not the image store {s.path} was computed from (its digest differs "
                             "from the one the shard's header records); copy the shard's own store beside it")
    return _digest_of(merge_stores(store_path_for(out_path), stores))


def _digest_of(path) -> str:
    try:
        store = ImageStore(path)
    except StoreError as e:
        raise CacheError(str(e)) from None
    try:
        return store.store_digest()
    finally:
        store.close()
