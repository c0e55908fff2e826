"""Tests for precompute/dfr.py: DFR last-layer retraining (Kirichenko et al., ICLR 2023)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from data.metrics import group_metrics
from precompute import dfr
from core.errors import ConfigError
from precompute.dfr import (DFR_CS, DFR_VARIANTS, DFRError, DFRHead, apply_head, balanced_subsample,
                            choose_c, dfr_variant, fit_dfr)

D = 32
CORE, SPUR = 0, 1


def make_split(counts, rng, dim=D):
    """Waterbirds-like embeddings: dim 0 carries y (noisy), dim 1 carries place (clean).

    counts: samples per group (2 * y + place). Returns float32 emb [N, dim], y [N], group [N].
    """
    group = np.repeat(np.arange(4), counts)
    y, place = group // 2, group % 2
    emb = rng.normal(size=(len(group), dim))
    emb[:, CORE] += 2 * y - 1  # Bayes accuracy from the core alone ~ Phi(1) = 0.84
    emb[:, SPUR] = 1.5 * (2 * place - 1) + 0.3 * rng.normal(size=len(group))
    emb += 0.5  # a non-zero mean, so folding the scaler's mean is exercised
    return emb.astype(np.float32), y, group


NEW_PENALTY_API = inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"


def sk_l1(C, random_state):
    """An L1 liblinear logistic regression, spelled for the installed scikit-learn."""
    if NEW_PENALTY_API:
        return LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=random_state)
    return LogisticRegression(penalty="l1", C=C, solver="liblinear", random_state=random_state)


def sk_study():
    """The study's fit: lbfgs, L2, C = 1, balanced class weights (sklearn's other defaults)."""
    if NEW_PENALTY_API:
        return LogisticRegression(l1_ratio=0.0, C=1.0, solver="lbfgs", class_weight="balanced")
    return LogisticRegression(penalty="l2", C=1.0, solver="lbfgs", class_weight="balanced")


def worst_group_acc(pred, y, group):
    return min((pred[group == g] == y[group == g]).mean() for g in np.unique(group))


class SpyLogReg(LogisticRegression):
    """Records every fit made through precompute.dfr (C, training rows, fitted model)."""

    fits: list = []

    def fit(self, X, y, sample_weight=None):
        super().fit(X, y, sample_weight)
        SpyLogReg.fits.append((self.C, np.array(X), np.array(y), self))
        return self


@pytest.fixture
def spy(monkeypatch):
    SpyLogReg.fits = []
    monkeypatch.setattr(dfr, "LogisticRegression", SpyLogReg)
    return SpyLogReg.fits


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    train = make_split([400, 20, 20, 400], rng)  # 95% of samples have place == y
    val = make_split([120, 80, 80, 120], rng)  # y and place independent
    test = make_split([200, 200, 200, 200], rng)
    return train, val, test


# ---------------------------------------------------------------- the method does its job


def test_dfr_recovers_core_direction(splits):
    train, val, test = splits
    erm = LogisticRegression().fit(train[0], train[1])
    erm_wga = group_metrics(erm.predict(test[0]), test[1], test[2])["wga"]

    head = fit_dfr(*val, seed=0, num_retrains=5)
    dfr_wga = group_metrics(apply_head(test[0], head).argmax(1), test[1], test[2])["wga"]

    assert erm_wga < 0.6, "the planted spurious feature should fool ERM on minority groups"
    assert dfr_wga > 0.75
    assert dfr_wga > erm_wga + 0.25
    w = head.weight[1]
    assert abs(w[CORE]) > 5 * abs(w[SPUR])
    assert w[CORE] > 0  # class 1 has the positive core mean
    assert head.C in DFR_CS and set(head.tune_wga) == set(DFR_CS)


# ---------------------------------------------------------------- exact protocol


def test_fit_dfr_matches_independent_recomputation(splits):
    _, (emb, y, group), _ = splits
    seed, num_retrains = 3, 4
    head = fit_dfr(emb, y, group, seed=seed, num_retrains=num_retrains)

    # The documented protocol, re-implemented with sklearn and numpy only.
    rng = np.random.default_rng(seed)

    def balanced(g_arr):
        members = [np.flatnonzero(g_arr == g) for g in range(4)]
        m = min(len(i) for i in members if len(i))
        picks = [rng.choice(i, size=m, replace=False) for i in members if len(i)]
        return np.sort(np.concatenate(picks))

    z = StandardScaler().fit_transform(emb.astype(np.float64))
    perm = rng.permutation(len(y))
    fit_half, score_half = perm[: len(y) // 2], perm[len(y) // 2:]
    tune = fit_half[balanced(group[fit_half])]
    expected_wga = {}
    for C in DFR_CS:
        model = sk_l1(C, seed).fit(z[tune], y[tune])
        pred = model.predict(z[score_half])
        expected_wga[C] = worst_group_acc(pred, y[score_half], group[score_half])
    assert head.tune_wga == pytest.approx(expected_wga, abs=1e-12)
    best = max(expected_wga.values())
    assert head.C == min(c for c, w in expected_wga.items() if w == best)

    coefs, intercepts = [], []
    for _ in range(num_retrains):
        idx = balanced(group)
        model = sk_l1(head.C, seed).fit(z[idx], y[idx])
        coefs.append(model.coef_[0])
        intercepts.append(model.intercept_[0])
    decision = z @ np.mean(coefs, axis=0) + np.mean(intercepts)
    logits = apply_head(emb, head)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-4, atol=1e-4)


def test_candidates_and_average_observed(splits, spy):
    """Each C is tried once on one shared balanced half-subsample; the retrains are averaged."""
    _, (emb, y, group), _ = splits
    head = fit_dfr(emb, y, group, seed=1, num_retrains=3)

    tune_fits, final_fits = spy[: len(DFR_CS)], spy[len(DFR_CS):]
    assert [f[0] for f in tune_fits] == list(DFR_CS)
    for _, X, _, _ in tune_fits[1:]:
        np.testing.assert_array_equal(X, tune_fits[0][1])
    assert len(tune_fits[0][1]) < len(y) // 2  # a balanced subsample of one half
    assert np.bincount(tune_fits[0][2]).tolist() == [len(tune_fits[0][2]) // 2] * 2

    assert len(final_fits) == 3 and all(f[0] == head.C for f in final_fits)
    z_sub = [f[1] for f in final_fits]
    assert all(len(x) == 4 * 80 for x in z_sub)  # 4 groups x the smallest group (80)
    assert not np.array_equal(z_sub[0], z_sub[1])  # different subsamples
    scaler = StandardScaler().fit(emb.astype(np.float64))
    mean_coef = np.mean([f[3].coef_[0] for f in final_fits], axis=0)
    np.testing.assert_allclose(2 * head.weight[1], mean_coef / scaler.scale_, rtol=1e-5, atol=1e-6)


def test_choose_c_argmax_and_ties():
    assert choose_c({1.0: 0.5, 0.3: 0.8, 0.1: 0.7}) == 0.3
    assert choose_c({1.0: 0.8, 0.3: 0.8, 0.1: 0.7}) == 0.3  # tie -> smaller C
    assert choose_c({0.01: 0.9}) == 0.01
    with pytest.raises(ValueError, match="at least one"):
        choose_c({})


def test_tie_in_tuning_picks_smaller_c(splits, monkeypatch):
    _, val, _ = splits
    monkeypatch.setattr(dfr, "group_metrics", lambda *a, **k: {"wga": 0.5})
    head = fit_dfr(*val, seed=0, num_retrains=1)
    assert head.C == min(DFR_CS)
    assert head.tune_wga == {c: 0.5 for c in DFR_CS}


# ---------------------------------------------------------------- scaler folding


def test_apply_head_folds_scaler_binary(splits, spy):
    _, (emb, y, group), (test_emb, _, _) = splits
    head = fit_dfr(emb, y, group, seed=0, num_retrains=1)
    model = spy[-1][3]  # the only final fit, so the head is exactly this model
    z = StandardScaler().fit(emb.astype(np.float64)).transform(test_emb.astype(np.float64))

    logits = apply_head(test_emb, head)
    assert logits.shape == (len(test_emb), 2) and logits.dtype == np.float32
    np.testing.assert_allclose(
        logits[:, 1] - logits[:, 0], model.decision_function(z), rtol=1e-4, atol=1e-4
    )
    prob = torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy()
    np.testing.assert_allclose(prob, model.predict_proba(z)[:, 1], atol=1e-5)
    np.testing.assert_allclose(logits.sum(1), 0.0, atol=1e-4)  # rows are [-w/2, +w/2]

    fc = torch.nn.Linear(D, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(head.weight))
        fc.bias.copy_(torch.from_numpy(head.bias))
        torch_logits = fc(torch.from_numpy(test_emb)).numpy()
    np.testing.assert_allclose(torch_logits, logits, rtol=1e-4, atol=1e-4)


def test_apply_head_multiclass_one_vs_rest(spy):
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), 100)
    place = np.tile([0, 1], 150)
    emb = rng.normal(size=(300, 20))
    emb[np.arange(300), y] += 2.0  # class k lives on dim k
    head = fit_dfr(emb, y, 2 * y + place, seed=0, Cs=(1.0, 0.1), num_retrains=1)

    assert head.weight.shape == (3, 20) and head.bias.shape == (3,)
    assert head.weight.dtype == np.float32 and head.bias.dtype == np.float32
    per_class = spy[-3:]  # one binary fit per class in the single retrain
    z = StandardScaler().fit_transform(emb)
    expected = np.stack([m.decision_function(z) for *_, m in per_class], axis=1)
    logits = apply_head(emb, head)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == y).mean() > 0.8


def test_apply_head_rejects_wrong_dim():
    head = DFRHead(weight=np.zeros((2, 4), np.float32), bias=np.zeros(2, np.float32), C=1.0)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        apply_head(np.zeros((3, 5)), head)


# ---------------------------------------------------------------- balanced_subsample


def test_balanced_subsample_counts_and_membership():
    group = np.array([0] * 10 + [1] * 3 + [3] * 7)  # group 2 empty
    idx = balanced_subsample(group, np.random.default_rng(0))
    assert np.bincount(group[idx], minlength=4).tolist() == [3, 3, 0, 3]
    assert len(np.unique(idx)) == len(idx)  # without replacement
    assert np.all(np.diff(idx) > 0)


def test_balanced_subsample_determinism():
    group = np.random.default_rng(0).integers(0, 4, size=200)
    a = balanced_subsample(group, np.random.default_rng(7))
    b = balanced_subsample(group, np.random.default_rng(7))
    c = balanced_subsample(group, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "group, match",
    [
        (np.array([], dtype=int), "at least one sample"),
        (np.array([0, 1, 4]), r"\[0, 4\)"),
        (np.array([0, -1]), r"\[0, 4\)"),
        (np.array([[0, 1]]), "1-D"),
        (np.array([0.5, 1.0]), "integers"),
    ],
)
def test_balanced_subsample_errors(group, match):
    with pytest.raises(ValueError, match=match):
        balanced_subsample(group, np.random.default_rng(0), num_groups=4)


def test_balanced_subsample_default_groups_from_data():
    group = np.array([0] * 5 + [4] * 2)  # groups 1-3 empty, 4 present: default num_groups = 5
    idx = balanced_subsample(group, np.random.default_rng(0))
    assert np.bincount(group[idx]).tolist() == [2, 0, 0, 0, 2]


# ---------------------------------------------------------------- fit_dfr contract


def test_fit_dfr_deterministic(splits):
    _, val, _ = splits
    a = fit_dfr(*val, seed=4, num_retrains=3)
    b = fit_dfr(*val, seed=4, num_retrains=3)
    c = fit_dfr(*val, seed=5, num_retrains=3)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert a.C == b.C and a.tune_wga == b.tune_wga
    assert not np.array_equal(a.weight, c.weight)


def test_fit_dfr_errors():
    rng = np.random.default_rng(0)
    emb, y, group = make_split([20, 20, 20, 20], rng, dim=8)
    with pytest.raises(ValueError, match="differ in length"):
        fit_dfr(emb, y[:-1], group)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fit_dfr(emb[:, 0], y, group)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_dfr(emb[:40], y[:40], group[:40])  # groups 0, 1: class 0 only
    with pytest.raises(ValueError, match="no samples"):
        fit_dfr(emb, y, group, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        fit_dfr(emb, y, group, num_classes=1)
    bad = emb.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_dfr(bad, y, group)
    lone = group.copy()
    lone[-19:] = 2  # group 3 keeps one sample: it cannot be in both halves
    with pytest.raises(ValueError, match="group 3 has 1 sample"):
        fit_dfr(emb, y, lone, num_retrains=1)
    with pytest.raises(ValueError, match="Cs"):
        fit_dfr(emb, y, group, Cs=())
    with pytest.raises(ValueError, match="Cs"):
        fit_dfr(emb, y, group, Cs=(1.0, -0.1))
    with pytest.raises(ValueError, match="duplicates"):
        fit_dfr(emb, y, group, Cs=(1.0, 1.0))
    with pytest.raises(ValueError, match="num_retrains"):
        fit_dfr(emb, y, group, num_retrains=0)


# ---------------------------------------------------------------- variants


NO_SILENT_CHANGES = pytest.mark.filterwarnings(
    "error::FutureWarning", "error::DeprecationWarning",
    "error::sklearn.exceptions.ConvergenceWarning",
)


@NO_SILENT_CHANGES
@pytest.mark.parametrize("variant", DFR_VARIANTS)
def test_every_variant_recovers_core_direction(splits, variant):
    train, val, test = splits
    erm = LogisticRegression().fit(train[0], train[1])
    erm_wga = worst_group_acc(erm.predict(test[0]), test[1], test[2])
    head = fit_dfr(*val, variant=variant, train_emb=train[0], seed=0, num_retrains=5)
    wga = worst_group_acc(apply_head(test[0], head).argmax(1), test[1], test[2])
    assert erm_wga < 0.6 and wga > 0.75 and wga > erm_wga + 0.25, (erm_wga, wga)
    assert abs(head.weight[1, CORE]) > 5 * abs(head.weight[1, SPUR])


def test_unknown_variant_is_refused(splits):
    with pytest.raises(ConfigError, match="unknown DFR variant 'paper'.*reference, study, tool"):
        fit_dfr(*splits[1], variant="paper")


def test_report_is_the_study_under_its_old_name(splits):
    """Older versions called the study's protocol "report": the name still fits the same head."""
    assert dfr_variant("report") == dfr_variant("study") == "study" and "report" not in DFR_VARIANTS
    old, new = (fit_dfr(*splits[1], variant=v, seed=3) for v in ("report", "study"))
    np.testing.assert_array_equal(old.weight, new.weight)
    np.testing.assert_array_equal(old.bias, new.bias)
    assert old.tune_wga == {} and old.C == 1.0  # the study's one fit, not the tool's tuning


def reference_balanced(g_arr, rng):
    """The reference's balanced subset: per group in turn, shuffle its positions, keep m."""
    members = [np.flatnonzero(g_arr == g) for g in range(g_arr.max() + 1)]
    m = min(len(p) for p in members)
    for p in members:
        rng.shuffle(p)
    return np.concatenate([p[:m] for p in members])


def test_reference_matches_independent_recomputation(splits):
    (train_emb, _, _), (emb, y, group), (test_emb, _, _) = splits
    seed, num_retrains = 2, 3
    head = fit_dfr(emb, y, group, variant="reference", train_emb=train_emb, seed=seed,
                   num_retrains=num_retrains)

    # dfr_on_validation_tune + dfr_on_validation_eval, with the documented seeded draws.
    rng = np.random.default_rng(seed)
    x = emb.astype(np.float64)
    idx = np.arange(len(y))
    rng.shuffle(idx)
    score, fit = idx[: len(y) // 2], idx[len(y) // 2:]
    tune = fit[reference_balanced(group[fit], rng)]
    tune_scaler = StandardScaler().fit(x[tune])
    expected_wga = {}
    for C in DFR_CS:
        model = sk_l1(C, int(rng.integers(2**31 - 1))).fit(tune_scaler.transform(x[tune]), y[tune])
        pred = model.predict(tune_scaler.transform(x[score]))
        expected_wga[C] = worst_group_acc(pred, y[score], group[score])
    assert head.tune_wga == pytest.approx(expected_wga, abs=1e-12)
    assert head.C == DFR_CS[int(np.argmax(list(expected_wga.values())))]

    train_scaler = StandardScaler().fit(train_emb.astype(np.float64))
    coefs, intercepts = [], []
    for _ in range(num_retrains):
        rows = reference_balanced(group, rng)
        rng.shuffle(np.arange(len(train_emb)))
        model = sk_l1(head.C, int(rng.integers(2**31 - 1))).fit(train_scaler.transform(x[rows]), y[rows])
        coefs.append(model.coef_[0])
        intercepts.append(model.intercept_[0])
    w = np.mean(coefs, axis=0) / train_scaler.scale_
    np.testing.assert_allclose(2 * head.weight[1], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(2 * head.bias[1], np.mean(intercepts) - w @ train_scaler.mean_,
                               rtol=1e-5, atol=1e-5)
    decision = train_scaler.transform(test_emb) @ np.mean(coefs, axis=0) + np.mean(intercepts)
    logits = apply_head(test_emb, head)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-4, atol=1e-4)


def test_reference_scalers_observed(splits, spy):
    """Tuning fits see the tuning subset standardised by itself; final fits the train scaler."""
    (train_emb, _, _), (emb, y, group), _ = splits
    fit_dfr(emb, y, group, variant="reference", train_emb=train_emb, seed=0, num_retrains=2)
    tune_fits, final_fits = spy[: len(DFR_CS)], spy[len(DFR_CS):]
    assert [f[0] for f in tune_fits] == list(DFR_CS) and len(final_fits) == 2
    X = tune_fits[0][1]
    np.testing.assert_allclose(X.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(X.std(0), 1.0, atol=1e-9)
    assert np.bincount(tune_fits[0][2]).tolist() == [len(X) // 2] * 2
    train_scaler = StandardScaler().fit(train_emb.astype(np.float64))
    for _, X, labels, _ in final_fits:
        raw = train_scaler.inverse_transform(X)  # rows of the validation set, group by group
        nearest = np.abs(raw[:, None, :] - emb[None, :, :]).max(-1).argmin(1)
        np.testing.assert_allclose(raw, emb[nearest], atol=1e-5)
        assert np.array_equal(labels, y[nearest])
        assert group[nearest].tolist() == sorted(group[nearest].tolist()) == np.repeat(range(4), 80).tolist()


def test_reference_ties_pick_the_first_c_of_the_grid(splits, monkeypatch):
    train, val, _ = splits
    monkeypatch.setattr(dfr, "group_metrics", lambda *a, **k: {"wga": 0.5})
    head = fit_dfr(*val, variant="reference", train_emb=train[0], seed=0, num_retrains=1)
    assert head.C == DFR_CS[0] == 1.0
    head = fit_dfr(*val, variant="reference", train_emb=train[0], seed=0, Cs=(0.1, 0.03, 1.0),
                   num_retrains=1)
    assert head.C == 0.1
    assert fit_dfr(*val, variant="tool", seed=0, num_retrains=1).C == min(DFR_CS)  # tool: smallest


def test_reference_needs_train_emb(splits):
    _, (emb, y, group), _ = splits
    with pytest.raises(DFRError, match="TRAINING split's embeddings.*pass train_emb"):
        fit_dfr(emb, y, group, variant="reference")
    with pytest.raises(ValueError, match=r"train_emb must be \[M, 32\]"):
        fit_dfr(emb, y, group, variant="reference", train_emb=emb[:, :5])
    with pytest.raises(DFRError, match="group 2 has 0 sample"):
        keep = group != 2  # the reference needs every group 0..max(group)
        fit_dfr(emb[keep], y[keep], group[keep], variant="reference", train_emb=emb)


def test_study_matches_independent_sklearn_fit(splits, spy):
    _, (emb, y, group), (test_emb, _, _) = splits
    head = fit_dfr(emb, y, group, variant="study", seed=7)
    rows = balanced_subsample(group, np.random.default_rng(7))
    model = sk_study().fit(emb[rows].astype(np.float64), y[rows])
    logits = apply_head(test_emb, head)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], model.decision_function(test_emb),
                               rtol=1e-4, atol=1e-4)
    prob = torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy()
    np.testing.assert_allclose(prob, model.predict_proba(test_emb)[:, 1], atol=1e-5)
    assert head.C == 1.0 and head.tune_wga == {}

    assert len(spy) == 1  # one fit: no tuning, no averaging
    C, X, _, fitted = spy[0]
    np.testing.assert_array_equal(X, emb[rows])  # raw embeddings: no scaler
    assert (C, fitted.solver, fitted.class_weight) == (1.0, "lbfgs", "balanced")
    assert fitted.l1_ratio == 0.0 if NEW_PENALTY_API else fitted.penalty == "l2"


def test_study_multiclass_is_multinomial():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(3), 100)
    emb = rng.normal(size=(300, 20))
    emb[np.arange(300), y] += 2.0
    group = 2 * y + np.tile([0, 1], 150)
    head = fit_dfr(emb, y, group, variant="study", seed=1)
    rows = balanced_subsample(group, np.random.default_rng(1))
    model = sk_study().fit(emb[rows], y[rows])
    prob = torch.softmax(torch.from_numpy(apply_head(emb, head)).double(), 1).numpy()
    np.testing.assert_allclose(prob, model.predict_proba(emb), atol=1e-5)


def test_subsample_proportions():
    """Uniform proportions give the balanced subsample; skewed ones keep the asked shares, as
    large as the smallest group allows (teachers that keep part of the spurious correlation)."""
    group = np.repeat(np.arange(4), [100, 40, 20, 60])
    a = balanced_subsample(group, np.random.default_rng(3))
    b = balanced_subsample(group, np.random.default_rng(3), proportions=[0.25] * 4)
    np.testing.assert_array_equal(a, b)
    skew = balanced_subsample(group, np.random.default_rng(3), proportions=[0.5, 0.1, 0.1, 0.3])
    counts = np.bincount(group[skew], minlength=4)
    assert counts.tolist() == [100, 20, 20, 60] and len(set(skew)) == len(skew)
    with pytest.raises(ValueError, match="proportions"):
        balanced_subsample(group, np.random.default_rng(3), proportions=[0, 0, 0, 0])
