"""Content digests of a cache file: what fletcher32 does not guard (chunk index, attributes).

fletcher32 checks each chunk's bytes, but not HDF5's chunk index (a damaged index node makes rows
read back as zeros or as another chunk's data, with no error) nor the root attributes. So a
finished file also carries:

- ``/digests/<dataset>``: [n_blocks, 32] uint8, the sha256 of every block of ``BLOCK_ROWS`` rows
  (one row: a reader of scattered rows, streaming a training split, checks exactly what it
  reads) of each dataset, over the logical array bytes (C order, stored dtype). Readers check
  every block they read; ``cache verify`` checks all of them.
- ``digests_sha256`` (root attribute): sha256 over all digest tables, in name order.
- ``header_sha256`` (root attribute): sha256 over the canonical JSON of every other root
  attribute (schema, teachers, views, ...). Checked on every open of a finished file.

A file is *finished* when it holds ``header_sha256``: the writer adds the digests only after
every row is done.
"""
from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np

BLOCK_ROWS = 1
HEADER_KEY = "header_sha256"
DIGESTS_KEY = "digests_sha256"
DIGEST_GROUP = "digests"


def digest_name(dataset: str) -> str:
    """``/digests/<name>`` of a dataset (``logits/teachers`` -> ``digests/logits.teachers``)."""
    return f"{DIGEST_GROUP}/{dataset.replace('/', '.')}"


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if hasattr(value, "item") else value


def header_digest(attrs) -> str:
    """sha256 of the canonical JSON of the root attributes (the digest attribute left out)."""
    plain = {k: _plain(attrs[k]) for k in sorted(attrs) if k != HEADER_KEY}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def block_digests(array: np.ndarray) -> np.ndarray:
    """[n_blocks, 32] uint8: sha256 of each run of BLOCK_ROWS rows of ``array``."""
    array = np.ascontiguousarray(array)
    n = -(-len(array) // BLOCK_ROWS)
    out = np.empty((n, 32), dtype=np.uint8)
    for b in range(n):
        out[b] = np.frombuffer(hashlib.sha256(array[b * BLOCK_ROWS:(b + 1) * BLOCK_ROWS].tobytes()).digest(),
                               dtype=np.uint8)
    return out


def bad_blocks(array: np.ndarray, first_block: int, digests: np.ndarray) -> list[int]:
    """The blocks of ``array`` (rows from block ``first_block`` on, whole blocks but maybe the
    file's last) whose digest differs from ``digests``."""
    got = block_digests(array)
    expected = digests[first_block:first_block + len(got)]
    if got.shape != expected.shape:
        return [first_block]
    return [first_block + int(b) for b in np.flatnonzero((got != expected).any(axis=1))]


def digests_digest(tables: dict[str, np.ndarray]) -> str:
    """sha256 over the digest tables of every dataset, in name order."""
    h = hashlib.sha256()
    for name in sorted(tables):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tables[name]).tobytes())
    return h.hexdigest()


def write_digests(f: h5py.File, names: list[str], slab_rows) -> None:
    """Digest every dataset in ``names`` (read back from the file in slabs of ``slab_rows(ds)``
    rows, whole blocks) into ``/digests``, then the digest and header attributes, last."""
    tables = {}
    for name in names:
        ds = f[name]
        step = max(1, slab_rows(ds) // BLOCK_ROWS) * BLOCK_ROWS
        parts = [block_digests(ds[a:a + step]) for a in range(0, ds.shape[0], step)]
        tables[name] = np.concatenate(parts) if parts else np.empty((0, 32), np.uint8)
        path = digest_name(name)
        if path in f:
            del f[path]
        f.create_dataset(path, data=tables[name], fletcher32=True)
    f.attrs[DIGESTS_KEY] = digests_digest(tables)
    f.attrs[HEADER_KEY] = header_digest(f.attrs)


def read_digest_tables(f: h5py.File, names: list[str]) -> dict[str, np.ndarray]:
    """The digest table of each dataset; raises KeyError naming a missing one."""
    return {name: f[digest_name(name)][...] for name in names}
