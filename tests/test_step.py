"""The training step: the fast batch-AGRE path equals the straightforward loop it replaces."""
from __future__ import annotations

import copy

import pytest
import torch

from core.weighting import agre_batch_weights_autograd, kd_per_teacher, teacher_weights
from distill.config import DistillConfig
from distill.losses import distillation_loss
from distill.student import Student
from distill.train import step

B, T, C, S = 8, 3, 2, 16


def reference_step(model, opt, x, y, zt, zb, feats, cfg):
    """The report's loop, spelled out: T + 1 autograd gradients for the weights, then one backward
    of the whole objective with the weights as constants."""
    logits, h, projected = model(x)
    if cfg.agre_params == "last":
        w = teacher_weights("agre-batch", student_logits=logits, teacher_logits=zt, biased_logits=zb, tau=cfg.tau,
                            penultimate=h, agre_params="last")
    else:
        w = agre_batch_weights_autograd(list(kd_per_teacher(logits, zt, cfg.tau).mean(0)),
                                        kd_per_teacher(logits, zb[:, None], cfg.tau).mean(),
                                        model.agre_params(cfg.agre_params)).unsqueeze(0).expand(B, T)
    gammas = {l: g for l, g in cfg.gammas.items() if g > 0}
    out = distillation_loss(logits, y, zt, w, cfg.tau, cfg.alpha, projected=projected, teacher_feats=feats,
                            gammas=gammas)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out, w


@pytest.mark.parametrize("kw", [dict(alpha=1.0, gamma=0.0), dict(alpha=0.9, gamma=0.5),
                                dict(alpha=1.0, gamma=0.5, agre_params="layer4"),
                                dict(alpha=0.9, gamma=0.0, agre_params="last")])
def test_fast_batch_agre_step_equals_the_reference_loop(kw):
    torch.manual_seed(0)
    cfg = DistillConfig(weighting="agre-batch", **{"agre_params": "all", **kw})
    dims = {"layer4": 32} if cfg.uses_features else {}
    model = Student(C, dims).double()
    twin = copy.deepcopy(model)
    x = torch.randn(B, 3, S, S, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    zt, zb = torch.randn(B, T, C, dtype=torch.float64) * 3, torch.randn(B, C, dtype=torch.float64) * 3
    feats = {"layer4": torch.randn(B, T, 32, dtype=torch.float64)} if dims else {}
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (model, twin)]
    for _ in range(2):  # the second step also checks the momentum buffers
        fast, w_fast = step(model, opts[0], x, y, zt, zb, feats, None, cfg, torch.device("cpu"))
        ref, w_ref = reference_step(twin, opts[1], x, y, zt, zb, feats, cfg)
        torch.testing.assert_close(w_fast, w_ref.to(w_fast.dtype), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(fast["loss"].detach(), ref["loss"].detach(), rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        # float64 end to end: only the summation order of the KD gradient differs
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.allclose(w_fast[0], torch.full((T,), 1.0 / T, dtype=w_fast.dtype))  # not trivially uniform


def test_agreement_diagnostics_leave_the_update_alone():
    """agre_compare computes other parameter sets' weights on the same step, logs how they agree,
    and does not change the update; the same set agrees perfectly with itself."""
    from core.weighting import agre_batch_weights_last, weight_agreement

    torch.manual_seed(1)
    model = Student(C, {}).double()
    twin = copy.deepcopy(model)
    x = torch.randn(B, 3, S, S, dtype=torch.float64)
    y = torch.randint(0, C, (B,))
    zt, zb = torch.randn(B, T, C, dtype=torch.float64) * 3, torch.randn(B, C, dtype=torch.float64) * 3
    plain = DistillConfig(weighting="agre-batch", agre_params="all")
    probed = DistillConfig(weighting="agre-batch", agre_params="all", agre_compare=("all", "last", "layer4"))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    with torch.no_grad():
        logits, h, _ = twin(x)
    w_last = agre_batch_weights_last(logits, h, zt, zb, 4.0)
    out_a, w_a = step(model, opts[0], x, y, zt, zb, {}, None, plain, torch.device("cpu"))
    out_b, w_b = step(twin, opts[1], x, y, zt, zb, {}, None, probed, torch.device("cpu"))
    torch.testing.assert_close(w_a, w_b, rtol=0, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    same = out_b["agre_compare"]["all"]
    assert float(same["abs_diff"]) < 1e-12 and float(same["spearman"]) > 0.999 and float(same["top"]) == 1
    want = weight_agreement(w_b[0].double(), w_last.double())
    for k in ("abs_diff", "spearman", "top"):
        torch.testing.assert_close(out_b["agre_compare"]["last"][k], want[k], rtol=1e-9, atol=1e-12)
    assert "agre_compare" not in out_a
    with pytest.raises(ValueError, match="agre_compare"):
        DistillConfig(weighting="aver", agre_compare=("last",))
