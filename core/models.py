"""ResNets that return logits and globally pooled layer2/3/4 features, and checkpoint I/O.

Checkpoints are plain ``{name: tensor}`` state dicts saved with ``torch.save`` and loaded with
``weights_only=True`` (no pickle of code objects, so a shared file cannot run code on load), or
``.safetensors`` files (no pickle at all). A received file is untrusted: the sizes its tensors
declare are bounded by its own size, and names, shapes and dtypes are checked against the
architecture, before any value is read.
"""
from __future__ import annotations

import hashlib
import math
import os
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
    # ResNet-18's blocks at a quarter of its width (16-32-64-128 channels, 0.70M parameters against
    # 11.2M): the synthetic default's miniature backbone and student (24 px images); no ImageNet weights.
    "resnet18-w16": {"layer2": 32, "layer3": 64, "layer4": 128},
}
# Base widths of the architectures torchvision does not name: layer1's channels, doubled per stage.
NARROW = {"resnet18-w16": ("resnet18", 16)}
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
        if arch in NARROW:
            self.net = _narrow_resnet(*NARROW[arch], num_classes)
        else:
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


def _narrow_resnet(base: str, width: int, num_classes: int) -> torchvision.models.ResNet:
    """torchvision's ``base`` ResNet with ``width`` channels after the stem instead of 64, each stage
    doubling it: the same blocks, module names and state-dict keys, fewer channels."""
    net = getattr(torchvision.models, base)(weights=None, num_classes=num_classes)
    block, depths = type(net.layer1[0]), [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    for i, depth in enumerate(depths):
        setattr(net, f"layer{i + 1}",
                net._make_layer(block, width * 2 ** i, depth, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    for m in net.modules():  # torchvision's own initialisation of the rebuilt modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object.

    Accepts a bare state dict, ``{"model_state_dict": ...}``, ``{"state_dict": ...}`` or
    ``{"model": ...}``; strips ``module.`` (DataParallel) and ``net.`` (FeatureResNet) prefixes.
    Reads no tensor's values.
    """
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = [str(k)[:40] for k in list(obj)[:5]] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{source}: no state dict of tensors found (keys: {what})")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: a state dict key is a {type(k).__name__}, not a name")
        for prefix in ("module.", "net."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# Parameters and buffers are floating point; only BatchNorm's counters are integers. Complex,
# boolean, float8 and quantized tensors are refused by name before any value is read.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64}
MAX_RECORDS = 100_000  # zip records in a torch.save file: one per tensor storage (a ResNet-50 has ~320)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def check_dtype(key: str, dtype, source) -> None:
    """A float dtype for a parameter, an integer one for a BatchNorm counter; CheckpointError
    naming the file, the key and the dtype otherwise."""
    if _is_counter(key):
        if dtype not in INT_DTYPES:
            raise CheckpointError(f"{source}: {key} has dtype {dtype}; a BatchNorm counter is an integer")
    elif dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{source}: parameter {key} has dtype {dtype}; a model's weights are "
                              f"float16, bfloat16, float32 or float64 (a complex, integer or quantized "
                              f"tensor is not a weight this tool can use)")


def _dense(t: torch.Tensor) -> bool:
    """True when ``t``'s strides lay its elements out once each, without gaps (any dimension
    order: a channels-last weight is dense): no stride-0 broadcast, no overlapping view."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    if any(sz == 0 for _, sz in dims):
        return True
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def check_layout(state: dict[str, torch.Tensor], source, file_bytes: int | None = None) -> None:
    """Bound what the tensors of a loaded state dict declare by what the file holds, reading no
    value: plain dense CPU tensors of a weight dtype (:func:`check_dtype`), each inside its storage,
    and together no more bytes than the file (``file_bytes``). ``weights_only`` loading builds any
    view of a storage: a 4-byte storage viewed as (15000, 15000) with strides (0, 0) costs 900 MB
    per float32 pass once a value is read."""
    total = 0
    for k, t in state.items():
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized \
                or t.is_nested or t.device.type != "cpu":
            raise CheckpointError(f"{source}: {k} is a {t.layout} {t.device.type} {type(t).__name__} "
                                  f"({t.dtype}); a checkpoint holds plain dense CPU tensors")
        check_dtype(k, t.dtype, source)
        nbytes = math.prod(t.shape) * t.element_size()
        held = t.untyped_storage().nbytes()
        if not _dense(t):
            raise CheckpointError(f"{source}: {k} is a view of shape {tuple(t.shape)} with strides "
                                  f"{t.stride()}, not a dense layout (a stride-0, overlapping or gapped "
                                  f"view: {nbytes} bytes declared over a storage of {held}); a saved "
                                  f"weight is laid out densely")
        if t.storage_offset() * t.element_size() + nbytes > held:
            raise CheckpointError(f"{source}: {k} of shape {tuple(t.shape)} declares {nbytes} bytes from "
                                  f"offset {t.storage_offset()}, its storage holds {held}")
        total += nbytes
    if file_bytes is not None and total > file_bytes:
        raise CheckpointError(f"{source}: its tensors declare {total} bytes, the file holds {file_bytes}: "
                              f"tensors that overlap one another")


def _check_zip(path: Path, size: int) -> None:
    """A torch.save file is a zip of uncompressed records: refuse one whose records would take more
    memory than the file's size (deflated records expand: a zip bomb) or that has more records
    than any model, before torch reads it."""
    import zipfile

    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # the record count, read before the central directory
        if end and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_RECORDS:
            raise CheckpointError(f"{path}: a zip of {end[zipfile._ECD_ENTRIES_TOTAL]} records; a checkpoint "
                                  f"has one per tensor (at most {MAX_RECORDS})")
        with zipfile.ZipFile(path) as z:
            declared = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a loadable checkpoint (damaged zip: {str(e)[:200]})") from None
    if declared > size:
        raise CheckpointError(f"{path}: its records declare {declared} bytes uncompressed in a file of "
                              f"{size} bytes (compressed records; torch.save writes none); refusing to "
                              f"expand them")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file: a JSON header of names, dtypes, shapes and byte ranges (checked
    by the library to tile the file exactly) and raw bytes; no pickle, no strides. Names and
    dtypes are checked from the header, before any tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype())
                check_dtype(k, dtype if dtype is not None else f.get_slice(k).get_dtype(), path)
            return {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a loadable safetensors file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict file without unpickling code, its declared sizes bounded by its size.

    ``.safetensors`` files are read with the safetensors library; others with ``torch.load``
    (``weights_only=True``) after a check of the zip's records (:func:`_check_zip`). The tensors
    then pass :func:`check_layout`; no value has been read when it returns.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    if path.suffix == ".safetensors":
        state = extract_state_dict(_load_safetensors(path), str(path))
    else:
        import zipfile

        if zipfile.is_zipfile(path):
            _check_zip(path, size)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {msg})") from None
        state = extract_state_dict(obj, str(path))
    check_layout(state, path, size)
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` as a ``.safetensors`` file (atomically): the format to share weights in."""
    from safetensors.torch import save

    from core.files import atomic_write_bytes

    return atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def backbone_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) of the non-head tensors' names and bytes: two models share a backbone exactly
    when these are equal."""
    # num_batches_tracked is skipped: it does not change the features, and older checkpoints
    # (e.g. torchvision's 2017 ImageNet files) do not have it. Raw bytes, so any dtype hashes.
    h = hashlib.sha256()
    for k in sorted(state):
        if not k.startswith("fc.") and not _is_counter(k):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_id(state: dict[str, torch.Tensor]) -> str:
    """Content hash of the non-head tensors (the first 16 hex digits of :func:`backbone_digest`):
    models that share a backbone share this id."""
    return backbone_digest(state)[:16]


def expected_state(arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The state dict of ``arch`` with ``num_classes`` outputs on the meta device: names, shapes
    and dtypes, no memory."""
    with torch.device("meta"):
        return FeatureResNet(arch, num_classes).net.state_dict()


def check_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], arch: str, num_classes: int,
                source, strict_head: bool = True) -> dict[str, torch.Tensor]:
    """``state`` checked against the names, shapes and dtypes of ``own`` (an architecture's state
    dict, see :func:`expected_state`), reading no value; returns it with missing BatchNorm
    counters filled in (and without the head unless ``strict_head``). CheckpointError naming the
    file and the mismatch."""
    if not strict_head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # BatchNorm counters only drive momentum=None averaging; files saved before PyTorch 0.4.1
    # lack them and torch's own loader accepts that, so they are filled in, not reported missing.
    state = {**{k: torch.zeros((), dtype=torch.long) for k in own if _is_counter(k)}, **state}
    missing = [k for k in own if k not in state and (strict_head or not k.startswith("fc."))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = ""
        if any(k.startswith("layer4.2.conv3") for k in unexpected + missing):
            hint = f" (is it a {'resnet18' if arch == 'resnet50' else 'resnet50'}?)"
        raise CheckpointError(f"{source}: does not fit {arch}{hint}: "
                              f"{len(missing)} missing key(s) {missing[:3]}, "
                              f"{len(unexpected)} unexpected key(s) {[k[:80] for k in unexpected[:3]]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            what = "number of classes" if k.startswith("fc.") else "architecture"
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, {arch} with "
                                  f"{num_classes} classes expects {tuple(own[k].shape)} (wrong {what})")
        check_dtype(k, v.dtype, source)
    return state


def load_into(model: FeatureResNet, state: dict[str, torch.Tensor], source: str,
              strict_head: bool = True, assign: bool = False) -> None:
    """Load ``state`` into ``model`` with errors that name the file and the mismatch
    (:func:`check_state`, before any value is copied).

    ``assign``: the model takes the state's tensors instead of copying them (for a model built on
    the meta device).
    """
    state = check_state(state, model.net.state_dict(), model.arch, model.num_classes, source, strict_head)
    model.net.load_state_dict(state, strict=strict_head, assign=assign)


def model_from_state(arch: str, num_classes: int, state: dict[str, torch.Tensor],
                     source: str) -> FeatureResNet:
    """A FeatureResNet holding ``state`` (as float32), with :func:`load_into`'s checks and errors.

    Built on the meta device and filled by assignment: no random initialisation of weights that
    are overwritten at once (about 0.2 s per ResNet-50 on a CPU core). The model owns copies:
    loading a head into it later never writes into ``state`` (which a caller may reuse). Names,
    shapes and dtypes are checked before anything is copied.
    """
    with torch.device("meta"):
        model = FeatureResNet(arch, num_classes)
    state = check_state(state, model.net.state_dict(), arch, num_classes, source)
    owned = {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
             for k, v in state.items()}
    load_into(model, owned, source, assign=True)
    return model


def imagenet_state(arch: str, weights_file: str | None = None,
                   timeout: float = 20.0) -> dict[str, torch.Tensor]:
    """ImageNet weights from a local file, or from torchvision's weight enum (download/cache).

    Fails fast (no hang) when the download cannot be done, saying what to pass instead.
    """
    if weights_file:
        return load_checkpoint(weights_file)
    if arch not in IMAGENET_WEIGHTS:
        raise CheckpointError(f"torchvision has no ImageNet weights for {arch}; pass --no-pretrained, or "
                              "--weights-file PATH with a state dict of that architecture")
    weights = torchvision.models.get_weight(IMAGENET_WEIGHTS[arch])
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise CheckpointError(
            f"could not download ImageNet weights {IMAGENET_WEIGHTS[arch]} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}). Pass --weights-file PATH with a "
            f"local torchvision {arch} state dict ({weights.url.rsplit('/', 1)[-1]}), "
            "or --no-pretrained.") from None
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
