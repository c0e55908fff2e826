"""Teacher weights against independent computations: brute-force autograd, hand loops."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.weighting import (agre_batch_weights_from_grads, agre_weights, aver_weights, cached_agre_weights,
                            kd_per_teacher, last_layer_gradients)
from distill.config import DistillConfig
from distill.data import Batch
from core.distributed import Dist
from distill.task import BatchAgre, CachedAgre, PerSampleAgre, Uniform, loss_gradients, weighting_for

F64 = torch.float64


def _kl_tau2(z_target, z_student, tau):
    """tau^2 KL(p_target || p_student) from probabilities (not via the module under test)."""
    p, q = torch.softmax(z_target / tau, -1), torch.softmax(z_student / tau, -1)
    return tau**2 * (p * (p.log() - q.log())).sum(-1)


def _cos(a, b):
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na < 1e-12 or nb < 1e-12 else float(a @ b) / (na * nb)


def _normalise_agre(W):
    # 1 - cos of exactly parallel float64 gradients is ~1e-16, not a weight
    W = [0.0 if w < 1e-9 else w for w in W]
    s = sum(W)
    return [w / s for w in W] if s > 0 else [1.0 / len(W)] * len(W)


def _normalise_batch(cosines):
    W = [max(1.0 - c, 0.01) for c in cosines]
    return [w / sum(W) for w in W]


def _reference_batch_weights(teacher_losses, biased_loss, params):
    """The study's batch AGRE weights the straightforward way: torch.autograd.grad of each batch
    loss, flattened and concatenated, cosines in float64 by hand."""
    def flat(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in zip(grads, params)])
    g_b = flat(biased_loss).to(F64)
    return torch.tensor(_normalise_batch([_cos(flat(l).to(F64), g_b) for l in teacher_losses]), dtype=F64)


def _brute_force_agre(h, head, zt, zb, tau):
    """Per-sample gradients of l_t(i), l_b(i) w.r.t. the head's weight and bias, by autograd."""
    B, T, _ = zt.shape

    def grad(loss):
        gw, gb = torch.autograd.grad(loss, (head.weight, head.bias), retain_graph=True)
        return torch.cat([gw.flatten(), gb])

    out = torch.empty(B, T, dtype=F64)
    for i in range(B):
        z_s = head(h[i])
        g_b = grad(_kl_tau2(zb[i], z_s, tau))
        W = [1.0 - _cos(grad(_kl_tau2(zt[i, t], z_s, tau)), g_b) for t in range(T)]
        out[i] = torch.tensor(_normalise_agre(W), dtype=F64)
    return out


@pytest.mark.parametrize("C", [2, 5])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_agre_matches_brute_force_autograd(C, tau):
    g = torch.Generator().manual_seed(C)
    B, T, D = 8, 4, 6
    head = nn.Linear(D, C).double()
    h = torch.randn(B, D, generator=g, dtype=F64)
    zt = 3 * torch.randn(B, T, C, generator=g, dtype=F64)
    zb = 3 * torch.randn(B, C, generator=g, dtype=F64)
    expected = _brute_force_agre(h, head, zt, zb, tau)
    z_s = head(h)
    w = agre_weights(z_s, zt, zb, tau)
    assert not w.requires_grad
    torch.testing.assert_close(w, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(w.sum(1), torch.ones(B, dtype=F64))


def test_agre_two_classes_is_a_hard_gate():
    # p_s = (1/2, 1/2); the biased model and teachers 0 and 2 favour class 0 (gradients parallel:
    # cos = +1, W = 0), teacher 1 favours class 1 (antiparallel: cos = -1, W = 2).
    z_s = torch.zeros(1, 2)
    zb = torch.tensor([[2.0, 0.0]])
    zt = torch.tensor([[[3.0, 0.0], [-1.0, 0.0], [1.0, 0.5]]])
    torch.testing.assert_close(agre_weights(z_s, zt, zb, 4.0), torch.tensor([[0.0, 1.0, 0.0]]))

    # Random two-class batches: every row is uniform over its W = 2 teachers.
    g = torch.Generator().manual_seed(0)
    w = agre_weights(torch.randn(64, 2, generator=g), 3 * torch.randn(64, 5, 2, generator=g),
                     3 * torch.randn(64, 2, generator=g), 4.0)
    nonzero = (w > 0).sum(1, keepdim=True).float()
    torch.testing.assert_close(w, (w > 0).float() / nonzero)


def test_agre_all_zero_row_falls_back_to_uniform():
    z_s = torch.zeros(1, 2)
    zb = torch.tensor([[2.0, 0.0]])
    zt = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [5.0, -1.0]]])  # all on the bias side: W = 0
    torch.testing.assert_close(agre_weights(z_s, zt, zb, 4.0), torch.full((1, 3), 1 / 3))


def test_agre_zero_vector_has_cosine_zero():
    g = torch.Generator().manual_seed(1)
    z_s, zb = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    # Teacher equal to the student: zero gradient, cos := 0, W = 1. Teacher equal to the biased
    # model: cos = 1, W = 0.
    zt = torch.stack([z_s, zb], dim=1)
    torch.testing.assert_close(agre_weights(z_s, zt, zb, 4.0), torch.tensor([[1.0, 0.0]] * 3))
    # Biased model equal to the student: every cosine is 0, so every teacher gets W = 1.
    zt = torch.randn(3, 5, 4, generator=g)
    torch.testing.assert_close(agre_weights(z_s, zt, z_s.clone(), 4.0), torch.full((3, 5), 0.2))
    # A difference at rounding level has no direction: it counts as zero too.
    z_s, zb = z_s.double(), zb.double()
    z_o = torch.randn(3, 4, generator=g, dtype=F64)
    nudged = z_s + torch.tensor([1e-14, 0.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(agre_weights(z_s, torch.stack([nudged, zb, z_o], 1), zb, 4.0),
                               agre_weights(z_s, torch.stack([z_s, zb, z_o], 1), zb, 4.0))


def test_agre_weights_carry_no_gradient():
    z_s = torch.randn(4, 3, requires_grad=True)
    w = agre_weights(z_s, torch.randn(4, 2, 3), torch.randn(4, 3), 4.0)
    assert not w.requires_grad and w.dtype == torch.float32


def test_cached_weights_match_hand_loop():
    g = torch.Generator().manual_seed(2)
    N, T, C, tau = 6, 3, 4, 4.0
    zt = 3 * torch.randn(N, T, C, generator=g, dtype=F64)
    zb = 3 * torch.randn(N, C, generator=g, dtype=F64)

    def softmax(z):
        e = [math.exp(float(v) / tau) for v in z]
        return [v / sum(e) for v in e]

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    u = [1.0 / C] * C
    expected = []
    for n in range(N):
        ub = [ui - pi for ui, pi in zip(u, softmax(zb[n]))]
        W = [1.0 - cos([ui - pi for ui, pi in zip(u, softmax(zt[n, t]))], ub) for t in range(T)]
        expected.append(_normalise_agre(W))
    w = cached_agre_weights(zt, zb, tau)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)
    # The uniform prediction is the one of an all-zero student.
    torch.testing.assert_close(w, agre_weights(torch.zeros(N, C, dtype=F64), zt, zb, tau))
    # Views as an extra leading dim (the cache's [N, K+1, T, C]).
    views = cached_agre_weights(torch.stack([zt, zt.flip(0)], 1), torch.stack([zb, zb.flip(0)], 1), tau)
    torch.testing.assert_close(views[:, 0], w)
    torch.testing.assert_close(views[:, 1], w.flip(0))


def test_aver_is_the_mean():
    zt = torch.randn(5, 4, 3)
    w = aver_weights(zt)
    torch.testing.assert_close(w, torch.full((5, 4), 0.25))
    z_s = torch.randn(5, 3)
    per = kd_per_teacher(z_s, zt, 2.0)
    torch.testing.assert_close((w * per).sum(1), per.mean(1))


def _tiny_student(C, seed):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh()).double()
    head = nn.Linear(5, C).double()
    return backbone, head


def _batch_losses(z_s, zt, zb, tau):
    """Batch means of l_t and l_b via F.kl_div (seed style)."""
    def l(z_target):
        return tau**2 * F.kl_div(F.log_softmax(z_s / tau, -1), F.softmax(z_target / tau, -1),
                                 reduction="batchmean")
    return [l(zt[:, t]) for t in range(zt.shape[1])], l(zb)


@pytest.mark.parametrize("C", [2, 5])
def test_batch_last_closed_form_matches_autograd_on_last_layer(C):
    g = torch.Generator().manual_seed(3)
    B, T, tau = 16, 4, 4.0
    backbone, head = _tiny_student(C, seed=C)
    x = torch.randn(B, 6, generator=g, dtype=F64)
    zt = 3 * torch.randn(B, T, C, generator=g, dtype=F64)
    zb = 3 * torch.randn(B, C, generator=g, dtype=F64)
    zt[:, 0] = zb  # teacher 0 is the biased model: cos = 1, so the 0.01 floor applies
    h = backbone(x)
    z_s = head(h)
    teacher_losses, biased_loss = _batch_losses(z_s, zt, zb, tau)
    w_ref = _reference_batch_weights(teacher_losses, biased_loss, [head.weight, head.bias])
    w_last = agre_batch_weights_from_grads(*last_layer_gradients(z_s, h, zt, zb, tau), F64)
    # float64 throughout: the two differ by the summation order of n = B * C * (D + 1) products,
    # which n u bounds whatever the order
    n = B * C * (h.shape[1] + 1)
    torch.testing.assert_close(w_last, w_ref, atol=n * torch.finfo(F64).eps, rtol=0)
    torch.testing.assert_close(w_last.sum(), torch.tensor(1.0, dtype=F64))
    assert float(w_last[0]) == pytest.approx(float(w_last.min()))
    assert not w_last.requires_grad


def test_batch_autograd_matches_explicit_backward_loop():
    g = torch.Generator().manual_seed(4)
    B, T, C, tau = 12, 3, 3, 2.0
    backbone, head = _tiny_student(C, seed=5)
    model = nn.Sequential(backbone, head)
    params = list(model.parameters())
    x = torch.randn(B, 6, generator=g, dtype=F64)
    zt = 2 * torch.randn(B, T, C, generator=g, dtype=F64)
    zb = 2 * torch.randn(B, C, generator=g, dtype=F64)
    zt[:, 1] = zb  # cos = 1 -> floored at 0.01
    z_s = model(x)
    teacher_losses, biased_loss = _batch_losses(z_s, zt, zb, tau)

    def grad_by_backward(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return torch.cat([p.grad.flatten().clone() for p in params])

    g_b = grad_by_backward(biased_loss)
    cosines = [_cos(grad_by_backward(l), g_b) for l in teacher_losses]
    expected = torch.tensor(_normalise_batch(cosines), dtype=F64)  # float64 losses: float64 weights
    assert max(1.0 - cosines[1], 0.01) == 0.01

    model.zero_grad(set_to_none=True)
    unused = nn.Parameter(torch.ones(3, dtype=F64))  # not in the graph: zero gradient
    g_b, *g_t = loss_gradients([biased_loss, *teacher_losses], params + [unused])
    w = agre_batch_weights_from_grads(g_t, g_b, F64)
    n = sum(p.numel() for p in params)  # float64 inner products over n terms: n u bounds any order
    torch.testing.assert_close(w, expected, atol=n * torch.finfo(F64).eps, rtol=0)
    assert all(p.grad is None for p in params + [unused])
    assert all(float(g[-1].abs().sum()) == 0 for g in (g_b, *g_t))
    # The graph survives for the training loss's own backward pass.
    sum(teacher_losses).backward()
    assert all(p.grad is not None for p in params)


def test_batch_weights_of_float32_gradients_match_float64_cosines():
    """Per-parameter inner products in the gradients' own float32, summed in float64, agree with
    cosines computed on the float64 concatenated vectors, at ResNet-18's parameter sizes (a
    2.4M-element tensor), with nearly parallel and nearly opposite teachers.

    Tolerance from the reduction: a float32 dot product of n terms errs by about sqrt(n) u
    sum_i |a_i b_i| <= sqrt(n) u |a| |b| (u = 2^-24; the probabilistic bound of Higham and Mary,
    2019, for any summation order, so for any CPU's kernel), so each cosine by about sqrt(n) u,
    and a weight W_t / sum W (sum W >= 1 here) by no more than that. Observed: ~1e-6 (Intel),
    1.9e-6 (AMD EPYC); a wrong formula errs by > 1e-2."""
    g = torch.Generator().manual_seed(11)
    sizes = [2_359_296, 512 * 256, 1000, 3]
    g_b = [torch.randn(n, generator=g) for n in sizes]
    noise = [[torch.randn(n, generator=g) for n in sizes] for _ in range(4)]
    mix = [(1.0, 0.01), (1.0, 1.0), (-1.0, 0.05), (0.0, 1.0)]  # (share of g_b, share of noise)
    g_t = [[a * b + c * e for b, e in zip(g_b, es)] for (a, c), es in zip(mix, noise)]
    flat_b = torch.cat(g_b).to(F64)
    expected = torch.tensor(_normalise_batch([_cos(torch.cat(t).to(F64), flat_b) for t in g_t]), dtype=F64)
    w = agre_batch_weights_from_grads(g_t, g_b, F64)
    tol = math.sqrt(max(sizes)) * torch.finfo(torch.float32).eps / 2  # sqrt(n) u = 9.2e-5
    torch.testing.assert_close(w, expected, atol=tol, rtol=0)
    assert float(w[0]) == pytest.approx(float(w.min()))  # the nearly parallel teacher gets the floor


class _Head:
    """A stand-in student whose ``all`` parameter set is a linear head's."""

    def __init__(self, head):
        self.head = head

    def agre_params(self, name):
        return list(self.head.parameters())


def test_weighting_strategies():
    g = torch.Generator().manual_seed(6)
    B, T, C, tau = 5, 3, 4, 4.0
    backbone, head = _tiny_student(C, seed=7)
    h = backbone(torch.randn(B, 6, generator=g, dtype=F64))
    z_s = head(h)
    zt = torch.randn(B, T, C, generator=g, dtype=F64)
    zb = torch.randn(B, C, generator=g, dtype=F64)
    cached = torch.rand(B, T, dtype=F64)
    batch = Batch(x=None, y=torch.zeros(B, dtype=torch.long), teacher_logits=zt, biased_logits=zb,
                  teacher_feats={}, cached_weights=cached)
    model = _Head(head)

    def run(strategy):
        return strategy(model, z_s, h, batch)

    torch.testing.assert_close(run(Uniform())[0], aver_weights(zt))
    torch.testing.assert_close(run(PerSampleAgre(tau))[0], agre_weights(z_s, zt, zb, tau))
    torch.testing.assert_close(run(CachedAgre())[0], cached)
    w_last, grads = run(BatchAgre("last", tau, Dist()))
    assert w_last.shape == (B, T) and grads is None
    w_all, (params, grads) = run(BatchAgre("all", tau, Dist()))  # "all" of this stand-in: the head, as "last"
    n = B * sum(p.numel() for p in head.parameters())  # closed form vs autograd: n u bounds the order
    torch.testing.assert_close(w_all, w_last.to(w_all.dtype), atol=n * torch.finfo(F64).eps, rtol=0)
    assert params == list(head.parameters())
    assert len(grads) == T and [g.shape for g in grads[0]] == [p.shape for p in head.parameters()]
    for name, kind in (("aver", Uniform), ("agre", PerSampleAgre), ("cached", CachedAgre), ("agre-batch", BatchAgre)):
        assert isinstance(weighting_for(DistillConfig(weighting=name), Dist(), keep_graph=False), kind)

    with pytest.raises(ValueError, match=r"\[B, T\]"):
        CachedAgre()(model, z_s, h, Batch(None, batch.y, zt, zb, {}, cached[:, :2]))
