"""LEACE erasure of the spurious attribute: the closed form, the probe, and the feature targets in a step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.config import DistillConfig
from data.metrics import probe_accuracy
from distill.erasure import Eraser, fit_leace, one_hot, teacher_eraser

CPU = torch.device("cpu")
EPS = np.finfo(np.float64).eps


def planted(n: int, D: int, strength: float, rng, k: int = 2):
    """Correlated Gaussian features with the attribute z added along one direction per value."""
    z = rng.integers(0, k, n)
    mix = rng.normal(size=(D, D)) / np.sqrt(D) + np.eye(D)
    dirs = rng.normal(size=(k, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return rng.normal(size=(n, D)) @ mix + strength * dirs[z], z


def tolerance(x: np.ndarray) -> float:
    """float64 round-off of the fit, amplified by the conditioning of Cov(X) on its range."""
    L = np.linalg.eigvalsh(np.cov(x.T))
    kept = L[L > L[-1] * x.shape[1] * EPS]
    return float(kept[-1] / kept[0] * max(x.shape) * EPS * np.abs(x).max())


@pytest.mark.parametrize("n, D, k", [(600, 32, 2), (40, 64, 2), (500, 16, 3)])  # full rank, n < D, 3 values
def test_leace_matches_the_concept_erasure_package(n, D, k):
    ce = pytest.importorskip("concept_erasure")
    x, z = planted(n, D, 3.0, np.random.default_rng(n + D + k), k)
    ours = fit_leace(x, z)
    theirs = ce.LeaceFitter.fit(torch.from_numpy(x), one_hot(z), shrinkage=False, constrain_cov_trace=False).eraser
    X = torch.from_numpy(x)
    tol = tolerance(x)
    torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=tol)
    torch.testing.assert_close(torch.eye(D, dtype=torch.float64) - ours.P, theirs.P, rtol=0, atol=tol)
    assert ours.left.shape[1] == k - 1  # the one-hot's k columns span k - 1 directions


def test_erased_features_have_no_covariance_with_the_attribute():
    x, z = planted(800, 24, 4.0, np.random.default_rng(1))
    erased = fit_leace(x, z)(torch.from_numpy(x)).numpy()
    cross = (erased - erased.mean(0)).T @ (one_hot(z).numpy() - one_hot(z).numpy().mean(0)) / (len(z) - 1)
    assert np.abs(cross).max() < tolerance(x) * 10
    assert np.abs(erased.mean(0) - x.mean(0)).max() < tolerance(x)  # the mean is kept (affine eraser)


def test_probe_is_at_chance_on_erased_features_of_a_planted_attribute():
    """Fit the eraser on one sample, train the probe on a second, score it on a third."""
    D = 8
    rng = np.random.default_rng(0)  # one mixing and one direction for the three samples
    z = [rng.integers(0, 2, n) for n in (20000, 4000, 4000)]
    mix = np.random.default_rng(9).normal(size=(D, D)) / np.sqrt(D) + np.eye(D)
    direction = np.random.default_rng(10).normal(size=D)
    direction /= np.linalg.norm(direction)
    xs = [rng.normal(size=(len(zz), D)) @ mix + 4.0 * np.outer(zz, direction) for zz in z]
    eraser = fit_leace(xs[0], z[0])
    raw = probe_accuracy(xs[1], z[1], xs[2], z[2])
    er = [eraser(torch.from_numpy(x)).numpy() for x in xs[1:]]
    erased = probe_accuracy(er[0], z[1], er[1], z[2])
    chance = max(np.mean(z[2]), 1 - np.mean(z[2]))
    sigma = np.sqrt(0.25 / len(z[2]))  # binomial std of an accuracy at chance
    assert raw > 0.95
    assert abs(erased - chance) < 4 * sigma, (raw, erased, chance)


def test_feature_target_is_validated_and_raw_by_default():
    from core.errors import ConfigError

    assert DistillConfig().feature_target == "raw"
    with pytest.raises(ConfigError, match="--feature-target"):
        DistillConfig(feature_target="scrubbed")
    erased = DistillConfig(feature_target="erased", gamma=0.5)
    assert erased.identity() != DistillConfig(gamma=0.5).identity()
    # without a feature loss the target changes nothing, so it is the same run
    assert DistillConfig(feature_target="erased").identity() == DistillConfig().identity()


def _train_view(cfg):
    from distill.data import Slots, load_split, open_inputs

    cache, store = open_inputs(cfg)
    train = load_split(cache, store, "train", CPU)
    slots = Slots(cache, cfg.needs, CPU, sample_views=cfg.sample_views, epochs=cfg.epochs)
    try:
        return cache, train.seen_through(slots.view(0))
    finally:
        slots.close()


def test_raw_step_is_todays_and_erased_step_uses_the_erased_features(tiny_cache):
    """raw: the batch's features are bit for bit today's (cache features of each teacher's
    backbone) and the step equals a step on them; erased: they are the fitted eraser's output."""
    from distill.data import make_batch
    from distill.student import Student
    from distill.task import DistillTask
    from distill.teachers import teacher_source

    base = dict(cache=str(tiny_cache), gamma=0.5, layers=("layer3", "layer4"), weighting="agre-batch",
                device="cpu", pretrained=False, batch_size=16)
    raw_cfg, er_cfg = DistillConfig(**base), DistillConfig(**base, feature_target="erased")
    cache, data = _train_view(raw_cfg)
    meta, size = cache.meta, cache.meta.out_size
    idx = torch.arange(16)
    raw_src, er_src = teacher_source(meta, raw_cfg, size, CPU), teacher_source(meta, er_cfg, size, CPU)
    assert raw_src.erase is None
    a, b = (make_batch(data, idx, 0, source, size, CPU) for source in (raw_src, er_src))
    backbone = torch.tensor(meta.backbone_of_teacher)
    for layer in ("layer3", "layer4"):
        today = data.view.feats[layer][idx].index_select(1, backbone)
        assert a.teacher_feats[layer].dtype == today.dtype
        torch.testing.assert_close(a.teacher_feats[layer], today, rtol=0, atol=0)
    # the erased target: the eraser of each teacher's backbone and each row's class
    eraser = teacher_eraser(tiny_cache, ("layer4",), meta.backbone_of_teacher, CPU)
    want = eraser("layer4", data.view.feats["layer4"][idx].index_select(1, backbone), data.y[idx])
    torch.testing.assert_close(b.teacher_feats["layer4"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b.teacher_feats["layer4"], a.teacher_feats["layer4"].float(), atol=1e-3)

    from distill.data import Batch
    torch.manual_seed(0)
    model = Student(meta.num_classes, {l: meta.feature_dims[l] for l in raw_cfg.active_layers})
    twin = __import__("copy").deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    today = Batch(a.x, a.y, a.teacher_logits, a.biased_logits,
                  {l: data.view.feats[l][idx].index_select(1, backbone) for l in raw_cfg.active_layers})
    out_raw = DistillTask(raw_cfg, raw_src, CPU).step(model, opts[0], a)
    out_today = DistillTask(raw_cfg, raw_src, CPU).step(twin, opts[1], today)
    for k in ("loss", "kd", "feat"):
        torch.testing.assert_close(out_raw[k], out_today[k], rtol=0, atol=0, msg=k)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_probe_on_the_tiny_cache(tiny_cache, capsys):
    from cache.reader import open_cache
    from distill.erasure import format_probe, probe_attribute

    with open_cache(tiny_cache) as cache:
        result = probe_attribute(cache)
    assert set(result["layers"]) == set(cache.meta.layers)
    for rows in result["layers"].values():
        for r in rows:
            assert 0 <= r["erased"] <= 1 and 0 <= r["raw"] <= 1 and r["n_test"] > 0
    with capsys.disabled():
        print("\n" + format_probe(result))


def test_eraser_on_device_tensors_keeps_shape_and_needs_no_host_values():
    x, z = planted(300, 16, 3.0, np.random.default_rng(4))
    e = fit_leace(x, z)
    from distill.erasure import TeacherFeatureEraser

    e1 = fit_leace(x[::-1].copy() * 2, z[::-1].copy())  # class 1's eraser: another fit
    identity = Eraser(e.mean * 0, e.left * 0, e.right * 0)
    te = TeacherFeatureEraser({"layer4": [[e, identity], [e1, identity]]}, [0, 1, 0], CPU)
    feats = torch.from_numpy(np.stack([x[:6]] * 3, 1)).half()           # [6, T=3, D]
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    out = te("layer4", feats, y)
    assert out.shape == feats.shape and out.dtype == torch.float32
    # float32 on the device against float64: two D-term dot products, D u |x| = 16 * 6e-8 * O(10) << 1e-4
    for row, c in enumerate(y.tolist()):  # each row: its class's eraser of its teacher's backbone
        want = (e if c == 0 else e1)(feats[row, 0].double()).float()
        torch.testing.assert_close(out[row, 0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[row, 2], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 1], feats[:, 1].float(), rtol=0, atol=0)   # backbone 1: identity eraser
