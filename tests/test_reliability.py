"""Faults a user or a machine makes: bit flips, edited headers, two writers, stale settings, bad
arguments and broken images. Each must end in a clear message, never in a silent wrong result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks.bitflips import campaign, index_node_offsets
from cache.reader import open_cache
from cache.schema import CacheError, CacheMeta
from cache.verify import verify
from cache.writer import CacheWriter
from core.errors import LockedError, ToolError
from core.files import OutputLock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """A finished cache of random contents: 150 rows (3 digest blocks), 50 training rows with 2
    random views each, 2 teachers."""
    rng = np.random.default_rng(0)
    N, K, T, C = 150, 2, 2, 2
    meta = CacheMeta(num_classes=C, class_names=["a", "b"], attr_names=["x", "y"], dataset="csv",
                     dataset_options={}, dataset_fingerprint="fp",
                     teachers=[{"name": "t0", "role": "teacher", "sha256": "0", "backbone_id": "b0"},
                               {"name": "t1", "role": "teacher", "sha256": "1", "backbone_id": "b0"},
                               {"name": "bias", "role": "biased", "sha256": "2", "backbone_id": "b0"}],
                     backbone_ids=["b0"], backbone_of_teacher=[0, 0], biased_backbone=0,
                     view_spec={"random_views": K, "out_size": 8}, store_size=9, teachers_pretrained=False,
                     layers=["layer4"], feature_dims={"layer4": 6}, num_samples=N, tau_cached=4.0)
    y, attr = rng.integers(0, 2, N), rng.integers(0, 2, N)
    samples = {"id": [f"img/{i}.png" for i in range(N)], "y": y, "attr": attr, "group": 2 * y + attr,
               "split": np.arange(N) % 3}

    def views(*lead):
        return {"box": rng.random((*lead, 4)), "flip": rng.random(lead) > 0.5, "logits": rng.normal(size=(*lead, T, C)),
                "biased": rng.normal(size=(*lead, C)), "features": {"layer4": rng.normal(size=(*lead, 1, 6))},
                "weights": rng.random((*lead, T))}
    path = tmp_path_factory.mktemp("small") / "cache.h5"
    with CacheWriter.create_or_resume(path, meta, samples) as w:
        for a, b in w.pending_chunks(40):
            nt = int(np.sum(samples["split"][a:b] == 0))
            w.write_rows(a, b, views(b - a), views(K, nt))
        w.finalize()
    return path


# ---------------------------------------------------------------- bit flips, index damage, header edits
def test_random_bit_flips_are_never_silent(small_cache, tmp_path):
    counts = campaign(small_cache, 60, seed=1, work=tmp_path)
    assert counts["silent"] == 0, counts
    assert counts["caught"] >= 5 and counts["caught"] + counts["harmless"] == 60


def test_damaged_chunk_index_is_caught(small_cache, tmp_path):
    """One byte changed inside HDF5's chunk-index nodes: no HDF5 error, rows read back wrong
    (zeros or another chunk), unless the digests catch it."""
    offsets = index_node_offsets(small_cache, per_node=3)
    assert offsets, "no chunk index found"
    counts = campaign(small_cache, 0, seed=2, offsets=offsets, work=tmp_path)
    assert counts["silent"] == 0 and counts["caught"] > 0, counts


def test_edited_header_is_caught(small_cache, tmp_path):
    path = tmp_path / "edited.h5"
    shutil.copy(small_cache, path)
    with h5py.File(path, "r+") as f:
        spec = json.loads(f.attrs["view_spec"])
        f.attrs["view_spec"] = json.dumps({**spec, "out_size": 16})
    with pytest.raises(CacheError, match="header .* does not match its digest"):
        open_cache(path)
    assert any("does not match its digest" in p for p in verify(path))


def test_unfinished_file_is_refused_and_named(small_cache, tmp_path):
    path = tmp_path / "unfinished.h5"
    shutil.copy(small_cache, path)
    with h5py.File(path, "r+") as f:
        del f.attrs["header_sha256"]  # as if killed while writing the digests
    with pytest.raises(CacheError, match="digests not written yet; rerun precompute"):
        open_cache(path)
    assert open_cache(path, require_complete=False).finished is False


# ---------------------------------------------------------------- one writer per output
def _hold_lock(path: Path) -> subprocess.Popen:
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from core.files import OutputLock\n"
            f"with OutputLock({str(path)!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_and_a_killed_holder_frees_the_lock(tmp_path):
    target = tmp_path / "cache.h5"
    proc = _hold_lock(target)
    try:
        with pytest.raises(LockedError, match=rf"cache.h5 is being written by another run \(pid {proc.pid}"):
            with OutputLock(target, "the cache"):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no cleanup runs
        proc.wait()
    with OutputLock(target, "the cache"):  # the dead holder's lock is gone with it
        pass


def test_two_distill_runs_into_one_folder(tiny_cache, tmp_path):
    from distill.config import DistillConfig
    from distill.train import fit

    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_lock(run)
    try:
        with pytest.raises(LockedError, match="the run folder .* is being written by another run"):
            fit(DistillConfig(cache=str(tiny_cache), out=str(run), epochs=1, device="cpu", pretrained=False),
                progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------- reuse only on an exact match
def test_teachers_rerun_with_other_settings_is_refused_then_rebuilt(tiny_data, tiny_teachers, tmp_path):
    from precompute.teachers import TeacherConfig, build_teachers

    folder = tmp_path / "teachers"
    shutil.copytree(tiny_teachers.parent, folder)
    recorded = json.loads((folder / "teachers_config.json").read_text())["config"]
    cfg = dict(recorded, data_root=str(tiny_data), out=str(folder), device="cpu", progress=False)
    before = (folder / "erm_seed0.pt").read_bytes()
    with pytest.raises(ToolError, match=r"built with other settings or data \(epochs: was 1, now 2\).*--overwrite"):
        build_teachers(TeacherConfig(**{**cfg, "epochs": 2}))
    assert (folder / "erm_seed0.pt").read_bytes() == before  # untouched
    same = build_teachers(TeacherConfig(**cfg))  # the same settings: reused, not retrained
    assert (folder / "erm_seed0.pt").read_bytes() == before and len(same.teachers) == 3
    rebuilt = build_teachers(TeacherConfig(**{**cfg, "epochs": 2, "overwrite": True}))
    assert (folder / "erm_seed0.pt").read_bytes() != before
    assert json.loads((folder / "teachers_config.json").read_text())["config"]["epochs"] == 2
    assert rebuilt.teachers[0].sha256 != same.teachers[0].sha256


def test_finished_cache_is_not_recomputed(tiny_data, tiny_teachers, tiny_cache, capsys):
    from precompute.run import PrecomputeConfig, run_precompute

    stamp = tiny_cache.stat().st_mtime_ns
    run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(tiny_cache), random_views=2,
                                    batch_size=64, device="cpu", progress=True))
    assert "already complete (590 rows); nothing to do" in capsys.readouterr().out
    assert tiny_cache.stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- arguments first, then work
def invoke(*args):
    from cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize("extra, message", [
    (["--layers", "layer5"], "--layers takes distinct names from layer2, layer3, layer4"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--shard", "3/3"], "--shard must look like 'i/n'"),
    (["--views", "-1"], "--views must be >= 0"),
])
def test_precompute_arguments_checked_before_any_work(tiny_data, tiny_teachers, tmp_path, monkeypatch, extra, message):
    import precompute.run as run_mod

    monkeypatch.setattr(run_mod, "fingerprint", lambda *a, **k: pytest.fail("fingerprinted before checking"))
    r = invoke("precompute", "--data-root", tiny_data, "--teachers", tiny_teachers, "--out", tmp_path / "c.h5", *extra)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "c.images.h5").exists()


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0", "--no-pretrained"], "untrained, random backbone"),
    (["--num-teachers", "0"], "--num-teachers, DFR retrains and the batch size must be >= 1"),
    (["--device", "foo"], "is not a device"),
])
def test_teachers_arguments_checked(tiny_data, tmp_path, extra, message):
    r = invoke("teachers", "--data-root", tiny_data, "--out", tmp_path / "t", *extra)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output


def test_teachers_out_naming_a_file(tiny_data, tmp_path):
    (tmp_path / "file").write_text("x")
    r = invoke("teachers", "--data-root", tiny_data, "--out", tmp_path / "file")
    assert r.exit_code != 0 and "is a file; the teachers need a folder" in r.output


def test_distill_rejects_negative_layer_gammas(tiny_cache, tmp_path):
    r = invoke("distill", "--cache", tiny_cache, "--layers", "layer3,layer4", "--layer-gammas", "-1,0.5",
               "--out", tmp_path / "r")
    assert r.exit_code != 0 and "--layer-gammas must be >= 0" in r.output


def test_sweep_set_takes_bare_words_as_strings():
    from cli import setting

    assert setting("agre_params=all") == ("agre_params", "all")
    assert setting("epochs=5") == ("epochs", 5) and setting("sample_views=off") == ("sample_views", False)
    assert setting("layers=[\"layer3\", \"layer4\"]") == ("layers", ["layer3", "layer4"])
    with pytest.raises(ToolError, match="--set takes key=value"):
        setting("oops")


# ---------------------------------------------------------------- broken images name the file
@pytest.fixture()
def broken_data(tiny_data, tmp_path):
    """A copy of the tiny data set with one image missing."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_data, folder)
    victim = sorted((folder / "images").rglob("*.png"))[5]
    victim.unlink()
    return folder, victim


def test_missing_image_is_named_by_every_command(broken_data, tiny_teachers, tiny_cache, tmp_path):
    folder, victim = broken_data
    name = victim.name
    for args in (["teachers", "--data-root", folder, "--out", tmp_path / "t", "--epochs", 1, "--no-pretrained"],
                 ["precompute", "--data-root", folder, "--teachers", tiny_teachers, "--out", tmp_path / "c.h5"],
                 ["distill", "--cache", tiny_cache, "--data-root", folder, "--out", tmp_path / "r"],
                 ["cache", "verify", tiny_cache, "--data-root", folder]):
        r = invoke(*args)
        assert r.exit_code != 0 and name in r.output and "missing image file" in r.output, (args[0], r.output)
        assert "Traceback" not in r.output


def test_truncated_image_is_named(tiny_data, tmp_path):
    from data.folders import DataError, read_image

    image = sorted((Path(tiny_data) / "images").rglob("*.png"))[0]
    cut = tmp_path / "cut.png"
    cut.write_bytes(image.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cut\.png: unreadable image"):
        read_image(cut, 16)
