"""torchrun: precompute and distill in 2 gloo processes equal one process (CPU, real launches)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_same_h5_content

ROOT = Path(__file__).resolve().parents[1]
# One thread per process in the launches and in the single-process references: the thread count
# changes the order of float sums, which would make "equal" mean "close".
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, procs: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd = (launcher if procs > 1 else [sys.executable]) + ["cli.py", *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def assert_same_file_content(a, b):
    """Bit for bit: each process runs exactly the batches of the single run."""
    assert_same_h5_content(a, b)


@pytest.fixture(scope="module")
def single(tiny_data, tiny_teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "cache.h5"
    run("precompute", "--data-root", tiny_data, "--teachers", tiny_teachers, "--out", out, "--views", 1,
        "--layers", "layer4", "--batch-size", 64, "--device", "cpu")
    return out


def test_torchrun_precompute_equals_one_process(tiny_data, tiny_teachers, single, tmp_path):
    out = tmp_path / "cache.h5"
    printed = run("precompute", "--data-root", tiny_data, "--teachers", tiny_teachers, "--out", out, "--views", 1,
                  "--layers", "layer4", "--batch-size", 64, "--device", "cpu", procs=2)
    assert printed.count("accuracy on view 0") == 1  # rank 0 alone reports
    assert_same_file_content(single, out)
    assert_same_file_content(single.with_name("cache.images.h5"), tmp_path / "cache.images.h5")
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["cache.h5", "cache.images.h5"]  # parts merged away


def test_torchrun_precompute_resumes_a_killed_process(tiny_data, tiny_teachers, single, tmp_path, monkeypatch):
    """Rank 1 died mid-way in an earlier launch: its part is resumed, the others reused."""
    from cache import writer as writer_mod
    from precompute.run import PrecomputeConfig, run_precompute

    written = []
    real = writer_mod.CacheWriter.write_rows

    def dying(self, *a, **kw):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(a)
        return real(self, *a, **kw)

    monkeypatch.setattr(writer_mod.CacheWriter, "write_rows", dying)
    part = tmp_path / "cache.rank1of2.h5"
    with pytest.raises(KeyboardInterrupt):
        run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(part), random_views=1,
                                        layers=("layer4",), batch_size=64, shard="1/2", device="cpu",
                                        progress=False))
    monkeypatch.undo()
    printed = run("precompute", "--data-root", tiny_data, "--teachers", tiny_teachers, "--out", tmp_path / "cache.h5",
                  "--views", 1, "--layers", "layer4", "--batch-size", 64, "--device", "cpu", procs=2)
    assert "resuming" in printed or len(written) == 1
    assert_same_file_content(single, tmp_path / "cache.h5")


def test_torchrun_distill_equals_one_process_with_the_global_batch(single, tmp_path):
    """Every gradient (the T + 1 of the batch weights too) and BatchNorm's statistics are those of
    the global batch; a small lr keeps the two runs' float differences (summation order) small.
    Tolerances, measured on a 2-core CPU: train losses differ by up to 9e-5 relative, batch weights
    by 2e-4 (1 - cos of float32 gradients), BatchNorm running variances by 1e-4 relative (the
    global variance from sums of squares)."""
    # an odd batch: the two processes hold unequal shares (32 and 31 rows) of every batch
    args = ["distill", "--cache", single, "--epochs", 1, "--batch-size", 63, "--gamma", 0.5, "--lr", 1e-4,
            "--device", "cpu", "--no-pretrained", "--keep-checkpoints", "last"]
    run(*args, "--out", tmp_path / "one")
    printed = run(*args, "--out", tmp_path / "two", procs=2)
    assert printed.count("run folder:") == 1
    one, two = ([json.loads(l) for l in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two"))
    assert len(one) == len(two) == 1  # one writer
    for k in ("loss", "kd", "feat"):
        assert two[0]["train"][k] == pytest.approx(one[0]["train"][k], rel=5e-4), k
    # batch weights are 1 - cos of gradients: their float noise (summation order) is larger
    np.testing.assert_allclose(two[0]["teacher_weights"], one[0]["teacher_weights"], atol=1e-3)
    assert two[0]["val"]["group_acc"] == one[0]["val"]["group_acc"]
    np.testing.assert_allclose(np.load(tmp_path / "two" / "teacher_weights.npy"),
                               np.load(tmp_path / "one" / "teacher_weights.npy"), atol=1e-3)
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-3, atol=1e-4, msg=k)


def test_torchrun_precompute_refuses_a_cache_made_otherwise(tiny_data, tiny_teachers, single):
    """What a launch finds at --out: a cache of other inputs is refused (unless --overwrite)."""
    from core.manifest import read_manifest
    from data.folders import load_metadata
    from precompute.run import PrecomputeConfig, _existing

    man, meta = read_manifest(tiny_teachers), load_metadata(tiny_data)
    same = PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(single), random_views=1, layers=("layer4",),
                            batch_size=64, device="cpu")
    assert _existing(same, man, meta, single) == "finished"
    other = PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(single), random_views=3, layers=("layer4",),
                             batch_size=64, device="cpu")
    assert "made for other inputs" in _existing(other, man, meta, single) and "--overwrite" in _existing(other, man, meta, single)
