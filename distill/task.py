"""The distillation task, built once per run: the teacher weighting and the objective, one step at a time.

``DistillTask.step(model, opt, batch)`` is the method's algorithm box for one batch
(docs/method.md#the-training-step), in the order it reads:

1. the student's forward pass on the batch's images;
2. the teacher weights ``w`` from the weighting strategy of ``cfg.weighting`` (one class per mode
   below, each the formula of docs/method.md#teacher-weighting, the maths in core.weighting);
3. ``loss = (1 - alpha) CE + alpha mean_i sum_t w_t(i) l_t(i) + sum_l gamma_l L_feat_l``
   (docs/method.md#the-objective; ``l_t`` is :func:`core.weighting.kd_per_teacher`, ``L_feat_l``
   :func:`feature_loss`);
4. its gradient (:meth:`DistillTask.backward`) and one optimiser step.

For the study's batch AGRE-KD over all parameters the T + 1 gradients that give the weights also
give the KD part of the update exactly (``sum_t w_t g_t``, the weights being constants), so the KD
term is then computed on detached logits and only the CE and feature terms take a backward pass
(none when there are none). Under torchrun the batch is this process's share of a global batch:
every gradient, those of the weights too, is summed over the processes
(:class:`core.distributed.Dist`), so the weights and the update are the global batch's.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.distributed import Dist
from core.runtime import autocast, memory_format_for
from core.weighting import (agre_batch_weights_from_grads, agre_weights, aver_weights, kd_per_teacher,
                            last_layer_gradients, weight_agreement)
from distill.config import DistillConfig
from distill.data import Batch


def feature_loss(projected: Tensor, teacher_feats: Tensor, weights: Tensor,
                 disagree: bool = False, eps: float = 1e-6) -> Tensor:
    """Feature distillation towards the weighted teacher mean (seed, Experiments 2 and 4).

    Target ``f_T(i) = sum_t w_t(i) f_t(i)`` (weights and teacher features detached);
    ``L = mean_{i,d} c_{i,d} (P h_i - f_T(i))_d^2`` with ``c = 1`` by default. With
    ``disagree=True`` dimensions where the teachers agree count more:
    ``c_{i,d} = 1 / (Var_t f_{t,i,d} + eps)`` (population variance over teachers), rescaled so
    that ``mean_d c_{i,d} = 1`` for every sample; identical teachers give plain MSE.

    Args:
        projected: [B, D] adapted student features ``P h``, differentiable.
        teacher_feats: [B, T, D] teacher features (float16 in the cache; computed in float32).
        weights: [B, T] teacher weights, rows summing to 1.
        disagree: weight dimensions by teacher agreement.
        eps: variance offset of the confidence.
    Returns:
        Scalar loss (float32, or float64 for float64 inputs).
    """
    if projected.ndim != 2 or teacher_feats.ndim != 3 or weights.ndim != 2:
        raise ValueError(f"feature_loss expects projected [B, D], teacher_feats [B, T, D], weights "
                         f"[B, T]; got {tuple(projected.shape)}, {tuple(teacher_feats.shape)}, "
                         f"{tuple(weights.shape)}")
    B, T, D = teacher_feats.shape
    if tuple(projected.shape) != (B, D) or tuple(weights.shape) != (B, T):
        raise ValueError(f"feature_loss shapes disagree: projected {tuple(projected.shape)}, "
                         f"teacher_feats {tuple(teacher_feats.shape)}, weights {tuple(weights.shape)}"
                         " (is the adapter's output width the teacher layer's width?)")
    dtype = torch.promote_types(projected.dtype, torch.float32)  # float32 under half precision
    feats = teacher_feats.detach().to(dtype)
    # An elementwise weighted sum, not einsum: autocast would run a matmul in half precision.
    target = (weights.detach().to(dtype).unsqueeze(-1) * feats).sum(1)  # [B, D]
    sq = (projected.to(dtype) - target).pow(2)
    if disagree:
        conf = 1.0 / (feats.var(dim=1, correction=0) + eps)  # [B, D]
        sq = sq * (conf / conf.mean(dim=1, keepdim=True))
    return sq.mean()


def loss_gradients(losses: Sequence[Tensor], params: Sequence[Tensor],
                   keep_graph: bool = True) -> list[list[Tensor]]:
    """``grad_theta loss`` for each scalar loss, one backward pass each, as lists over ``params``;
    a parameter a loss does not reach gets zeros. The graph is kept after the last pass only with
    ``keep_graph`` (for a further backward); ``.grad`` of the parameters is left as it was.

    ``loss.backward(inputs=params)`` rather than ``torch.autograd.grad``: the same gradients,
    faster (docs/results.md#speed).
    """
    params = list(params)
    before = [p.grad for p in params]
    out = []
    try:
        for i, loss in enumerate(losses):
            for p in params:
                p.grad = None
            loss.backward(inputs=params, retain_graph=keep_graph or i < len(losses) - 1)
            out.append([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
    finally:
        for p, g in zip(params, before):
            p.grad = g
    return out



class Uniform:
    """``aver``: every teacher ``1/T`` (the AVER baseline)."""

    def __call__(self, model, logits: Tensor, h: Tensor, batch: Batch) -> tuple[Tensor, None]:
        return aver_weights(batch.teacher_logits), None


class PerSampleAgre:
    """``agre``: the AGRE-KD paper's per-sample weights (Eq. 5), closed form at the last layer."""

    def __init__(self, tau: float):
        self.tau = tau

    def __call__(self, model, logits: Tensor, h: Tensor, batch: Batch) -> tuple[Tensor, None]:
        return agre_weights(logits, batch.teacher_logits, batch.biased_logits, self.tau), None


class CachedAgre:
    """``cached``: the student-independent weights precompute wrote, read with the batch."""

    def __call__(self, model, logits: Tensor, h: Tensor, batch: Batch) -> tuple[Tensor, None]:
        w = batch.cached_weights
        if w is None or tuple(w.shape) != tuple(batch.teacher_logits.shape[:2]):
            raise ValueError(f"cached weights must be [B, T] = {list(batch.teacher_logits.shape[:2])}, got "
                             f"{None if w is None else list(w.shape)}")
        return w.detach(), None


class BatchAgre:
    """``agre-batch``: the study's AGRE-KD, one weight per teacher per batch from the cosine of the
    gradients ``g_t``, ``g_b`` of the batch-mean ``l_t`` and ``l_b`` w.r.t. the parameter set
    ``params`` (``all``, ``layer4``: one backward pass each; ``last``: closed form):
    ``w_t = max(1 - cos(g_t, g_b), 0.01)``, normalised.

    With ``all`` the call also returns ``(params, g_t)``, the parameters and each teacher's
    gradient over them: the exact KD gradient of the step is ``alpha sum_t w_t g_t``.
    ``keep_graph``: a further backward pass follows on the same graph.
    """

    def __init__(self, params: str, tau: float, dist: Dist, keep_graph: bool = True):
        self.params, self.tau, self.dist, self.distributed = params, tau, dist, dist.active
        self.exact = params == "all"
        self.keep_graph = keep_graph or not self.exact  # layer4: the whole loss backward follows
        self._model, self._params = None, []  # the model's parameter set, listed once

    def gradients(self, model, logits: Tensor, h: Tensor, batch: Batch):
        """(``g_t`` for each teacher, ``g_b``) as lists over the parameter set, summed over the processes."""
        zt, zb, share = batch.teacher_logits, batch.biased_logits, batch.share
        if self.params == "last":  # closed form of this process's rows: scaled after
            g_t, g_b = last_layer_gradients(logits, h, zt, zb, self.tau)
            if self.distributed:
                for g in (*g_t, g_b):
                    g[0].mul_(share)
        else:  # through the network (and the global BatchNorm): scaled before the backward passes
            if self._model is not model:
                self._model, self._params = model, model.agre_params(self.params)
            losses = [kd_per_teacher(logits, zb[:, None], self.tau).mean(),
                      *kd_per_teacher(logits, zt, self.tau).mean(0)]
            g_b, *g_t = loss_gradients([l * share for l in losses] if self.distributed else losses,
                                       self._params, keep_graph=self.keep_graph)
        if self.distributed:
            self.dist.all_sum([g for gs in (*g_t, g_b) for g in gs])
        return g_t, g_b

    def batch_weights(self, model, logits: Tensor, h: Tensor, batch: Batch) -> Tensor:
        """The [T] weights of the batch."""
        return agre_batch_weights_from_grads(*self.gradients(model, logits, h, batch), logits.dtype)

    def __call__(self, model, logits: Tensor, h: Tensor, batch: Batch):
        g_t, g_b = self.gradients(model, logits, h, batch)
        w = agre_batch_weights_from_grads(g_t, g_b, logits.dtype).unsqueeze(0).expand(len(batch.y), -1)
        return w, ((self._params, g_t) if self.exact else None)


def weighting_for(cfg: DistillConfig, dist: Dist, keep_graph: bool):
    """The weighting strategy of ``cfg.weighting`` (``keep_graph``: a further backward pass follows)."""
    if cfg.weighting == "agre-batch":
        return BatchAgre(cfg.agre_params, cfg.tau, dist, keep_graph)
    return {"aver": Uniform, "agre": lambda: PerSampleAgre(cfg.tau), "cached": CachedAgre}[cfg.weighting]()


class DistillTask:
    """The weighting and the objective of one run (see the module docstring), from the fields of
    ``cfg`` they use: weighting, agre_params, agre_compare, tau, alpha, the distilled layers'
    gammas, feature_weighting and feat_eps. The batches (:class:`distill.data.Batches`) bring the
    teacher outputs; ``teachers``, the run's teacher source, is not used here. ``device``: the
    run's (its autocast and memory layout)."""

    def __init__(self, cfg: DistillConfig, teachers, device, dist: Dist = Dist()):
        self.tau, self.alpha = cfg.tau, cfg.alpha
        self.gammas = {l: cfg.gammas[l] for l in cfg.active_layers}  # every gamma_l > 0
        self.disagree, self.feat_eps = cfg.feature_weighting == "disagree", cfg.feat_eps
        has_non_kd = self.alpha < 1 or bool(self.gammas)
        self.weighting = weighting_for(cfg, dist, keep_graph=has_non_kd)
        # diagnostics: other parameter sets' batch weights on the same steps (no effect on training)
        self.compared = {name: BatchAgre(name, cfg.tau, dist) for name in cfg.agre_compare}
        self.dist, self.distributed = dist, dist.active
        self.autocast = autocast(device)  # bf16 on a GPU, nothing on the CPU
        self.memory_format = memory_format_for(device)  # channels_last on a GPU

    def step(self, model, opt, batch: Batch) -> dict:
        """One SGD update on ``batch``. Returns the objective's parts (detached means over this
        process's rows: "loss", "ce", "kd", "feat", "feat/<layer>"), "weights" [b, T] and, with
        ``cfg.agre_compare``, "agre_compare"."""
        with self.autocast:
            logits, h, projected = model(batch.x.contiguous(memory_format=self.memory_format))
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 under bf16 autocast
        logits, h = logits.to(dtype), h.to(dtype)
        opt.zero_grad(set_to_none=True)
        compared = {name: s.batch_weights(model, logits, h, batch) for name, s in self.compared.items()}
        w, kd_grads = self.weighting(model, logits, h, batch)  # [b, T], no gradient
        w = w.detach()

        a, gammas, zero = self.alpha, self.gammas, torch.zeros((), dtype=dtype, device=logits.device)
        ce = F.cross_entropy(logits, batch.y) if a < 1 else zero
        z_kd = logits if kd_grads is None else logits.detach()  # its gradient is known: kd_grads
        kd = (w.to(dtype) * kd_per_teacher(z_kd, batch.teacher_logits, self.tau)).sum(1).mean()
        feat = {l: feature_loss(projected[l], batch.teacher_feats[l], w, self.disagree, self.feat_eps)
                for l in gammas}
        loss = (1 - a) * ce + a * kd + sum((g * feat[l] for l, g in gammas.items()), zero)  # the objective

        self.backward(model, loss, batch.share, kd_grads, w[0])
        opt.step()
        out = {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(),
               "feat": sum((f.detach() for f in feat.values()), zero), "weights": w,
               **{f"feat/{l}": f.detach() for l, f in feat.items()}}
        if compared:
            out["agre_compare"] = {name: weight_agreement(w[0].double(), wx.double())
                                   for name, wx in compared.items()}
        return out

    def backward(self, model, loss: Tensor, share: float, kd_grads=None, w: Tensor | None = None) -> None:
        """The global batch's gradient of the objective in every ``p.grad``.

        ``loss`` is this process's: scaled by its ``share`` of the global batch before its
        backward pass (the global BatchNorm's backward adds every process's cotangents, which must
        carry their own share), then summed over the processes. With ``kd_grads`` (the study's
        batch weights over all parameters: the parameters and each teacher's ``g_t`` over them,
        already global) the KD term
        of ``loss`` carries no gradient and ``alpha sum_t w_t g_t`` is added exactly, over all
        parameters at once (one host sync per step); a loss with no other term needs no backward.
        """
        if loss.requires_grad:
            (loss * share if self.distributed else loss).backward()
        if self.distributed:
            self.dist.all_sum([p.grad for p in model.parameters() if p.grad is not None])
        if kd_grads is None:
            return
        params, grads = kd_grads
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            acc = [p.grad for p in params]
            for w_t, g in zip((self.alpha * w).tolist(), grads):
                torch._foreach_add_(acc, g, alpha=w_t)
