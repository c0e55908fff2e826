"""data/metrics.py against independent computations: per group and class by hand, balanced accuracy
by sklearn, ECE by an explicit loop over the 15 bins."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data.metrics import ECE_BINS, class_metrics, expected_calibration_error, group_metrics, split_metrics

# Float64 sums of at most a few thousand terms in [0, 1]: relative error below n * eps ~ 1e-12.
TOL = 1e-12


def _random_case(seed: int, n: int = 2000, classes: int = 3, attrs: int = 2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.2, 4.0, size=(n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, classes, n)
    a = rng.integers(0, attrs, n)
    return probs, probs.argmax(1), y, y * attrs + a


def _ece_by_hand(probs, y, bins=15):
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            total += inside.sum() / len(y) * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_metric_against_an_independent_computation(seed):
    from sklearn.metrics import balanced_accuracy_score

    probs, pred, y, group = _random_case(seed)
    train_counts = np.array([50, 5, 40, 8, 30, 2])
    m = group_metrics(pred, y, group, train_counts, probs=probs)
    accs = [float(np.mean(pred[group == g] == y[group == g])) for g in range(6)]
    recalls = [float(np.mean(pred[y == c] == c)) for c in range(3)]
    assert m["group_acc"] == pytest.approx(accs, rel=TOL)
    assert m["group_count"] == [int((group == g).sum()) for g in range(6)]
    assert m["wga"] == pytest.approx(min(accs), rel=TOL)
    assert m["mean_acc"] == pytest.approx(float(np.mean(pred == y)), rel=TOL)
    weighted = sum(w * a for w, a in zip(train_counts, accs)) / train_counts.sum()
    assert m["avg_acc"] == pytest.approx(weighted, rel=TOL)
    assert m["mean_group_acc"] == pytest.approx(sum(accs) / 6, rel=TOL)
    assert m["class_acc"] == pytest.approx(recalls, rel=TOL)
    assert m["worst_class_acc"] == pytest.approx(min(recalls), rel=TOL)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), rel=TOL)
    assert m["ece"] == pytest.approx(_ece_by_hand(probs, y), rel=TOL, abs=TOL)
    assert ECE_BINS == 15


def test_ece_known_values_and_bin_edges():
    # all predictions right at confidence 1: perfectly calibrated
    assert expected_calibration_error(np.eye(3)[[0, 1, 2]], [0, 1, 2]) == 0.0
    # 4 rows at confidence 0.8 (bin 12 = (12/15, 13/15]), 3 right: |0.75 - 0.8| = 0.05
    p = np.array([[0.8, 0.2]] * 4)
    assert expected_calibration_error(p, [0, 0, 0, 1]) == pytest.approx(0.05, abs=TOL)
    # a confidence exactly on an edge (2/3 = 10/15) belongs to the bin below: bins (9/15, 10/15] and
    # (10/15, 11/15] are scored apart, each |acc - conf| weighted by its half of the rows
    p = np.array([[2 / 3, 1 / 3], [0.7, 0.3]])
    expected = 0.5 * abs(1 - 2 / 3) + 0.5 * abs(0 - 0.7)
    assert expected_calibration_error(p, [0, 1]) == pytest.approx(expected, abs=TOL)
    assert _ece_by_hand(p, np.array([0, 1])) == pytest.approx(expected, abs=TOL)
    with pytest.raises(ValueError):
        expected_calibration_error(np.ones((2, 2)) / 2, [0])


def test_class_metrics_read_no_groups_and_skip_absent_classes():
    # class 0: 2/3 right, class 1: absent, class 2: 1/2 right
    m = class_metrics([0, 0, 2, 2, 0], [0, 0, 0, 2, 2], num_classes=3)
    assert m["class_count"] == [3, 0, 2] and math.isnan(m["class_acc"][1])
    assert m["worst_class_acc"] == pytest.approx(0.5)
    assert m["balanced_acc"] == pytest.approx((2 / 3 + 0.5) / 2)
    with pytest.raises(ValueError, match="length"):
        class_metrics([0], [0, 1])


def test_without_probabilities_ece_is_none_and_split_metrics_passes_them():
    probs, pred, y, group = _random_case(5, n=300, classes=2)
    assert group_metrics(pred, y, group)["ece"] is None
    split = np.repeat([0, 1, 2], 100)
    out = split_metrics(pred, y, group, split, {"val": 1, "test": 2}, num_groups=4, probs=probs)
    assert out["test"]["ece"] == pytest.approx(_ece_by_hand(probs[200:], y[200:]), abs=TOL)
    p, t, g = pred[100:200], y[100:200], group[100:200]
    by_hand = np.mean([np.mean(p[g == k] == t[g == k]) for k in range(4)])
    assert out["val"]["mean_group_acc"] == pytest.approx(by_hand, rel=TOL)
