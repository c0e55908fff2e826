"""The training step: the task's fast batch-AGRE path equals the straightforward loop it replaces."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from distill.config import DistillConfig
from distill.data import Batch
from distill.student import Student
from distill.task import DistillTask

B, T, C, S = 8, 3, 2, 16
CPU = torch.device("cpu")


def _kd(z_s, z_t, tau):
    """Batch mean of tau^2 KL(p_t || p_s), as the study's code writes it (F.kl_div)."""
    return tau**2 * F.kl_div(F.log_softmax(z_s / tau, -1), F.softmax(z_t / tau, -1), reduction="batchmean")


def reference_weights(model, logits, h, zt, zb, cfg):
    """The study's batch weights spelled out: autograd.grad of each batch-mean KD loss w.r.t.
    the parameter set, flattened, cosine with the biased model's, floor 0.01, normalised."""
    if cfg.agre_params == "last":
        params = list(model.backbone.net.fc.parameters())
    else:
        params = model.agre_params(cfg.agre_params)

    def flat(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in zip(gs, params)])
    if cfg.agre_params == "last":  # the last layer's gradient from its input h (a leaf here)
        h = h.detach().requires_grad_(False)
        logits = model.backbone.net.fc(h)
    g_b = flat(_kd(logits, zb, cfg.tau))
    W = []
    for t in range(zt.shape[1]):
        g_t = flat(_kd(logits, zt[:, t], cfg.tau))
        W.append(max(1 - float(g_t @ g_b) / float(g_t.norm() * g_b.norm()), 0.01))
    return torch.tensor([w / sum(W) for w in W], dtype=logits.dtype)


def reference_step(model, opt, x, y, zt, zb, feats, cfg):
    """The study's loop: T + 1 autograd gradients for the weights, then one backward of the whole
    objective with the weights as constants."""
    logits, h, projected = model(x)
    w = reference_weights(model, logits, h, zt, zb, cfg)
    kd = sum(w[t] * _kd(logits, zt[:, t], cfg.tau) for t in range(zt.shape[1]))
    loss = cfg.alpha * kd + (1 - cfg.alpha) * F.cross_entropy(logits, y)
    for layer in cfg.active_layers:
        target = (w[None, :, None] * feats[layer]).sum(1)
        loss = loss + cfg.gammas[layer] * ((projected[layer] - target) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach(), w


def _task(cfg):
    return DistillTask(cfg, teachers=None, device=CPU)


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
    task, batch = _task(cfg), Batch(x, y, zt, zb, feats)
    # float64 end to end: the two differ only by summation orders, over at most n = the number of
    # parameters (11.2M) products; n u bounds that for any order (Higham, ch. 3)
    tol = sum(p.numel() for p in model.parameters()) * torch.finfo(torch.float64).eps / 2
    for _ in range(2):  # the second step also checks the momentum buffers
        fast = task.step(model, opts[0], batch)
        ref_loss, w_ref = reference_step(twin, opts[1], x, y, zt, zb, feats, cfg)
        w_fast = fast["weights"]
        torch.testing.assert_close(w_fast[0], w_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(fast["loss"], ref_loss, rtol=tol, atol=tol)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    assert not torch.allclose(w_fast[0], torch.full((T,), 1.0 / T, dtype=w_fast.dtype))  # not trivially uniform


def test_agreement_diagnostics_leave_the_update_alone():
    """agre_compare computes other parameter sets' weights on the same step, logs how they agree,
    and does not change the update; the same set agrees perfectly with itself."""
    from core.weighting import weight_agreement

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
    w_last = reference_weights(twin, logits, h, zt, zb, DistillConfig(agre_params="last"))
    batch = Batch(x, y, zt, zb, {})
    out_a, out_b = _task(plain).step(model, opts[0], batch), _task(probed).step(twin, opts[1], batch)
    torch.testing.assert_close(out_a["weights"], out_b["weights"], rtol=0, atol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    same = out_b["agre_compare"]["all"]
    assert float(same["abs_diff"]) < 1e-12 and float(same["spearman"]) > 0.999 and float(same["top"]) == 1
    want = weight_agreement(out_b["weights"][0].double(), w_last.double())
    tol = sum(p.numel() for p in model.parameters()) * torch.finfo(torch.float64).eps / 2  # as above
    for k in ("abs_diff", "spearman", "top"):
        torch.testing.assert_close(out_b["agre_compare"]["last"][k], want[k], rtol=tol, atol=tol)
    assert "agre_compare" not in out_a
    with pytest.raises(ValueError, match="agre_compare"):
        DistillConfig(weighting="aver", agre_compare=("last",))
