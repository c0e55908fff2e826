"""The distillation task, built once per run: the teacher source, the teacher weighting and the objective.

``DistillTask.step(model, opt, batch)`` is the method's algorithm box for one batch
(docs/method.md#the-training-step):

1. the student's forward pass on the batch's images;
2. the teacher weights ``w`` from the weighting strategy of ``cfg.weighting`` (one class per mode
   below, each the formula of docs/method.md#teacher-weighting, the maths in core.weighting);
3. the objective ``(1 - alpha) CE + alpha mean_i sum_t w_t(i) l_t(i) + sum_l gamma_l L_feat_l``
   (:class:`distill.losses.Objective`) and its backward pass;
4. one optimiser step.

For the study's batch AGRE-KD over all parameters the T + 1 gradients that give the weights also
give the KD part of the update exactly (``sum_t w_t g_t``, the weights being constants), so only
the CE and feature terms take a further backward pass, and none when there are none. Under
torchrun the batch is this process's share of a global batch: every gradient, those of the
weights too, is summed over the processes (:class:`core.distributed.Dist`), so the weights and the
update are the global batch's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from core.distributed import Dist
from core.runtime import autocast, memory_format_for
from core.weighting import (agre_batch_weights_from_grads, agre_weights, at_least_float32, aver_weights,
                            kd_per_teacher, last_layer_gradients, weight_agreement)
from distill.config import DistillConfig
from distill.data import Batch
from distill.losses import Objective


def loss_gradients(losses: Sequence[Tensor], params: Sequence[Tensor], keep_graph: bool = True) -> list[list[Tensor]]:
    """``grad_theta loss`` for each scalar loss, one backward pass each, as lists over ``params``;
    a parameter a loss does not reach gets zeros. The graph is kept after the last pass only with
    ``keep_graph`` (for a further backward); ``.grad`` of the parameters is left as it was.

    ``loss.backward(inputs=params)`` rather than ``torch.autograd.grad``: the same gradients, and
    measured 1.4x faster for ResNet-18 on a 2-core CPU (6 gradients: 0.88 s vs 1.23 s).
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

    With ``all`` the call also returns the ``g_t`` (over ``model.agre_params("all")``): the exact
    KD gradient of the step is ``alpha sum_t w_t g_t``. ``keep_graph``: a further backward pass
    follows on the same graph.
    """

    def __init__(self, params: str, tau: float, dist: Dist, keep_graph: bool = True):
        self.params, self.tau, self.dist = params, tau, dist
        self.exact = params == "all"
        self.keep_graph = keep_graph or not self.exact  # layer4: the whole loss backward follows

    def gradients(self, model, logits: Tensor, h: Tensor, batch: Batch):
        """(``g_t`` for each teacher, ``g_b``) as lists over the parameter set, summed over the processes."""
        zt, zb, share, dist = batch.teacher_logits, batch.biased_logits, batch.share, self.dist
        if self.params == "last":  # closed form of this process's rows: scaled after
            g_t, g_b = last_layer_gradients(logits, h, zt, zb, self.tau)
            if dist.active:
                for g in (*g_t, g_b):
                    g[0].mul_(share)
        else:  # through the network (and the global BatchNorm): scaled before the backward passes
            losses = [kd_per_teacher(logits, zb[:, None], self.tau).mean(), *kd_per_teacher(logits, zt, self.tau).mean(0)]
            g_b, *g_t = loss_gradients([l * share for l in losses] if dist.active else losses,
                                       model.agre_params(self.params), keep_graph=self.keep_graph)
        if dist.active:
            dist.all_sum([g for gs in (*g_t, g_b) for g in gs])
        return g_t, g_b

    def batch_weights(self, model, logits: Tensor, h: Tensor, batch: Batch) -> Tensor:
        """The [T] weights of the batch."""
        g_t, g_b = self.gradients(model, logits, h, batch)
        return agre_batch_weights_from_grads(g_t, g_b, logits.dtype)

    def __call__(self, model, logits: Tensor, h: Tensor, batch: Batch):
        g_t, g_b = self.gradients(model, logits, h, batch)
        w = agre_batch_weights_from_grads(g_t, g_b, logits.dtype).unsqueeze(0).expand(len(batch.y), -1)
        return w, (g_t if self.exact else None)


def weighting_for(cfg: DistillConfig, dist: Dist, keep_graph: bool):
    """The weighting strategy of ``cfg.weighting`` (``keep_graph``: a further backward pass follows)."""
    if cfg.weighting == "agre-batch":
        return BatchAgre(cfg.agre_params, cfg.tau, dist, keep_graph)
    return {"aver": Uniform, "agre": lambda: PerSampleAgre(cfg.tau), "cached": CachedAgre}[cfg.weighting]()


class DistillTask:
    """Teachers, weighting and objective of one run (see the module docstring).

    ``teachers``: the run's teacher source of :mod:`distill.teachers` (the cache, or live
    teachers); the batches (:class:`distill.data.Batches`) come with its outputs.
    """

    def __init__(self, cfg: DistillConfig, teachers, device, dist: Dist = Dist()):
        self.cfg, self.teachers, self.device, self.dist = cfg, teachers, device, dist
        self.objective = Objective.from_config(cfg)
        self.weighting = weighting_for(cfg, dist, keep_graph=self.objective.has_non_kd)
        # diagnostics: other parameter sets' batch weights on the same steps (no effect on training)
        self.compared = {name: BatchAgre(name, cfg.tau, dist) for name in cfg.agre_compare}

    def step(self, model, opt, batch: Batch) -> dict:
        """One SGD update on ``batch``. Returns the objective's parts (detached means over this
        process's rows; ``"weights"`` [b, T]; ``"agre_compare"`` with ``cfg.agre_compare``)."""
        with autocast(self.device):
            logits, h, projected = model(batch.x.contiguous(memory_format=memory_format_for(self.device)))
        logits, h = logits.to(at_least_float32(logits)), h.to(at_least_float32(h))  # bf16 under autocast
        opt.zero_grad(set_to_none=True)
        compared = {name: s.batch_weights(model, logits, h, batch) for name, s in self.compared.items()}
        w, kd_grads = self.weighting(model, logits, h, batch)
        out = self.objective(logits, projected, batch, w)
        if kd_grads is None or self.objective.has_non_kd:
            loss = out["loss"] if kd_grads is None else out["non_kd"]
            (loss * batch.share if self.dist.active else loss).backward()
        self._sum_gradients(model)
        if kd_grads is not None:
            self._add_kd_gradient(model, w[0], kd_grads)
        opt.step()
        if compared:
            out["agre_compare"] = {name: weight_agreement(w[0].detach().double(), wx.double())
                                   for name, wx in compared.items()}
        return out

    def _sum_gradients(self, model) -> None:
        """The global batch's gradient: the sum of the processes' gradients of ``share_r * loss_r``
        (nothing alone). The share scales the loss before its backward pass, not the gradient after:
        the global BatchNorm's backward adds every process's cotangents, which must carry their own
        process's share."""
        if self.dist.active:
            self.dist.all_sum([p.grad for p in model.parameters() if p.grad is not None])

    @torch.no_grad()
    def _add_kd_gradient(self, model, w: Tensor, grads) -> None:
        """``p.grad += alpha sum_t w_t g_t`` over all parameters at once (one host sync per step)."""
        params = model.agre_params("all")
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        acc = [p.grad for p in params]
        for w_t, g in zip((self.cfg.alpha * w).tolist(), grads):
            torch._foreach_add_(acc, g, alpha=w_t)
