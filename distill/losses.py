"""Distillation objective: cross-entropy + weighted ensemble KD + weighted-teacher feature matching.

``L = (1 - alpha) CE(y, z_s) + alpha mean_i sum_t w_t(i) l_t(i) + sum_l gamma_l L_feat_l``
(docs/method.md#the-objective), with ``l_t(i) = tau^2 KL(p_t(i) || p_s(i))`` and teacher weights
``w_t(i)`` from :mod:`core.weighting` (AGRE-KD: Kenfack et al., "Adaptive group robust ensemble
knowledge distillation", 2024). Weights never carry gradient.

This runs every training step: nothing here synchronises with the device (no ``.item()``); the
reported parts are detached scalar tensors for the loop to log.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.weighting import at_least_float32, kd_per_teacher


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
    dtype = at_least_float32(projected)
    feats = teacher_feats.detach().to(dtype)
    # An elementwise weighted sum, not einsum: autocast would run a matmul in half precision.
    target = (weights.detach().to(dtype).unsqueeze(-1) * feats).sum(1)  # [B, D]
    sq = (projected.to(dtype) - target).pow(2)
    if disagree:
        conf = 1.0 / (feats.var(dim=1, correction=0) + eps)  # [B, D]
        sq = sq * (conf / conf.mean(dim=1, keepdim=True))
    return sq.mean()


class Objective:
    """The full objective of one batch, with its parts for logging (timm's task contract):
    ``L = (1 - alpha) CE(y, z_s) + alpha mean_i sum_t w_t(i) l_t(i) + sum_l gamma_l L_feat_l``
    (docs/method.md#the-objective).

    CE is skipped when ``alpha == 1`` and a layer's feature loss when ``gamma_l == 0`` (reported as
    0); only the layers named in ``gammas`` are distilled.

    Args:
        tau: KD temperature; alpha: KD weight in [0, 1].
        gammas: layer -> feature-loss weight.
        disagree, eps: disagreement weighting of the feature loss (:func:`feature_loss`).
    """

    def __init__(self, tau: float, alpha: float, gammas: dict[str, float] | None = None,
                 disagree: bool = False, eps: float = 1e-6):
        self.tau, self.alpha, self.gammas = tau, alpha, dict(gammas or {})
        self.disagree, self.eps = disagree, eps
        bad = {l: g for l, g in self.gammas.items() if g < 0}
        if bad:
            raise ValueError(f"feature-loss gammas must be >= 0, got {bad}")

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        """The objective of a :class:`distill.config.DistillConfig` (its distilled layers only)."""
        return cls(cfg.tau, cfg.alpha, {l: cfg.gammas[l] for l in cfg.active_layers},
                   cfg.feature_weighting == "disagree", cfg.feat_eps)

    @property
    def has_non_kd(self) -> bool:
        """Whether the objective has terms besides KD (CE or a feature loss), with a gradient."""
        return self.alpha < 1 or any(g > 0 for g in self.gammas.values())

    def __call__(self, student_logits: Tensor, projected: dict[str, Tensor], batch, weights: Tensor) -> dict:
        """The objective on ``batch`` (a :class:`distill.data.Batch`: ``y`` [B], ``teacher_logits``
        [B, T, C], ``teacher_feats`` {layer: [B, T, D_l]}) for student logits [B, C], adapted
        student features {layer: [B, D_l]} and teacher weights [B, T] (detached here).

        Returns ``{"loss": scalar with grad, "non_kd": the loss without its KD term, ``(1 - alpha) CE
        + sum_l gamma_l L_feat`` (with grad when not zero), "ce", "kd", "feat": detached scalars,
        "feat/<layer>": each layer's unweighted L_feat, "weights": [B, T] detached}``; ``"feat"`` is
        the unweighted sum of the per-layer losses.
        """
        y, teacher_logits, teacher_feats = batch.y, batch.teacher_logits, batch.teacher_feats
        if student_logits.ndim != 2 or teacher_logits.ndim != 3:
            raise ValueError(f"student_logits must be [B, C] and teacher_logits [B, T, C], got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        B, T, _ = teacher_logits.shape
        if tuple(weights.shape) != (B, T) or tuple(y.shape) != (B,):
            raise ValueError(f"weights must be [B, T] = [{B}, {T}] and y [B], got "
                             f"{tuple(weights.shape)} and {tuple(y.shape)}")
        weights = weights.detach()
        dtype = at_least_float32(student_logits)

        def zero() -> Tensor:
            return torch.zeros((), dtype=dtype, device=student_logits.device)

        kd = (weights.to(dtype) * kd_per_teacher(student_logits, teacher_logits, self.tau)).sum(1).mean()
        ce = F.cross_entropy(student_logits.to(dtype), y) if self.alpha < 1 else zero()
        feat = {l: self._feature_loss(l, projected, teacher_feats, weights) if g > 0 else zero()
                for l, g in self.gammas.items()}

        non_kd = (1 - self.alpha) * ce + sum((g * feat[l] for l, g in self.gammas.items() if g > 0), zero())
        loss = self.alpha * kd + non_kd  # L = (1 - alpha) CE + alpha KD + sum_l gamma_l L_feat_l

        return {"loss": loss, "non_kd": non_kd, "ce": ce.detach(), "kd": kd.detach(),
                "feat": sum((f.detach() for f in feat.values()), zero()), "weights": weights,
                **{f"feat/{l}": f.detach() for l, f in feat.items()}}

    def _feature_loss(self, layer: str, projected, teacher_feats, weights: Tensor) -> Tensor:
        if projected is None or teacher_feats is None or layer not in projected or layer not in teacher_feats:
            raise ValueError(f"feature layer {layer!r} has gamma {self.gammas[layer]} but no projected student "
                             "or teacher features were given for it")
        return feature_loss(projected[layer], teacher_feats[layer], weights, self.disagree, self.eps)
