"""Group metrics: the only place worst-group accuracy is computed.

Groups are ``y * A + attr`` for A values of the spurious attribute (Waterbirds: ``2 * y + place``,
0 landbird/land, 1 landbird/water, 2 waterbird/land, 3 waterbird/water; names in
:class:`data.folders.Metadata`).
"""
from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def group_metrics(pred, y, group, train_group_counts=None, num_groups: int | None = None) -> dict:
    """Per-group accuracy, worst-group accuracy, mean accuracy and average accuracy.

    Args:
        pred, y, group: [N] predicted class, true class, group index.
        train_group_counts: [num_groups] training-set group sizes. "avg_acc" weights the group
            accuracies by these proportions (group DRO / WILDS convention). Without it, the
            groups are weighted by their counts in this split, i.e. avg_acc == mean_acc.
        num_groups: number of groups (default: the length of train_group_counts, else
            ``max(group) + 1``).
    Returns:
        dict with "group_acc" (list, NaN for an empty group), "group_count" (list of int),
        "wga" (min over non-empty groups), "mean_acc" (plain accuracy over all samples) and
        "avg_acc" (None when the training counts give no weight to any group of this split,
        e.g. on a shard holding few training rows). Accuracies are fractions in [0, 1].
    """
    pred, y, group = as_numpy(pred).ravel(), as_numpy(y).ravel(), as_numpy(group).ravel()
    if num_groups is None:
        num_groups = len(train_group_counts) if train_group_counts is not None else int(group.max(initial=0)) + 1
    if not (len(pred) == len(y) == len(group)):
        raise ValueError(f"pred, y and group differ in length: {len(pred)}, {len(y)}, {len(group)}")
    if len(y) == 0:
        raise ValueError("group_metrics needs at least one sample")
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
    }


TRAIN_SPLIT = 0  # split code of the training rows (Waterbirds metadata: 0 train, 1 val, 2 test)


def split_metrics(pred, y, group, split, splits: dict[str, int], num_groups: int) -> dict[str, dict]:
    """``group_metrics`` of each named split present, e.g. ``splits={"val": 1, "test": 2}``.

    All arrays are [N] over the whole data set; "avg_acc" weights group accuracies by the
    training split's group counts when training rows are present.
    """
    pred, y, group, split = (as_numpy(a).ravel() for a in (pred, y, group, split))
    train = split == TRAIN_SPLIT
    train_counts = np.bincount(group[train], minlength=num_groups)[:num_groups] if train.any() else None
    out = {}
    for name, code in splits.items():
        sel = split == code
        if sel.any():
            out[name] = group_metrics(pred[sel], y[sel], group[sel], train_counts, num_groups)
    return out
