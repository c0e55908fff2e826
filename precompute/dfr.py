"""Deep Feature Reweighting (DFR): three protocols for re-training a teacher's last layer.

Reference: Kirichenko, Izmailov & Wilson, "Last layer re-training is sufficient for robustness
to spurious correlations", ICLR 2023 (DFR_Val^Tr). :func:`fit_dfr` fits a last layer on the
validation-set penultimate embeddings ``emb [N, D]`` (D = 2048 for ResNet-50) with one of
``DFR_VARIANTS``:

- ``"tool"``: this tool's earlier protocol (``fit_dfr``'s default for back-compatibility; the
  teachers stage defaults to ``"study"``). ``StandardScaler`` fit on all N embeddings; C tuned
  on two random halves (L1 liblinear on one group-balanced subsample of the fit half, worst-group
  accuracy (WGA) on the other half, ties to the smallest C); ``coef_``/``intercept_`` averaged
  over ``num_retrains`` group-balanced subsamples of the whole set.
- ``"reference"``: the DFR reference code's validation variant (``dfr_evaluate_spurious.py``,
  ``dfr_on_validation_tune`` + ``dfr_on_validation_eval`` with their main script's defaults): the
  tuning scaler is fit on the tuning subsample, the final scaler on the TRAINING split's
  embeddings, ties go to the first C of the grid. See :func:`_fit_reference`.
- ``"study"``: the study's ``dfr.py``: one L2 lbfgs logistic regression (C = 1,
  ``class_weight="balanced"``) on one group-balanced subsample, no scaler, no tuning, no averaging.
  Older versions called it ``"report"``; that name is still accepted (:func:`dfr_variant`).

Every variant returns a :class:`DFRHead` with any scaler folded into its weight/bias: the
parameters of the teacher's ``fc = nn.Linear(D, C)``, copied in as they are.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from core.constants import DFR_ALIASES, DFR_VARIANTS
from core.errors import ConfigError, ToolError
from data.metrics import group_metrics

# The DFR reference grid for Waterbirds (inverse L1 strength), largest C first as in the paper.
DFR_CS = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
DEFAULT_NUM_RETRAINS = 20


class DFRError(ToolError, ValueError):
    """Validation data DFR cannot fit a head on (a class or group too small or missing)."""


def dfr_variant(name: str) -> str:
    """The protocol's name as DFR_VARIANTS spells it: ``"report"``, the study's protocol under its
    old name, is ``"study"``. ConfigError for an unknown name."""
    name = DFR_ALIASES.get(name, name)
    if name not in DFR_VARIANTS:
        raise ConfigError(f"unknown DFR variant {name!r}; choose one of {', '.join(DFR_VARIANTS)}")
    return name


@dataclass
class DFRHead:
    """A DFR last layer with the input standardisation (if any) folded in.

    ``logits = emb @ weight.T + bias`` (see :func:`apply_head`), i.e. the parameters of an
    ``nn.Linear(D, num_classes)``.

    Attributes:
        weight: [C, D] float32. Binary problems: rows ``[-w/2, +w/2]`` so that
            ``logit_1 - logit_0`` equals the logistic decision function and the 2-way softmax equals
            the logistic probability. C > 2: one-vs-rest rows for "tool"/"reference" (argmax = OvR
            prediction; the softmax is not sklearn's normalised-sigmoid ``predict_proba``),
            multinomial rows for "study" (softmax = its ``predict_proba``).
        bias: [C] float32, built the same way.
        C: the inverse regularisation strength used (L1 for "tool"/"reference", L2 for "study").
        tune_wga: held-out worst-group accuracy for every candidate C (empty for "study").
    """

    weight: np.ndarray
    bias: np.ndarray
    C: float
    tune_wga: dict[float, float] = field(default_factory=dict)
    converged: bool = True  # False: the solver stopped at its iteration limit (the study's lbfgs does)

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


def balanced_subsample(group, rng: np.random.Generator, num_groups: int | None = None,
                       proportions=None) -> np.ndarray:
    """Indices of a group-balanced subsample (the DFR "balanced" data).

    Every non-empty group contributes ``m`` rows drawn without replacement, where ``m`` is the size
    of the smallest non-empty group; empty groups are skipped (they cannot be balanced in).
    With ``proportions`` ([num_groups], the share of each group; for teachers that keep part of
    the spurious correlation) group g contributes ``floor(M * p_g)`` rows, M the largest size the
    groups allow; uniform proportions give the balanced subsample.

    Args:
        group: [N] ints in ``[0, num_groups)``.
        rng: the generator to draw from (advanced in place, so consecutive calls differ).
        num_groups: number of possible groups (default ``max(group) + 1``).
        proportions: target share of each group (renormalised over the non-empty groups).
    Returns:
        int64 indices into ``group``, sorted ascending.
    """
    group = _as_int_vector(group, "group")
    if group.size == 0:
        raise ValueError("balanced_subsample needs at least one sample, got an empty group array")
    if num_groups is None:
        num_groups = int(group.max()) + 1
    if group.min() < 0 or group.max() >= num_groups:
        raise ValueError(
            f"group values must lie in [0, {num_groups}), got min {group.min()}, max {group.max()}"
        )
    members = [np.flatnonzero(group == g) for g in range(num_groups)]
    if proportions is None:
        m = min(len(idx) for idx in members if len(idx))
        sizes = [m if len(idx) else 0 for idx in members]
    else:
        p = np.asarray(proportions, dtype=np.float64)[:num_groups] * np.array([len(i) > 0 for i in members])
        if len(p) != num_groups or p.min() < 0 or p.sum() <= 0:
            raise ValueError(f"proportions must give {num_groups} non-negative shares, got {proportions}")
        p = p / p.sum()
        total = min(len(idx) / p[g] for g, idx in enumerate(members) if p[g] > 0)
        sizes = [int(np.floor(total * p[g] + 1e-9)) for g in range(num_groups)]
    picks = [rng.choice(idx, size=n, replace=False) for idx, n in zip(members, sizes) if n]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def choose_c(tune_wga: dict[float, float]) -> float:
    """The C with the highest held-out WGA; ties go to the smallest C ("tool"'s rule).

    The reference code's ``np.argmax`` over its grid order (1.0 first) would keep the largest C on a
    tie; with a few dozen minority samples ties are common, and among equally robust heads the
    sparser one is the safer choice, so "tool" breaks ties towards regularisation ("reference"
    keeps the reference's rule, see :func:`_fit_reference`).
    """
    if not tune_wga:
        raise ValueError("choose_c needs at least one (C, WGA) pair")
    best = max(tune_wga.values())
    return float(min(c for c, w in tune_wga.items() if w == best))


def _logreg(penalty: str, C: float, **kwargs) -> LogisticRegression:
    """``LogisticRegression`` with an L1 or L2 penalty, spelled for the installed scikit-learn."""
    # scikit-learn 1.8 deprecated `penalty` in favour of `l1_ratio` (1 = L1, 0 = L2); before 1.8,
    # `l1_ratio` is ignored unless penalty="elasticnet" (silently giving L2), so pick the spelling
    # by version: no deprecation warning on new versions, no silent L2 on old ones.
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(l1_ratio={"l1": 1.0, "l2": 0.0}[penalty], C=C, **kwargs)
    return LogisticRegression(penalty=penalty, C=C, **kwargs)


def _l1_logreg(C: float, random_state: int) -> LogisticRegression:
    return _logreg("l1", C, solver="liblinear", random_state=random_state)


def _require_all_classes(y: np.ndarray, num_classes: int) -> None:
    present = np.unique(y)
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise DFRError(
            f"a group-balanced subsample has no sample of class(es) {missing}; DFR needs every "
            "class in every balanced subsample (does each class have its own groups?)"
        )


def _fit_l1(z: np.ndarray, y: np.ndarray, C: float, num_classes: int, random_state: int):
    """L1 logistic regression on standardised ``z``; returns (coef [K, D], intercept [K]).

    K = 1 for a binary problem (sklearn's single decision function, positive = class 1), else
    K = num_classes one-vs-rest problems. Recent scikit-learn refuses multiclass liblinear, so the
    one-vs-rest loop (what liblinear did internally) is written out here.
    """
    _require_all_classes(y, num_classes)
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


def _fold(coef: np.ndarray, intercept: np.ndarray, scaler: StandardScaler | None):
    """Fold ``z = (x - mean) / scale`` (if a scaler) into the linear map: (weight [C, D], bias [C])."""
    w, b = coef, intercept
    if scaler is not None:
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
        raise DFRError(f"DFR needs at least 2 classes with samples, got class counts {counts.tolist()}")
    if np.any(counts == 0):
        raise DFRError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no samples (class counts "
                       f"{counts.tolist()}); a head cannot be fit for a class it never sees")
    return emb, y, group, int(num_classes), int(group.max()) + 1


def _check_train_emb(train_emb, dim: int) -> np.ndarray:
    if train_emb is None:
        raise DFRError(
            'DFR variant "reference" fits its final StandardScaler on the TRAINING split\'s '
            "embeddings, as the DFR reference code does: pass train_emb=[M, D] (eval-view "
            'embeddings of the training rows), or choose variant "tool" (scaler fit on the '
            'validation embeddings) or "study" (no scaler)'
        )
    train_emb = np.asarray(train_emb, dtype=np.float64)
    if train_emb.ndim != 2 or train_emb.shape[1] != dim or len(train_emb) == 0:
        raise ValueError(f"train_emb must be [M, {dim}] with M >= 1 (like emb), got shape {train_emb.shape}")
    if not np.all(np.isfinite(train_emb)):
        raise DFRError("train_emb contains NaN or inf; check the embedding extraction")
    return train_emb


def _check_halves(group, fit_half, score_half, groups) -> None:
    total = np.bincount(group, minlength=len(groups))
    in_fit = np.bincount(group[fit_half], minlength=len(groups))
    in_score = np.bincount(group[score_half], minlength=len(groups))
    for g in groups:
        if in_fit[g] == 0 or in_score[g] == 0:
            raise DFRError(
                f"group {g} has {total[g]} sample(s); the seeded split into tuning halves leaves "
                f"{in_fit[g]} in the fit half and {in_score[g]} in the score half. DFR tuning "
                "needs each group in both halves: add samples to it or drop the group"
            )


def fit_dfr(emb, y, group, *, variant: str = "tool", train_emb=None, seed: int = 0, Cs=DFR_CS,
            num_retrains: int = DEFAULT_NUM_RETRAINS, num_classes: int | None = None,
            proportions=None) -> DFRHead:
    """Fit a DFR head on (validation-set) embeddings (Kirichenko et al., ICLR 2023).

    Args:
        emb: [N, D] penultimate embeddings (eval view, eval mode).
        y: [N] class labels in ``[0, num_classes)``.
        group: [N] group ids (Waterbirds: ``2 * y + place``).
        variant: one of ``DFR_VARIANTS``; the protocols are in :func:`_fit_tool`,
            :func:`_fit_reference` and :func:`_fit_study`.
        train_emb: [M, D] training-split embeddings; required by "reference" (its final scaler),
            ignored by the others.
        seed: the only source of randomness; equal seeds give identical heads.
        Cs: candidate inverse L1 strengths (default: the DFR Waterbirds grid); not used by "study".
        num_retrains: balanced subsamples whose fits are averaged (DFR: 20); not used by "study".
        num_classes: defaults to ``max(y) + 1``; every class needs samples.
        proportions: group shares of the subsamples instead of balanced ones ("tool" and
            "study"; see :func:`balanced_subsample`), for a teacher that keeps part of the
            spurious correlation.
    Returns:
        DFRHead with any scaler folded into weight [C, D] / bias [C].
    Raises:
        ConfigError: an unknown variant.
        DFRError (a ValueError): data DFR cannot fit (non-finite embeddings, fewer than 2 classes,
            a class with no samples, a group missing from a tuning half), or "reference" without
            train_emb.
        ValueError: mismatched lengths or shapes, bad Cs or num_retrains.
    """
    variant = dfr_variant(variant)
    emb, y, group, num_classes, num_groups = _check_inputs(emb, y, group, num_classes)
    if proportions is not None and variant == "reference":
        raise ConfigError("the reference DFR protocol balances its data itself; skewed group proportions "
                          "work with the 'tool' and 'study' variants")
    if variant == "study":
        return _fit_study(emb, y, group, seed=seed, num_classes=num_classes, num_groups=num_groups,
                           proportions=proportions)
    Cs = tuple(float(c) for c in Cs)
    if not Cs or any(not math.isfinite(c) or c <= 0 for c in Cs):
        raise ValueError(f"Cs must be a non-empty sequence of positive finite numbers, got {Cs}")
    if len(set(Cs)) != len(Cs):
        raise ValueError(f"Cs has duplicates: {Cs}")
    if int(num_retrains) != num_retrains or num_retrains < 1:
        raise ValueError(f"num_retrains must be a positive integer, got {num_retrains}")
    if variant == "reference":
        return _fit_reference(emb, y, group, _check_train_emb(train_emb, emb.shape[1]), seed=seed,
                              Cs=Cs, num_retrains=int(num_retrains), num_classes=num_classes)
    return _fit_tool(emb, y, group, seed=seed, Cs=Cs, num_retrains=int(num_retrains),
                     num_classes=num_classes, num_groups=num_groups, proportions=proportions)


def _fit_tool(emb, y, group, *, seed, Cs, num_retrains, num_classes, num_groups, proportions=None) -> DFRHead:
    """Variant "tool": the protocol in the module docstring.

    Randomness, in this exact order, from ``rng = np.random.default_rng(seed)``:
    ``perm = rng.permutation(N)``; fit half ``perm[:N // 2]``, score half ``perm[N // 2:]``;
    one ``balanced_subsample`` of the fit half (shared by all C, as in the reference); then
    ``num_retrains`` ``balanced_subsample`` calls on the whole set. liblinear gets
    ``random_state=seed`` in every fit.
    """
    rng = np.random.default_rng(seed)
    # Fit once on the whole set (not per half, unlike the reference's tuning step): the same scaler
    # is then the one folded into the final head, and it uses no labels.
    scaler = StandardScaler().fit(emb)
    z = scaler.transform(emb)

    n = len(y)
    perm = rng.permutation(n)
    fit_half, score_half = perm[: n // 2], perm[n // 2:]
    _check_halves(group, fit_half, score_half, np.flatnonzero(np.bincount(group)))

    # One balanced subsample for all C, so the candidates differ only in regularisation.
    tune_idx = fit_half[balanced_subsample(group[fit_half], rng, num_groups, proportions)]
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
    for _ in range(num_retrains):
        idx = balanced_subsample(group, rng, num_groups, proportions)
        coef, intercept = _fit_l1(z[idx], y[idx], best_c, num_classes, seed)
        coefs.append(coef)
        intercepts.append(intercept)
    weight, bias = _fold(np.mean(coefs, axis=0), np.mean(intercepts, axis=0), scaler)
    return DFRHead(weight=weight, bias=bias, C=best_c, tune_wga=tune_wga)


def _reference_balanced(group: np.ndarray, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Reference balanced subset: per group 0..G-1 in turn, shuffle its positions, keep the first
    ``m`` (the smallest group's size); concatenated in group order, not sorted."""
    members = [np.flatnonzero(group == g) for g in range(num_groups)]
    m = min(len(p) for p in members)
    for p in members:
        rng.shuffle(p)
    return np.concatenate([p[:m] for p in members])


def _liblinear_seed(rng: np.random.Generator) -> int:
    # With random_state=None scikit-learn seeds liblinear from the global RandomState, one draw
    # of randint(2**31 - 1) per fit; drawing it from our generator keeps that, reproducibly.
    return int(rng.integers(np.iinfo(np.int32).max))


def _fit_reference(emb, y, group, train_emb, *, seed, Cs, num_retrains, num_classes) -> DFRHead:
    """Variant "reference": ``dfr_on_validation_tune`` then ``dfr_on_validation_eval`` of the DFR
    reference code (``dfr_evaluate_spurious.py``) with its main script's DFR_Val defaults
    (balanced validation data, no training rows added, unit class weights, L1 liblinear).

    Groups are ``0..G-1`` with ``G = max(group) + 1``; each must be present in both tuning halves.

    1. Tuning (one round): shuffle ``idx = arange(N)``; score half ``idx[:N // 2]``, fit half
       ``idx[N // 2:]``. Balanced subset of the fit half: for each group in turn, shuffle its
       positions and keep the first ``m`` (``m`` = its smallest group), rows in group order.
       ``StandardScaler`` fit on that subset, applied to it and to the score half. For each C in
       grid order: fit, WGA on the score half. ``C = Cs[argmax(WGA)]``: ties go to the FIRST C of
       the grid (1.0, the weakest L1, in the default grid).
    2. Final head: ``StandardScaler`` fit on ``train_emb``. ``num_retrains`` times: a fresh
       balanced subset of the whole validation set (same recipe), a shuffle of the training row
       indices (the reference shuffles them even though it adds none of them), an L1 fit with the
       chosen C on the train-scaled subset. ``coef_`` and ``intercept_`` are averaged and the
       train scaler is folded in.

    Same as the reference: every step above, its row order, its class weights (``{0: 1, 1: 1}``
    is no weighting) and its tie rule. Not the same: (a) randomness comes from
    ``np.random.default_rng(seed)`` instead of the unseeded global ``np.random``, in the
    reference's order of draws (``rng.shuffle`` for each ``np.random.shuffle``; one liblinear seed
    ``rng.integers(2**31 - 1)`` per fit, where scikit-learn would draw it from the global
    RandomState), so the same subsets as any given reference run cannot be reproduced;
    (b) embeddings are float64 (the reference passes float32 to the scaler); (c) more than 2
    classes (the reference is binary) use the one-vs-rest loop of :func:`_fit_l1` with one seed;
    (d) data on which the reference would fail or score NaN (a group id in 0..G-1 without rows
    in a half) raise DFRError.
    """
    rng = np.random.default_rng(seed)
    num_groups = int(group.max()) + 1
    n = len(y)
    idx = np.arange(n)
    rng.shuffle(idx)
    score_half, fit_half = idx[: n // 2], idx[n // 2:]
    _check_halves(group, fit_half, score_half, range(num_groups))

    tune = fit_half[_reference_balanced(group[fit_half], num_groups, rng)]
    tune_scaler = StandardScaler().fit(emb[tune])
    z_tune, z_score = tune_scaler.transform(emb[tune]), tune_scaler.transform(emb[score_half])
    tune_wga: dict[float, float] = {}
    for C in Cs:
        coef, intercept = _fit_l1(z_tune, y[tune], C, num_classes, _liblinear_seed(rng))
        pred = _predict(z_score, coef, intercept)
        tune_wga[C] = group_metrics(pred, y[score_half], group[score_half], num_groups=num_groups)["wga"]
    best_c = Cs[int(np.argmax(list(tune_wga.values())))]  # np.argmax: the first maximum

    scaler = StandardScaler().fit(train_emb)
    train_order = np.arange(len(train_emb))
    coefs, intercepts = [], []
    for _ in range(num_retrains):
        rows = _reference_balanced(group, num_groups, rng)
        rng.shuffle(train_order)  # unused, as in the reference: keeps its order of draws
        coef, intercept = _fit_l1(scaler.transform(emb[rows]), y[rows], best_c, num_classes,
                                  _liblinear_seed(rng))
        coefs.append(coef)
        intercepts.append(intercept)
    weight, bias = _fold(np.mean(coefs, axis=0), np.mean(intercepts, axis=0), scaler)
    return DFRHead(weight=weight, bias=bias, C=best_c, tune_wga=tune_wga)


STUDY_C = 1.0  # the study's dfr.py; its other settings are scikit-learn's defaults


def _fit_study(emb, y, group, *, seed, num_classes, num_groups, proportions=None) -> DFRHead:
    """Variant "study": the study's ``dfr.py``.

    ``LogisticRegression(solver="lbfgs", L2, C=1, class_weight="balanced")`` on raw embeddings
    (no scaler) of ONE group-balanced subsample of the validation set:
    ``balanced_subsample(group, np.random.default_rng(seed))``. No C tuning, no averaging; more
    than 2 classes give lbfgs's multinomial model. ``C = 1.0``, ``tune_wga = {}``. scikit-learn's
    ``max_iter=100`` is kept as the study's call had it: on raw 2048-d embeddings lbfgs may stop
    there (the warning is caught and reported as ``DFRHead.converged = False``; the teachers stage
    prints a line), and that early stop is part of its heads.
    """
    rows = balanced_subsample(group, np.random.default_rng(seed), num_groups, proportions)
    _require_all_classes(y[rows], num_classes)
    with warnings.catch_warnings(record=True) as caught:  # the study's heads stop at max_iter too
        warnings.simplefilter("always", ConvergenceWarning)
        model = _logreg("l2", STUDY_C, solver="lbfgs", class_weight="balanced").fit(emb[rows], y[rows])
    weight, bias = _fold(model.coef_, model.intercept_, None)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return DFRHead(weight=weight, bias=bias, C=STUDY_C, tune_wga={}, converged=converged)


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
