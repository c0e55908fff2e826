"""The maths of teacher weighting that both stages use: AVER, AGRE-KD, the study's batch AGRE, cached AGRE.

Formulas only (docs/method.md#teacher-weighting); the strategies that apply them to a training
batch are in :mod:`distill.task`. Notation: student logits ``z_s`` [B, C], teacher logits ``z_t``
[B, T, C], biased-model logits ``z_b`` [B, C], temperature ``tau``, ``p_x = softmax(z_x / tau)``,
student penultimate features ``h`` [B, D]. The KD loss of teacher t on sample i is
``l_t(i) = tau^2 KL(p_t(i) || p_s(i))`` and the bias loss is ``l_b(i) = tau^2 KL(p_b(i) || p_s(i))``.

AGRE-KD (Kenfack et al., "Adaptive group robust ensemble knowledge distillation", 2024, Eq. 5)
weights teacher t on sample i by how far its gradient points away from the biased model's:
``W_t(i) = 1 - cos(grad l_t(i), grad l_b(i))``, ``w_t(i) = W_t(i) / sum_t' W_t'(i)``. For the
student's last layer ``z_s = A h + a`` the gradient is ``tau (p_s - p_t) (x) [h; 1]``; the common
factor ``[h; 1]`` cancels in the cosine, so ``cos = cos(p_s - p_t, p_s - p_b)`` in class space.

Every weight returned here is detached: weights never carry gradient.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# Rounding leaves 1 - cos ~ 1e-16 for exactly parallel gradients in float64. Without snapping,
# a row of such residues would be normalised into arbitrary weights instead of taking the
# all-zero fallback, and the two-class gate W in {0, 2} would not be exact.
_PARALLEL_TOL = 1e-9
# A gradient (difference) vector shorter than this counts as zero: its direction is noise.
_ZERO_NORM = 1e-12
# Floor of the study's batch weights, max(1 - cos, 0.01): no teacher is ever switched off.
BATCH_FLOOR = 0.01


def _wide_dtype(device: torch.device) -> torch.dtype:
    # Cosines of nearly parallel vectors need float64 to reproduce the exact gate; MPS has none.
    return torch.float32 if device.type == "mps" else torch.float64


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support has nothing to disable
        return contextlib.nullcontext()


def _probs(logits: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    return F.softmax(logits.detach().to(dtype) / tau, dim=-1)


def _check_logits(student_logits: Tensor | None, teacher_logits: Tensor,
                  biased_logits: Tensor | None = None) -> None:
    if teacher_logits.ndim != 3:
        raise ValueError(f"teacher_logits must be [B, T, C], got shape {tuple(teacher_logits.shape)}")
    B, _, C = teacher_logits.shape
    for name, x in (("student_logits", student_logits), ("biased_logits", biased_logits)):
        if x is not None and tuple(x.shape) != (B, C):
            raise ValueError(f"{name} must be [B, C] = [{B}, {C}] to match teacher_logits "
                             f"{tuple(teacher_logits.shape)}, got {tuple(x.shape)}")


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last dim (broadcasting), defined as 0 when either vector is zero."""
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    nonzero = (na > _ZERO_NORM) & (nb > _ZERO_NORM)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(_ZERO_NORM ** 2)
    return torch.where(nonzero, cos.clamp(-1.0, 1.0), torch.zeros_like(cos))


def _agre_normalised(p_ref: Tensor, p_t: Tensor, p_b: Tensor) -> Tensor:
    """AGRE weights from probabilities: p_ref [..., C], p_t [..., T, C], p_b [..., C] -> [..., T]."""
    cos = _cosine(p_ref.unsqueeze(-2) - p_t, (p_ref - p_b).unsqueeze(-2))
    W = 1.0 - cos
    W = torch.where(W > _PARALLEL_TOL, W, torch.zeros_like(W))
    total = W.sum(-1, keepdim=True)
    uniform = torch.full_like(W, 1.0 / W.shape[-1])
    return torch.where(total > 0, W / total.clamp_min(_PARALLEL_TOL), uniform)


def kd_per_teacher(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Per-sample, per-teacher KD loss ``l_t(i) = tau^2 KL(p_t(i) || p_s(i))``.

    The standard Hinton direction, as in the study's code, i.e.
    ``F.kl_div(log_softmax(z_s / tau), softmax(z_t / tau), reduction="none").sum(-1) * tau^2``.

    Args:
        student_logits: [B, C], differentiable.
        teacher_logits: [B, T, C], treated as constant targets (detached).
        tau: temperature > 0.
    Returns:
        [B, T] losses in at least float32 (half-precision logits are upcast first).
    """
    _check_logits(student_logits, teacher_logits)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_ps = F.log_softmax(student_logits.to(dtype) / tau, dim=-1).unsqueeze(1)  # [B, 1, C]
    log_pt = F.log_softmax(teacher_logits.detach().to(dtype) / tau, dim=-1)      # [B, T, C]
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1) * tau**2


@torch.no_grad()
def agre_weights(student_logits: Tensor, teacher_logits: Tensor, biased_logits: Tensor,
                 tau: float) -> Tensor:
    """Per-sample AGRE-KD weights (Kenfack et al. 2024, Eq. 5), gradients at the last layer.

    ``W_t(i) = 1 - cos(p_s(i) - p_t(i), p_s(i) - p_b(i))``, the closed form of the cosine between
    the gradients of ``l_t(i)`` and ``l_b(i)`` w.r.t. the student's last-layer weight and bias.
    ``w_t(i) = W_t(i) / sum_t W_t(i)``; a row with every ``W_t(i) = 0`` becomes uniform ``1/T``;
    the cosine with a zero vector (a teacher, or the biased model, equal to the student) is 0.
    With C = 2 all difference vectors are collinear, so ``W in {0, 2}``: a hard gate, as in the
    paper's formula.

    Args:
        student_logits: [B, C]; teacher_logits: [B, T, C]; biased_logits: [B, C]; tau > 0.
    Returns:
        [B, T] weights, rows summing to 1, no gradient.
    """
    _check_logits(student_logits, teacher_logits, biased_logits)
    wide = _wide_dtype(student_logits.device)
    w = _agre_normalised(_probs(student_logits, tau, wide), _probs(teacher_logits, tau, wide),
                         _probs(biased_logits, tau, wide))
    return w.to(torch.promote_types(student_logits.dtype, torch.float32))


@torch.no_grad()
def cached_agre_weights(teacher_logits: Tensor, biased_logits: Tensor, tau: float) -> Tensor:
    """Student-independent AGRE weights, written once into the cache (``/weights/agre_cached``).

    The :func:`agre_weights` formula with the student replaced by the uniform prediction
    ``u = 1/C``: ``W_t(i) = 1 - cos(u - p_t(i), u - p_b(i))``, normalised over t, with the same
    all-zero fallback and zero-vector convention.

    Args:
        teacher_logits: [N, T, C]; biased_logits: [N, C] (any equal leading dims also work,
            e.g. [N, V, T, C] and [N, V, C] for cached views); tau > 0.
    Returns:
        [N, T] weights (float32 unless the logits are float64), rows summing to 1.
    """
    if teacher_logits.ndim < 2 or tuple(biased_logits.shape) != (
            tuple(teacher_logits.shape[:-2]) + tuple(teacher_logits.shape[-1:])):
        raise ValueError(f"teacher_logits [..., T, C] {tuple(teacher_logits.shape)} and "
                         f"biased_logits [..., C] {tuple(biased_logits.shape)} do not match")
    wide = _wide_dtype(teacher_logits.device)
    p_b = _probs(biased_logits, tau, wide)
    u = torch.full_like(p_b, 1.0 / p_b.shape[-1])
    w = _agre_normalised(u, _probs(teacher_logits, tau, wide), p_b)
    return w.to(torch.promote_types(teacher_logits.dtype, torch.float32))


def aver_weights(teacher_logits: Tensor) -> Tensor:
    """AVER baseline: every teacher weighted ``1/T``. teacher_logits [B, T, C] -> [B, T]."""
    if teacher_logits.ndim != 3:
        raise ValueError(f"teacher_logits must be [B, T, C], got shape {tuple(teacher_logits.shape)}")
    B, T, _ = teacher_logits.shape
    return torch.full((B, T), 1.0 / T, dtype=torch.promote_types(teacher_logits.dtype, torch.float32),
                      device=teacher_logits.device)


@torch.no_grad()
def last_layer_gradients(student_logits: Tensor, penultimate: Tensor, teacher_logits: Tensor,
                         biased_logits: Tensor, tau: float) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Closed form of the study's batch gradients w.r.t. the student's last layer (weight [C, D],
    bias [C]): ``g_t = (tau / B) sum_i (p_s(i) - p_t(i)) (x) [h_i; 1]`` for each teacher, likewise
    ``g_b`` for the biased model (``penultimate`` [B, D] is ``h``). Unlike per-sample AGRE,
    ``[h_i; 1]`` differs across the summed samples and does not cancel in the cosine.
    Returns (T lists of one [C, D + 1] tensor, a list of one [C, D + 1]), in float64 where available."""
    _check_logits(student_logits, teacher_logits, biased_logits)
    B = student_logits.shape[0]
    if penultimate.ndim != 2 or penultimate.shape[0] != B:
        raise ValueError(f"penultimate must be [B, D] with B = {B}, got {tuple(penultimate.shape)}")
    wide = _wide_dtype(student_logits.device)
    p_s = _probs(student_logits, tau, wide)
    h1 = torch.cat([penultimate.detach().to(wide), p_s.new_ones(B, 1)], dim=1)  # [B, D + 1]
    scale = tau / B
    # Autocast would run einsum in half precision on float32 inputs (MPS); the cosine needs more.
    with _no_autocast(student_logits.device):
        g_t = scale * torch.einsum("btc,bd->tcd", p_s.unsqueeze(1) - _probs(teacher_logits, tau, wide), h1)
        g_b = scale * torch.einsum("bc,bd->cd", p_s - _probs(biased_logits, tau, wide), h1)
    return [[g] for g in g_t], [g_b]


def agre_batch_weights_from_grads(teacher_grads: Sequence[Sequence[Tensor]],
                                  biased_grads: Sequence[Tensor],
                                  dtype: torch.dtype = torch.float32) -> Tensor:
    """``w_t = max(1 - cos(g_t, g_b), 0.01)`` normalised to sum 1, from the gradients as lists of
    per-parameter tensors (the cosine of the flattened, concatenated vectors; with a zero vector
    it is 0). Returns [T] in ``dtype``.

    The 2T + 1 inner products are taken per parameter by ``torch.dot`` in the gradients' dtype (no
    temporary, no concatenated copy of the whole gradient; several times faster than a float64
    elementwise product, docs/results.md#speed) and summed over parameters in float64: within
    1e-6 of the all-float64 weights for float32 gradients (tests/test_weighting.py)."""
    wide = _wide_dtype(biased_grads[0].device)
    with torch.no_grad():
        per_param = []
        for j, b in enumerate(biased_grads):
            b = b.reshape(-1)
            ts = [g[j].reshape(-1) for g in teacher_grads]
            per_param.append(torch.stack([torch.dot(b, b), *(torch.dot(t, t) for t in ts),
                                          *(torch.dot(t, b) for t in ts)]))
        sums = torch.stack(per_param).to(wide).sum(0)  # [bb, tt_1..tt_T, tb_1..tb_T]
        T = len(teacher_grads)
        bb, tt, tb = sums[0], sums[1:T + 1], sums[T + 1:]
        nonzero = (tt.sqrt() > _ZERO_NORM) & (bb.sqrt() > _ZERO_NORM)
        cos = (tb / (tt * bb).sqrt().clamp_min(_ZERO_NORM ** 2)).clamp(-1.0, 1.0)
        cos = torch.where(nonzero, cos, torch.zeros_like(cos))
        W = (1.0 - cos).clamp_min(BATCH_FLOOR)
        return (W / W.sum()).to(dtype)


def weight_agreement(reference: Tensor, other: Tensor) -> dict[str, Tensor]:
    """How well batch weights ``other`` [T] agree with ``reference`` [T] (both sum to 1):
    ``abs_diff`` mean |w_ref - w_other|, ``spearman`` rank correlation (ties broken by index),
    ``top`` 1 when both put the most weight on the same teacher. Scalars, no host sync."""
    def ranks(w):
        return w.argsort().argsort().to(torch.float64)
    a, b = ranks(reference), ranks(other)
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).clamp_min(_ZERO_NORM)
    return {"abs_diff": (reference - other).abs().mean().to(torch.float64), "spearman": (a * b).sum() / denom,
            "top": (reference.argmax() == other.argmax()).to(torch.float64)}
