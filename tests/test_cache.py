"""The teacher cache contract: round trip, resume, refusals, checksums, shards + merge, info."""
from __future__ import annotations

import json
import pickle
import shutil

import h5py
import numpy as np
import pytest

from cache import info as I, merge as M, schema as S, verify as VF
from cache.reader import open_cache
from cache.schema import CacheError, CacheMeta
from cache.writer import CacheWriter

N, V, T, NC, B = 20, 2, 3, 2, 2
DIMS = {"layer3": 6, "layer4": 8}


def make_meta(**over) -> CacheMeta:
    kw = dict(
        num_classes=NC, class_names=["landbird", "waterbird"], attr_names=["land", "water"],
        dataset="waterbirds", dataset_options={}, dataset_fingerprint="fp-abc",
        teachers=[{"name": "t0", "role": "teacher", "sha256": "a" * 64, "backbone_id": "erm0"},
                  {"name": "t1", "role": "teacher", "sha256": "b" * 64, "backbone_id": "erm1"},
                  {"name": "t2", "role": "teacher", "sha256": "c" * 64, "backbone_id": "erm1"},
                  {"name": "erm0", "role": "biased", "sha256": "d" * 64, "backbone_id": "erm0"}],
        backbone_ids=["erm0", "erm1"], backbone_of_teacher=[0, 1, 1], biased_backbone=0,
        view_spec={"random_views": V - 1, "out_size": 16, "seed": 0, "scale": [0.7, 1.0]}, store_size=18,
        teachers_pretrained=False, layers=list(DIMS), feature_dims=dict(DIMS), num_samples=N, tau_cached=4.0)
    kw.update(over)
    return CacheMeta(**kw)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, N)
    attr = rng.integers(0, 2, N)
    return {
        "samples": {"id": [f"{i:03d}.Bird/img_é{i}.jpg" for i in range(N)], "y": y, "attr": attr,
                    "group": 2 * y + attr, "split": np.arange(N) % 3},
        "box": rng.random((N, V, 4), dtype=np.float32),
        "flip": rng.random((N, V)) > 0.5,
        "teacher_logits": rng.normal(size=(N, V, T, NC)).astype(np.float32),
        "biased_logits": rng.normal(size=(N, V, NC)).astype(np.float32),
        "features": {l: rng.normal(size=(N, V, B, d)).astype(np.float32) for l, d in DIMS.items()},
        "agre_cached": rng.random((N, V, T), dtype=np.float32),
    }


def rows_of(data, a, b) -> dict:
    return {"box": data["box"][a:b], "flip": data["flip"][a:b],
            "teacher_logits": data["teacher_logits"][a:b], "biased_logits": data["biased_logits"][a:b],
            "features": {l: v[a:b] for l, v in data["features"].items()},
            "agre_cached": data["agre_cached"][a:b]}


def write(path, data, meta=None, row_start=0, row_stop=N, shard="", chunk=7, limit=None, **kw):
    """Write a file (or shard) from the fixture; ``limit`` stops after that many chunks."""
    meta = meta or make_meta()
    samples = {k: v[row_start:row_stop] for k, v in data["samples"].items()}
    with CacheWriter.create_or_resume(path, meta, samples, row_start, row_stop, shard, **kw) as w:
        for a, b in w.pending_chunks(chunk)[:limit]:
            w.write_rows(a, b, **rows_of(data, row_start + a, row_start + b))
        if w.num_done == w.num_rows:
            w.finalize()
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory, data):
    return write(tmp_path_factory.mktemp("full") / "cache.h5", data)


def test_round_trip(full, data):
    r = open_cache(full)
    assert r.num_rows == N and r.meta.num_teachers == T and r.meta.feature_dims == DIMS
    assert r.meta.views_per_row == V and r.meta.view_spec == make_meta().view_spec
    assert r.meta.store_size == 18 and r.meta.out_size == 16 and r.meta.random_views == V - 1
    assert list(r.sample("id")) == data["samples"]["id"]
    for k in ("y", "attr", "group", "split"):
        np.testing.assert_array_equal(r.sample(k), data["samples"][k])
    rows = np.array([0, 2, 7, 13, 19])  # sparse: several slabs
    for views in (1, [1, 0]):
        d = r.read(rows=rows, views=views)
        sel = (rows, views) if np.isscalar(views) else (rows[:, None], np.array(views)[None])
        np.testing.assert_array_equal(d["logits"], data["teacher_logits"][sel])
        np.testing.assert_array_equal(d["biased"], data["biased_logits"][sel])
        np.testing.assert_array_equal(d["weights"], data["agre_cached"][sel])
        np.testing.assert_array_equal(d["box"], data["box"][sel])
        np.testing.assert_array_equal(d["flip"], data["flip"][sel])
        for layer in DIMS:
            got = d["features"][layer]
            assert got.dtype == np.float16 and got.shape[-2:] == (B, DIMS[layer])
            np.testing.assert_allclose(got, data["features"][layer][sel], rtol=1e-3, atol=1e-3)
    assert r.read(rows=np.array([], int), views=0)["logits"].shape == (0, T, NC)
    with pytest.raises(ValueError, match="increasing"):
        r.read(rows=np.array([3, 2]))


def test_read_split(full, data):
    r = open_cache(full)
    every = r.read()
    np.testing.assert_array_equal(every["logits"], data["teacher_logits"])
    np.testing.assert_array_equal(every["features"]["layer4"], data["features"]["layer4"].astype(np.float16))
    val = r.read(split="val", views=0, layers=["layer3"])
    rows = np.flatnonzero(data["samples"]["split"] == 1)
    np.testing.assert_array_equal(val["rows"], rows)
    np.testing.assert_array_equal(val["logits"], data["teacher_logits"][rows, 0])
    np.testing.assert_array_equal(val["flip"], data["flip"][rows, 0])
    assert list(val["features"]) == ["layer3"] and val["features"]["layer3"].shape == (len(rows), B, 6)
    assert list(val["id"]) == [data["samples"]["id"][i] for i in rows]


def test_file_layout(full):
    with h5py.File(full, "r") as f:
        assert f.attrs["schema"] == S.SCHEMA_NAME and f.attrs["schema_version"] == 2
        assert json.loads(f.attrs["teachers"])[3]["role"] == "biased"
        assert f.attrs["row_start"] == 0 and f.attrs["row_stop"] == N and f.attrs["shard"] == ""
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            ds = f[name]
            if name.startswith("digests/"):  # small tables, checksummed, not compressed
                assert ds.fletcher32 and ds.dtype == np.uint8 and ds.shape[1] == 32, name
                continue
            assert ds.fletcher32 and ds.compression == "gzip" and ds.chunks[1:] == ds.shape[1:], name
        assert f["features/layer4"].dtype == np.float16
        assert f["features/layer4"].shape == (N, V, B, 8)


def test_resume(tmp_path, data):
    path = tmp_path / "c.h5"
    write(path, data, chunk=5, limit=2)  # rows 0..10 done, then "crash"
    with CacheWriter.create_or_resume(path, make_meta(), data["samples"]) as w:
        assert w.resumed and w.num_done == 10
        assert w.pending_chunks(5) == [(10, 15), (15, 20)]
        assert w.pending_chunks(4) == [(10, 12), (12, 16), (16, 20)]  # aligned to multiples of 4
    for other in (make_meta(dataset_fingerprint="fp-other"), make_meta(view_spec={"random_views": V - 1, "out_size": 16, "seed": 5}),
                  make_meta(tau_cached=2.0), make_meta(layers=["layer4"], feature_dims={"layer4": 8})):
        with pytest.raises(CacheError, match="(?i)made for other inputs.*pass --overwrite to rebuild it, or choose another --out"):
            CacheWriter.create_or_resume(path, other, data["samples"])
    changed = {**data["samples"], "y": 1 - data["samples"]["y"]}
    with pytest.raises(CacheError, match="samples"):
        CacheWriter.create_or_resume(path, make_meta(), changed)
    write(path, data, chunk=5)  # finish it
    np.testing.assert_array_equal(open_cache(path).read(views=1)["logits"], data["teacher_logits"][:, 1])


def test_incomplete_refused(tmp_path, data):
    path = write(tmp_path / "c.h5", data, chunk=5, limit=2)
    with pytest.raises(CacheError, match=r"incomplete: 10 of 20 rows done; rerun precompute"):
        open_cache(path)
    assert open_cache(path, require_complete=False).done.sum() == 10
    assert any("incomplete" in p for p in VF.verify(path, "fp-abc"))


def test_unknown_schema_version(tmp_path, full, data):
    path = tmp_path / "v3.h5"
    shutil.copy(full, path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(CacheError, match=r"version 3 found.*supports version 2"):
        open_cache(path)
    with pytest.raises(CacheError, match=r"version 3 found"):  # not resumed over either
        CacheWriter.create_or_resume(path, make_meta(), data["samples"])


def test_not_a_cache_and_missing(tmp_path):
    with pytest.raises(CacheError, match="no such cache file"):
        open_cache(tmp_path / "none.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(CacheError, match="not a teacher cache"):
        open_cache(tmp_path / "other.h5")


def test_truncated_file(tmp_path, full):
    path = tmp_path / "cut.h5"
    blob = full.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CacheError, match="cut.h5: not a readable HDF5 file.*truncated or corrupt"):
        open_cache(path)
    problems = VF.verify(path, None)
    assert problems and "cut.h5" in problems[0]


def _flip_chunk_bytes(path, name, chunk_index):
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(chunk_index)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(4)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(x ^ 0xFF for x in b))
    return info


@pytest.mark.parametrize("compression", [None, 1])
def test_corrupt_chunk_found_by_verify(tmp_path, data, compression):
    path = write(tmp_path / "c.h5", data, compression=compression)
    assert VF.verify(path, "fp-abc") == []
    _flip_chunk_bytes(path, "logits/teachers", 0)
    problems = VF.verify(path, "fp-abc")
    assert len(problems) == 1 and problems[0].startswith("/logits/teachers") and "checksum" in problems[0]
    r = open_cache(path)  # header and done flags are intact, the reads fail loudly
    with pytest.raises(CacheError, match="logits/teachers.*verify"):
        r.read(rows=np.array([0]), views=0)


def test_verify_fingerprint(full):
    assert VF.verify(full, "fp-abc") == [] and VF.verify(full, None) == []
    problems = VF.verify(full, "fp-zzz")
    assert len(problems) == 1 and "another data set" in problems[0]


def _shards(tmp_path, data, specs, meta=None):
    paths = []
    for shard, (a, b) in specs:
        paths.append(write(tmp_path / f"s{len(paths)}.h5", data, meta=meta, row_start=a, row_stop=b,
                           shard=shard, chunk=4))
    return paths


def test_shard_merge_equals_full(tmp_path, full, data):
    specs = [(f"{i}/3", S.shard_rows(f"{i}/3", N)) for i in (2, 0, 1)]  # any order
    assert [r for _, r in sorted(specs)] == [(0, 6), (6, 13), (13, 20)]
    out = tmp_path / "merged.h5"
    M.merge(out, _shards(tmp_path, data, specs))
    assert not (tmp_path / "merged.h5.tmp").exists()
    with h5py.File(full, "r") as a, h5py.File(out, "r") as b:
        skip = {"created", "header_sha256"}  # the header digest covers "created"
        attrs = [{k: f.attrs[k] for k in f.attrs if k not in skip} for f in (a, b)]
        assert attrs[0] == attrs[1]
        names_a, names_b = [], []
        a.visititems(lambda n, o: names_a.append(n) if isinstance(o, h5py.Dataset) else None)
        b.visititems(lambda n, o: names_b.append(n) if isinstance(o, h5py.Dataset) else None)
        assert names_a == names_b
        for n in names_a:
            assert (a[n].dtype, a[n].chunks, a[n].compression, a[n].fletcher32) == \
                   (b[n].dtype, b[n].chunks, b[n].compression, b[n].fletcher32), n
            np.testing.assert_array_equal(a[n][...], b[n][...], err_msg=n)
    assert VF.verify(out, "fp-abc") == []


def test_merge_refusals(tmp_path, data):
    third = {f"{i}/3": S.shard_rows(f"{i}/3", N) for i in range(3)}
    good = _shards(tmp_path, data, list(third.items()))
    out = tmp_path / "m.h5"

    with pytest.raises(CacheError, match="rows 6..13 are in none of the shards"):
        M.merge(out, [good[0], good[2]])
    with pytest.raises(CacheError, match="rows 13..20 are in none"):
        M.merge(out, good[:2])
    with pytest.raises(CacheError, match="twice"):
        M.merge(out, [good[0], good[0], good[1], good[2]])

    (tmp_path / "odd").mkdir()
    other_fp = _shards(tmp_path / "odd", data, [("1/3", third["1/3"])],
                       meta=make_meta(dataset_fingerprint="x"))
    with pytest.raises(CacheError, match="does not belong.*dataset_fingerprint"):
        M.merge(out, [good[0], other_fp[0], good[2]])

    (tmp_path / "half").mkdir()
    halves = _shards(tmp_path / "half", data, [("1/2", S.shard_rows("1/2", N))])
    with pytest.raises(CacheError, match="different shard counts"):
        M.merge(out, [good[0], good[1], halves[0]])

    (tmp_path / "over").mkdir()
    over = _shards(tmp_path / "over", data, [("0/2", (0, 8)), ("1/2", (6, 20))])
    with pytest.raises(CacheError, match="overlaps"):
        M.merge(out, over)

    (tmp_path / "inc").mkdir()
    inc = write(tmp_path / "inc" / "s1.h5", data, row_start=6, row_stop=13, shard="1/3", chunk=2, limit=1)
    with pytest.raises(CacheError, match="s1.h5: incomplete"):
        M.merge(out, [good[0], inc, good[2]])

    assert not out.exists() and not (tmp_path / "m.h5.tmp").exists()


def test_reader_pickles_and_works_in_workers(full, data):
    import torch

    r = open_cache(full)
    r.read(rows=np.array([1]), views=0)  # the handle is open now
    r2 = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(r2.read(rows=np.array([3, 4]), views=1)["biased"], data["biased_logits"][[3, 4], 1])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return i, r.read(rows=np.array([i]), views=1)["logits"][0]

    loader = torch.utils.data.DataLoader(Rows(), batch_size=5, num_workers=2)
    for idx, logits in loader:
        np.testing.assert_array_equal(logits.numpy(), data["teacher_logits"][idx.numpy(), 1])


def test_summarize_accuracy(full, data):
    d = I.summarize(full)
    assert d["rows"] == N and d["rows_done"] == N and d["random_views"] == V - 1
    assert d["layers"] == DIMS and [t["role"] for t in d["teachers"]].count("biased") == 1
    s = data["samples"]
    assert d["splits"] == {"train": 7, "val": 7, "test": 6}
    for t in range(T):
        for code, name in ((0, "train"), (1, "val"), (2, "test")):
            sel = s["split"] == code
            hits = sum(int(np.argmax(data["teacher_logits"][i, 0, t]) == s["y"][i])
                       for i in np.flatnonzero(sel))
            assert d["accuracy"][f"t{t}"][name]["mean_acc"] == pytest.approx(hits / sel.sum())
    sel = s["split"] == 2
    pred = data["biased_logits"][sel, 0].argmax(-1)
    groups = s["group"][sel]
    per_group = [np.mean(pred[groups == g] == s["y"][sel][groups == g]) for g in np.unique(groups)]
    assert d["accuracy"]["erm0"]["test"]["wga"] == pytest.approx(min(per_group))
    text = I.format_summary(d)
    for word in ("t0", "erm0", "biased", "layer4 8", "ensemble", "fp-abc", "test 6"):
        assert word in text


def test_write_rows_refuses_bad_input(tmp_path, data):
    with CacheWriter.create_or_resume(tmp_path / "c.h5", make_meta(), data["samples"]) as w:
        rows = rows_of(data, 0, 4)
        with pytest.raises(ValueError, match="logits/teachers: shape"):
            w.write_rows(0, 4, **{**rows, "teacher_logits": rows["teacher_logits"][:, :, :2]})
        with pytest.raises(ValueError, match="layers"):
            w.write_rows(0, 4, **{**rows, "features": {"layer4": rows["features"]["layer4"]}})
        bad = rows["biased_logits"].copy()
        bad[0, 0, 0] = np.nan
        with pytest.raises(CacheError, match="non-finite"):
            w.write_rows(0, 4, **{**rows, "biased_logits": bad})
        assert w.num_done == 0


def test_meta_validation_and_provenance():
    with pytest.raises(CacheError, match="biased"):
        make_meta(teachers=[{"name": "t0", "role": "teacher", "sha256": "", "backbone_id": "erm0"}],
                  backbone_of_teacher=[0])
    with pytest.raises(CacheError, match="backbone_of_teacher points"):
        make_meta(backbone_of_teacher=[1, 1, 1])
    from core.provenance import provenance

    p = provenance()
    assert set(p) == {"created", "tool_version", "git_commit", "torch_version"} and p["git_commit"]
    with pytest.raises(ValueError):
        S.parse_shard("3/3")
