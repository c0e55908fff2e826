"""Sharing a cache: slim, diff, extend, and a received copy used without the data folder."""
from __future__ import annotations

import dataclasses
import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache.integrity import BLOCK_ROWS, write_digests
from cache.reader import open_cache
from cache.schema import is_slotted, layout, store_path_for
from cache.tools import diff, format_diff, slim
from cache.verify import verify
from cache.writer import slab_rows
from conftest import assert_same_h5_content
from precompute.run import PrecomputeConfig, run_precompute

FAST = dict(epochs=1, batch_size=64, lr=1e-2, device="cpu", pretrained=False)


def _fit(cache, out, **kw):
    from distill.config import DistillConfig
    from distill.train import fit

    return fit(DistillConfig(cache=str(cache), out=str(out), **{**FAST, **kw}), progress=False)


def _copy(cache, folder):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(cache, folder / "cache.h5")
    shutil.copy(store_path_for(cache), folder / "cache.images.h5")
    return folder / "cache.h5"


def _redigest(path):
    """Re-write the digests of an edited file, so that it opens (a planted, not a damaged, change)."""
    with h5py.File(path, "r+") as f:
        from cache.schema import meta_from_file, train_positions
        meta, a, b, _ = meta_from_file(f, path)
        names = list(layout(meta, b - a, len(train_positions(f["samples/split"][...]))))
        write_digests(f, names, slab_rows, is_slotted, BLOCK_ROWS)


def test_slim_keeps_exactly_the_kept_data_verifies_and_trains(tiny_cache, tmp_path):
    from cli import cli

    out = tmp_path / "small.h5"
    res = CliRunner().invoke(cli, ["cache", "slim", str(tiny_cache), "--out", str(out), "--layers", "layer4",
                                   "--views", "1"])
    assert res.exit_code == 0, res.output
    assert verify(out) == []
    big, small = open_cache(tiny_cache), open_cache(out)
    assert small.meta.layers == ["layer4"] and small.meta.random_views == 1
    assert small.root_digest != big.root_digest
    with h5py.File(tiny_cache, "r") as fa, h5py.File(out, "r") as fb:
        names = []
        fb.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("digests/") else None)
        assert "eval/features/layer4" in names and not any("layer3" in n or "layer2" in n for n in names)
        for n in names:
            want = fa[n][:1] if is_slotted(n) else fa[n][...]  # the first of the two slots
            np.testing.assert_array_equal(fb[n][...], want, err_msg=n)
    h = small.meta.history[-1]
    assert h["op"] == "slim" and h["from"] == big.root_digest
    assert h["dropped"] == {"layers": ["layer2", "layer3"], "random_views": [2]}
    assert big.meta.history == []
    assert store_path_for(out).is_file()
    res = CliRunner().invoke(cli, ["cache", "info", str(out)])
    assert res.exit_code == 0 and "slim from" in res.output and "dropped layers layer2,layer3, random views 2..2" \
        in res.output, res.output
    _fit(out, tmp_path / "run", gamma=0.5)
    assert (tmp_path / "run").is_dir()


def test_slim_refuses_what_the_cache_lacks(tiny_cache, tmp_path):
    from core.errors import ToolError

    with pytest.raises(ToolError, match="--views must be in 0..2"):
        slim(tiny_cache, tmp_path / "a.h5", views=3)
    with pytest.raises(ToolError, match="--layers must name"):
        slim(tiny_cache, tmp_path / "a.h5", layers=["layer1"])
    with pytest.raises(ToolError, match="input file"):
        slim(tiny_cache, tiny_cache)


def test_diff_passes_equal_files_and_finds_a_planted_difference(tiny_cache, tmp_path):
    from cli import cli

    same = _copy(tiny_cache, tmp_path / "same")
    res = CliRunner().invoke(cli, ["cache", "diff", str(tiny_cache), str(same)])
    assert res.exit_code == 0 and "EQUAL" in res.output, res.output
    planted = _copy(tiny_cache, tmp_path / "planted")
    with h5py.File(planted, "r+") as f:
        f["random/logits/teachers"][1, 5, 0, 0] += 0.25  # slot 1 (view 2), training row 5, teacher 0
    _redigest(planted)
    assert verify(planted) == []
    d = diff(tiny_cache, planted)
    bad = [x for x in d["datasets"] if x["rows_differing"]]
    assert [(x["dataset"], x["slot"], x["rows_differing"], x["first_row"]) for x in bad] == \
        [("random/logits/teachers", 1, 1, 5)]
    assert bad[0]["max_abs"] == pytest.approx(0.25, rel=1e-5) and not d["equal"] and not d["header"]
    res = CliRunner().invoke(cli, ["cache", "diff", str(tiny_cache), str(planted)])
    assert res.exit_code == 1 and "random/logits/teachers" in res.output and "DIFFERENT" in res.output, res.output
    # within the tolerance it passes
    res = CliRunner().invoke(cli, ["cache", "diff", str(tiny_cache), str(planted), "--atol", "0.3"])
    assert res.exit_code == 0, res.output
    # layout differences are named
    small = slim(tiny_cache, tmp_path / "small.h5", layers=["layer4"], views=1)
    d = diff(tiny_cache, small)
    assert not d["equal"] and any("layer3" in x for x in d["only_in"]) and any("slots 2..2" in x for x in d["only_in"])
    assert "layers" in " ".join(d["header"]) and "only" in format_diff(d)


@pytest.fixture(scope="module")
def two_teachers(tiny_teachers, tmp_path_factory):
    """The tiny manifest without its third teacher (same checkpoints)."""
    folder = tmp_path_factory.mktemp("two") / "teachers"
    shutil.copytree(tiny_teachers.parent, folder)
    man = json.loads(tiny_teachers.read_text())
    dropped = [m for m in man["models"] if m["role"] == "teacher"][2]
    man["models"] = [m for m in man["models"] if m is not dropped]
    (folder / "manifest.json").write_text(json.dumps(man))
    return folder / "manifest.json", dropped["name"]


def test_extend_equals_a_fresh_precompute(tiny_data, tiny_teachers, tiny_cache, two_teachers, tmp_path):
    """2 teachers + the third by extend == the 3-teacher precompute (tiny_cache), bit for bit on
    the CPU with the same batch size (64, as tiny_cache)."""
    from cli import cli

    manifest2, third = two_teachers
    small = run_precompute(PrecomputeConfig(str(tiny_data), str(manifest2),
                                            str(tmp_path / "two.h5"), random_views=2,
                                            batch_size=64, device="cpu", progress=False))
    assert open_cache(small).meta.num_teachers == 2
    out = tmp_path / "ext" / "three.h5"
    out.parent.mkdir()
    res = CliRunner().invoke(cli, ["cache", "extend", str(small), "--teachers", str(tiny_teachers),
                                   "--out", str(out),
                                   "--batch-size", "64", "--device", "cpu", "--data-root", str(tiny_data)])
    assert res.exit_code == 0, res.output
    assert verify(out) == []
    assert_same_h5_content(tiny_cache, out)
    ext, ref = open_cache(out).meta, open_cache(tiny_cache).meta
    strip = {"history": []}
    assert dataclasses.replace(ext, **strip).identity() == ref.identity()
    h = ext.history[-1]
    assert h["op"] == "extend" and h["computed"] == [third] and h["weights"] == "recomputed"
    assert sorted(h["copied"]) == sorted(t["name"] for t in ref.teachers if t["name"] != third)
    assert h["from"] == open_cache(small).root_digest
    res = CliRunner().invoke(cli, ["cache", "info", str(out)])
    assert res.exit_code == 0 and f"computed {third}" in res.output, res.output
    res = CliRunner().invoke(cli, ["cache", "diff", str(tiny_cache), str(out)])
    assert res.exit_code == 0, res.output
    # another batch size: other batches, equal within float32 rounding of the new teacher's logits
    other = tmp_path / "other.h5"
    from precompute.extend import extend
    extend(small, tiny_teachers, other, batch_size=100, device="cpu")
    d = diff(tiny_cache, other, atol=1e-4, rtol=1e-4)
    assert d["equal"], format_diff(d)


def test_extend_refuses_models_that_do_not_fit(tiny_data, tiny_cache, tiny_teachers, tmp_path):
    from cli import cli
    from data.synth import SynthSpec, generate

    folder = tmp_path / "t"
    shutil.copytree(tiny_teachers.parent, folder)
    man = json.loads((folder / "manifest.json").read_text())
    man["num_classes"] = 3
    for m in man["models"]:
        m["num_classes"] = 3
    (folder / "manifest.json").write_text(json.dumps(man))
    res = CliRunner().invoke(cli, ["cache", "extend", str(tiny_cache), "--teachers",
                                   str(folder / "manifest.json"), "--out", str(tmp_path / "x.h5")])
    assert res.exit_code != 0 and "does not fit" in res.output and "classes" in res.output, res.output
    shutil.rmtree(folder)
    shutil.copytree(tiny_teachers.parent, folder)
    record = json.loads((folder / "teachers_config.json").read_text())
    record["dataset_fingerprint"] = "0" * 64
    (folder / "teachers_config.json").write_text(json.dumps(record))
    res = CliRunner().invoke(cli, ["cache", "extend", str(tiny_cache), "--teachers",
                                   str(folder / "manifest.json"), "--out", str(tmp_path / "x.h5")])
    assert res.exit_code != 0 and "another data set" in res.output and "Traceback" not in res.output, res.output
    other = generate(tmp_path / "other", SynthSpec(scale=0.05, size=24, seed=2))
    res = CliRunner().invoke(cli, ["cache", "extend", str(tiny_cache), "--teachers", str(tiny_teachers),
                                   "--out", str(tmp_path / "x.h5"), "--data-root", str(other)])
    assert res.exit_code != 0 and "another data set" in res.output, res.output
    assert not (tmp_path / "x.h5").exists()


def test_received_copy_works_without_the_data_folder(tiny_data, tiny_cache, tmp_path):
    """cache.h5 + cache.images.h5 in a new folder, the data folder moved away: info, verify and a
    distill run work; --data-root, when given, is checked against the fingerprint."""
    from cli import cli
    from data.synth import SynthSpec, generate

    received = _copy(tiny_cache, tmp_path / "received")
    away = tiny_data.with_name(tiny_data.name + ".away")
    tiny_data.rename(away)
    try:
        res = CliRunner().invoke(cli, ["cache", "info", str(received)])
        assert res.exit_code == 0 and "teacher_1" in res.output, res.output
        res = CliRunner().invoke(cli, ["cache", "verify", str(received)])
        assert res.exit_code == 0 and "OK" in res.output, res.output
        s = _fit(received, tmp_path / "received" / "run", gamma=0.5)
        assert (tmp_path / "received" / "run").is_dir() and s is not None
    finally:
        away.rename(tiny_data)
    res = CliRunner().invoke(cli, ["cache", "verify", str(received), "--data-root", str(tiny_data)])
    assert res.exit_code == 0 and "matches the data folder" in res.output, res.output
    _fit(received, tmp_path / "run2", data_root=str(tiny_data))
    other = generate(tmp_path / "other", SynthSpec(scale=0.05, size=24, seed=2))
    res = CliRunner().invoke(cli, ["cache", "verify", str(received), "--data-root", str(other)])
    assert res.exit_code != 0 and "another data set" in res.output
    from distill.data import DistillError
    with pytest.raises(DistillError, match="another data set"):
        _fit(received, tmp_path / "run3", data_root=str(other))
