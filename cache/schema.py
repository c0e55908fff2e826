"""The cache schema: what a teacher cache holds, declared once (layout, header, shards).

The cache is the contract between ``precompute`` (writes it) and ``distill`` (reads it). One
self-describing HDF5 file; no pickle. Schema ``gr-kd-cache`` version 2 (R = row_stop - row_start
rows in this file; file row r is dataset row row_start + r; V = K + 1 views per row, view 0 the
eval view and views 1..K random; T teachers; B distinct backbones; C classes; A values of the
spurious attribute)::

    / attrs  schema, schema_version, created (UTC ISO), tool_version, git_commit, torch_version,
             dataset (name), dataset_options (JSON, e.g. CelebA's target and spurious attribute),
             class_names (JSON [C]), attr_names (JSON [A]),
             num_classes, dataset_fingerprint, teachers (JSON [{name, role, sha256, backbone_id}],
             role "teacher" | "biased"; logits follow the order of the "teacher" entries),
             backbone_ids (JSON [B]), backbone_of_teacher (JSON [T], index into B),
             biased_backbone (index into B), view_spec (JSON of data.views.ViewSpec: random_views
             K, out_size, scale, ratio, seed), store_size (pixel side of the image store),
             teachers_pretrained, layers (JSON), tau_cached, feature_dtype "float16",
             num_samples (N of the whole data set), row_start, row_stop, shard ("i/n" or ""),
             digests_sha256, header_sha256 (cache.integrity; present once the file is finished)
    /samples/  id [R] utf-8 str (image path), y, attr, group (y * A + attr), split [R] int64
    /views/    box [R, V, 4] float32 (top, left, height, width, relative), flip [R, V] bool
    /logits/   teachers [R, V, T, C] float32, biased [R, V, C] float32
    /features/ <layer> [R, V, B, D_layer] float16
    /weights/  agre_cached [R, V, T] float32
    /progress/ done [R] bool
    /digests/  <dataset> [R, 32] uint8: sha256 of every row (cache.integrity)

Every dataset is chunked by rows (a chunk holds a few whole rows, all views), checksummed
(fletcher32) and compressed with the portable shuffle + gzip filters (or not compressed).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.constants import ROLES
from core.errors import ConfigError, ToolError
from core.provenance import PROVENANCE_FIELDS, canon, provenance
from data.folders import group_names

SCHEMA_NAME = "gr-kd-cache"
SCHEMA_VERSION = 2
FEATURE_DTYPE = "float16"
SAMPLE_FIELDS = ("id", "y", "attr", "group", "split")

# A chunk is the unit of decompression: a random row read decodes its whole chunk, so chunks stay
# small, but a few rows long so that small per-row datasets do not turn into millions of chunks.
CHUNK_BYTES = 256 * 1024
MAX_CHUNK_ROWS = 64
DEFAULT_GZIP_LEVEL = 1  # float data compresses about as well at level 1 as at 9, and far faster


class CacheError(ToolError):
    """A cache file that cannot be used as asked; the message names the file and what to do."""


@dataclass
class CacheMeta:
    """What a cache was made from and how it is laid out (everything but the rows).

    ``teachers`` lists every model with ``{"name", "role", "sha256", "backbone_id"}``; exactly one
    has role ``"biased"``, the others (role ``"teacher"``, T of them, in logit order) are the
    ensemble. ``backbone_ids[backbone_of_teacher[t]]`` is teacher t's backbone (its row in
    ``/features``), ``backbone_ids[biased_backbone]`` the biased model's. ``view_spec`` is a
    :class:`data.views.ViewSpec` as a dict. Provenance fields left empty are filled from
    :func:`core.provenance.provenance` on construction.
    """

    num_classes: int
    class_names: list
    attr_names: list
    dataset: str
    dataset_options: dict
    dataset_fingerprint: str
    teachers: list
    backbone_ids: list
    backbone_of_teacher: list
    biased_backbone: int
    view_spec: dict
    store_size: int
    teachers_pretrained: bool
    layers: list
    feature_dims: dict
    num_samples: int
    tau_cached: float
    created: str = ""
    tool_version: str = ""
    git_commit: str = ""
    torch_version: str = ""

    # The fields a resumed or merged file must share with the inputs; provenance may differ.
    IDENTITY = ("num_classes", "class_names", "attr_names", "dataset", "dataset_options", "dataset_fingerprint", "teachers", "backbone_ids",
                "backbone_of_teacher", "biased_backbone", "view_spec", "store_size",
                "teachers_pretrained", "layers", "feature_dims", "num_samples", "tau_cached")

    def __post_init__(self):
        self.teachers = canon(list(self.teachers))
        self.class_names, self.attr_names = [str(c) for c in self.class_names], [str(a) for a in self.attr_names]
        self.backbone_ids = [str(b) for b in self.backbone_ids]
        self.backbone_of_teacher = [int(b) for b in self.backbone_of_teacher]
        self.layers = [str(l) for l in self.layers]
        self.feature_dims = {str(k): int(v) for k, v in self.feature_dims.items()}
        self.view_spec = canon(dict(self.view_spec))
        self.dataset_options = canon(dict(self.dataset_options))
        self.num_classes, self.store_size = int(self.num_classes), int(self.store_size)
        self.num_samples, self.biased_backbone = int(self.num_samples), int(self.biased_backbone)
        self.teachers_pretrained = bool(self.teachers_pretrained)
        self.tau_cached = float(self.tau_cached)
        self.dataset_fingerprint = str(self.dataset_fingerprint)
        missing = [k for k in PROVENANCE_FIELDS if not getattr(self, k)]
        if missing:
            prov = provenance()
            for k in missing:
                setattr(self, k, prov[k])
        self.validate()

    @property
    def teacher_entries(self) -> list[dict]:
        return [t for t in self.teachers if t.get("role") == "teacher"]

    @property
    def biased_entry(self) -> dict:
        return next(t for t in self.teachers if t.get("role") == "biased")

    @property
    def num_teachers(self) -> int:
        return len(self.teacher_entries)

    @property
    def num_backbones(self) -> int:
        return len(self.backbone_ids)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def group_names(self) -> list[str]:
        return list(group_names(self.class_names, self.attr_names))

    @property
    def random_views(self) -> int:
        """K: the random views stored per row besides the eval view."""
        return int(self.view_spec.get("random_views", 0))

    @property
    def views_per_row(self) -> int:
        """V = K + 1: the length of every dataset's view axis (view 0 is the eval view)."""
        return self.random_views + 1

    @property
    def out_size(self) -> int:
        """Pixel side of a rendered view (what the teachers saw)."""
        return int(self.view_spec["out_size"])

    def identity(self) -> dict:
        return canon({k: getattr(self, k) for k in self.IDENTITY})

    def identity_digest(self) -> str:
        """sha256 of :meth:`identity`: equal for caches with the same contents (a merged file
        and its single-process twin), different when data, teachers, views or layers differ."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def validate(self) -> None:
        """Raise CacheError on a meta that could not describe a consistent file."""
        problems = []
        roles = [t.get("role") for t in self.teachers]
        if any(r not in ROLES for r in roles):
            problems.append(f"teacher roles must be one of {ROLES}, got {roles}")
        if roles.count("biased") != 1:
            problems.append(f"exactly one model must have role 'biased', got {roles.count('biased')}")
        if roles.count("teacher") < 1:
            problems.append("at least one model must have role 'teacher'")
        for t in self.teachers:
            if not all(k in t for k in ("name", "role", "sha256", "backbone_id")):
                problems.append(f"teacher entry {t} needs name, role, sha256 and backbone_id")
        if len(set(self.backbone_ids)) != len(self.backbone_ids) or not self.backbone_ids:
            problems.append(f"backbone_ids must be distinct and non-empty, got {self.backbone_ids}")
        if len(self.backbone_of_teacher) != roles.count("teacher"):
            problems.append(f"backbone_of_teacher has {len(self.backbone_of_teacher)} entries for "
                            f"{roles.count('teacher')} teachers")
        B = len(self.backbone_ids)
        if not all(0 <= b < B for b in [*self.backbone_of_teacher, self.biased_backbone]):
            problems.append(f"backbone indices must lie in 0..{B - 1}")
        elif not problems:
            for t, b in zip(self.teacher_entries, self.backbone_of_teacher):
                if t["backbone_id"] != self.backbone_ids[b]:
                    problems.append(f"teacher {t['name']} has backbone_id {t['backbone_id']!r} "
                                    f"but backbone_of_teacher points to {self.backbone_ids[b]!r}")
            if self.biased_entry["backbone_id"] != self.backbone_ids[self.biased_backbone]:
                problems.append("the biased model's backbone_id differs from backbone_ids[biased_backbone]")
        if sorted(self.feature_dims) != sorted(self.layers) or len(set(self.layers)) != len(self.layers):
            problems.append(f"feature_dims keys {sorted(self.feature_dims)} must be the layers {self.layers}")
        if any("/" in l or not l for l in self.layers):
            problems.append(f"layer names must be non-empty and contain no '/': {self.layers}")
        if any(d < 1 for d in self.feature_dims.values()):
            problems.append(f"feature dims must be positive: {self.feature_dims}")
        if self.num_classes < 2 or self.num_samples < 1 or self.random_views < 0:
            problems.append("num_classes >= 2, num_samples >= 1 and random_views >= 0 are required")
        if len(self.class_names) != self.num_classes or not self.attr_names:
            problems.append(f"class_names {self.class_names} must name the {self.num_classes} classes "
                            f"and attr_names {self.attr_names} at least one attribute value")
        if "out_size" not in self.view_spec or self.store_size < 1:
            problems.append("view_spec needs out_size, and store_size must be positive")
        if problems:
            raise CacheError("invalid cache meta: " + "; ".join(problems))


# ----------------------------------------------------------------------------- layout


def layout(meta: CacheMeta, R: int) -> dict[str, tuple[tuple, np.dtype | None]]:
    """Dataset path -> (shape, dtype) of a file with R rows; dtype None is the utf-8 ``samples/id``."""
    V, T, C, B = meta.views_per_row, meta.num_teachers, meta.num_classes, meta.num_backbones
    out = {"samples/id": ((R,), None)}
    out.update({f"samples/{k}": ((R,), np.dtype(np.int64)) for k in SAMPLE_FIELDS[1:]})
    out.update({
        "views/box": ((R, V, 4), np.dtype(np.float32)),
        "views/flip": ((R, V), np.dtype(bool)),
        "logits/teachers": ((R, V, T, C), np.dtype(np.float32)),
        "logits/biased": ((R, V, C), np.dtype(np.float32)),
    })
    out.update({f"features/{l}": ((R, V, B, meta.feature_dims[l]), np.dtype(FEATURE_DTYPE))
                for l in meta.layers})
    out["weights/agre_cached"] = ((R, V, T), np.dtype(np.float32))
    out["progress/done"] = ((R,), np.dtype(bool))
    return out


# What a training step reads, by the names the reader returns (see CacheReader.read).
ROW_DATASETS = {"box": "views/box", "flip": "views/flip", "logits": "logits/teachers",
                "biased": "logits/biased", "weights": "weights/agre_cached"}


def row_bytes(shape: tuple, itemsize: int) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) * itemsize


def chunk_rows(row_nbytes: int, R: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(row_nbytes, 1), R))


def encode_ids(ids) -> np.ndarray:
    # Fixed-length utf-8, not variable-length: HDF5 cannot filter (checksum) variable-length data,
    # and a shared file must be checksummed everywhere. Readers see str either way (``asstr``).
    import h5py

    ids = [str(s) for s in ids]
    width = max([len(s.encode("utf-8")) for s in ids] + [1])
    return np.array([s.encode("utf-8") for s in ids], dtype=h5py.string_dtype("utf-8", width))


# ----------------------------------------------------------------------------- header


def meta_attrs(meta: CacheMeta, row_start: int, row_stop: int, shard: str) -> dict:
    """The file's root attributes for ``meta`` and its row range."""
    return {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "created": meta.created,
        "tool_version": meta.tool_version, "git_commit": meta.git_commit,
        "torch_version": meta.torch_version, "num_classes": meta.num_classes,
        "class_names": json.dumps(meta.class_names), "attr_names": json.dumps(meta.attr_names),
        "dataset": meta.dataset, "dataset_options": json.dumps(meta.dataset_options, sort_keys=True),
        "dataset_fingerprint": meta.dataset_fingerprint, "teachers": json.dumps(meta.teachers),
        "backbone_ids": json.dumps(meta.backbone_ids),
        "backbone_of_teacher": json.dumps(meta.backbone_of_teacher),
        "biased_backbone": meta.biased_backbone,
        "view_spec": json.dumps(meta.view_spec, sort_keys=True), "store_size": meta.store_size,
        "teachers_pretrained": meta.teachers_pretrained, "layers": json.dumps(meta.layers),
        "tau_cached": meta.tau_cached, "feature_dtype": FEATURE_DTYPE,
        "num_samples": meta.num_samples, "row_start": row_start, "row_stop": row_stop, "shard": shard,
    }


def check_schema(attrs, path) -> None:
    schema = attrs.get("schema")
    if schema != SCHEMA_NAME:
        raise CacheError(f"{path}: not a teacher cache (schema attribute {schema!r}, expected "
                         f"{SCHEMA_NAME!r}); pass the cache.h5 written by precompute")
    version = attrs.get("schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {version} found, this tool supports version "
                         f"{SCHEMA_VERSION}; use the tool version that wrote it or rebuild the "
                         "cache with precompute")


def meta_from_file(f, path) -> tuple[CacheMeta, int, int, str]:
    """Meta and (row_start, row_stop, shard) of an open h5py file whose schema was checked."""
    a = f.attrs
    try:
        layers = json.loads(a["layers"])
        missing = [f"/features/{l}" for l in layers if f"features/{l}" not in f]
        if missing:
            raise KeyError(", ".join(missing))
        meta = CacheMeta(
            num_classes=int(a["num_classes"]), class_names=json.loads(a["class_names"]),
            attr_names=json.loads(a["attr_names"]), dataset=str(a["dataset"]),
            dataset_options=json.loads(a["dataset_options"]),
            dataset_fingerprint=str(a["dataset_fingerprint"]),
            teachers=json.loads(a["teachers"]), backbone_ids=json.loads(a["backbone_ids"]),
            backbone_of_teacher=json.loads(a["backbone_of_teacher"]),
            biased_backbone=int(a["biased_backbone"]), view_spec=json.loads(a["view_spec"]),
            store_size=int(a["store_size"]), teachers_pretrained=bool(a["teachers_pretrained"]),
            layers=layers, feature_dims={l: int(f[f"features/{l}"].shape[-1]) for l in layers},
            num_samples=int(a["num_samples"]), tau_cached=float(a["tau_cached"]),
            created=str(a["created"]), tool_version=str(a["tool_version"]),
            git_commit=str(a["git_commit"]), torch_version=str(a["torch_version"]))
        row_start, row_stop, shard = int(a["row_start"]), int(a["row_stop"]), str(a["shard"])
    except KeyError as e:
        raise CacheError(f"{path}: attribute or dataset {e} is missing: the file is damaged, or was not "
                         "written completely. Delete it and rerun precompute") from None
    except (ValueError, TypeError, IndexError, CacheError) as e:
        raise CacheError(f"{path}: inconsistent header ({e}); delete it and rerun precompute") from None
    if not 0 <= row_start < row_stop <= meta.num_samples:
        raise CacheError(f"{path}: row range {row_start}..{row_stop} does not fit num_samples "
                         f"{meta.num_samples}; delete it and rerun precompute")
    return meta, row_start, row_stop, shard


# ----------------------------------------------------------------------------- shards and files


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard must look like 'i/n' with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(m.group(1)), int(m.group(2))


def shard_rows(shard: str, num_samples: int, align: int = 1) -> tuple[int, int]:
    """Dataset rows ``[start, stop)`` of shard ``"i/n"``: n contiguous, near-equal ranges whose
    boundaries are multiples of ``align``.

    Precompute aligns them to its batch size, so every shard runs exactly the batches of a
    single-process run and the merged file equals it bit for bit (batch composition changes
    float results in the last bits on some kernels). Raises ConfigError for an empty shard.
    """
    i, n = parse_shard(shard)
    align = max(1, int(align))

    def edge(k):
        return min(num_samples, round((k * num_samples // n) / align) * align)
    start, stop = edge(i), (num_samples if i == n - 1 else edge(i + 1))
    if start >= stop:
        raise ConfigError(f"shard {shard} holds no rows: {num_samples} rows in batches of {align} do not "
                          f"make {n} shards; use fewer shards or a smaller --batch-size")
    return start, stop


def store_path_for(cache_path: str | Path) -> Path:
    """The pre-decoded image store that goes with a cache file (same folder, same stem). A shard
    file has its own, holding its rows only; ``cache merge`` puts them together."""
    p = Path(cache_path)
    return p.with_name(p.stem + ".images.h5")
