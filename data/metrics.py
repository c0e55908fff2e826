"""Group metrics: the only place worst-group accuracy (and every other reported metric) is computed.

Groups are ``y * A + attr`` for A values of the spurious attribute (Waterbirds: ``2 * y + place``,
0 landbird/land, 1 landbird/water, 2 waterbird/land, 3 waterbird/water; names in
:class:`data.folders.Metadata`). Definitions and the convention each follows: docs/method.md,
section Metrics.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017)


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def class_metrics(pred, y, num_classes: int | None = None) -> dict:
    """Per-class recall, worst-class and balanced accuracy, from predictions and classes only.

    Reads no group or attribute label: model selection by worst-class accuracy uses this alone.

    Returns:
        dict with "class_acc" (list: recall of each class, NaN for a class without rows),
        "class_count" (list of int), "worst_class_acc" (min recall over the classes with rows) and
        "balanced_acc" (mean recall over the classes with rows: sklearn's balanced_accuracy_score).
    """
    pred, y = as_numpy(pred).ravel(), as_numpy(y).ravel()
    if len(pred) != len(y):
        raise ValueError(f"pred and y differ in length: {len(pred)}, {len(y)}")
    if len(y) == 0:
        raise ValueError("class_metrics needs at least one sample")
    if num_classes is None:
        num_classes = int(max(y.max(), pred.max())) + 1
    count = np.bincount(y, minlength=num_classes)[:num_classes]
    hits = np.bincount(y, weights=pred == y, minlength=num_classes)[:num_classes]
    present = count > 0
    recall = np.where(present, hits / np.maximum(count, 1), np.nan)
    return {"class_acc": [float(a) for a in recall], "class_count": [int(c) for c in count],
            "worst_class_acc": float(np.min(recall[present])),
            "balanced_acc": float(np.mean(recall[present]))}


def expected_calibration_error(probs, y, bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over ``bins`` equal-width bins of the
    confidence (the largest predicted probability), bin b holding confidences in (b/bins, (b+1)/bins]
    (the first also holds 0). The prediction is the argmax of ``probs`` [N, C]; float64 sums."""
    probs, y = as_numpy(probs).astype(np.float64), as_numpy(y).ravel()
    if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
        raise ValueError(f"probs must be [N, C] with N = len(y) > 0, got {probs.shape} for {len(y)} labels")
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(np.float64)
    which = np.digitize(conf, np.linspace(0.0, 1.0, bins + 1)[1:-1], right=True)
    gap = (np.bincount(which, weights=correct, minlength=bins)
           - np.bincount(which, weights=conf, minlength=bins))
    return float(np.abs(gap).sum() / len(y))  # |B_b| |acc_b - conf_b| = |sum correct - sum conf| per bin


def group_metrics(pred, y, group, train_group_counts=None, num_groups: int | None = None, probs=None,
                  num_classes: int | None = None) -> dict:
    """Per-group accuracy, worst-group accuracy, mean, average, mean-group, worst-class and
    balanced accuracy, and the calibration error when ``probs`` are given.

    Args:
        pred, y, group: [N] predicted class, true class, group index.
        train_group_counts: [num_groups] training-set group sizes. "avg_acc" weights the group
            accuracies by these proportions (group DRO / WILDS convention). Without it, the
            groups are weighted by their counts in this split, i.e. avg_acc == mean_acc.
        num_groups: number of groups (default: the length of train_group_counts, else
            ``max(group) + 1``).
        probs: [N, C] predicted class probabilities (softmax), for "ece"; ``pred`` must be their
            argmax. None: "ece" is None.
        num_classes: number of classes (default: C of ``probs``, else ``max(y, pred) + 1``).
    Returns:
        dict with "group_acc" (list, NaN for an empty group), "group_count" (list of int),
        "wga" (min over non-empty groups), "mean_acc" (plain accuracy over all samples),
        "avg_acc" (None when the training counts give no weight to any group of this split,
        e.g. on a shard holding few training rows), "mean_group_acc" (unweighted mean over the
        non-empty groups), the keys of :func:`class_metrics` and "ece" (15 bins, or None).
        Accuracies are fractions in [0, 1].
    """
    pred, y, group = as_numpy(pred).ravel(), as_numpy(y).ravel(), as_numpy(group).ravel()
    if num_groups is None:
        num_groups = (len(train_group_counts) if train_group_counts is not None
                      else int(group.max(initial=0)) + 1)
    if not (len(pred) == len(y) == len(group)):
        raise ValueError(f"pred, y and group differ in length: {len(pred)}, {len(y)}, {len(group)}")
    if len(y) == 0:
        raise ValueError("group_metrics needs at least one sample")
    if probs is not None and num_classes is None:
        num_classes = as_numpy(probs).shape[-1]
    correct = pred == y
    count = np.bincount(group, minlength=num_groups)[:num_groups]
    hits = np.bincount(group, weights=correct, minlength=num_groups)[:num_groups]
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
    nonempty = count > 0
    weights = count if train_group_counts is None else np.asarray(train_group_counts, dtype=float)
    weights = np.where(nonempty, weights, 0.0)
    avg = float(np.sum(np.nan_to_num(acc) * weights) / weights.sum()) if weights.sum() > 0 else None
    return {
        "group_acc": [float(a) for a in acc],
        "group_count": [int(c) for c in count],
        "wga": float(np.min(acc[nonempty])),
        "mean_acc": float(correct.mean()),
        "avg_acc": avg,
        "mean_group_acc": float(np.mean(acc[nonempty])),
        **class_metrics(pred, y, num_classes),
        "ece": None if probs is None else expected_calibration_error(probs, y),
    }


TRAIN_SPLIT = 0  # split code of the training rows (Waterbirds metadata: 0 train, 1 val, 2 test)


def split_metrics(pred, y, group, split, splits: dict[str, int], num_groups: int,
                  probs=None) -> dict[str, dict]:
    """``group_metrics`` of each named split present, e.g. ``splits={"val": 1, "test": 2}``.

    All arrays are [N] over the whole data set (``probs`` [N, C], optional); "avg_acc" weights
    group accuracies by the training split's group counts when training rows are present.
    """
    pred, y, group, split = (as_numpy(a).ravel() for a in (pred, y, group, split))
    probs = None if probs is None else as_numpy(probs)
    train = split == TRAIN_SPLIT
    train_counts = np.bincount(group[train], minlength=num_groups)[:num_groups] if train.any() else None
    out = {}
    for name, code in splits.items():
        sel = split == code
        if sel.any():
            out[name] = group_metrics(pred[sel], y[sel], group[sel], train_counts, num_groups,
                                      None if probs is None else probs[sel])
    return out


def probe_accuracy(x_train, z_train, x_test, z_test, C: float = 1.0) -> float:
    """Held-out accuracy of a linear probe (logistic regression on standardised features)
    predicting ``z`` from features ``x``: fit on the train rows, scored on the test rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(z_train)) < 2:
        return float(np.mean(z_test == z_train[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    probe.fit(np.asarray(x_train, dtype=np.float64), z_train)
    return float(probe.score(np.asarray(x_test, dtype=np.float64), z_test))
