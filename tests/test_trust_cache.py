"""A received cache is checked whole: its image store is bound to its header, a published root digest is enforced; merges and reports are locked and atomic."""
from __future__ import annotations

import hashlib
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache.reader import open_cache
from cache.schema import store_path_for
from cache.verify import verify
from core.errors import LockedError
from core.files import OutputLock, atomic_save_npy
from data.store import ImageStore, merge_stores

DISTILL = ("distill", "--epochs", 1, "--no-pretrained", "--device", "cpu")


def invoke(*args):
    from cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output, r.output
    return r


def copy_cache(src, folder, with_store=True):
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copy(src, dst)
    if with_store:
        shutil.copy(store_path_for(src), store_path_for(dst))
    return dst


def _change_image(store_path, row=3, redigest=True):
    """Invert one image's pixels; ``redigest``: and write its new digest (the store then passes
    its own check: only the cache's header tells it is not the store the outputs came from)."""
    with h5py.File(store_path, "r+") as f:
        h, w = (int(v) for v in f["hw"][row])
        a = int(f["offset"][row]) - int(f.attrs["pixel_start"])
        px = 255 - f["pixels"][a:a + 3 * h * w]
        f["pixels"][a:a + 3 * h * w] = px
        if redigest:
            f["digest"][row] = np.frombuffer(hashlib.sha256(px.tobytes()).digest(), np.uint8)


def test_precompute_binds_the_image_store_into_the_header(tiny_cache):
    with open_cache(tiny_cache) as r:
        bound = r.meta.store_digest
    store = ImageStore(store_path_for(tiny_cache))
    assert len(bound) == 64 and store.store_digest() == bound
    store.close()
    assert verify(tiny_cache) == []


def test_cache_copied_without_its_store_is_refused(tiny_cache, tmp_path):
    path = copy_cache(tiny_cache, tmp_path, with_store=False)
    problems = verify(path)
    assert any("copied without its image store: send cache.images.h5 with it" in p for p in problems), problems
    r = invoke("cache", "verify", path)
    assert r.exit_code == 1 and "send cache.images.h5 with it" in r.output


def test_another_or_damaged_store_is_refused(tiny_cache, tmp_path):
    swapped = copy_cache(tiny_cache, tmp_path / "swapped")
    _change_image(store_path_for(swapped))
    store = ImageStore(store_path_for(swapped))
    assert store.verify() == []  # consistent in itself
    store.close()
    problems = verify(swapped)
    assert any("is not the image store this cache was computed from" in p for p in problems), problems
    r = invoke(*DISTILL, "--cache", swapped, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "is not the image store" in r.output and "was computed from" in r.output

    damaged = copy_cache(tiny_cache, tmp_path / "damaged")
    _change_image(store_path_for(damaged), redigest=False)
    problems = verify(damaged)
    assert any("1 image(s) do not match their sha256 digest (rows 3)" in p for p in problems), problems


def test_published_root_digest_is_enforced(tiny_cache, tmp_path):
    from distill.config import DistillConfig
    from distill.data import open_inputs

    with open_cache(tiny_cache) as r:
        root = r.root_digest
    r = invoke("cache", "info", tiny_cache)
    assert r.exit_code == 0 and f"root digest  {root}" in r.output
    r = invoke("cache", "verify", tiny_cache, "--expect", root)
    assert r.exit_code == 0 and "OK (root digest as published)" in r.output, r.output
    r = invoke("cache", "verify", tiny_cache, "--expect", "0" * 64)
    assert r.exit_code == 1 and f"root digest {root} is not the expected {'0' * 64}" in r.output, r.output
    r = invoke(*DISTILL, "--cache", tiny_cache, "--expect-cache", "0" * 64, "--out", tmp_path / "run")
    assert r.exit_code == 1 and "(--expect-cache): this is not the cache that was published" in r.output, r.output
    cache, store = open_inputs(DistillConfig(cache=str(tiny_cache), expect_cache=root.upper()))
    cache.close()
    assert DistillConfig(expect_cache=root).identity() == DistillConfig().identity()  # placement only


def test_distill_out_under_a_file_is_a_message(tiny_cache, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    r = invoke(*DISTILL, "--cache", tiny_cache, "--out", afile / "run")
    assert r.exit_code == 1 and "Error: cannot" in r.output and str(afile) in r.output, r.output


def test_merges_are_locked(tmp_path):
    out = tmp_path / "merged.h5"
    with OutputLock(out, "the cache"):
        r = invoke("cache", "merge", out, tmp_path / "s0.h5", tmp_path / "s1.h5")
    assert r.exit_code == 1 and "is being written by another run (pid" in r.output, r.output
    store = store_path_for(out)
    with OutputLock(store, "the image store"):
        with pytest.raises(LockedError, match="being written by another run"):
            merge_stores(store, [tmp_path / "part0.images.h5"])


def test_sweep_plan_is_locked_and_atomic(tmp_path):
    from experiments.sweep import SWEEP_FILE, _write_plan

    with OutputLock(tmp_path / SWEEP_FILE, "the sweep plan"):
        with pytest.raises(LockedError):
            _write_plan(tmp_path, "c.h5", {}, [])
    _write_plan(tmp_path, "c.h5", {}, [])
    assert (tmp_path / SWEEP_FILE).is_file() and not list(tmp_path.glob(f".{SWEEP_FILE}.*"))


def test_teacher_weights_and_report_csv_replace_a_planted_link(tmp_path):
    from experiments.report import write_csv

    victim = tmp_path / "victim"
    victim.write_text("keep")
    for name in ("teacher_weights.npy", "report.csv"):
        (tmp_path / name).symlink_to(victim)
    atomic_save_npy(tmp_path / "teacher_weights.npy", np.arange(3.0))
    write_csv([], tmp_path / "report.csv", ["g0"])
    assert victim.read_text() == "keep"
    assert not (tmp_path / "teacher_weights.npy").is_symlink() and not (tmp_path / "report.csv").is_symlink()
    assert np.load(tmp_path / "teacher_weights.npy").tolist() == [0.0, 1.0, 2.0]
    assert (tmp_path / "report.csv").read_text().startswith("table,row,weighting")
