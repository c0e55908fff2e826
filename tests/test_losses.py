"""KD, feature and total losses against hand-worked golden values and explicit loops; the total
as the training step computes it (DistillTask.step on a stand-in student with given outputs)."""
import math

import pytest
import torch
import torch.nn.functional as F

from core.weighting import kd_per_teacher
from distill.config import DistillConfig
from distill.data import Batch
from distill.task import DistillTask, feature_loss

LN3 = math.log(3.0)
# tau = 1, z_s = (0, 0) -> p_s = (1/2, 1/2); z_t = (ln 3, 0) -> p_t = (3/4, 1/4):
# KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.75 * 0.4054651 - 0.25 * 0.6931472 = 0.1308120
KL_34 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
# z_s = (ln 3, 0) -> p_s = (3/4, 1/4); z_t = (0, 0) -> p_t = (1/2, 1/2):
# KL = 1/2 ln(2/3) + 1/2 ln 2 = -0.2027326 + 0.3465736 = 0.1438410
KL_REV = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)


def test_kd_golden_two_classes():
    assert KL_34 == pytest.approx(0.1308120, abs=1e-7)
    assert KL_REV == pytest.approx(0.1438410, abs=1e-7)
    z_s = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    zt = torch.tensor([[[LN3, 0.0], [0.0, 0.0]], [[0.0, 0.0], [LN3, 0.0]]])
    torch.testing.assert_close(kd_per_teacher(z_s, zt, 1.0),
                               torch.tensor([[KL_34, 0.0], [KL_REV, 0.0]]))
    # tau = 2 on doubled logits gives the same distributions, times tau^2 = 4: 0.5232481
    l = kd_per_teacher(2 * z_s, 2 * zt, 2.0)
    torch.testing.assert_close(l, 4 * torch.tensor([[KL_34, 0.0], [KL_REV, 0.0]]))
    assert float(l[0, 0]) == pytest.approx(0.5232481, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_kl_div_and_its_gradient(tau):
    g = torch.Generator().manual_seed(0)
    z_s = (3 * torch.randn(7, 5, generator=g, dtype=torch.float64)).requires_grad_()
    zt = 3 * torch.randn(7, 3, 5, generator=g, dtype=torch.float64)
    l = kd_per_teacher(z_s, zt, tau)
    ref = torch.stack([F.kl_div(F.log_softmax(z_s / tau, -1), F.softmax(zt[:, t] / tau, -1),
                                reduction="none").sum(-1) * tau**2 for t in range(3)], dim=1)
    torch.testing.assert_close(l, ref)
    # d l_t(i) / d z_s(i) = tau (p_s(i) - p_t(i)): the basis of the AGRE closed form
    l[:, 1].sum().backward()
    expected = tau * (F.softmax(z_s / tau, -1) - F.softmax(zt[:, 1] / tau, -1))
    torch.testing.assert_close(z_s.grad, expected.detach())


def _golden_batch():
    # Sample 0: l = (KL_34, 0), w = (1/2, 1/2) -> 0.0654060.
    # Sample 1: l = (KL_34, KL_34) (by symmetry), w = (1/4, 3/4) -> 0.1308120.
    # Weighted KD = (0.0654060 + 0.1308120) / 2 = 0.0981090.
    z_s = torch.zeros(2, 2, requires_grad=True)
    zt = torch.tensor([[[LN3, 0.0], [0.0, 0.0]], [[0.0, LN3], [LN3, 0.0]]])
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75]], requires_grad=True)
    return z_s, torch.tensor([0, 1]), zt, w


KD_GOLDEN = (0.5 * KL_34 + (0.25 + 0.75) * KL_34) / 2


class GivenOutputs(torch.nn.Module):
    """A stand-in student whose forward returns the given logits and adapted features (leaves,
    so their gradients after the step are the objective's)."""

    def __init__(self, z_s, projected):
        super().__init__()
        self.z_s, self.projected = z_s, projected

    def forward(self, x):
        return self.z_s, torch.zeros(len(self.z_s), 1), self.projected


def distillation_loss(z_s, y, zt, w, tau, alpha, projected=None, teacher_feats=None, gammas=None):
    """The objective of one training step (weights given as the ``cached`` weighting's), with
    the gradients it leaves on ``z_s`` and ``projected`` (lr 0: the step changes nothing)."""
    gammas = gammas or {}
    cfg = DistillConfig(weighting="cached", tau=tau, alpha=alpha, layers=tuple(gammas) or ("layer4",),
                        layer_gammas=tuple(gammas.values()) or None)
    leaves = [z_s, *(projected or {}).values()]
    opt = torch.optim.SGD(leaves, lr=0.0)
    batch = Batch(torch.zeros(len(y), 1), y, zt, None, teacher_feats or {}, cached_weights=w)
    return DistillTask(cfg, None, torch.device("cpu")).step(GivenOutputs(z_s, projected or {}), opt, batch)


def test_distillation_loss_golden_alpha_one():
    assert KD_GOLDEN == pytest.approx(0.0981090, abs=1e-7)
    z_s, y, zt, w = _golden_batch()
    out = distillation_loss(z_s, y, zt, w, tau=1.0, alpha=1.0)
    assert float(out["loss"].detach()) == pytest.approx(KD_GOLDEN, abs=1e-6)
    assert float(out["kd"]) == pytest.approx(KD_GOLDEN, abs=1e-6)
    assert float(out["ce"]) == 0.0 and float(out["feat"]) == 0.0
    assert not out["loss"].requires_grad and not out["kd"].requires_grad  # reported: detached
    # the step's backward: d KD / d z_s = sum_t w_t tau (p_s - p_t) / B at p_s = (1/2, 1/2)
    expected = ((w.detach().unsqueeze(-1) * (0.5 - F.softmax(zt, -1))).sum(1)) / 2
    torch.testing.assert_close(z_s.grad, expected)


def test_distillation_loss_golden_alpha_half():
    # CE of z_s = (0, 0) is ln 2 = 0.6931472 for either label:
    # L = 0.5 * 0.6931472 + 0.5 * 0.0981090 = 0.3956281
    z_s, y, zt, w = _golden_batch()
    out = distillation_loss(z_s, y, zt, w, tau=1.0, alpha=0.5)
    assert float(out["ce"]) == pytest.approx(math.log(2.0), abs=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(0.3956281, abs=1e-6)


def test_distillation_loss_golden_features_and_gradients():
    z_s, y, zt, w = _golden_batch()
    # layer4, gamma 0.5. Sample 0: teachers (1, 1), (3, 1), w = (1/2, 1/2) -> target (2, 1);
    # projected (1, 0) -> squared errors (1, 1). Sample 1: teachers (0, 0), (4, 0),
    # w = (1/4, 3/4) -> target (3, 0); projected (0, 1) -> (9, 1). L_feat = 12 / 4 = 3.
    # layer2, gamma 2: projected 0, every teacher feature 1 -> L_feat = 1. layer3: gamma 0.
    # L = 0.0981090 + 0.5 * 3 + 2 * 1 = 3.5981090
    p4 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    f4 = torch.tensor([[[1.0, 1.0], [3.0, 1.0]], [[0.0, 0.0], [4.0, 0.0]]])
    p2 = torch.zeros(2, 3, requires_grad=True)
    f2 = torch.ones(2, 2, 3, dtype=torch.float16)
    out = distillation_loss(z_s, y, zt, w, tau=1.0, alpha=1.0,
                            projected={"layer4": p4, "layer2": p2},
                            teacher_feats={"layer4": f4, "layer2": f2},
                            gammas={"layer4": 0.5, "layer3": 0.0, "layer2": 2.0})
    assert float(out["feat/layer4"]) == pytest.approx(3.0)
    assert float(out["feat/layer2"]) == pytest.approx(1.0)
    assert "feat/layer3" not in out  # gamma 0: not distilled
    assert float(out["feat"]) == pytest.approx(4.0)
    assert float(out["loss"].detach()) == pytest.approx(KD_GOLDEN + 3.5, abs=1e-6)

    # d/dP of gamma * mean (P - f_T)^2 = gamma * 2 (P - f_T) / (B D)
    target4 = torch.tensor([[2.0, 1.0], [3.0, 0.0]])
    torch.testing.assert_close(p4.grad, 0.5 * 2 * (p4.detach() - target4) / 4)
    torch.testing.assert_close(p2.grad, torch.full((2, 3), 2.0 * 2 * -1.0 / 6))
    # KD gradient at p_s = (1/2, 1/2): sum_t w_t tau (p_s - p_t) / B
    p_t = F.softmax(zt, -1)
    expected = ((w.detach().unsqueeze(-1) * (0.5 - p_t)).sum(1)) / 2
    torch.testing.assert_close(z_s.grad, expected)
    assert w.grad is None and not out["weights"].requires_grad


@pytest.mark.parametrize("spread", [1.0, 1e-3])  # 1e-3: teacher variance near eps
def test_feature_loss_disagreement_matches_loop(spread):
    g = torch.Generator().manual_seed(1)
    B, T, D, eps = 3, 4, 5, 1e-6
    proj = torch.randn(B, D, generator=g, dtype=torch.float64)
    feats = 1 + spread * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(B, T, generator=g, dtype=torch.float64), -1)
    total = 0.0
    for i in range(B):
        conf, err = [], []
        for d in range(D):
            vals = [float(feats[i, t, d]) for t in range(T)]
            mean = sum(vals) / T
            conf.append(1.0 / (sum((v - mean) ** 2 for v in vals) / T + eps))
            target = sum(float(w[i, t]) * vals[t] for t in range(T))
            err.append((float(proj[i, d]) - target) ** 2)
        mean_conf = sum(conf) / D
        total += sum(c / mean_conf * e for c, e in zip(conf, err))
    assert float(feature_loss(proj, feats, w, disagree=True, eps=eps)) == pytest.approx(total / (B * D))


def test_feature_loss_identical_teachers_is_plain_mse():
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(4, 6, generator=g)
    f = torch.randn(4, 6, generator=g)
    feats = f.unsqueeze(1).expand(4, 3, 6)
    w = torch.softmax(torch.randn(4, 3, generator=g), -1)
    mse = F.mse_loss(proj, f)
    torch.testing.assert_close(feature_loss(proj, feats, w), mse)
    torch.testing.assert_close(feature_loss(proj, feats, w, disagree=True), mse)


def test_feature_loss_half_precision_teachers():
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(4, 6, generator=g)
    feats = torch.randn(4, 3, 6, generator=g).half()
    w = torch.softmax(torch.randn(4, 3, generator=g), -1)
    for disagree in (False, True):
        loss = feature_loss(proj, feats, w, disagree=disagree)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, feature_loss(proj, feats.float(), w, disagree=disagree))
    with pytest.raises(ValueError, match="adapter"):
        feature_loss(proj[:, :5], feats, w)
