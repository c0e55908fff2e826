"""Precompute: the cache holds what the models produce, once per backbone, resumable and shardable."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from data.store import ImageStore
from data.views import ViewSpec, render, sample_views
from cache.reader import open_cache
from core.manifest import load_model, read_manifest
from cache.schema import store_path_for
from core.ensemble import Ensemble
from precompute.run import PrecomputeConfig, run_precompute


from conftest import assert_same_h5_content as _assert_same_content


def test_cache_equals_model_outputs(tiny_data, tiny_teachers, tiny_cache):
    cache = open_cache(tiny_cache)
    man = read_manifest(tiny_teachers)
    ens = Ensemble(man).eval()
    spec = ViewSpec(**cache.meta.view_spec)
    rows = np.array([0, 7, 100, 301, 589])  # three training rows, a validation and a test row
    train = cache.split[rows] == 0
    assert train.tolist() == [True, True, True, False, False]
    store = ImageStore(store_path_for(tiny_cache))
    box, flip = sample_views(rows, spec, store.hw[rows])

    def view(v):  # the store's images (flat Pixels, or canvases with their sizes) rendered as view v
        images = store.load(rows)
        hw = {}
        if isinstance(images, np.ndarray):
            images, hw = torch.from_numpy(images), {"hw": torch.from_numpy(store.hw[rows])}
        return render(images, torch.from_numpy(box[:, v]), torch.from_numpy(flip[:, v]), spec.out_size, **hw)
    positions = np.searchsorted(cache.train_rows, rows[train])
    assert np.array_equal(cache.train_rows[positions], rows[train])
    for v in range(cache.meta.views_per_row):
        x = view(v)
        with torch.no_grad():
            zt, zb, feats = ens(x)
        # view 0 of every row; views 1..K of the training rows only (evaluation rows have none)
        d = cache.read_eval(rows=rows, layers=cache.meta.layers) if v == 0 else \
            cache.read_slot(v, layers=cache.meta.layers, positions=positions)
        sel = slice(None) if v == 0 else train
        np.testing.assert_allclose(d["box"], box[sel, v])
        np.testing.assert_array_equal(d["flip"], flip[sel, v])
        np.testing.assert_allclose(d["logits"], zt.numpy()[sel], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(d["biased"], zb.numpy()[sel], rtol=1e-4, atol=1e-4)
        for layer in cache.meta.layers:
            np.testing.assert_allclose(d["features"][layer].astype(np.float32),
                                       feats[layer].half().float().numpy()[sel], rtol=2e-3, atol=2e-3)
    slot0 = cache.read_slot(0, positions=positions)
    np.testing.assert_array_equal(slot0["logits"], cache.read_eval(rows=rows[train])["logits"])
    # ... and equal to each model loaded on its own: teacher t's head on its backbone, the biased
    # model's own head (not a teacher's) on the backbone it shares
    x = view(0)
    v0 = cache.read_eval(rows=rows)
    with torch.no_grad():
        for t, m in enumerate(man.teachers):
            np.testing.assert_allclose(v0["logits"][:, t], load_model(man, m).eval()(x)[0],
                                       rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(v0["biased"], load_model(man, man.biased).eval()(x)[0],
                                   rtol=1e-4, atol=1e-4)
    # teacher t's logits are its own head on its backbone, not another teacher's
    assert not np.allclose(v0["logits"][:, 0], v0["logits"][:, 1])


def test_cached_weights_follow_the_formula(tiny_cache):
    cache = open_cache(tiny_cache)
    tau = cache.meta.tau_cached

    def softmax(z):
        e = np.exp(z / tau - (z / tau).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for d in (cache.read_eval(split="val"), cache.read_slot(2)):
        n, T, C = d["logits"].shape
        for i in range(0, n, 7):
            pb, u = softmax(d["biased"][i].astype(np.float64)), np.full(C, 1.0 / C)
            W = []
            for t in range(T):
                a, b = u - softmax(d["logits"][i, t].astype(np.float64)), u - pb
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                cos = 0.0 if na < 1e-12 or nb < 1e-12 else a @ b / (na * nb)
                W.append(max(1.0 - cos, 0.0) if 1.0 - cos > 1e-9 else 0.0)
            W = np.array(W)
            expect = W / W.sum() if W.sum() > 0 else np.full(T, 1.0 / T)
            np.testing.assert_allclose(d["weights"][i], expect, atol=1e-5)


def test_shared_backbone_runs_once_per_view(tiny_data, tiny_teachers, tmp_path, monkeypatch):
    man = read_manifest(tiny_teachers)
    assert len({m.backbone_id for m in man.models}) == 1
    calls = []
    original = Ensemble.__init__

    def counting_init(self, m):
        original(self, m)
        for bb in self.backbones:
            bb.register_forward_hook(lambda *a: calls.append(1))

    monkeypatch.setattr(Ensemble, "__init__", counting_init)
    out = run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers),
                                          str(tmp_path / "c.h5"), random_views=1,
                                          layers=("layer4",), batch_size=200, device="cpu", progress=False))
    n = open_cache(out).num_rows
    split = open_cache(out).split
    # one forward per batch of 200 (row, view) pairs: every row's view 0, the training rows' view 1
    pairs = [np.sum(1 + (split[a:a + 200] == 0)) for a in range(0, n, 200)]
    assert len(calls) == sum(-(-p // 200) for p in pairs)  # 3 teachers + biased on one backbone, once


def test_ensemble_reads_each_checkpoint_file_once(tiny_teachers, monkeypatch):
    """Backbone and heads of entries that share a file come from one read of it."""
    from core import ensemble as run_mod

    man = read_manifest(tiny_teachers)
    reads = []
    real = run_mod.load_checkpoint
    monkeypatch.setattr(run_mod, "load_checkpoint", lambda path: reads.append(path) or real(path))
    Ensemble(man)
    files = {man.path(m.file) for m in man.models} | {man.path(m.head_file) for m in man.models if m.head_file}
    assert sorted(reads) == sorted(files)


def test_resume_after_kill_equals_uninterrupted(tiny_data, tiny_teachers, tmp_path, monkeypatch):
    from cache import writer as cache_mod

    cfg = dict(random_views=1, layers=("layer3", "layer4"), batch_size=128, device="cpu", progress=False)
    full = run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers),
                                           str(tmp_path / "full.h5"), **cfg))

    written = []
    real_write = cache_mod.CacheWriter.write_rows

    def dying_write(self, start, stop, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(start)
        return real_write(self, start, stop, **kw)

    monkeypatch.setattr(cache_mod.CacheWriter, "write_rows", dying_write)
    part = tmp_path / "part.h5"
    with pytest.raises(KeyboardInterrupt):
        run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(part), **cfg))
    with pytest.raises(Exception, match="incomplete"):
        open_cache(part)
    monkeypatch.setattr(cache_mod.CacheWriter, "write_rows", real_write)
    run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(part), **cfg))
    _assert_same_content(full, part)


def test_shards_merge_to_the_single_run(tiny_data, tiny_teachers, tiny_cache, tmp_path):
    from cli import cli

    shards = []
    for i in range(3):
        p = tmp_path / f"cache.shard{i}.h5"
        run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(p),
                                        random_views=2, batch_size=64,
                                        shard=f"{i}/3", device="cpu", progress=False))
        shards.append(str(p))
    for shard in shards:  # a shard's own metrics never fail a valid shard
        res = CliRunner().invoke(cli, ["cache", "info", shard])
        assert res.exit_code == 0 and "shard" in res.output, res.output
    merged = tmp_path / "merged.h5"
    res = CliRunner().invoke(cli, ["cache", "merge", str(merged), *shards])
    assert res.exit_code == 0, res.output
    # bit for bit: shard boundaries are aligned to the batch size, so every batch is the same
    _assert_same_content(tiny_cache, merged)
    assert store_path_for(merged).is_file()
    # the merged header is bound to the merged store, which equals the single run's
    assert open_cache(merged).meta.store_digest == open_cache(tiny_cache).meta.store_digest != ""


def test_altered_checkpoint_is_refused(tiny_data, tiny_teachers, tmp_path):
    from cli import cli

    teachers = tmp_path / "teachers"
    shutil.copytree(tiny_teachers.parent, teachers)
    man = json.loads((teachers / "manifest.json").read_text())
    head = teachers / man["models"][0]["head_file"]
    state = torch.load(head, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, head)
    res = CliRunner().invoke(cli, ["precompute", "--data-root", str(tiny_data), "--teachers",
                                   str(teachers / "manifest.json"), "--out", str(tmp_path / "c.h5")])
    assert res.exit_code != 0
    assert "was altered" in res.output and "Traceback" not in res.output
    head.unlink()
    res = CliRunner().invoke(cli, ["precompute", "--data-root", str(tiny_data), "--teachers",
                                   str(teachers / "manifest.json"), "--out", str(tmp_path / "c.h5")])
    assert res.exit_code != 0 and "is missing" in res.output and "Traceback" not in res.output


def test_cache_info_and_verify_commands(tiny_data, tiny_cache, tmp_path):
    from cli import cli
    from data.synth import SynthSpec, generate

    res = CliRunner().invoke(cli, ["cache", "info", str(tiny_cache)])
    assert res.exit_code == 0 and "teacher_1" in res.output and "test" in res.output
    res = CliRunner().invoke(cli, ["cache", "verify", str(tiny_cache), "--data-root", str(tiny_data)])
    assert res.exit_code == 0 and "OK" in res.output
    other = generate(tmp_path / "other", SynthSpec(scale=0.05, size=24, seed=2))
    res = CliRunner().invoke(cli, ["cache", "verify", str(tiny_cache), "--data-root", str(other)])
    assert res.exit_code != 0 and "another data set" in res.output and "Traceback" not in res.output


def test_overlapped_pipeline_writes_the_serial_cache(tiny_data, tiny_teachers, tmp_path):
    """Reading ahead and writing behind change when things happen, never what is written."""
    kw = dict(random_views=1, layers=("layer4",), batch_size=64, device="cpu", progress=False)
    serial = run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(tmp_path / "a.h5"),
                                             prefetch=0, **kw))
    overlapped = run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(tmp_path / "b.h5"),
                                                 prefetch=3, **kw))
    _assert_same_content(serial, overlapped)
