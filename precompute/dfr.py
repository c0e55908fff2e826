"""Deep Feature Reweighting (DFR): re-train a teacher's last layer on group-balanced data.

Reference: Kirichenko, Izmailov & Wilson, "Last layer re-training is sufficient for robustness
to spurious correlations", ICLR 2023 (DFR_Val^Tr, as in their ``dfr_evaluate_spurious.py``).

Protocol on the validation-set penultimate embeddings ``emb [N, D]`` (D = 2048 for ResNet-50):

1. ``StandardScaler`` fit on all N embeddings.
2. Tuning: split the N rows into two random halves; for each C in ``DFR_CS`` fit an L1 logistic
   regression (liblinear) on a group-balanced subsample of the first half and score worst-group
   accuracy (WGA) on the second half. Keep the C with the best held-out WGA.
3. Final head: fit with that C on ``num_retrains`` group-balanced subsamples of the WHOLE set and
   average ``coef_`` and ``intercept_``.

The result is a :class:`DFRHead` whose weight/bias already contain the scaler, so it drops into
the teacher's ``fc = nn.Linear(D, C)``::

    fc.weight.data.copy_(torch.from_numpy(head.weight))
    fc.bias.data.copy_(torch.from_numpy(head.bias))
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from core.errors import ToolError
from data.metrics import NUM_GROUPS, group_metrics

# The DFR reference grid for Waterbirds (inverse L1 strength), largest C first as in the paper.
DFR_CS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
DEFAULT_NUM_RETRAINS = 20


class DFRError(ToolError, ValueError):
    """Validation data DFR cannot fit a head on (a class or group too small or missing)."""


@dataclass
class DFRHead:
    """A DFR last layer with the input standardisation folded in.

    ``logits = emb @ weight.T + bias`` (see :func:`apply_head`), i.e. the parameters of an
    ``nn.Linear(D, num_classes)``.

    Attributes:
        weight: [C, D] float32. Binary problems: rows ``[-w/2, +w/2]`` so that
            ``logit_1 - logit_0`` equals the logistic decision function and the 2-way softmax equals
            the logistic probability. C > 2: one-vs-rest rows (argmax = OvR prediction; the softmax
            is not sklearn's normalised-sigmoid ``predict_proba``).
        bias: [C] float32, built the same way.
        C: the chosen inverse L1 regularisation strength.
        tune_wga: held-out worst-group accuracy for every candidate C (tuning step).
    """

    weight: np.ndarray
    bias: np.ndarray
    C: float
    tune_wga: dict[float, float] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


def _as_int_vector(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        if not (np.issubdtype(arr.dtype, np.number) and np.all(np.isfinite(arr))
                and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def balanced_subsample(group, rng: np.random.Generator, num_groups: int = NUM_GROUPS) -> np.ndarray:
    """Indices of a group-balanced subsample (the DFR "balanced" data).

    Every non-empty group contributes ``m`` rows drawn without replacement, where ``m`` is the size
    of the smallest non-empty group; empty groups are skipped (they cannot be balanced in).

    Args:
        group: [N] ints in ``[0, num_groups)``.
        rng: the generator to draw from (advanced in place, so consecutive calls differ).
        num_groups: number of possible groups.
    Returns:
        [m * (number of non-empty groups)] int64 indices into ``group``, sorted ascending.
    """
    group = _as_int_vector(group, "group")
    if group.size == 0:
        raise ValueError("balanced_subsample needs at least one sample, got an empty group array")
    if group.min() < 0 or group.max() >= num_groups:
        raise ValueError(
            f"group values must lie in [0, {num_groups}), got min {group.min()}, max {group.max()}"
        )
    members = [np.flatnonzero(group == g) for g in range(num_groups)]
    m = min(len(idx) for idx in members if len(idx))
    picks = [rng.choice(idx, size=m, replace=False) for idx in members if len(idx)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def choose_c(tune_wga: dict[float, float]) -> float:
    """The C with the highest held-out WGA; ties go to the smallest C (strongest L1).

    The reference code's ``np.argmax`` over its grid order (1.0 first) would keep the largest C on a
    tie; with a few dozen minority samples ties are common, and among equally robust heads the
    sparser one is the safer choice, so we break ties towards regularisation.
    """
    if not tune_wga:
        raise ValueError("choose_c needs at least one (C, WGA) pair")
    best = max(tune_wga.values())
    return float(min(c for c, w in tune_wga.items() if w == best))


def _l1_logreg(C: float, random_state: int) -> LogisticRegression:
    # scikit-learn 1.8 deprecated `penalty` in favour of `l1_ratio`; before 1.8, `l1_ratio` is
    # ignored unless penalty="elasticnet" (silently giving L2), so pick the spelling by version.
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=random_state)
    return LogisticRegression(penalty="l1", C=C, solver="liblinear", random_state=random_state)


def _fit_l1(z: np.ndarray, y: np.ndarray, C: float, num_classes: int, random_state: int):
    """L1 logistic regression on standardised ``z``; returns (coef [K, D], intercept [K]).

    K = 1 for a binary problem (sklearn's single decision function, positive = class 1), else
    K = num_classes one-vs-rest problems. Recent scikit-learn refuses multiclass liblinear, so the
    one-vs-rest loop (what liblinear did internally) is written out here.
    """
    present = np.unique(y)
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise DFRError(
            f"a group-balanced subsample has no sample of class(es) {missing}; DFR needs every "
            "class in every balanced subsample (does each class have its own groups?)"
        )
    if num_classes == 2:
        model = _l1_logreg(C, random_state).fit(z, y)
        return model.coef_.copy(), model.intercept_.copy()
    coefs, intercepts = [], []
    for k in range(num_classes):
        model = _l1_logreg(C, random_state).fit(z, (y == k).astype(np.int64))
        coefs.append(model.coef_[0])
        intercepts.append(model.intercept_[0])
    return np.stack(coefs), np.asarray(intercepts)


def _predict(z: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    scores = z @ coef.T + intercept
    if coef.shape[0] == 1:
        return (scores[:, 0] > 0).astype(np.int64)  # sklearn: class 1 iff decision > 0
    return scores.argmax(axis=1)


def _fold(coef: np.ndarray, intercept: np.ndarray, scaler: StandardScaler):
    """Fold ``z = (x - mean) / scale`` into the linear map: (weight [C, D], bias [C]) float32."""
    w = coef / scaler.scale_  # [K, D]
    b = intercept - w @ scaler.mean_  # [K]
    if coef.shape[0] == 1:
        # Two logits whose difference is the decision function: softmax == sigmoid(decision).
        w = np.concatenate([-w / 2, w / 2])
        b = np.concatenate([-b / 2, b / 2])
    return w.astype(np.float32), b.astype(np.float32)


def _check_inputs(emb, y, group, num_classes):
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"emb must be [N, D], got shape {emb.shape}")
    y = _as_int_vector(y, "y")
    group = _as_int_vector(group, "group")
    if not (len(emb) == len(y) == len(group)):
        raise ValueError(f"emb, y and group differ in length: {len(emb)}, {len(y)}, {len(group)}")
    if len(y) == 0:
        raise ValueError("fit_dfr needs at least one sample")
    if not np.all(np.isfinite(emb)):
        raise DFRError("emb contains NaN or inf; check the embedding extraction")
    if y.min() < 0 or group.min() < 0:
        raise ValueError("y and group must be non-negative")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if y.max() >= num_classes:
        raise ValueError(f"y has label {y.max()} but num_classes is {num_classes}")
    counts = np.bincount(y, minlength=num_classes)
    if num_classes < 2 or np.count_nonzero(counts) < 2:
        raise DFRError(
            f"DFR needs at least 2 classes with samples, got class counts {counts.tolist()}"
        )
    if np.any(counts == 0):
        raise DFRError(
            f"class(es) {np.flatnonzero(counts == 0).tolist()} have no samples (class counts "
            f"{counts.tolist()}); a head cannot be fit for a class it never sees"
        )
    # Waterbirds has 4 groups; wider group ids (more classes) widen the count, never truncate it.
    num_groups = max(NUM_GROUPS, int(group.max()) + 1)
    return emb, y, group, int(num_classes), num_groups


def fit_dfr(
    emb,
    y,
    group,
    *,
    seed: int = 0,
    Cs=DFR_CS,
    num_retrains: int = DEFAULT_NUM_RETRAINS,
    num_classes: int | None = None,
) -> DFRHead:
    """Fit a DFR head on (validation-set) embeddings (Kirichenko et al., ICLR 2023).

    Args:
        emb: [N, D] penultimate embeddings (eval view, eval mode).
        y: [N] class labels in ``[0, num_classes)``.
        group: [N] group ids (Waterbirds: ``2 * y + place``).
        seed: the only source of randomness; equal seeds give identical heads.
        Cs: candidate inverse L1 strengths (default: the DFR Waterbirds grid).
        num_retrains: number of balanced subsamples whose fits are averaged (DFR: 20).
        num_classes: defaults to ``max(y) + 1``; every class needs samples.
    Returns:
        DFRHead with the scaler folded into weight [C, D] / bias [C].

    Randomness, in this exact order, from ``rng = np.random.default_rng(seed)``:
    ``perm = rng.permutation(N)``; fit half ``perm[:N // 2]``, score half ``perm[N // 2:]``;
    one ``balanced_subsample`` of the fit half (shared by all C, as in the reference); then
    ``num_retrains`` ``balanced_subsample`` calls on the whole set. liblinear gets
    ``random_state=seed`` in every fit.

    Raises:
        ValueError: mismatched lengths, non-finite embeddings, fewer than 2 classes, a class with no
            samples, a group present in the data but absent from one tuning half, bad Cs or
            num_retrains.
    """
    emb, y, group, num_classes, num_groups = _check_inputs(emb, y, group, num_classes)
    Cs = tuple(float(c) for c in Cs)
    if not Cs or any(not math.isfinite(c) or c <= 0 for c in Cs):
        raise ValueError(f"Cs must be a non-empty sequence of positive finite numbers, got {Cs}")
    if len(set(Cs)) != len(Cs):
        raise ValueError(f"Cs has duplicates: {Cs}")
    if int(num_retrains) != num_retrains or num_retrains < 1:
        raise ValueError(f"num_retrains must be a positive integer, got {num_retrains}")

    rng = np.random.default_rng(seed)
    # Fit once on the whole set (not per half, unlike the reference's tuning step): the same scaler
    # is then the one folded into the final head, and it uses no labels.
    scaler = StandardScaler().fit(emb)
    z = scaler.transform(emb)

    n = len(y)
    perm = rng.permutation(n)
    fit_half, score_half = perm[: n // 2], perm[n // 2:]
    total = np.bincount(group, minlength=num_groups)
    in_fit = np.bincount(group[fit_half], minlength=num_groups)
    in_score = np.bincount(group[score_half], minlength=num_groups)
    for g in np.flatnonzero(total):
        if in_fit[g] == 0 or in_score[g] == 0:
            raise DFRError(
                f"group {g} has {total[g]} sample(s); the seeded split into tuning halves leaves "
                f"{in_fit[g]} in the fit half and {in_score[g]} in the score half. DFR tuning "
                "needs every present group in both halves: add samples to it or drop the group"
            )

    # One balanced subsample for all C, so the candidates differ only in regularisation.
    tune_idx = fit_half[balanced_subsample(group[fit_half], rng, num_groups)]
    tune_wga: dict[float, float] = {}
    for C in Cs:
        coef, intercept = _fit_l1(z[tune_idx], y[tune_idx], C, num_classes, seed)
        pred = _predict(z[score_half], coef, intercept)
        scores = group_metrics(pred, y[score_half], group[score_half], num_groups=num_groups)
        tune_wga[C] = scores["wga"]
    best_c = choose_c(tune_wga)

    # Averaging over balanced subsamples uses every majority sample at least sometimes, and
    # averaging logistic weights is what the reference does (not an ensemble of predictions).
    coefs, intercepts = [], []
    for _ in range(int(num_retrains)):
        idx = balanced_subsample(group, rng, num_groups)
        coef, intercept = _fit_l1(z[idx], y[idx], best_c, num_classes, seed)
        coefs.append(coef)
        intercepts.append(intercept)
    weight, bias = _fold(np.mean(coefs, axis=0), np.mean(intercepts, axis=0), scaler)
    return DFRHead(weight=weight, bias=bias, C=best_c, tune_wga=tune_wga)


def apply_head(emb, head: DFRHead) -> np.ndarray:
    """Logits of a DFR head on raw (unscaled) embeddings.

    Args:
        emb: [N, D] embeddings, the same kind ``fit_dfr`` saw.
        head: the fitted head.
    Returns:
        [N, C] float32 logits ``emb @ head.weight.T + head.bias`` (what ``nn.Linear`` computes;
        evaluated in float64 before the cast).
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[1] != head.dim:
        raise ValueError(f"emb must be [N, {head.dim}] for this head, got shape {emb.shape}")
    logits = emb @ head.weight.astype(np.float64).T + head.bias.astype(np.float64)
    return logits.astype(np.float32)
