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

import dataclasses
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.constants import ROLES
from core.errors import ToolError
from core.files import JSONFileError, atomic_write_json, load_json, sha256_file
from core.models import (FEATURE_DIMS, CheckpointError, FeatureResNet, backbone_digest, backbone_id,
                         check_dtype, check_state, expected_state, load_checkpoint, model_from_state)

SCHEMA = "gr-kd-teachers"
VERSION = 1
ALLOW_OUTSIDE_ENV = "GRKD_ALLOW_OUTSIDE_PATHS"  # "1": a manifest may name files outside its folder
RESIZE_MODES = ("keep-aspect", "squash")  # data.store.RESIZE_MODES (core does not import data)
# Bounds of a received manifest's fields (a real one: a few kB, 2-3 classes, 224 px, < 10 models).
MAX_MANIFEST_BYTES, MAX_MODELS, MAX_CLASSES, MAX_IMAGE_SIZE = 1 << 20, 256, 1000, 1024
MAX_TEXT, MAX_PATH = 200, 4096
FIELDS_REQUIRED = ("name", "role", "arch", "num_classes", "file", "sha256", "backbone_id")
_SHA256 = re.compile("[0-9a-f]{64}")


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
    source: Path | None = None  # the manifest file it was read from (for messages)

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


def _problem(path, field: str, want: str, value) -> ManifestError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return ManifestError(f"{path}: malformed manifest: {field} must be {want}, got {shown[:80]}")


def _int_in(d: dict, key: str, low: int, high: int, path, field: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _problem(path, field, f"an integer in [{low}, {high}]", v)
    return v


def _text(v, path, field: str, optional: bool = False, max_len: int = MAX_TEXT) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not 0 < len(v) <= max_len or any(ord(c) < 32 for c in v):
        raise _problem(path, field, f"a non-empty string of at most {max_len} printable characters", v)
    return v


def _entry(m, i: int, num_classes: int, path) -> ModelEntry:
    """One model of a manifest, every field's type and range checked (not its files)."""
    where = f"models[{i}]"
    if not isinstance(m, dict):
        raise _problem(path, where, "an object", m)
    names = {f.name for f in dataclasses.fields(ModelEntry)}
    unknown, missing = sorted(set(m) - names), sorted(f for f in FIELDS_REQUIRED if f not in m)
    if unknown or missing:
        raise ManifestError(f"{path}: malformed manifest: {where} has unknown field(s) {unknown[:5]} and "
                            f"lacks {missing} (fields: {', '.join(sorted(names))})")
    name = _text(m["name"], path, f"{where}.name")
    where = f"models[{i}] ({name})"
    _text(m["role"], path, f"{where}.role")  # one of ROLES: checked with the others' roles
    if m["arch"] not in FEATURE_DIMS:
        raise _problem(path, f"{where}.arch", f"one of {', '.join(FEATURE_DIMS)}", m["arch"])
    if m["num_classes"] != num_classes or isinstance(m["num_classes"], bool):
        raise _problem(path, f"{where}.num_classes", f"the manifest's num_classes ({num_classes})",
                       m["num_classes"])
    for key in ("sha256", "head_sha256"):
        v = m.get(key)
        if not (v is None and key == "head_sha256") and not (isinstance(v, str) and _SHA256.fullmatch(v)):
            raise _problem(path, f"{where}.{key}", "64 lowercase hex digits", v)
    head = _text(m.get("head_file"), path, f"{where}.head_file", optional=True, max_len=MAX_PATH)
    if (head is None) != (m.get("head_sha256") is None):
        raise ManifestError(f"{path}: malformed manifest: {where} needs head_file and head_sha256 together")
    if not isinstance(m.get("metrics", {}), dict):
        raise _problem(path, f"{where}.metrics", "an object", m["metrics"])
    return ModelEntry(name=name, role=m["role"], arch=m["arch"], num_classes=num_classes,
                      file=_text(m["file"], path, f"{where}.file", max_len=MAX_PATH), sha256=m["sha256"],
                      backbone_id=_text(m["backbone_id"], path, f"{where}.backbone_id", max_len=64),
                      head_file=head, head_sha256=m.get("head_sha256"), metrics=m.get("metrics", {}))


def parse_manifest(d, path) -> Manifest:
    """A manifest from its parsed JSON, every field's type and range checked: ManifestError naming
    the file and the field otherwise. Reads no model file."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA or d.get("version") != VERSION:
        raise ManifestError(f"{path}: not a version-{VERSION} {SCHEMA} manifest")
    known = {"schema", "version", "num_classes", "image_size", "pretrained", "resize", "models"}
    missing = sorted(known - {"resize"} - set(d))
    if missing or set(d) - known:
        raise ManifestError(f"{path}: malformed manifest: missing field(s) {missing}, unknown field(s) "
                            f"{sorted(set(d) - known)[:5]}")
    num_classes = _int_in(d, "num_classes", 2, MAX_CLASSES, path, "num_classes")
    image_size = _int_in(d, "image_size", 8, MAX_IMAGE_SIZE, path, "image_size")
    if not isinstance(d["pretrained"], bool):
        raise _problem(path, "pretrained", "true or false", d["pretrained"])
    resize = d.get("resize", "keep-aspect")
    if resize not in RESIZE_MODES:
        raise _problem(path, "resize", f"one of {', '.join(RESIZE_MODES)}", resize)
    if not isinstance(d["models"], list) or not 0 < len(d["models"]) <= MAX_MODELS:
        raise _problem(path, "models", f"a list of 1 to {MAX_MODELS} models", d["models"])
    models = [_entry(m, i, num_classes, path) for i, m in enumerate(d["models"])]
    return Manifest(models, num_classes, image_size, d["pretrained"], Path(path).parent, resize, Path(path))


def read_manifest(path: str | Path, allow_outside_paths: bool | None = None) -> Manifest:
    """The manifest at ``path`` (or in that folder), checked; its model files must lie inside its
    folder unless ``allow_outside_paths`` (default: the environment variable
    ``GRKD_ALLOW_OUTSIDE_PATHS`` is ``1``). The JSON is read as untrusted (:func:`load_json`: size
    and depth bounded) and every field's type and range checked (:func:`parse_manifest`); the
    model files are not read (see :func:`verify_files`, :func:`verify_models`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"no teacher manifest at {path}; build teachers with `python cli.py teachers` "
                            "or declare yours with `python cli.py teachers import`")
    try:
        d = load_json(path, "manifest", max_bytes=MAX_MANIFEST_BYTES)
    except JSONFileError as e:
        reason = str(e).removeprefix(f"manifest {path}: ")
        raise ManifestError(f"{path}: malformed manifest ({reason})") from None
    man = parse_manifest(d, path)
    models = man.models
    roles = [m.role for m in models]
    if roles.count("biased") != 1 or "teacher" not in roles or any(r not in ROLES for r in roles):
        raise ManifestError(f"{path}: needs at least one 'teacher' and exactly one 'biased' "
                            f"model, has roles {roles}")
    if len({m.name for m in models}) != len(models):
        raise ManifestError(f"{path}: model names are not unique")
    if allow_outside_paths is None:
        allow_outside_paths = os.environ.get(ALLOW_OUTSIDE_ENV, "") == "1"
    outside = [] if allow_outside_paths else outside_paths(man)
    if outside:
        shown = f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}"
        raise ManifestError(f"{path}: {len(outside)} model file(s) lie outside the manifest's folder "
                            f"{path.parent} ({shown}); a received "
                            "manifest could name any file on this machine, so this is refused. If you wrote "
                            "it (e.g. `teachers import` of checkpoints kept elsewhere) and trust those "
                            f"paths, set {ALLOW_OUTSIDE_ENV}=1; or move the checkpoints into "
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
    non-finite loss. CheckpointError naming the file, the parameter and how many values.

    Run it after :func:`core.models.check_state` (names, shapes, dtypes): it reads every value.
    A complex tensor (which may hold NaN in its imaginary part) is refused, not skipped.
    """
    import torch

    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise CheckpointError(f"{source}: parameter {name} has dtype {t.dtype}; a model's weights are "
                                  f"real numbers")
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                raise CheckpointError(f"{source}: parameter {name} holds {bad} "
                                      f"non-finite value(s) (NaN or inf) of {t.numel()}: a diverged or "
                                      "damaged checkpoint; use another one")


def checked_state(state: dict, arch: str, num_classes: int, source) -> dict:
    """``state`` checked as a whole model of ``arch``: names, shapes and dtypes first (no value
    read), then every value finite. Returns it with missing BatchNorm counters filled in."""
    state = check_state(state, expected_state(arch, num_classes), arch, num_classes, source)
    check_finite(state, source)
    return state


def checked_head(state: dict, arch: str, num_classes: int, source) -> tuple:
    """``(fc.weight, fc.bias)`` of ``state`` (a head file, or a whole model's own head), their
    shapes and dtypes checked against ``arch`` with ``num_classes`` outputs, then their values
    finite. CheckpointError naming the file otherwise."""
    own = expected_state(arch, num_classes)
    head = {k: state.get(k) for k in ("fc.weight", "fc.bias")}
    for k, v in head.items():
        if v is None or tuple(v.shape) != tuple(own[k].shape):
            got = "nothing" if v is None else f"shape {tuple(v.shape)}"
            raise CheckpointError(f"{source}: not a head for {arch} with {num_classes} classes ({k}: {got}, "
                                  f"expected {tuple(own[k].shape)})")
        check_dtype(k, v.dtype, source)
    check_finite(head, source)
    return head["fc.weight"], head["fc.bias"]


def _check_id(man: Manifest, entry: ModelEntry, digest: str) -> None:
    """``entry.backbone_id`` must be (a prefix of at least 16 digits of) ``digest``, the hash this
    tool computed from its file's backbone weights."""
    if len(entry.backbone_id) < 16 or digest[:len(entry.backbone_id)] != entry.backbone_id:
        raise ManifestError(f"{man.source or man.root}: model {entry.name}: backbone_id "
                            f"{entry.backbone_id!r} is not the backbone of its file {man.path(entry.file)} "
                            f"({digest[:16]}): a model's backbone is the hash of its file's weights, "
                            f"computed here, never taken from a manifest; rebuild or re-import the teachers")


def _verified_backbone(man: Manifest, entry: ModelEntry, load, seen: dict) -> dict:
    """The checked state of ``entry``'s file (:func:`checked_state`), its backbone_id checked
    against the hash of the file's backbone; ``seen`` maps each (file, arch, classes) checked so
    far to its backbone digest (such a file is neither scanned nor hashed again)."""
    path = man.path(entry.file)
    key = (path, entry.arch, entry.num_classes)
    if key in seen:
        state = check_state(load(path), expected_state(entry.arch, entry.num_classes), entry.arch,
                            entry.num_classes, path)
    else:
        state = checked_state(load(path), entry.arch, entry.num_classes, path)
        seen[key] = backbone_digest(state)
    _check_id(man, entry, seen[key])
    return state


def verify_models(man: Manifest, load=load_checkpoint, seen: dict | None = None) -> dict[str, str]:
    """Load and check every model of ``man`` (each file once): names, shapes and dtypes against
    its architecture before any value is read, every weight and head finite, each backbone_id the
    hash of the file's own backbone weights, and two models sharing a backbone_id only when their
    backbone bytes are equal. Returns each model's backbone digest (full sha256) by name; ``seen``
    (optional) collects the digests for :func:`load_model`. ManifestError or CheckpointError
    naming the model and the file."""
    seen = {} if seen is None else seen
    files: dict[tuple, list[ModelEntry]] = {}
    for m in man.models:
        files.setdefault((man.path(m.file), m.arch, m.num_classes), []).append(m)
    digests, by_id = {}, {}
    for key, entries in files.items():
        state = _verified_backbone(man, entries[0], load, seen)
        for m in entries:
            _check_id(man, m, seen[key])
            digests[m.name] = seen[key]
            head_path = man.path(m.head_file or m.file)
            checked_head(load(head_path) if m.head_file else state, m.arch, m.num_classes, head_path)
        del state
    for m in man.models:
        first = by_id.setdefault(m.backbone_id, (m.name, digests[m.name]))
        if first[1] != digests[m.name]:
            raise ManifestError(f"{man.source or man.root}: models {first[0]} and {m.name} share backbone_id "
                                f"{m.backbone_id!r} but their files hold different backbones")
    return digests


def load_model(man: Manifest, entry: ModelEntry, load=load_checkpoint,
               seen: dict | None = None) -> FeatureResNet:
    """The model of one manifest entry (backbone file + optional head file), in eval mode.

    ``load(path) -> state dict``: how files are read (a memo lets several entries share one read).
    Names, shapes and dtypes are checked before any value is read, values are finite, and the
    entry's backbone_id must be the hash of the file's backbone (``seen``: digests of files
    already hashed, see :func:`verify_models`).
    """
    state = _verified_backbone(man, entry, load, {} if seen is None else seen)
    model = model_from_state(entry.arch, entry.num_classes, state, str(man.path(entry.file)))
    if entry.head_file:
        w, b = checked_head(load(man.path(entry.head_file)), entry.arch, entry.num_classes,
                            man.path(entry.head_file))
        model.fc.load_state_dict({"weight": w, "bias": b})
    return model.eval()


def make_entry(name: str, role: str, file: str | Path, arch: str, num_classes: int,
               head_file: str | Path | None = None, state: dict | None = None,
               root: Path | None = None) -> ModelEntry:
    """Validate a checkpoint (and head) and describe it; raises CheckpointError naming the file.
    Names, shapes and dtypes are checked before any value is read (:func:`checked_state`)."""
    file = Path(file)
    state = state if state is not None else load_checkpoint(file)
    state = checked_state(state, arch, num_classes, file)
    model_from_state(arch, num_classes, state, str(file))  # raises CheckpointError if it does not fit
    if head_file:
        checked_head(load_checkpoint(head_file), arch, num_classes, head_file)

    def rel(p):
        p = Path(p).resolve()
        return str(p.relative_to(root.resolve())) if root and p.is_relative_to(root.resolve()) else str(p)

    return ModelEntry(name=name, role=role, arch=arch, num_classes=num_classes, file=rel(file),
                      sha256=sha256_file(file), backbone_id=backbone_id(state),
                      head_file=rel(head_file) if head_file else None,
                      head_sha256=sha256_file(head_file) if head_file else None)


def export_safetensors(man: Manifest, out: str | Path) -> Manifest:
    """Write every checkpoint of ``man`` (checked by :func:`verify_models`) as a ``.safetensors``
    file in the folder ``out`` and a manifest naming them (``out/manifest.json``); returns it.

    The format to share teachers in: no pickle, no strides, names, dtypes and byte ranges in a
    JSON header. Tensors keep their dtype and bytes, so every backbone_id stays the same; the
    sha256s are the new files'. Refuses to write over the manifest it reads.
    """
    from core.files import ensure_dir
    from core.models import save_safetensors

    out = ensure_dir(out, "export folder")
    if out.resolve() == Path(man.root).resolve():
        raise ManifestError(f"export into {out}: that is the manifest's own folder; choose another")
    verify_models(man)
    written: dict[Path, str] = {}

    def export(rel: str | None) -> str | None:
        if rel is None:
            return None
        src = man.path(rel)
        if src not in written:
            name = f"{Path(rel).stem}.safetensors"
            while name in written.values():
                name = f"{Path(name).stem}_{len(written)}.safetensors"
            save_safetensors(load_checkpoint(src), out / name)
            written[src] = name
        return written[src]

    models = [dataclasses.replace(m, file=export(m.file), head_file=export(m.head_file)) for m in man.models]
    for m in models:
        m.sha256 = sha256_file(out / m.file)
        m.head_sha256 = sha256_file(out / m.head_file) if m.head_file else None
    new = dataclasses.replace(man, models=models, root=out, source=out / "manifest.json")
    new.save(out / "manifest.json")
    return new
