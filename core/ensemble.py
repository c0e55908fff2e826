"""The teacher ensemble as one module: each distinct backbone run once, every head on top of it.

Which models share a backbone is decided by the bytes of their files, never by what the manifest
says: :func:`core.manifest.verify_models` checks every file (names, shapes and dtypes before any
value, every weight and head finite) and that each ``backbone_id`` is the hash of its file's
backbone weights, so two models share a backbone only when those weights are equal.
"""
from __future__ import annotations

import functools

import torch

from core.constants import LAYERS
from core.manifest import Manifest, checked_head, load_model, verify_models
from core.models import load_checkpoint


class Ensemble(torch.nn.Module):
    """Distinct backbones and the heads on top of them.

    ``forward(x)`` runs each distinct backbone once and returns (teacher logits [n, T, C],
    biased logits [n, C], {layer: [n, B, D]}).
    """

    def __init__(self, man: Manifest):
        super().__init__()
        models = man.teachers + [man.biased]
        load = functools.cache(load_checkpoint)  # every checkpoint file is read once
        seen: dict = {}
        verify_models(man, load, seen)  # refuses a backbone_id that is not its file's
        self.backbone_ids = man.backbone_ids
        first = {b: next(m for m in models if m.backbone_id == b) for b in self.backbone_ids}
        self.backbones = torch.nn.ModuleList(load_model(man, first[b], load, seen) for b in self.backbone_ids)
        self.teacher_backbone, self.biased_backbone = man.teacher_backbone, man.biased_backbone
        self.heads = torch.nn.ModuleList(self._head(*head_of(man, m, load)) for m in models)

    @staticmethod
    def _head(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.nn.Linear:
        if b is None:  # a state dict (checked by the caller)
            w, b = w["fc.weight"], w["fc.bias"]
        head = torch.nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict({"weight": w, "bias": b})
        return head

    def forward(self, x: torch.Tensor, layers=LAYERS):
        feats = [bb(x, layers=tuple(set(layers) | {"layer4"}))[1] for bb in self.backbones]
        owners = self.teacher_backbone + [self.biased_backbone]
        with torch.autocast(x.device.type, enabled=False):  # heads in float32, like DFR's fit
            logits = [head(feats[b]["layer4"].float()) for head, b in zip(self.heads, owners)]
        stacked = {l: torch.stack([f[l] for f in feats], dim=1) for l in layers}
        return torch.stack(logits[:-1], dim=1), logits[-1], stacked


def head_of(man: Manifest, entry, load=load_checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of a model's head (its head file, else its own ``fc``), checked: the
    architecture's shapes, a float dtype, finite values; CheckpointError naming the file."""
    path = man.path(entry.head_file or entry.file)
    return checked_head(load(path), entry.arch, entry.num_classes, path)
