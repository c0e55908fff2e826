"""core/h5safe.py on planted HDF5 files: links out of the file and implausible declared sizes."""
from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from core.errors import ToolError
from core.h5safe import check_structure, open_untrusted


class Bad(ToolError):
    pass


def good_file(path):
    with h5py.File(path, "w") as f:
        g = f.create_group("teachers/t0")
        g.create_dataset("logits", data=np.random.default_rng(0).standard_normal((50, 2)).astype("f2"))
        f.create_dataset("zeros", data=np.zeros((2000, 64), "f4"), compression="gzip", chunks=(500, 64))
        f.create_dataset("empty", shape=(0, 3), dtype="f4")
        f.create_dataset("scalar", data=3)
        f.create_dataset("names", data=np.array(["a", "bb"], dtype=h5py.string_dtype()))
        f.attrs["header"] = "{}"
    return path


def test_a_plain_file_passes(tmp_path):
    with open_untrusted(good_file(tmp_path / "ok.h5"), error_cls=Bad) as f:
        assert check_structure(f, error_cls=Bad) == 7  # 2 groups + 5 datasets


def plant(tmp_path, kind):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o.create_dataset("secret", data=np.arange(10, dtype="f4"))
    path = good_file(tmp_path / f"{kind}.h5")
    with h5py.File(path, "a") as f:
        if kind == "external link":
            f["teachers/t1"] = h5py.ExternalLink(str(other), "/secret")
        elif kind == "soft link":
            f["alias"] = h5py.SoftLink("/teachers/t0/logits")
        elif kind == "virtual dataset":
            layout = h5py.VirtualLayout(shape=(10,), dtype="f4")
            layout[:] = h5py.VirtualSource(str(other), "secret", shape=(10,))
            f.create_virtual_dataset("v", layout)
        elif kind == "external storage":
            raw = tmp_path / "raw.bin"
            raw.write_bytes(np.arange(10, dtype="f4").tobytes())
            f.create_dataset("ext", shape=(10,), dtype="f4", external=[(str(raw), 0, 40)])
        elif kind == "huge chunked":
            f.create_dataset("huge", shape=(10**12, 2), dtype="f2", chunks=(1024, 2))
        elif kind == "huge contiguous":
            f.create_dataset("huge", shape=(10**12,), dtype="f4")
    return path


MESSAGES = {"external link": "/teachers/t1 is an external link to",
            "soft link": "/alias is a soft link to /teachers/t0/logits",
            "virtual dataset": "dataset /v is a virtual dataset",
            "external storage": "dataset /ext keeps its data in external file(s)",
            "huge chunked": "dataset /huge declares 976,562,500 chunks (shape (1000000000000, 2), "
                            "chunks (1024, 2))",
            "huge contiguous": "dataset /huge declares shape (1000000000000,)"}


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_planted_files_are_refused(tmp_path, kind):
    path = plant(tmp_path, kind)
    if kind.startswith("huge"):
        assert path.stat().st_size < 64 * 1024
    t0 = time.perf_counter()
    with pytest.raises(Bad) as e:
        open_untrusted(path, error_cls=Bad)
    assert time.perf_counter() - t0 < 5
    assert MESSAGES[kind] in str(e.value) and str(path) in str(e.value)
    assert "do not use it" in str(e.value)


def test_sparse_allowed_only_for_chunked_when_asked(tmp_path):
    with open_untrusted(plant(tmp_path, "huge chunked"), error_cls=Bad, allow_sparse=True):
        pass
    with pytest.raises(Bad, match="declares shape"):
        open_untrusted(plant(tmp_path, "huge contiguous"), error_cls=Bad, allow_sparse=True)


def test_too_many_objects_missing_and_junk_files(tmp_path):
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        for i in range(30):
            f.create_group(f"g{i}")
    with pytest.raises(Bad, match="more than 20 objects"):
        open_untrusted(path, error_cls=Bad, max_objects=20)
    with open_untrusted(path, error_cls=Bad, max_objects=30):
        pass
    with pytest.raises(Bad, match="no such HDF5 file"):
        open_untrusted(tmp_path / "missing.h5", error_cls=Bad)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(Bad, match="not a readable HDF5 file"):
        open_untrusted(tmp_path / "junk.h5", error_cls=Bad)


def test_chunk_counts_are_bounded_per_dataset_and_in_all(tmp_path):
    """Unallocated chunks cost HDF5 memory on a read as allocated ones do: what a file declares is
    bounded by what its size can index, per dataset and over all of them, from metadata only."""
    from core.h5safe import FREE_CHUNKS

    one = tmp_path / "one.h5"
    with h5py.File(one, "w") as f:
        f.create_dataset("bomb", (FREE_CHUNKS * 100,), "u1", chunks=(1,))[:10] = 1
    with pytest.raises(Bad, match=rf"dataset /bomb declares {FREE_CHUNKS * 100:,} chunks"):
        open_untrusted(one, error_cls=Bad)
    with open_untrusted(one, error_cls=Bad, allow_sparse=lambda name, ds: name == "bomb"):
        pass  # a file being resumed: its reader bounds those chunks from its own header
    many = tmp_path / "many.h5"
    with h5py.File(many, "w") as f:  # each under the bound, together over it
        for i in range(8):
            f.create_dataset(f"d{i}", (FREE_CHUNKS,), "u1", chunks=(1,))[:4] = 1
    with pytest.raises(Bad, match="its datasets declare more than .* chunks in all"):
        open_untrusted(many, error_cls=Bad)


def test_chunks_larger_than_the_dataset_are_refused(tmp_path):
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:  # a resizable dataset may declare chunks beyond its shape
        f.create_dataset("x", shape=(10,), maxshape=(None,), chunks=(10**8,), dtype="u1", compression="gzip")
    with pytest.raises(Bad, match=r"dataset /x has chunks \(100000000,\) larger than its shape \(10,\)"):
        open_untrusted(path, error_cls=Bad)
