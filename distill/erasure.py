"""Linear concept erasure (LEACE) of the spurious attribute from the teachers' cached features.

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form", Thm. 4.3):
for features X and a concept Z (here the one-hot spurious attribute), with Sigma_XX = Cov(X),
Sigma_XZ = Cov(X, Z), the whitening W = (Sigma_XX^{1/2})^+ and the orthogonal projection
proj(A) = U U^T onto the column space of A = W Sigma_XZ (U: its left singular vectors),

    P = W^+ U U^T W,          r(x) = x - P (x - mu_X).

After r, Cov(r(X), Z) = 0: no linear classifier predicts Z better than a constant, and among
the erasers that guarantee it r moves X least in the mean squared (Sigma_XX^+) sense. P has rank
k <= (number of attribute values - 1), so it is stored as ``left`` [D, k] = W^+ U and ``right``
[k, D] = U^T W, and applied as x - ((x - mu) right^T) left^T. Everything is fit in float64; rank
deficiency (more dimensions than validation rows) is handled as ``torch.linalg.pinv`` does: an
eigenvalue of Sigma_XX (a singular value of W Sigma_XZ) counts only above ``max(shape) * eps``
times the largest.

``--feature-target erased`` fits one eraser per layer, per distinct backbone and **per class** on
the eval-view rows of the training and validation splits (their attribute labels), and applies to
each teacher feature the eraser of its backbone and of the row's class (training rows have their
labels). Per class, because the attribute moves the features of landbirds and waterbirds in
different directions: erasing it over all rows equalises only the pooled means, and a probe on a
landbird-heavy split then reads it from the landbirds' direction. Measured on the synthetic
default's test rows (held-out probe, layer2/3/4; chance 50.4%): fit on validation only, over all
rows, 59.5 / 68.1 / 75.8%; per class on training + validation rows 57.9 / 61.9 / 63.8%. What is
left is the sampling error of each class's estimated attribute direction, which shrinks only as
(dimensions / fit rows): the same per-class fit on a third of the TEST rows' own labels leaves
57.3 / 61.2 / 63.1% on the other two thirds (a fit on the probe's own half reads 47-50%, but only
because that half is erased exactly), and a validation split 4, 16 and 64 times the default's
(``data.synth.SynthSpec.val_factor``; fit on training + validation) leaves 54.8 / 55.1 / 61.1%,
53.9 / 55.1 / 60.4% and 54.3 / 53.2 / 57.2% (docs/results.md#the-demo).
:func:`probe_attribute` measures how well a held-out
linear probe still recovers the attribute from raw and from erased features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.metrics import probe_accuracy

FIT_SPLITS = ("train", "val")  # the rows the erasers are fit on (eval view)


@dataclass(frozen=True)
class Eraser:
    """r(x) = x - ((x - mean) right^T) left^T for x [..., D] (float64 tensors as fitted)."""

    mean: torch.Tensor   # [D]
    left: torch.Tensor   # [D, k]
    right: torch.Tensor  # [k, D]

    @property
    def P(self) -> torch.Tensor:
        """The rank-k oblique projection P [D, D] that r subtracts."""
        return self.left @ self.right

    def __call__(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=self.mean.dtype)
        return x - ((x - self.mean) @ self.right.T) @ self.left.T


def one_hot(z) -> torch.Tensor:
    """[n] attribute values -> [n, k] float64 one-hot over the values present."""
    z = np.asarray(z).reshape(-1)
    values = np.unique(z)
    return torch.from_numpy((z[:, None] == values[None, :]).astype(np.float64))


def fit_leace(x, z) -> Eraser:
    """The LEACE eraser of concept ``z`` ([n] labels, or [n, k] already encoded) from ``x`` [n, D]."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    z = torch.as_tensor(np.asarray(z), dtype=torch.float64)
    z = one_hot(z.numpy()) if z.ndim == 1 else z
    n, D = x.shape
    if n < 2:
        raise ValueError(f"LEACE needs at least 2 rows, got {n}")
    mean = x.mean(0)
    xc, zc = x - mean, z - z.mean(0)
    sigma_xx = (xc.T @ xc) / (n - 1)
    sigma_xx = (sigma_xx + sigma_xx.T) / 2
    sigma_xz = (xc.T @ zc) / (n - 1)
    eps = torch.finfo(torch.float64).eps
    L, V = torch.linalg.eigh(sigma_xx)
    keep = L > L[-1].clamp_min(0) * D * eps
    L = L.clamp_min(0)
    root = torch.where(keep, L.sqrt(), torch.zeros_like(L))
    inv_root = torch.where(keep, L.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(L))
    W = (V * inv_root) @ V.T       # (Sigma^{1/2})^+
    W_pinv = (V * root) @ V.T      # Sigma^{1/2} = W^+
    U, s, _ = torch.linalg.svd(W @ sigma_xz, full_matrices=False)
    rank = int((s > s[0] * max(W.shape[0], sigma_xz.shape[1]) * eps).sum()) if s.numel() and s[0] > 0 else 0
    U = U[:, :rank]
    return Eraser(mean, W_pinv @ U, U.T @ W)


# ----------------------------------------------------------------------------- in training

class TeacherFeatureEraser:
    """The erasers of every distilled layer, one per (class, backbone), indexed per teacher and kept
    on the device: ``(layer, feats [b, T, D], y [b]) -> erased float32 feats``, no host sync."""

    def __init__(self, erasers: dict[str, list[list[Eraser]]], backbone_of_teacher, device):
        self.erasers, self.params = erasers, {}  # erasers: as fit, for the run's probe
        idx = torch.as_tensor(np.asarray(backbone_of_teacher), dtype=torch.long)
        for layer, per_class in erasers.items():
            flat = [e for per_backbone in per_class for e in per_backbone]
            k = max(e.left.shape[1] for e in flat)
            C, B, D = len(per_class), len(per_class[0]), flat[0].mean.shape[0]
            mean = torch.zeros(C, B, D, dtype=torch.float64)
            left = torch.zeros(C, B, D, k, dtype=torch.float64)
            right = torch.zeros(C, B, k, D, dtype=torch.float64)
            for c, per_backbone in enumerate(per_class):  # an eraser of lower rank: zero padding
                for b, e in enumerate(per_backbone):
                    mean[c, b], left[c, b, :, :e.left.shape[1]], right[c, b, :e.right.shape[0]] = \
                        e.mean, e.left, e.right
            self.params[layer] = tuple(t.index_select(1, idx).float().to(device) for t in (mean, left, right))

    def __call__(self, layer: str, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, left, right = (t[y] for t in self.params[layer])     # [b, T, D], [b, T, D, k], [b, T, k, D]
        delta = feats.float() - mean
        coef = torch.einsum("btd,btkd->btk", delta, right)
        return feats.float() - torch.einsum("btk,btdk->btd", coef, left)


def fit_erasers(cache, layers) -> dict[str, list[list[Eraser]]]:
    """``{layer: [[Eraser per backbone] per class]}`` fit on the cache's training and validation
    rows (eval view), one class at a time; a class whose rows hold a single attribute value gets
    the identity (nothing to erase there)."""
    layers = list(layers)
    parts = [cache.read_eval(split=s, fields=(), layers=layers) for s in FIT_SPLITS]
    attr = np.concatenate([np.asarray(d["attr"]) for d in parts])
    y = np.concatenate([np.asarray(d["y"]) for d in parts])
    classes = range(cache.meta.num_classes)
    if all(len(np.unique(attr[y == c])) < 2 for c in classes):
        from distill.data import DistillError

        raise DistillError(f"{cache.path}: no class of the {' and '.join(FIT_SPLITS)} splits holds both "
                           "attribute values; nothing to erase (--feature-target erased needs them)")
    out = {}
    for l in layers:
        f = np.concatenate([d["features"][l] for d in parts])
        out[l] = [[_fit_or_identity(f[y == c, b].astype(np.float64), attr[y == c]) for b in range(f.shape[1])]
                  for c in classes]
    return out


def _fit_or_identity(x: np.ndarray, z: np.ndarray) -> Eraser:
    if len(np.unique(z)) > 1:
        return fit_leace(x, z)
    zero = torch.zeros(x.shape[1], dtype=torch.float64)
    return Eraser(zero, zero[:, None], zero[None, :])


def teacher_eraser(cache_path, layers, backbone_of_teacher, device) -> TeacherFeatureEraser:
    from cache.reader import open_cache

    with open_cache(cache_path) as cache:
        return TeacherFeatureEraser(fit_erasers(cache, layers), backbone_of_teacher, device)


# ----------------------------------------------------------------------------- the probe

def probe_split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def probe_attribute(cache, layers=None, split: str = "test", seed: int = 0, erasers=None) -> dict:
    """How well a linear probe recovers the spurious attribute from raw and erased features.

    The erasers are fit as in training (:func:`fit_erasers`) and applied per row's class; the
    probe (logistic regression, C = 1, standardised features) is trained on a random half of
    ``split`` and scored on the other half, for each layer and backbone. ``chance`` is the
    majority rate of the scored half. Returns ``{"fit_split", "probe_split", "layers": {layer:
    [{"backbone", "raw", "erased", "chance", "n_train", "n_test"}]}}`` (accuracies in [0, 1]).
    ``erasers``: already fit on this cache for ``layers`` (a run's), else fit here.
    """
    layers = list(cache.meta.layers if layers is None else layers)
    erasers = fit_erasers(cache, layers) if erasers is None else erasers
    d = cache.read_eval(split=split, fields=(), layers=layers)
    attr, y = np.asarray(d["attr"]), np.asarray(d["y"])
    a, b = probe_split_halves(len(attr), seed)
    out = {}
    for layer in layers:
        f = d["features"][layer]
        rows = []
        for bb in range(f.shape[1]):
            raw = f[:, bb].astype(np.float64)
            erased = raw.copy()
            for c, per_backbone in enumerate(erasers[layer]):
                erased[y == c] = per_backbone[bb](raw[y == c]).numpy()
            chance = float(np.max(np.bincount(attr[b].astype(np.int64))) / len(b)) if len(b) else float("nan")
            rows.append({"backbone": bb, "raw": probe_accuracy(raw[a], attr[a], raw[b], attr[b]),
                         "erased": probe_accuracy(erased[a], attr[a], erased[b], attr[b]),
                         "chance": chance, "n_train": int(len(a)), "n_test": int(len(b))})
        out[layer] = rows
    return {"fit_split": "+".join(FIT_SPLITS), "probe_split": split, "layers": out}


def format_probe(result: dict) -> str:
    """The probe's table: one line per layer and backbone, accuracies in percent."""
    lines = [f"Linear probe for the spurious attribute (erasers fit per class on {result['fit_split']}; "
             f"probe trained on half of {result['probe_split']}, scored on the other half)",
             "layer    backbone  raw %   erased %  chance %  (train/test rows)"]
    for layer, rows in result["layers"].items():
        for r in rows:
            lines.append(f"{layer:<8} {r['backbone']:>8}  {100 * r['raw']:6.2f}  {100 * r['erased']:8.2f}  "
                         f"{100 * r['chance']:8.2f}  ({r['n_train']}/{r['n_test']})")
    return "\n".join(lines)


def eraser_for(cfg, meta, device, num_teachers: int | None = None) -> TeacherFeatureEraser | None:
    """The run's feature eraser: None for ``feature_target`` raw or no distilled layer (the teacher
    features are then used as they are, bit for bit); else fit on ``cfg.cache``'s training and
    validation rows, one per layer, class and backbone of the cache's teachers (the online loop's
    teachers must be the cache's: same count, same order)."""
    if cfg.feature_target == "raw" or not cfg.active_layers:
        return None
    if num_teachers is not None and num_teachers != meta.num_teachers:
        from distill.data import DistillError

        raise DistillError(f"--feature-target erased fits its erasers on the cache's teachers "
                           f"({meta.num_teachers}); the online teachers are {num_teachers}: use the "
                           "cache's own manifest")
    return teacher_eraser(cfg.cache, cfg.active_layers, meta.backbone_of_teacher, device)
