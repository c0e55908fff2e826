"""The teacher cache contract: round trip, resume, refusals, checksums, shards + merge, info."""
from __future__ import annotations

import json
import pickle
import re
import shutil

import h5py
import numpy as np
import pytest

from cache import info as I, merge as M, schema as S, verify as VF
from cache.reader import open_cache
from cache.schema import CacheError, CacheMeta
from cache.writer import CacheWriter

import conftest

N, V, T, NC, B = 20, 4, 3, 2, 2   # V = K + 1 views: slot 0 the eval view, K = 3 random slots
K = V - 1
DIMS = {"layer3": 6, "layer4": 8}
FIELDS = {"box": "box", "flip": "flip", "logits": "teacher_logits", "biased": "biased_logits",
          "weights": "agre_cached"}


def make_meta(**over) -> CacheMeta:
    kw = dict(
        num_classes=NC, class_names=["landbird", "waterbird"], attr_names=["land", "water"],
        dataset="waterbirds", dataset_options={}, dataset_fingerprint="fp-abc",
        teachers=[{"name": "t0", "role": "teacher", "sha256": "a" * 64, "backbone_id": "erm0"},
                  {"name": "t1", "role": "teacher", "sha256": "b" * 64, "backbone_id": "erm1"},
                  {"name": "t2", "role": "teacher", "sha256": "c" * 64, "backbone_id": "erm1"},
                  {"name": "erm0", "role": "biased", "sha256": "d" * 64, "backbone_id": "erm0"}],
        backbone_ids=["erm0", "erm1"], backbone_of_teacher=[0, 1, 1], biased_backbone=0,
        view_spec={"random_views": K, "out_size": 16, "seed": 0, "scale": [0.7, 1.0]}, store_size=18,
        teachers_pretrained=False, layers=list(DIMS), feature_dims=dict(DIMS), num_samples=N, tau_cached=4.0)
    kw.update(over)
    return CacheMeta(**kw)


def make_data(n, seed=0):
    """Every view of every row ([n, V, ...]); the cache keeps view 0 of all, views 1..K of train rows."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    attr = rng.integers(0, 2, n)
    return {
        "samples": {"id": [f"{i:03d}.Bird/img_é{i}.jpg" for i in range(n)], "y": y, "attr": attr,
                    "group": 2 * y + attr, "split": np.arange(n) % 3},
        "box": rng.random((n, V, 4), dtype=np.float32),
        "flip": rng.random((n, V)) > 0.5,
        "teacher_logits": rng.normal(size=(n, V, T, NC)).astype(np.float32),
        "biased_logits": rng.normal(size=(n, V, NC)).astype(np.float32),
        "features": {l: rng.normal(size=(n, V, B, d)).astype(np.float32) for l, d in DIMS.items()},
        "agre_cached": rng.random((n, V, T), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def data():
    return make_data(N)


def rows_of(data, a, b) -> dict:
    """write_rows' arguments for dataset rows a..b: view 0 of each, views 1..K of its training rows."""
    train = a + np.flatnonzero(data["samples"]["split"][a:b] == 0)

    def view(sel):
        return {**{k: data[src][sel] for k, src in FIELDS.items()},
                "features": {l: v[sel] for l, v in data["features"].items()}}
    ev = view((slice(a, b), 0))
    rnd = view((train[None, :], np.arange(1, V)[:, None]))  # [K, nt, ...]
    return {"eval": ev, "random": rnd if len(train) else None}


def expected(data, rows, v) -> dict:
    """What the cache holds for view v of ``rows``."""
    return {**{k: data[src][rows, v] for k, src in FIELDS.items()},
            "features": {l: f[rows, v].astype(np.float16) for l, f in data["features"].items()}}


def write(path, data, meta=None, row_start=0, row_stop=None, shard="", chunk=7, limit=None, **kw):
    """Write a file (or shard) from the fixture; ``limit`` stops after that many chunks."""
    n = len(data["samples"]["y"])
    row_stop = n if row_stop is None else row_stop
    meta = meta or make_meta(num_samples=n)
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


def assert_view(d, want, layers=DIMS):
    for k in FIELDS:
        np.testing.assert_array_equal(d[k], want[k], err_msg=k)
    assert sorted(d["features"]) == sorted(layers)
    for l in layers:
        assert d["features"][l].dtype == np.float16
        np.testing.assert_array_equal(d["features"][l], want["features"][l], err_msg=l)


def test_round_trip(full, data):
    r = open_cache(full)
    assert r.num_rows == N and r.meta.num_teachers == T and r.meta.feature_dims == DIMS
    assert r.meta.views_per_row == V and r.meta.view_spec == make_meta().view_spec
    assert r.meta.store_size == 18 and r.meta.out_size == 16 and r.meta.random_views == K
    assert list(r.sample("id")) == data["samples"]["id"]
    for k in ("y", "attr", "group", "split"):
        np.testing.assert_array_equal(r.sample(k), data["samples"][k])
    train = np.flatnonzero(data["samples"]["split"] == 0)
    np.testing.assert_array_equal(r.train_rows, train)
    rows = np.array([0, 2, 7, 13, 19])  # sparse: several slabs
    d = r.read_eval(rows=rows, layers=DIMS)
    np.testing.assert_array_equal(d["rows"], rows)
    assert_view(d, expected(data, rows, 0))
    for slot in range(V):
        d = r.read_slot(slot, layers=DIMS)
        np.testing.assert_array_equal(d["rows"], train)
        np.testing.assert_array_equal(d["y"], data["samples"]["y"][train])
        assert_view(d, expected(data, train, slot))
    pos = np.array([1, 4, 6])
    d = r.read_slot(2, layers=["layer4"], fields=("logits", "weights"), positions=pos)
    assert set(d) >= {"rows", "positions", "y", "group", "split", "logits", "weights", "features"}
    assert "box" not in d and "biased" not in d and list(d["features"]) == ["layer4"]
    np.testing.assert_array_equal(d["rows"], train[pos])
    np.testing.assert_array_equal(d["logits"], data["teacher_logits"][train[pos], 2])
    assert r.read_eval(rows=np.array([], int))["logits"].shape == (0, T, NC)
    assert r.read_slot(1, positions=[])["box"].shape == (0, 4)
    with pytest.raises(ValueError, match="increasing"):
        r.read_eval(rows=np.array([3, 2]))
    with pytest.raises(ValueError, match="slot must be in 0..3"):
        r.read_slot(4)
    with pytest.raises(CacheError, match="--layers including layer2"):
        r.read_slot(1, layers=["layer2"])


def test_read_split(full, data):
    r = open_cache(full)
    every = r.read_eval(layers=DIMS)
    assert_view(every, expected(data, np.arange(N), 0))
    val = r.read_eval(split="val", layers=["layer3"])
    rows = np.flatnonzero(data["samples"]["split"] == 1)
    np.testing.assert_array_equal(val["rows"], rows)
    np.testing.assert_array_equal(val["logits"], data["teacher_logits"][rows, 0])
    np.testing.assert_array_equal(val["flip"], data["flip"][rows, 0])
    assert list(val["features"]) == ["layer3"] and val["features"]["layer3"].shape == (len(rows), B, 6)
    assert list(val["id"]) == [data["samples"]["id"][i] for i in rows]
    assert r.read_eval(split="test")["features"] == {}  # no layer unless asked


def test_file_layout(full):
    Rt = 7
    with h5py.File(full, "r") as f:
        assert f.attrs["schema"] == S.SCHEMA_NAME and f.attrs["schema_version"] == 3
        assert json.loads(f.attrs["teachers"])[3]["role"] == "biased"
        assert f.attrs["row_start"] == 0 and f.attrs["row_stop"] == N and f.attrs["shard"] == ""
        assert json.loads(f.attrs["feature_dims"]) == DIMS and f.attrs["block_rows"] == 64
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            ds = f[name]
            if name.startswith("digests/"):  # small tables, checksummed, not compressed
                assert ds.fletcher32 and ds.dtype == np.uint8 and ds.shape[-1] == 32, name
                assert ds.shape[:-1] == ((K, 1) if name.startswith("digests/random.") else (1,)), name
                continue
            assert ds.fletcher32 and ds.compression == "gzip", name
            if name.startswith("random/"):  # a chunk holds rows of one slot
                assert ds.shape[:2] == (K, Rt) and ds.chunks[0] == 1 and ds.chunks[2:] == ds.shape[2:], name
            else:
                assert ds.shape[0] == N and ds.chunks[1:] == ds.shape[1:], name
        assert f["eval/features/layer4"].dtype == np.float16
        assert f["eval/features/layer4"].shape == (N, B, 8)
        assert f["random/features/layer4"].shape == (K, Rt, B, 8)
        assert f["random/logits/teachers"].shape == (K, Rt, T, NC)
        assert f["eval/flip"].shape == (N,) and f["random/flip"].shape == (K, Rt)


def test_uncompressed_slots_are_contiguous_on_disk(tmp_path, data):
    """Chunks are allocated when the file is made, slot by slot: one slot of a dataset is one byte
    range, whatever order the rows were written in."""
    big = make_data(400, seed=3)
    path = write(tmp_path / "c.h5", big, chunk=50, compression=None)
    with h5py.File(path, "r") as f:
        ds = f["random/features/layer4"]
        assert ds.chunks[1] < ds.shape[1]  # several chunks per slot
        infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
        by_slot = {}
        for c in infos:
            by_slot.setdefault(c.chunk_offset[0], []).append(c)
        for slot, chunks in by_slot.items():
            chunks.sort(key=lambda c: c.chunk_offset[1])
            for a, b in zip(chunks, chunks[1:]):
                assert b.byte_offset == a.byte_offset + a.size, slot


def test_resume(tmp_path, data):
    path = tmp_path / "c.h5"
    write(path, data, chunk=5, limit=2)  # rows 0..10 done, then "crash"
    with CacheWriter.create_or_resume(path, make_meta(), data["samples"]) as w:
        assert w.resumed and w.num_done == 10
        assert w.pending_chunks(5) == [(10, 15), (15, 20)]
        assert w.pending_chunks(4) == [(10, 12), (12, 16), (16, 20)]  # aligned to multiples of 4
    for other in (make_meta(dataset_fingerprint="fp-other"),
                  make_meta(view_spec={"random_views": V - 1, "out_size": 16, "seed": 5}),
                  make_meta(tau_cached=2.0), make_meta(layers=["layer4"], feature_dims={"layer4": 8})):
        with pytest.raises(CacheError,
                           match="(?i)made for other inputs.*pass --overwrite to rebuild it, "
                                 "or choose another --out"):
            CacheWriter.create_or_resume(path, other, data["samples"])
    y = 1 - data["samples"]["y"]  # other labels (their groups with them: a consistent, other data set)
    changed = {**data["samples"], "y": y, "group": 2 * y + data["samples"]["attr"]}
    with pytest.raises(CacheError, match="samples"):
        CacheWriter.create_or_resume(path, make_meta(), changed)
    write(path, data, chunk=5)  # finish it
    train = np.flatnonzero(data["samples"]["split"] == 0)
    np.testing.assert_array_equal(open_cache(path).read_slot(1)["logits"], data["teacher_logits"][train, 1])
    conftest.assert_same_h5_content(path, write(tmp_path / "once.h5", data, chunk=5))


def test_incomplete_refused(tmp_path, data):
    path = write(tmp_path / "c.h5", data, chunk=5, limit=2)
    with pytest.raises(CacheError, match=r"incomplete: 10 of 20 rows done; rerun precompute"):
        open_cache(path)
    assert open_cache(path, require_complete=False).done.sum() == 10
    assert any("incomplete" in p for p in VF.verify(path, "fp-abc"))


@pytest.mark.parametrize("version", [2, 4])
def test_other_schema_version(tmp_path, full, data, version):
    path = tmp_path / f"v{version}.h5"
    shutil.copy(full, path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = version
    cmd = (f"python cli.py precompute --data-root DATA_DIR --teachers TEACHERS/manifest.json --out {path} "
           "--views 3 --layers layer3,layer4 --dataset waterbirds --overwrite")
    with pytest.raises(CacheError, match=rf"version {version} found.*reads version 3 only") as e:
        open_cache(path)
    assert cmd in str(e.value) and "same" in str(e.value)
    with pytest.raises(CacheError, match=rf"version {version} found"):  # not resumed over either
        CacheWriter.create_or_resume(path, make_meta(), data["samples"])
    assert any(f"version {version} found" in p for p in VF.verify(path))


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


def _flip_chunk_bytes(path, name, chunk_index=None, coord=None):
    """Inverts 4 bytes in the middle of one stored chunk of ``name``: the ``chunk_index``-th, or
    the one holding element ``coord``."""
    with h5py.File(path, "r") as f:
        dsid = f[name].id
        info = dsid.get_chunk_info(chunk_index) if coord is None else dsid.get_chunk_info_by_coord(coord)
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
    _flip_chunk_bytes(path, "eval/logits/teachers", 0)
    problems = VF.verify(path, "fp-abc")
    assert len(problems) == 1 and problems[0].startswith("/eval/logits/teachers") and "checksum" in problems[0]
    r = open_cache(path)  # header and done flags are intact, the reads fail loudly
    with pytest.raises(CacheError, match="eval/logits/teachers.*verify"):
        r.read_eval(rows=np.array([0]))
    r.read_slot(1)  # the random views are elsewhere, and sound


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
    r.read_eval(rows=np.array([1]))  # the handle is open now
    r2 = pickle.loads(pickle.dumps(r))
    train = r.train_rows
    np.testing.assert_array_equal(r2.read_slot(1, positions=[3, 4])["biased"],
                                  data["biased_logits"][train[[3, 4]], 1])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return i, r.read_slot(2, positions=[i])["logits"][0]

    loader = torch.utils.data.DataLoader(Rows(), batch_size=3, num_workers=2)
    for idx, logits in loader:
        np.testing.assert_array_equal(logits.numpy(), data["teacher_logits"][train[idx.numpy()], 2])


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
        ev, rnd = rows["eval"], rows["random"]
        with pytest.raises(ValueError, match="eval/logits/teachers: shape"):
            w.write_rows(0, 4, {**ev, "logits": ev["logits"][:, :, :1]}, rnd)
        with pytest.raises(ValueError, match="layers"):
            w.write_rows(0, 4, {**ev, "features": {"layer4": ev["features"]["layer4"]}}, rnd)
        with pytest.raises(ValueError, match="random views are needed"):
            w.write_rows(0, 4, ev, None)
        bad = ev["biased"].copy()
        bad[0, 0] = np.nan
        with pytest.raises(CacheError,
                           match=r"/eval/logits/biased: non-finite values from the biased model 'erm0'"):
            w.write_rows(0, 4, {**ev, "biased": bad}, rnd)
        bad = rnd["logits"].copy()
        bad[2, 1, 1, 0] = np.inf
        with pytest.raises(CacheError, match=r"/random/logits/teachers: non-finite values from teacher 't1'"):
            w.write_rows(0, 4, ev, {**rnd, "logits": bad})
        bad = rnd["features"]["layer3"].copy()
        bad[0, 0, 1, 0] = 1e6  # float16 overflow
        with pytest.raises(CacheError,
                           match=r"random/features/layer3: non-finite values from backbone 'erm1' "
                                 r"\(of t1, t2\).*float16 overflow"):
            w.write_rows(0, 4, ev, {**rnd, "features": {**rnd["features"], "layer3": bad}})
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


# ------------------------------------------------ v3: one slot at a time, per-slot digests, root digest
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = make_data(400, seed=5)
    return write(tmp_path_factory.mktemp("big") / "cache.h5", d, chunk=64, compression=None), d


def slot_bytes(path, slot, layers) -> int:
    """The bytes of one slot's datasets themselves (what a read of it uses)."""
    part, lead = ("eval", None) if slot == 0 else ("random", slot - 1)
    names = ["box", "flip", "logits/teachers", "logits/biased", "weights/agre_cached"] + [f"features/{l}" for l in layers]
    with h5py.File(path, "r") as f:
        train = int(np.sum(f["samples/split"][...] == 0))
        total = 0
        for n in names:
            ds = f[f"{part}/{n}"]
            per_row = int(np.prod(ds.shape[2 if lead is not None else 1:])) * ds.dtype.itemsize
            total += per_row * train
    return total


@pytest.mark.parametrize("slot", [1, 3])
def test_read_slot_reads_only_that_slot(big, slot):
    path, d = big
    r = open_cache(path)
    r.sample("y")  # the samples, read once per reader
    before = r.bytes_read
    got = r.read_slot(slot, layers=DIMS)
    used = slot_bytes(path, slot, DIMS)
    assert used <= r.bytes_read - before <= 1.3 * used, (r.bytes_read - before, used)
    train = np.flatnonzero(d["samples"]["split"] == 0)
    assert_view(got, expected(d, train, slot))
    before = r.bytes_read  # a second epoch on the same slot: the digests are already in memory
    r.read_slot(slot, layers=["layer4"], fields=("logits",))
    with h5py.File(path, "r") as f:
        assert r.bytes_read - before == f["random/logits/teachers"][slot - 1].nbytes + f["random/features/layer4"][slot - 1].nbytes


def test_damage_in_slot_3_leaves_slot_2_readable(tmp_path, big):
    path, d = big
    train = np.flatnonzero(d["samples"]["split"] == 0)
    # 1) raw bytes flipped inside one of slot 3's chunks (fletcher32 or the digest catch it)
    raw = tmp_path / "raw.h5"
    shutil.copy(path, raw)
    _flip_chunk_bytes(raw, "random/logits/teachers", coord=(2, 0, 0, 0))
    r = open_cache(raw)
    with pytest.raises(CacheError, match="random/logits/teachers"):
        r.read_slot(3)
    np.testing.assert_array_equal(r.read_slot(2)["logits"], d["teacher_logits"][train, 2])
    assert any(p.startswith("/random/logits/teachers") for p in VF.verify(raw))
    # 2) a value changed through HDF5 (valid checksum, wrong contents): only the slot's digest sees it
    edited = tmp_path / "edited.h5"
    shutil.copy(path, edited)
    with h5py.File(edited, "r+") as f:
        f["random/logits/teachers"][2, 70, 1, 0] += 1.0  # slot 3, row 70: its second block
    r = open_cache(edited)
    with pytest.raises(CacheError,
                       match=r"rows 64..128 of slot 2 \(view 3\) of /random/logits/teachers do not match"):
        r.read_slot(3)
    np.testing.assert_array_equal(r.read_slot(3, positions=np.arange(64))["logits"],
                                  d["teacher_logits"][train[:64], 3])
    np.testing.assert_array_equal(r.read_slot(2)["logits"], d["teacher_logits"][train, 2])
    problems = VF.verify(edited)
    assert len(problems) == 1 and "slot 2 (view 3) rows 64..128" in problems[0] and "digest" in problems[0]


def test_root_digest_names_the_contents(tmp_path, big, full):
    path, d = big
    root = open_cache(path).root_digest
    assert len(root) == 64 and root == h5py.File(path, "r").attrs["header_sha256"]
    assert VF.verify(path, expect=root) == [] and VF.verify(path, expect=root.upper()) == []
    assert root != open_cache(full).root_digest
    # any change of data, made consistent again (digests rewritten, as a tamperer would), moves it
    from cache import integrity
    from cache.schema import is_slotted

    for name, index in (("random/flip", (1, 3)), ("eval/features/layer3", (5, 0, 0)), ("samples/y", (7,))):
        forged = tmp_path / f"forged_{name.replace('/', '_')}.h5"
        shutil.copy(path, forged)
        with h5py.File(forged, "r+") as f:
            ds = f[name]
            ds[index] = 1 - ds[index] if ds.dtype.kind in "bi" else ds[index] + 1
            if name == "samples/y":  # its group with it, or the range check refuses the file first
                f["samples/group"][index] = 2 * ds[index] + f["samples/attr"][index]
            integrity.write_digests(f, _datasets(f), lambda ds: 1000, is_slotted)
        r = open_cache(forged)  # the file is self-consistent ...
        assert r.root_digest != root, name  # ... but not the published one
        problems = VF.verify(forged, expect=root)
        assert len(problems) == 1 and "not the expected" in problems[0], name
    same = write(tmp_path / "again.h5", d, chunk=64, compression=None)
    with h5py.File(same, "r+") as f:  # the same contents, made at another time: only "created" differs
        created = h5py.File(path, "r").attrs["created"]
        f.attrs["created"] = created
        f.attrs["git_commit"] = h5py.File(path, "r").attrs["git_commit"]
        f.attrs["header_sha256"] = integrity.header_digest(f.attrs)
    assert open_cache(same).root_digest == root


def _datasets(f) -> list[str]:
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("digests/") else None)
    return names


def test_no_random_views(tmp_path, data):
    path = write(tmp_path / "k0.h5", data, meta=make_meta(view_spec={"random_views": 0, "out_size": 16}))
    r = open_cache(path)
    with h5py.File(path, "r") as f:
        assert "random" not in f
    assert_view(r.read_slot(0, layers=DIMS), expected(data, r.train_rows, 0))
    with pytest.raises(ValueError, match="slot must be in 0..0"):
        r.read_slot(1)
    assert VF.verify(path) == []


def test_header_fields_come_from_the_dataclass(full):
    import dataclasses

    fields = [f.name for f in dataclasses.fields(CacheMeta)]
    assert S.IDENTITY == tuple(k for k in fields if k not in ("created", "tool_version",
                                                              "git_commit", "torch_version"))
    with h5py.File(full, "r") as f:
        assert set(fields) <= set(f.attrs)
    m = open_cache(full).meta
    assert m == dataclasses.replace(make_meta(),
                                    **{k: getattr(m, k) for k in ("created", "tool_version",
                                                                  "git_commit", "torch_version")})
    assert make_meta(backbone_of_teacher=(np.int64(0), 1, 1),
                     feature_dims={"layer3": np.int64(6), "layer4": 8}) \
        .identity() == make_meta().identity()


def test_run_footprint_formulas():
    m = make_meta(layers=["layer4"], feature_dims={"layer4": 8})
    per = I.slot_bytes(m, ["layer4"])
    assert per == 16 + 1 + 4 * T * NC + 4 * NC + 4 * T + 2 * B * 8
    fp = I.run_footprint(m, {"train": 10, "val": 4, "test": 6}, {"train": 1000, "val": 400, "test": 600},
                         ["layer4"], teachers_online=False)
    assert fp["held"]["images"] == 2000 and fp["held"]["teacher_outputs"] == 2 * 10 * per
    assert fp["epoch_read"]["total"] == 1000 + 10 * per + 400
    online = I.run_footprint(m, {"train": 10, "val": 4, "test": 6}, {"train": 1000, "val": 400, "test": 600},
                             ["layer4"], teachers_online=True)
    assert online["held"]["teacher_outputs"] == 0 and online["epoch_read"]["total"] == 1400
    table = I.reference_settings()
    wb = next(t for t in table if t["setting"].startswith("Waterbirds") and "layer4" in t["setting"]
              and "1 backbone" in t["setting"])
    per, train, rows = wb["slot_bytes"], 4795, 4795 + 1199 + 5794
    # the file: view 0 of every row and K = 30 slots of the training rows; a run: two slots held, one read
    assert wb["file"] == (rows + 30 * train) * per
    assert wb["held_teachers"] == 2 * train * per and wb["epoch_read_teachers"] == train * per
    text = I.format_reference()
    assert "CelebA, layer2-4, 5 backbones" in text and "v2" not in text


def test_links_out_of_the_file_are_refused(tmp_path, full, data):
    """A received file reads only datasets stored inside it (core.h5safe), on open, verify and resume."""
    path = tmp_path / "linked.h5"
    shutil.copy(full, path)
    with h5py.File(path, "r+") as f:
        f["eval/extra"] = h5py.ExternalLink("/etc/passwd", "/x")
    with pytest.raises(CacheError, match="link"):
        open_cache(path)
    assert any("link" in p for p in VF.verify(path))
    with pytest.raises(CacheError, match="link"):
        CacheWriter.create_or_resume(path, make_meta(), data["samples"])


# ------------------------------------------------ samples out of range (a received file is untrusted)
def _planted(src, dst, name, row, value, redigest=True):
    """A copy of ``src`` with ``name[row] = value``; ``redigest``: digests rewritten, as a sender's
    buggy tool (or a tamperer) would leave them, so that the range check, not the digest, has to see it."""
    from cache import integrity

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f[name][row] = value(f) if callable(value) else value
        if redigest:
            integrity.write_digests(f, _datasets(f), lambda ds: 1000, S.is_slotted)
    return dst


def _cli(*args):
    from click.testing import CliRunner

    from cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1 and "Traceback" not in r.output, r.output
    return r.output


ADVICE = "ask its sender for a fresh copy, or rebuild it with precompute"


@pytest.mark.parametrize("name, row, value, message", [
    ("samples/y", 7, 2,
     r"/samples/y row 7 holds 2, not a class in 0\.\.1 \(num_classes 2: landbird, waterbird\)"),
    ("samples/y", 3, -1, r"/samples/y row 3 holds -1, not a class in 0\.\.1"),
    ("samples/attr", 5, 9, r"/samples/attr row 5 holds 9, not an attribute value in 0\.\.1 \(land, water\)"),
    ("samples/group", 4, 4, r"/samples/group row 4 holds 4, not a group in 0\.\.3 \(num_groups 4\)"),
    ("samples/group", 4, lambda f: (f["samples/group"][4] + 1) % 4,
     r"/samples/group row 4 holds \d, but its class \d and attribute \d make group \d \(y \* 2 \+ attr\)"),
    ("samples/split", 11, 3, r"/samples/split row 11 holds 3, not a split code \(0 train, 1 val, 2 test\)"),
    ("samples/split", 13, -7, r"/samples/split row 13 holds -7, not a split code"),
    ("samples/id", 9, lambda f: f["samples/id"][2],
     r"/samples/id row 9 holds '002\.Bird/img_é2\.jpg', the image of row 2 again \(1 repeated ids\)"),
])
def test_samples_out_of_range_are_refused(tmp_path, full, data, name, row, value, message):
    """A label, attribute, group, split code or id the header does not allow ends in one CacheError
    naming the dataset, row and value (not an IndexError in training), on open, info and verify."""
    path = _planted(full, tmp_path / "bad.h5", name, row, value)
    for complete in (True, False):
        with pytest.raises(CacheError, match=message) as e:
            open_cache(path, require_complete=complete)
        assert str(e.value).startswith(f"{path}: ") and ADVICE in str(e.value)
    problems = VF.verify(path)
    assert len(problems) == 1 and re.search(message, problems[0]) and ADVICE in problems[0], problems
    for cmd in (("cache", "verify", path), ("cache", "info", path)):
        out = _cli(*cmd)
        assert re.search(message, " ".join(out.split())), out
    with pytest.raises(CacheError, match=message):  # nor resumed over
        CacheWriter.create_or_resume(path, make_meta(), data["samples"])


def test_planted_sample_without_new_digests_is_named_as_damage(tmp_path, full):
    path = _planted(full, tmp_path / "bad.h5", "samples/y", 7, 5, redigest=False)
    with pytest.raises(CacheError,
                       match=r"rows 0\.\.20 of /samples/y do not match their digest: the file is damaged"):
        open_cache(path)
    problems = VF.verify(path)
    assert len(problems) == 1 and problems[0].startswith("/samples/y: 1 block(s) do not match their digest"), problems


def test_sample_lengths_must_match_the_header(tmp_path, full):
    from cache import integrity

    short = tmp_path / "short.h5"  # one row fewer in /samples/y than the header declares
    shutil.copy(full, short)
    with h5py.File(short, "r+") as f:
        y = f["samples/y"][:-1]
        del f["samples/y"]
        f.create_dataset("samples/y", data=y, fletcher32=True)
    with pytest.raises(CacheError, match=r"/samples/y has shape \(19,\), expected \(20,\)"):
        open_cache(short)
    assert any("/samples/y has shape (19,), expected (20,)" in p for p in VF.verify(short))
    more = tmp_path / "more.h5"  # a whole file (no shard name) must hold every declared row
    shutil.copy(full, more)
    with h5py.File(more, "r+") as f:
        f.attrs["num_samples"] = N + 1
        f.attrs["header_sha256"] = integrity.header_digest(f.attrs)
    message = rf"rows 0\.\.{N} of a whole file \(no shard name\), which must hold all num_samples = {N + 1} rows"
    with pytest.raises(CacheError, match=message):
        open_cache(more)
    problems = VF.verify(more)
    assert len(problems) == 1 and re.search(message, problems[0]) and ADVICE in problems[0]


def test_writer_refuses_samples_out_of_range(tmp_path, data):
    s = data["samples"]
    bad = {**s, "y": s["y"].copy()}
    bad["y"][7] = 2
    with pytest.raises(ValueError,
                       match=r"samples to write: /samples/y row 1 \(dataset row 7\) holds 2, not a class"):
        CacheWriter.create_or_resume(tmp_path / "s1.h5", make_meta(), {k: v[6:13] for k, v in bad.items()},
                                     6, 13, "1/3")
    with pytest.raises(ValueError,
                       match=r"/samples/group row 0 holds 1, but its class 0 and attribute 0 make group 0"):
        samples = {**s, "y": np.zeros(N, np.int64), "attr": np.zeros(N, np.int64),
                   "group": np.r_[1, np.zeros(N - 1, np.int64)]}
        CacheWriter.create_or_resume(tmp_path / "c.h5", make_meta(), samples)
    assert not list(tmp_path.iterdir())
