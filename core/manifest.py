"""The teacher manifest: which checkpoints make the ensemble, and the biased model.

``TEACHERS_DIR/manifest.json``::

    {"schema": "gr-kd-teachers", "version": 1, "num_classes": 2, "image_size": 224,
     "pretrained": true, "models": [
        {"name": "teacher_1", "role": "teacher", "arch": "resnet50", "num_classes": 2,
         "file": "erm_seed0.pt", "sha256": "...", "head_file": "teacher_1_head.pt",
         "head_sha256": "...", "backbone_id": "...", "metrics": {"val": {...}, "test": {...}}},
        {"name": "biased", "role": "biased", "file": "erm_seed0.pt", ...}]}

``file`` is a full ResNet state dict; ``head_file`` (optional) replaces its ``fc`` (a DFR head).
Paths are relative to the manifest's folder unless absolute. A manifest is read as untrusted: every
path must lie inside its folder (after ``..`` and symbolic links are resolved), unless the user
allows others explicitly with the environment variable ``GRKD_ALLOW_OUTSIDE_PATHS=1`` (or
``read_manifest(..., allow_outside_paths=True)``): a received manifest could name any file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.constants import ROLES
from core.errors import ToolError
from core.files import atomic_write_json, sha256_file
from core.models import CheckpointError, FeatureResNet, backbone_id, load_checkpoint, model_from_state

SCHEMA = "gr-kd-teachers"
VERSION = 1
ALLOW_OUTSIDE_ENV = "GRKD_ALLOW_OUTSIDE_PATHS"  # "1": a manifest may name files outside its folder


class ManifestError(ToolError):
    """A manifest that cannot be used; the message says which entry and why."""


@dataclass
class ModelEntry:
    name: str
    role: str
    arch: str
    num_classes: int
    file: str
    sha256: str
    backbone_id: str
    head_file: str | None = None
    head_sha256: str | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class Manifest:
    models: list[ModelEntry]
    num_classes: int
    image_size: int
    pretrained: bool
    root: Path = Path(".")
    resize: str = "keep-aspect"  # how the images were resized before the teachers saw them

    @property
    def teachers(self) -> list[ModelEntry]:
        return [m for m in self.models if m.role == "teacher"]

    @property
    def biased(self) -> ModelEntry:
        return next(m for m in self.models if m.role == "biased")

    @property
    def backbone_ids(self) -> list[str]:
        """Distinct backbones, teachers' first, then the biased model's (if not shared)."""
        return list(dict.fromkeys(m.backbone_id for m in self.teachers + [self.biased]))

    @property
    def teacher_backbone(self) -> list[int]:
        """Index into ``backbone_ids`` of each teacher's backbone."""
        return [self.backbone_ids.index(m.backbone_id) for m in self.teachers]

    @property
    def biased_backbone(self) -> int:
        return self.backbone_ids.index(self.biased.backbone_id)

    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        d = {"schema": SCHEMA, "version": VERSION, "num_classes": self.num_classes,
             "image_size": self.image_size, "pretrained": self.pretrained, "resize": self.resize,
             "models": [asdict(m) for m in self.models]}
        return atomic_write_json(path, d)


def outside_paths(man: Manifest) -> list[str]:
    """The model files of ``man`` that do not lie inside its folder (``..``, absolute paths and
    symbolic links resolved)."""
    root = Path(man.root).resolve()
    out = []
    for m in man.models:
        for rel in (m.file, m.head_file):
            if rel is not None and not man.path(rel).resolve().is_relative_to(root):
                out.append(str(rel))
    return out


def read_manifest(path: str | Path, allow_outside_paths: bool | None = None) -> Manifest:
    """The manifest at ``path`` (or in that folder), checked; its model files must lie inside its
    folder unless ``allow_outside_paths`` (default: the environment variable
    ``GRKD_ALLOW_OUTSIDE_PATHS`` is ``1``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"no teacher manifest at {path}; build teachers with `python cli.py teachers` "
                            "or declare yours with `python cli.py teachers import`")
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or d.get("schema") != SCHEMA or d.get("version") != VERSION:
            raise ManifestError(f"{path}: not a version-{VERSION} {SCHEMA} manifest")
        models = [ModelEntry(**m) for m in d["models"]]
        man = Manifest(models, int(d["num_classes"]), int(d["image_size"]), bool(d["pretrained"]), path.parent,
                       str(d.get("resize", "keep-aspect")))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    roles = [m.role for m in models]
    if roles.count("biased") != 1 or "teacher" not in roles or any(r not in ROLES for r in roles):
        raise ManifestError(f"{path}: needs at least one 'teacher' and exactly one 'biased' model, has roles {roles}")
    if len({m.name for m in models}) != len(models):
        raise ManifestError(f"{path}: model names are not unique")
    if allow_outside_paths is None:
        allow_outside_paths = os.environ.get(ALLOW_OUTSIDE_ENV, "") == "1"
    outside = [] if allow_outside_paths else outside_paths(man)
    if outside:
        raise ManifestError(f"{path}: {len(outside)} model file(s) lie outside the manifest's folder "
                            f"{path.parent} ({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}); a "
                            f"received manifest could name any file on this machine, so this is refused. If "
                            f"you wrote it (e.g. `teachers import` of checkpoints kept elsewhere) and trust "
                            f"those paths, set {ALLOW_OUTSIDE_ENV}=1; or move the checkpoints into "
                            f"{path.parent} and import them again")
    return man


def verify_files(man: Manifest) -> None:
    """Every checkpoint exists and has the sha256 the manifest declares."""
    seen: dict[Path, str] = {}
    for m in man.models:
        for rel, digest in ((m.file, m.sha256), (m.head_file, m.head_sha256)):
            if rel is None:
                continue
            p = man.path(rel)
            if not p.is_file():
                raise ManifestError(f"model {m.name}: checkpoint {p} is missing")
            if p not in seen:
                seen[p] = sha256_file(p)
            if seen[p] != digest:
                raise ManifestError(f"model {m.name}: checkpoint {p} was altered (sha256 {seen[p][:12]}..., "
                                    f"manifest says {digest[:12]}...); rebuild or re-import the teachers")


def check_finite(state: dict, source) -> None:
    """Refuse a checkpoint holding NaN or inf in any floating tensor: such a teacher gives
    non-finite (or constant) outputs that would otherwise surface far later, as a bad table or a
    non-finite loss. CheckpointError naming the file, the parameter and how many values."""
    import torch

    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                raise CheckpointError(f"{source}: parameter {name} holds {bad} non-finite value(s) (NaN or inf) "
                                      f"of {t.numel()}: a diverged or damaged checkpoint; use another one")


def load_model(man: Manifest, entry: ModelEntry, load=load_checkpoint) -> FeatureResNet:
    """The model of one manifest entry (backbone file + optional head file), in eval mode.

    ``load(path) -> state dict``: how files are read (a memo lets several entries share one read).
    """
    state = load(man.path(entry.file))
    check_finite(state, man.path(entry.file))
    model = model_from_state(entry.arch, entry.num_classes, state, str(man.path(entry.file)))
    if entry.head_file:
        head = load(man.path(entry.head_file))
        check_finite(head, man.path(entry.head_file))
        try:
            model.fc.load_state_dict({"weight": head["fc.weight"], "bias": head["fc.bias"]})
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{man.path(entry.head_file)}: not a head for {entry.arch} with "
                                  f"{entry.num_classes} classes ({e})") from None
    return model.eval()


def make_entry(name: str, role: str, file: str | Path, arch: str, num_classes: int,
               head_file: str | Path | None = None, state: dict | None = None,
               root: Path | None = None) -> ModelEntry:
    """Validate a checkpoint (and head) and describe it; raises CheckpointError naming the file."""
    file = Path(file)
    state = state if state is not None else load_checkpoint(file)
    check_finite(state, file)
    model_from_state(arch, num_classes, state, str(file))  # raises CheckpointError if it does not fit
    if head_file:
        check_finite(load_checkpoint(head_file), head_file)

    def rel(p):
        p = Path(p).resolve()
        return str(p.relative_to(root.resolve())) if root and p.is_relative_to(root.resolve()) else str(p)

    return ModelEntry(name=name, role=role, arch=arch, num_classes=num_classes, file=rel(file),
                      sha256=sha256_file(file), backbone_id=backbone_id(state),
                      head_file=rel(head_file) if head_file else None,
                      head_sha256=sha256_file(head_file) if head_file else None)
