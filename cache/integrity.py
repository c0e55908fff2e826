"""Content digests of a cache file: what fletcher32 does not guard (chunk index, attributes).

fletcher32 checks each chunk's bytes, but not HDF5's chunk index (a damaged index node makes rows
read back as zeros or as another chunk's data, with no error) nor the root attributes. So a
finished file also carries:

- ``/digests/<dataset>``: the sha256 of every block of ``block_rows`` rows (root attribute,
  ``BLOCK_ROWS`` when written) of each dataset, over the logical array bytes (C order, stored
  dtype): [n_blocks, 32] uint8 for a per-row dataset, [K, n_blocks, 32] for a slotted
  (``/random``) one, a table per slot, so that reading one slot checks just that slot. Readers
  check every block they read; ``cache verify`` checks all of them.
- ``digests_sha256`` (root attribute): sha256 over all digest tables, in name order.
- ``header_sha256`` (root attribute): sha256 over the canonical JSON of every other root
  attribute (schema, teachers, views, ``digests_sha256``, ...). Checked on every open of a
  finished file. It is the file's **root digest**: through ``digests_sha256`` it covers every
  block of every dataset, so two files with the same root digest hold the same bytes.

A file is *finished* when it holds ``header_sha256``: the writer adds the digests only after
every row is done.
"""
from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np

# Rows per digest block. Reads cover whole blocks: a slot or a split read in slabs costs nothing
# extra; a single scattered row costs its block (64 rows). One table entry (32 bytes) per block
# keeps the tables small next to the data even for one-byte rows (flip).
BLOCK_ROWS = 64
HEADER_KEY = "header_sha256"
DIGESTS_KEY = "digests_sha256"
DIGEST_GROUP = "digests"


def digest_name(dataset: str) -> str:
    """``/digests/<name>`` of a dataset (``random/logits/teachers`` -> ``digests/random.logits.teachers``)."""
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


def block_digests(array: np.ndarray, block: int = BLOCK_ROWS) -> np.ndarray:
    """[n_blocks, 32] uint8: sha256 of each run of ``block`` rows of ``array`` (axis 0)."""
    array = np.ascontiguousarray(array)
    n = -(-len(array) // block)
    out = np.empty((n, 32), dtype=np.uint8)
    for b in range(n):
        out[b] = np.frombuffer(hashlib.sha256(array[b * block:(b + 1) * block].tobytes()).digest(),
                               dtype=np.uint8)
    return out


def bad_blocks(array: np.ndarray, first_block: int, digests: np.ndarray,
               block: int = BLOCK_ROWS) -> list[int]:
    """The blocks of ``array`` (rows from block ``first_block`` on, whole blocks but maybe the
    last of the dataset) whose digest differs from ``digests`` ([n_blocks, 32], one slot's)."""
    got = block_digests(array, block)
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


def dataset_digests(ds: h5py.Dataset, slotted: bool, slab_rows: int, block: int = BLOCK_ROWS) -> np.ndarray:
    """The digest table of one dataset, read back in slabs of about ``slab_rows`` rows (whole blocks)."""
    step = max(1, slab_rows // block) * block
    n_rows = ds.shape[1] if slotted else ds.shape[0]

    def table(read):
        parts = [block_digests(read(a, min(a + step, n_rows)), block) for a in range(0, n_rows, step)]
        return np.concatenate(parts) if parts else np.empty((0, 32), np.uint8)
    if slotted:
        return np.stack([table(lambda a, b, k=k: ds[k, a:b]) for k in range(ds.shape[0])])
    return table(lambda a, b: ds[a:b])


def write_digests(f: h5py.File, names: list[str], slab_rows, slotted, block: int = BLOCK_ROWS) -> None:
    """Digest every dataset in ``names`` (``slab_rows(ds)`` rows read at a time, ``slotted(name)``
    for /random ones) into ``/digests``, then the digest and header attributes, last."""
    tables = {}
    for name in names:
        ds = f[name]
        tables[name] = dataset_digests(ds, slotted(name), slab_rows(ds), block)
        path = digest_name(name)
        if path in f:
            del f[path]
        f.create_dataset(path, data=tables[name], fletcher32=True)
    f.attrs[DIGESTS_KEY] = digests_digest(tables)
    f.attrs[HEADER_KEY] = header_digest(f.attrs)
