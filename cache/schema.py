"""The cache schema: what a teacher cache holds, declared once (layout, header, shards).

The cache is the contract between ``precompute`` (writes it) and ``distill`` (reads it). One
self-describing HDF5 file; no pickle. Schema ``gr-kd-cache`` version 3, laid out by epoch (R =
row_stop - row_start rows in this file, file row r is dataset row row_start + r; Rt of them are
training rows, ``train_rows`` = the file rows whose split is train, increasing; K random views
per training row; T teachers; B distinct backbones; C classes; A spurious-attribute values)::

    / attrs    schema, schema_version, feature_dtype, block_rows, row_start, row_stop, shard
               ("i/n" or ""), and one attribute per CacheMeta field under its own name (lists and
               dicts as JSON; see header_attrs), digests_sha256 and header_sha256 once finished
    /samples/  id [R] utf-8 str (image path), y, attr, group (y * A + attr), split [R] int64
    /eval/     view 0 (the eval view) of every row:
               box [R, 4] float32 (top, left, height, width, relative), flip [R] bool,
               logits/teachers [R, T, C] float32, logits/biased [R, C] float32,
               features/<layer> [R, B, D_layer] float16, weights/agre_cached [R, T] float32
    /random/   the K random views of the training rows only, slot-major (view v = slot v - 1):
               box [K, Rt, 4], flip [K, Rt], logits/teachers [K, Rt, T, C], logits/biased [K, Rt, C],
               features/<layer> [K, Rt, B, D], weights/agre_cached [K, Rt, T]
               (absent when K = 0 or the file holds no training row)
    /progress/ done [R] bool
    /digests/  <dataset with '/' -> '.'>: [n_blocks, 32] uint8, or [K, n_blocks, 32] for /random
               (one table per slot): sha256 of every block of block_rows rows (cache.integrity)

Why slot-major: epoch e of a run uses one random view of every training row (slot e mod K), so
that slot is one [Rt, ...] slab of each dataset; chunks are (1, rows, ...) and, in an uncompressed
file, allocated when the file is made, in slot order, so one slot of one dataset is one contiguous
byte range and an epoch's read of it is sequential. Evaluation rows keep view 0 only.
Every dataset is chunked by rows, checksummed (fletcher32) and optionally compressed with the
portable shuffle + gzip filters (a gzip file allocates its chunks as they are written: the slots
are then interleaved on disk, still read alone).

The root digest of a file (:attr:`cache.reader.CacheReader.root_digest`) is its header digest:
it covers every root attribute, among them ``digests_sha256``, which covers every digest table,
which covers every block of every dataset; a sender publishes it, a receiver checks it with
``verify(path, expect=DIGEST)``.

What each header field may hold, its kind and its range (the ``MAX_*`` limits, checked on every
open before anything is sized from them), is in :mod:`cache.limits`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.limits import field_problems, is_int, is_number
from core.constants import ROLES
from core.errors import ConfigError, ToolError
from core.provenance import PROVENANCE_FIELDS, provenance
from data.folders import SPLIT_CODES, group_names

SCHEMA_NAME = "gr-kd-cache"
SCHEMA_VERSION = 3
FEATURE_DTYPE = "float16"
SAMPLE_FIELDS = ("id", "y", "attr", "group", "split")
TRAIN = SPLIT_CODES["train"]

# A chunk is the unit of decompression: a random row read decodes its whole chunk, so chunks stay
# small, but a few rows long so that small per-row datasets do not turn into millions of chunks.
CHUNK_BYTES = 256 * 1024
MAX_CHUNK_ROWS = 64
DEFAULT_GZIP_LEVEL = 1  # float data compresses about as well at level 1 as at 9, and far faster

EVAL, RANDOM = "eval", "random"
# What a view holds, by the names the reader returns -> dataset name under /eval or /random.
VIEW_FIELDS = {"box": "box", "flip": "flip", "logits": "logits/teachers", "biased": "logits/biased",
               "weights": "weights/agre_cached"}


class CacheError(ToolError):
    """A cache file that cannot be used as asked; the message names the file and what to do."""


def _items(kind):
    return field(metadata={"item": kind})


@dataclass
class CacheMeta:
    """What a cache was made from and how it is laid out (everything but the rows).

    ``teachers`` lists every model with ``{"name", "role", "sha256", "backbone_id"}``; exactly one
    has role ``"biased"``, the others (role ``"teacher"``, T of them, in logit order) are the
    ensemble. ``backbone_ids[backbone_of_teacher[t]]`` is teacher t's backbone (its row in
    the features' B axis), ``backbone_ids[biased_backbone]`` the biased model's. ``view_spec`` is
    a :class:`data.views.ViewSpec` as a dict. Provenance fields left empty are filled from
    :func:`core.provenance.provenance` on construction.

    ``store_digest`` binds the image store beside the cache (:func:`store_path_for`) to it: the
    teacher outputs were computed from those pixels, so it is part of the identity.

    Every field is one root attribute of the file, under its name (lists and dicts as JSON):
    :func:`header_attrs` and :func:`meta_from_file` loop over the fields, and the identity (what a
    resumed or merged file must share with its inputs) is every field but the provenance ones.
    """

    num_classes: int
    class_names: list = _items(str)
    attr_names: list = _items(str)
    dataset: str
    dataset_options: dict
    dataset_fingerprint: str
    teachers: list
    backbone_ids: list = _items(str)
    backbone_of_teacher: list = _items(int)
    biased_backbone: int
    view_spec: dict
    store_size: int
    teachers_pretrained: bool
    layers: list = _items(str)
    feature_dims: dict
    num_samples: int
    tau_cached: float
    store_digest: str = ""           # ImageStore.store_digest() of the image store the outputs were
                                      # computed from ("" for a file made without one)
    # What was done to the file after precompute, oldest first: {"op": "slim" | "extend", "from":
    # the input's root digest, ...} (cache.tools, precompute.extend); [] for a precomputed file.
    history: list = field(default_factory=list)
    created: str = ""
    tool_version: str = ""
    git_commit: str = ""
    torch_version: str = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _normalise(f, getattr(self, f.name)))
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
        """K: the random views stored per training row besides the eval view."""
        return int(self.view_spec.get("random_views", 0))

    @property
    def views_per_row(self) -> int:
        """K + 1: the view slots of a training row (slot 0 the eval view, 1..K random)."""
        return self.random_views + 1

    @property
    def out_size(self) -> int:
        """Pixel side of a rendered view (what the teachers saw)."""
        return int(self.view_spec["out_size"])

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def identity_digest(self) -> str:
        """sha256 of :meth:`identity`: equal for caches with the same contents (a merged file
        and its single-process twin), different when data, teachers, views or layers differ."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def backbone_users(self, b: int) -> list[str]:
        """Names of the models (teachers, biased model) whose features are backbone ``b``'s."""
        names = [t["name"] for t, bb in zip(self.teacher_entries, self.backbone_of_teacher) if bb == b]
        return names + ([self.biased_entry["name"]] if self.biased_backbone == b else [])

    def validate(self) -> None:
        """Raise CacheError on a meta that could not describe a consistent file."""
        problems = field_problems(self)
        if problems:  # the checks below assume the fields' shapes
            raise CacheError("invalid cache meta: " + "; ".join(problems))
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
        if any(not isinstance(d, int) or d < 1 for d in self.feature_dims.values()):
            problems.append(f"feature dims must be positive integers: {self.feature_dims}")
        if self.num_classes < 2 or self.num_samples < 1 or self.random_views < 0:
            problems.append("num_classes >= 2, num_samples >= 1 and random_views >= 0 are required")
        if len(self.class_names) != self.num_classes or not self.attr_names:
            problems.append(f"class_names {self.class_names} must name the {self.num_classes} classes "
                            f"and attr_names {self.attr_names} at least one attribute value")
        if "out_size" not in self.view_spec or self.store_size < 1:
            problems.append("view_spec needs out_size, and store_size must be positive")
        if problems:
            raise CacheError("invalid cache meta: " + "; ".join(problems))


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}
IDENTITY = tuple(f.name for f in dataclasses.fields(CacheMeta) if f.name not in PROVENANCE_FIELDS)


def _plain(x):
    """numpy scalars and arrays as Python values (for JSON)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _is_json(f) -> bool:
    return f.type in ("list", "dict")


def _normalise(f, value):
    """One field's value in its canonical form: JSON round trip for lists and dicts (tuples
    become lists, keys strings, numpy values Python ones), items of the kind the field says.
    A value of another kind (a header read from a received file may hold anything) is a
    CacheError naming the field; nothing is converted but numbers (an int where a float goes)."""
    if isinstance(value, np.generic):
        value = value.item()
    if _is_json(f):
        value = json.loads(json.dumps(value, sort_keys=True, default=_plain))
        kind = list if f.type == "list" else dict
        if not isinstance(value, kind):
            raise CacheError(f"invalid cache meta: field {f.name!r} must be a JSON {f.type}, "
                             f"got {type(value).__name__} {str(value)[:60]}")
        item = f.metadata.get("item")
        if item is not None:
            wrong = [v for v in value if not (isinstance(v, item) and (item is not int or is_int(v)))]
            if wrong:
                raise CacheError(f"invalid cache meta: field {f.name!r} must list {item.__name__} values, "
                                 f"got {str(wrong[0])[:60]}")
        return value
    ok = {"int": is_int, "float": is_number, "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[f.type]
    if not ok(value):
        raise CacheError(f"invalid cache meta: field {f.name!r} must be {f.type}, "
                         f"got {type(value).__name__} {str(value)[:60]}")
    return _SCALARS[f.type](value)


# ----------------------------------------------------------------------------- layout


def train_positions(split) -> np.ndarray:
    """File rows whose split is train (increasing): the rows that hold random view slots."""
    return np.flatnonzero(np.asarray(split) == TRAIN)


def has_random(meta: CacheMeta, Rt: int) -> bool:
    return meta.random_views > 0 and Rt > 0


def view_datasets(meta: CacheMeta, part: str) -> dict[str, str]:
    """Reader key -> dataset path of one part ("eval" or "random"); features as ``features/<l>``."""
    out = {k: f"{part}/{v}" for k, v in VIEW_FIELDS.items()}
    out.update({f"features/{l}": f"{part}/features/{l}" for l in meta.layers})
    return out


def layout(meta: CacheMeta, R: int, Rt: int) -> dict[str, tuple[tuple, np.dtype | None]]:
    """Dataset path -> (shape, dtype) of a file with R rows, Rt of them training rows; dtype None
    is the utf-8 ``samples/id``. /random datasets have a leading slot axis of length K."""
    T, C, B, K = meta.num_teachers, meta.num_classes, meta.num_backbones, meta.random_views
    per_view = {"box": ((4,), np.float32), "flip": ((), bool), "logits": ((T, C), np.float32),
                "biased": ((C,), np.float32), "weights": ((T,), np.float32),
                **{f"features/{l}": ((B, meta.feature_dims[l]), FEATURE_DTYPE) for l in meta.layers}}
    out = {"samples/id": ((R,), None)}
    out.update({f"samples/{k}": ((R,), np.dtype(np.int64)) for k in SAMPLE_FIELDS[1:]})
    parts = [(EVAL, (R,))] + ([(RANDOM, (K, Rt))] if has_random(meta, Rt) else [])
    for part, lead in parts:
        names = view_datasets(meta, part)
        out.update({names[k]: ((*lead, *shape), np.dtype(dtype)) for k, (shape, dtype) in per_view.items()})
    out["progress/done"] = ((R,), np.dtype(bool))
    return out


def is_slotted(name: str) -> bool:
    """A /random dataset: axis 0 is the slot, axis 1 the training row."""
    return name.startswith(RANDOM + "/")


def row_bytes(shape: tuple, itemsize: int, slotted: bool = False) -> int:
    """Bytes of one row of a dataset (of one slot's row for a slotted one)."""
    return int(np.prod(shape[2 if slotted else 1:], dtype=np.int64)) * itemsize


def chunk_rows(row_nbytes: int, R: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(row_nbytes, 1), R))


def chunks_of(name: str, shape: tuple, itemsize: int) -> tuple:
    """HDF5 chunk shape: a few whole rows; for a slotted dataset, of one slot."""
    slotted = is_slotted(name)
    rows = chunk_rows(row_bytes(shape, itemsize, slotted), shape[1 if slotted else 0])
    return (1, rows, *shape[2:]) if slotted else (rows, *shape[1:])


def encode_ids(ids) -> np.ndarray:
    # Fixed-length utf-8, not variable-length: HDF5 cannot filter (checksum) variable-length data,
    # and a shared file must be checksummed everywhere. Readers see str either way (``asstr``).
    import h5py

    ids = [str(s) for s in ids]
    width = max([len(s.encode("utf-8")) for s in ids] + [1])
    return np.array([s.encode("utf-8") for s in ids], dtype=h5py.string_dtype("utf-8", width))


# ----------------------------------------------------------------------------- header


def header_attrs(meta: CacheMeta, row_start: int, row_stop: int, shard: str, block_rows: int) -> dict:
    """The file's root attributes for ``meta`` and its row range: one per CacheMeta field."""
    out = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "feature_dtype": FEATURE_DTYPE,
           "block_rows": int(block_rows), "row_start": int(row_start), "row_stop": int(row_stop),
           "shard": shard}
    for f in dataclasses.fields(CacheMeta):
        value = getattr(meta, f.name)
        out[f.name] = json.dumps(value, sort_keys=True) if _is_json(f) else value
    return out


def rebuild_hint(attrs, path) -> str:
    """The precompute command that rebuilds the file at ``path`` (what its header says of it)."""
    def get(key, default):
        try:
            return json.loads(attrs[key]) if key in ("view_spec", "layers") else str(attrs[key])
        except Exception:  # an old or damaged header: leave the placeholder
            return default
    views = get("view_spec", {}).get("random_views", "K") if isinstance(get("view_spec", {}), dict) else "K"
    layers = get("layers", None)
    dataset = get("dataset", None)
    return ("python cli.py precompute --data-root DATA_DIR --teachers TEACHERS/manifest.json "
            f"--out {path} --views {views}" + (f" --layers {','.join(layers)}" if layers else "")
            + (f" --dataset {dataset}" if dataset else "") + " --overwrite")


def check_schema(attrs, path) -> None:
    schema = attrs.get("schema")
    if schema != SCHEMA_NAME:
        raise CacheError(f"{path}: not a teacher cache (schema attribute {schema!r}, expected "
                         f"{SCHEMA_NAME!r}); pass the cache.h5 written by precompute")
    version = attrs.get("schema_version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        version = None
    if version != SCHEMA_VERSION:
        older = version is not None and version < SCHEMA_VERSION
        why = (" (row-major: every row kept K + 1 views; version 3 keeps the random views of the "
               "training rows only, one slot per epoch)" if older else "")
        raise CacheError(f"{path}: cache schema version {version} found{why}; this tool reads version "
                         f"{SCHEMA_VERSION} only. Rebuild it with the arguments that made it (the same "
                         f"data folder, teachers and options) plus --overwrite: {rebuild_hint(attrs, path)}")


def meta_from_file(f, path) -> tuple[CacheMeta, int, int, str]:
    """Meta and (row_start, row_stop, shard) of an open h5py file whose schema was checked."""
    a = f.attrs
    try:
        kw = {}
        for fl in dataclasses.fields(CacheMeta):
            if fl.name == "history" and fl.name not in a:  # a file written before the field
                continue
            raw = a[fl.name]
            raw = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            kw[fl.name] = json.loads(raw) if _is_json(fl) else raw
        meta = CacheMeta(**kw)
        row_start, row_stop, shard = int(a["row_start"]), int(a["row_stop"]), str(a["shard"])
    except KeyError as e:
        raise CacheError(f"{path}: attribute {e} is missing: the file is damaged, or was not written "
                         "completely. Delete it and rerun precompute") from None
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
