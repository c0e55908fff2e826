"""Shared tiny fixtures: a small synthetic data set, teachers and a cache, built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY_SIZE = 16  # view side used by the tiny pipeline


def assert_same_h5_content(a, b) -> None:
    """Two HDF5 files hold the same datasets with bit-identical contents."""
    import h5py
    import numpy as np

    def datasets(path):
        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
        return out
    da, db = datasets(a), datasets(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert np.array_equal(da[k], db[k]), k


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Synthetic Waterbirds at 5% of the real counts (about 590 images of 24 px)."""
    from data.synth import SynthSpec, generate

    return generate(tmp_path_factory.mktemp("data") / "synth", SynthSpec(scale=0.05, size=24, seed=1))


@pytest.fixture(scope="session")
def tiny_teachers(tiny_data, tmp_path_factory) -> Path:
    """3 DFR teachers on one from-scratch backbone (1 epoch) + the biased model.

    ResNet-18 teachers keep the suite fast on 2 cores; every stage takes the architecture from
    the manifest, so the code path is the ResNet-50 one with other feature dimensions.
    """
    from precompute.teachers import TeacherConfig, build_teachers

    out = tmp_path_factory.mktemp("teachers")
    build_teachers(TeacherConfig(str(tiny_data), str(out), num_teachers=3, epochs=1, image_size=TINY_SIZE, arch="resnet18",
                                 pretrained=False, shared_backbone=True, lr=1e-2, dfr_retrains=2,
                                 device="cpu", progress=False))
    return out / "manifest.json"


@pytest.fixture(scope="session")
def tiny_cache(tiny_data, tiny_teachers, tmp_path_factory) -> Path:
    """Cache with 2 random views besides the eval view, all three layers."""
    from precompute.run import PrecomputeConfig, run_precompute

    out = tmp_path_factory.mktemp("cache") / "cache.h5"
    return run_precompute(PrecomputeConfig(str(tiny_data), str(tiny_teachers), str(out), random_views=2,
                                           batch_size=64, device="cpu", progress=False))
