"""The trainable module: ResNet-18 student and its feature adapters, optimised and saved together."""
from __future__ import annotations

import torch
import torch.nn as nn

from core.models import FEATURE_DIMS, build_model


class Student(nn.Module):
    """ResNet-18 plus one bias-free linear adapter per distilled layer (student dim -> teacher dim).

    ``forward(x)`` returns (logits [B, C], penultimate h [B, 512], {layer: P_l h_l [B, D_teacher]}).
    Adapters: 128 -> 512, 256 -> 1024, 512 -> 2048 for layer2/3/4 (ResNet-18 -> ResNet-50).
    """

    def __init__(self, num_classes: int, teacher_dims: dict[str, int], pretrained: bool = False,
                 weights_file: str | None = None, arch: str = "resnet18"):
        super().__init__()
        self.backbone = build_model(arch, num_classes, pretrained, weights_file)
        self.layers = tuple(teacher_dims)
        # Bias-free, like the study's projector (a 1x1 convolution without bias on its maps).
        self.adapters = nn.ModuleDict({l: nn.Linear(FEATURE_DIMS[arch][l], d, bias=False)
                                       for l, d in teacher_dims.items()})

    def agre_params(self, name: str) -> list[nn.Parameter]:
        """The parameters whose gradients give the ``agre-batch`` weights (``--agre-params``):
        ``all`` every backbone parameter (the study's choice), ``layer4`` layer4 and the
        classifier. (The adapters are not reached by the KD losses.)"""
        net = self.backbone.net
        if name == "all":
            params = list(net.parameters())
        elif name == "layer4":
            params = [*net.layer4.parameters(), *net.fc.parameters()]
        else:
            raise ValueError(f"no autograd parameter set {name!r}; 'last' has a closed form")
        return [p for p in params if p.requires_grad]

    def forward(self, x: torch.Tensor):
        logits, feats = self.backbone(x, layers=self.layers + ("layer4",))
        projected = {l: self.adapters[l](feats[l]) for l in self.layers}
        return logits, feats["layer4"], projected
