"""Where a training step gets its teacher outputs: the cache (the tool), or live teachers (the study).

A teacher source says, for the batch rows ``idx`` of the training split, through which view
the student sees them (``view(data, idx, images, epoch) -> (box, flip)``) and what the teachers
output on exactly those pixels (``outputs(data, idx, x, y) -> (teacher logits, biased logits,
{layer: features}, cached weights or None)``); :func:`distill.data.make_batch` renders the
student's input between the two. ``names`` lists its models (``{"name", "role"}``) for the run's
summary.

- :class:`CachedTeachers` rebuilds the epoch's stored view (its slot) and reads its cached outputs;
- :class:`OnlineTeachers` is the study's loop, the yardstick for what the cache changes: a fresh
  ``RandomResizedCrop`` + flip of every image at every step (per (seed, epoch, row), so a resumed
  run replays it), the teachers and the biased model run on it, nothing read from the cache.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from cache.schema import CacheMeta
from core.ensemble import Ensemble
from core.manifest import read_manifest, verify_files
from core.models import FEATURE_DIMS
from core.runtime import autocast, epoch_seed, memory_format_for
from core.weighting import cached_agre_weights
from data.views import ViewSpec, sample_views
from distill.config import DistillConfig
from distill.data import DistillError, SplitData
from distill.erasure import eraser_for


class CachedTeachers:
    """Teacher outputs read from the cache for the sampled stored views."""

    def __init__(self, meta: CacheMeta, cfg: DistillConfig, image_size: int, device):
        self.cfg, self.image_size, self.device = cfg, image_size, device
        self.num_teachers = meta.num_teachers
        self.feature_dims = meta.feature_dims  # {layer: width} of the cached teacher features
        self.backbone = torch.tensor(meta.backbone_of_teacher, device=device)
        self.layers = cfg.active_layers
        self.names = [{"name": t["name"], "role": t["role"]} for t in meta.teachers]
        self.erase = eraser_for(cfg, meta, device)  # None: raw features (feature_target raw)

    def view(self, data: SplitData, idx: torch.Tensor, images, epoch: int) -> tuple[Tensor, Tensor]:
        """The stored view of the epoch's slot (``data`` is seen through it): box [b, 4], flip [b]."""
        return data.box[idx], data.flip[idx]

    def outputs(self, data: SplitData, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """The cached outputs of the rows ``idx`` on their slot's view, on the device."""
        d = self.device
        feats = {l: data.feats[l][idx].to(d).index_select(1, self.backbone) for l in self.layers}
        if self.erase is not None:  # the spurious attribute erased from each teacher's features
            feats = {l: self.erase(l, f, y) for l, f in feats.items()}
        cached = data.cached[idx].to(d) if self.cfg.needs.cached_weights else None
        return data.logits[idx].to(d), data.biased[idx].to(d), feats, cached


class OnlineTeachers:
    """The study's loop: teachers run live on a fresh crop of every image at every step."""

    def __init__(self, meta: CacheMeta, cfg: DistillConfig, image_size: int, device):
        man = read_manifest(cfg.teachers_online)
        verify_files(man)
        if man.num_classes != meta.num_classes:
            raise DistillError(f"the teachers of {cfg.teachers_online} have {man.num_classes} classes, the data of "
                               f"{cfg.cache} {meta.num_classes}")
        self.cfg, self.image_size, self.device = cfg, image_size, device
        self.ensemble = Ensemble(man).to(device).eval().to(memory_format=memory_format_for(device))
        self.num_teachers = len(man.teachers)
        self.feature_dims = FEATURE_DIMS[man.teachers[0].arch]  # any layer: computed live
        self.backbone = torch.tensor(man.teacher_backbone, device=device)
        self.layers = cfg.active_layers
        self.names = [{"name": m.name, "role": m.role} for m in man.models]
        spec = meta.view_spec  # the cache's crop distribution, eval geometry and tau
        self.spec = ViewSpec(random_views=1, out_size=image_size, scale=tuple(spec.get("scale", (0.7, 1.0))),
                             ratio=tuple(spec.get("ratio", (3 / 4, 4 / 3))), resize=spec.get("resize", "keep-aspect"))
        self.tau_cached = meta.tau_cached
        self.manifest = man
        self.erase = eraser_for(cfg, meta, device, self.num_teachers)  # None: raw features

    def crops(self, rows: np.ndarray, hw: np.ndarray, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop (box [b, 4], flip [b]) of each dataset row."""
        spec = dataclasses.replace(self.spec, seed=epoch_seed(self.cfg.seed, epoch))
        box, flip = sample_views(rows, spec, hw)
        return torch.from_numpy(box[:, 1]), torch.from_numpy(flip[:, 1])

    @torch.no_grad()
    def run(self, x: torch.Tensor, y: torch.Tensor):
        """(teacher logits [b, T, C], biased logits [b, C], {layer: [b, T, D]}) on images ``x`` of
        classes ``y`` (the erasers are per class)."""
        with autocast(self.device):
            zt, zb, f = self.ensemble(x.contiguous(memory_format=memory_format_for(self.device)), self.layers or ("layer4",))
        feats = {l: f[l].float().index_select(1, self.backbone) for l in self.layers}
        if self.erase is not None:
            feats = {l: self.erase(l, f, y) for l, f in feats.items()}
        return zt.float(), zb.float(), feats

    def view(self, data: SplitData, idx: torch.Tensor, images, epoch: int) -> tuple[Tensor, Tensor]:
        """A fresh crop of every row of the batch (``images``: its pixels), per (seed, epoch, row)."""
        return self.crops(data.rows[idx].cpu().numpy(), images.hw.cpu().numpy(), epoch)

    def outputs(self, data: SplitData, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        """The teachers run live on the batch's pixels ``x``."""
        zt, zb, feats = self.run(x, y)
        cached = cached_agre_weights(zt, zb, self.tau_cached) if self.cfg.weighting == "cached" else None
        return zt, zb, feats, cached


def teacher_source(meta: CacheMeta, cfg: DistillConfig, image_size: int, device):
    return (OnlineTeachers if cfg.teachers_online else CachedTeachers)(meta, cfg, image_size, device)
