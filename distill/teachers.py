"""The run's teachers: read from the cache (the tool), or run live (the study's loop).

:func:`teacher_source` gives one of two kinds, which :func:`distill.data.make_batch` tells apart
by ``live``:

- :class:`CachedTeachers` (``live`` False): the cache's teachers; the batch reads their outputs
  on the epoch's stored view (its slot) from the cache;
- :class:`OnlineTeachers` (``live`` True) is the study's loop, the yardstick for what the cache
  changes: a fresh ``RandomResizedCrop`` + flip of every image at every step (:meth:`crops`, per
  (seed, epoch, row), so a resumed run replays it), the teachers and the biased model run on it
  (:meth:`outputs`), nothing read from the cache.

Both carry what a run needs of its teachers: ``num_teachers``, ``feature_dims`` ({layer:
width}), ``names`` (``{"name", "role"}`` for the summary), ``layers`` (the distilled ones),
``backbone`` ([T]: the backbone of each teacher, whose features it shares) and ``erase`` (the
feature eraser of ``--feature-target erased``, or None).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cache.schema import CacheMeta
from core.ensemble import Ensemble
from core.manifest import read_manifest, verify_files
from core.models import FEATURE_DIMS
from core.runtime import autocast, epoch_seed, memory_format_for
from core.weighting import cached_agre_weights
from data.views import ViewSpec, sample_views
from distill.config import DistillConfig
from distill.data import DistillError
from distill.erasure import eraser_for


class CachedTeachers:
    """The cache's teachers: their outputs are read with each batch."""

    live = False

    def __init__(self, meta: CacheMeta, layers: tuple[str, ...], device):
        self.num_teachers = meta.num_teachers
        self.feature_dims = meta.feature_dims  # {layer: width} of the cached teacher features
        self.backbone = torch.tensor(meta.backbone_of_teacher, device=device)
        self.layers = layers
        self.names = [{"name": t["name"], "role": t["role"]} for t in meta.teachers]
        self.erase = None


class OnlineTeachers:
    """The study's loop: the teachers of ``manifest`` run live on a fresh crop of every image at
    every step, with the cache's crop distribution (scale, ratio, resize) at ``image_size``;
    ``cached_weights``: also give the ``cached`` weighting's weights, computed live."""

    live = True

    def __init__(self, meta: CacheMeta, manifest: str, layers: tuple[str, ...], image_size: int, device, *,
                 seed: int, cached_weights: bool = False):
        man = read_manifest(manifest)
        verify_files(man)
        if man.num_classes != meta.num_classes:
            raise DistillError(f"the teachers of {manifest} have {man.num_classes} classes, the cache's data "
                               f"{meta.num_classes}")
        self.device, self.seed, self.layers, self.manifest = device, seed, layers, man
        self.memory_format = memory_format_for(device)
        self.ensemble = Ensemble(man).to(device).eval().to(memory_format=self.memory_format)
        self.num_teachers = len(man.teachers)
        self.feature_dims = FEATURE_DIMS[man.teachers[0].arch]  # any layer: computed live
        self.backbone = torch.tensor(man.teacher_backbone, device=device)
        self.names = [{"name": m.name, "role": m.role} for m in man.models]
        spec = meta.view_spec  # the cache's crop distribution, eval geometry and tau
        self.spec = ViewSpec(random_views=1, out_size=image_size,
                             scale=tuple(spec.get("scale", (0.7, 1.0))),
                             ratio=tuple(spec.get("ratio", (3 / 4, 4 / 3))),
                             resize=spec.get("resize", "keep-aspect"))
        self.cached_weights, self.tau_cached = cached_weights, meta.tau_cached
        self.erase = None

    def crops(self, rows: np.ndarray, hw: np.ndarray, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop (box [b, 4], flip [b]) of each dataset row (``hw``: the images' sizes)."""
        spec = dataclasses.replace(self.spec, seed=epoch_seed(self.seed, epoch))
        box, flip = sample_views(rows, spec, hw)
        return torch.from_numpy(box[:, 1]), torch.from_numpy(flip[:, 1])

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, y: torch.Tensor):
        """(teacher logits [b, T, C], biased logits [b, C], {layer: [b, T, D]}, the ``cached``
        weighting's weights [b, T] or None) on images ``x`` of classes ``y``."""
        with autocast(self.device):
            zt, zb, f = self.ensemble(x.contiguous(memory_format=self.memory_format),
                                      self.layers or ("layer4",))
        feats = {l: f[l].float().index_select(1, self.backbone) for l in self.layers}
        zt, zb = zt.float(), zb.float()
        cached = cached_agre_weights(zt, zb, self.tau_cached) if self.cached_weights else None
        return zt, zb, feats, cached


def teacher_source(meta: CacheMeta, cfg: DistillConfig, image_size: int, device):
    """The teachers of a run of ``cfg`` on the cache of ``meta``: the live ones of
    ``cfg.teachers_online``, else the cache's; with the run's feature eraser."""
    if cfg.teachers_online:
        teachers = OnlineTeachers(meta, cfg.teachers_online, cfg.active_layers, image_size, device,
                                  seed=cfg.seed, cached_weights=cfg.weighting == "cached")
        teachers.erase = eraser_for(cfg, meta, device, teachers.num_teachers)
    else:
        teachers = CachedTeachers(meta, cfg.active_layers, device)
        teachers.erase = eraser_for(cfg, meta, device)
    return teachers
