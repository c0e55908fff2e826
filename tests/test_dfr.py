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
from precompute.dfr import DFR_CS, DFRHead, apply_head, balanced_subsample, choose_c, fit_dfr

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


def sk_l1(C, random_state):
    """An L1 liblinear logistic regression, spelled for the installed scikit-learn."""
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(l1_ratio=1.0, C=C, solver="liblinear", random_state=random_state)
    return LogisticRegression(penalty="l1", C=C, solver="liblinear", random_state=random_state)


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
        balanced_subsample(group, np.random.default_rng(0))


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
