"""ResNets that return logits and globally pooled layer2/3/4 features, and checkpoint I/O.

Checkpoints are plain ``{name: tensor}`` state dicts saved with ``torch.save`` and loaded with
``weights_only=True``: no pickle of code objects, so a shared file cannot run code on load.
"""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from core.constants import LAYERS
from core.errors import ToolError

FEATURE_DIMS = {
    "resnet18": {"layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer2": 512, "layer3": 1024, "layer4": 2048},
}
# ImageNet weights as in the DFR reference code (torchvision's original "pretrained=True").
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1",
                    "resnet50": "ResNet50_Weights.IMAGENET1K_V1"}


class CheckpointError(ToolError):
    """A checkpoint that cannot be loaded into the model asked for."""


class FeatureResNet(nn.Module):
    """torchvision ResNet whose forward returns ``(logits [B, C], {layer: pooled [B, D]})``.

    Pooled features are ``AdaptiveAvgPool2d(1)`` of layer2/3/4 outputs; layer4's is the
    penultimate embedding the ``fc`` head sees.
    """

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        if arch not in FEATURE_DIMS:
            raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(FEATURE_DIMS)}")
        self.arch, self.num_classes = arch, num_classes
        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)

    @property
    def fc(self) -> nn.Linear:
        return self.net.fc

    def forward(self, x: torch.Tensor, layers=LAYERS):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer1(x)
        feats = {}
        for name in LAYERS:
            x = getattr(n, name)(x)
            if name in layers or name == "layer4":
                feats[name] = torch.flatten(n.avgpool(x), 1)
        logits = n.fc(feats["layer4"])
        return logits, {k: v for k, v in feats.items() if k in layers}


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object.

    Accepts a bare state dict, ``{"model_state_dict": ...}``, ``{"state_dict": ...}`` or
    ``{"model": ...}``; strips ``module.`` (DataParallel) and ``net.`` (FeatureResNet) prefixes.
    """
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no state dict of tensors found (keys: {list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "net."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict file without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return extract_state_dict(obj, str(path))


def backbone_id(state: dict[str, torch.Tensor]) -> str:
    """Content hash of the non-head tensors: models that share a backbone share this id."""
    # num_batches_tracked is skipped: it does not change the features, and older checkpoints
    # (e.g. torchvision's 2017 ImageNet files) do not have it. Raw bytes, so any dtype hashes.
    h = hashlib.sha256()
    for k in sorted(state):
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_into(model: FeatureResNet, state: dict[str, torch.Tensor], source: str,
              strict_head: bool = True, assign: bool = False) -> None:
    """Load ``state`` into ``model`` with errors that name the file and the mismatch.

    ``assign``: the model takes the state's tensors instead of copying them (for a model built on
    the meta device).
    """
    own = model.net.state_dict()
    if not strict_head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # BatchNorm counters only drive momentum=None averaging; files saved before PyTorch 0.4.1
    # lack them and torch's own loader accepts that, so they are filled in, not reported missing.
    state = {**{k: torch.zeros((), dtype=torch.long) for k in own if k.endswith("num_batches_tracked")},
             **state}
    missing = [k for k in own if k not in state and (strict_head or not k.startswith("fc."))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = ""
        if any(k.startswith("layer4.2.conv3") for k in unexpected + missing):
            hint = f" (is it a {'resnet18' if model.arch == 'resnet50' else 'resnet50'}?)"
        raise CheckpointError(f"{source}: does not fit {model.arch}{hint}: "
                              f"{len(missing)} missing key(s) {missing[:3]}, "
                              f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            what = "number of classes" if k.startswith("fc.") else "architecture"
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, {model.arch} with "
                                  f"{model.num_classes} classes expects {tuple(own[k].shape)} (wrong {what})")
    model.net.load_state_dict(state, strict=strict_head, assign=assign)


def model_from_state(arch: str, num_classes: int, state: dict[str, torch.Tensor], source: str) -> FeatureResNet:
    """A FeatureResNet holding ``state`` (as float32), with :func:`load_into`'s checks and errors.

    Built on the meta device and filled by assignment: no random initialisation of weights that
    are overwritten at once (about 0.2 s per ResNet-50 on a CPU core). The model owns copies:
    loading a head into it later never writes into ``state`` (which a caller may reuse).
    """
    with torch.device("meta"):
        model = FeatureResNet(arch, num_classes)
    owned = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
    load_into(model, owned, source, assign=True)
    return model


def imagenet_state(arch: str, weights_file: str | None = None, timeout: float = 20.0) -> dict[str, torch.Tensor]:
    """ImageNet weights from a local file, or from torchvision's weight enum (download/cache).

    Fails fast (no hang) when the download cannot be done, saying what to pass instead.
    """
    if weights_file:
        return load_checkpoint(weights_file)
    weights = torchvision.models.get_weight(IMAGENET_WEIGHTS[arch])
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise CheckpointError(
            f"could not download ImageNet weights {IMAGENET_WEIGHTS[arch]} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}). Pass --weights-file PATH with a local "
            f"torchvision {arch} state dict ({weights.url.rsplit('/', 1)[-1]}), or --no-pretrained.") from None
    finally:
        socket.setdefaulttimeout(old)


def build_model(arch: str, num_classes: int, pretrained: bool = False,
                weights_file: str | None = None) -> FeatureResNet:
    """A FeatureResNet, ImageNet-initialised when asked (the 1000-way head is replaced)."""
    model = FeatureResNet(arch, num_classes)
    if pretrained or weights_file:
        load_into(model, imagenet_state(arch, weights_file), weights_file or IMAGENET_WEIGHTS[arch],
                  strict_head=False)
    return model
