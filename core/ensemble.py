"""The teacher ensemble as one module: each distinct backbone run once, every head on top of it."""
from __future__ import annotations

import functools

import torch

from core.constants import LAYERS
from core.manifest import Manifest, load_model
from core.models import load_checkpoint


class Ensemble(torch.nn.Module):
    """Distinct backbones and the heads on top of them.

    ``forward(x)`` runs each distinct backbone once and returns (teacher logits [n, T, C],
    biased logits [n, C], {layer: [n, B, D]}).
    """

    def __init__(self, man: Manifest):
        super().__init__()
        models = man.teachers + [man.biased]
        self.backbone_ids = man.backbone_ids
        load = functools.cache(load_checkpoint)  # every checkpoint file is read once
        first = {b: next(m for m in models if m.backbone_id == b) for b in self.backbone_ids}
        self.backbones = torch.nn.ModuleList(load_model(man, first[b], load) for b in self.backbone_ids)
        self.teacher_backbone, self.biased_backbone = man.teacher_backbone, man.biased_backbone
        self.heads = torch.nn.ModuleList(self._head(load(man.path(m.head_file or m.file))) for m in models)

    @staticmethod
    def _head(state: dict) -> torch.nn.Linear:
        w, b = state["fc.weight"], state["fc.bias"]
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
