"""The teacher cache: one self-describing HDF5 file, the only place that knows its dataset names.

Teachers and the biased model run once (``precompute``); the student trains from this file. It is
meant to be shared, so it carries everything needed to trust it: schema name and version, the
fingerprint of the data set it was made from, the teachers' checkpoint hashes, the view recipe,
provenance, per-chunk fletcher32 checksums and a per-row ``done`` flag for resume. No pickle.

Schema ``gr-kd-cache`` version 1 (R = row_stop - row_start rows in this file; file row r is
dataset row row_start + r; V = K + 1 views, view 0 the eval view; T teachers; B distinct
backbones; C classes)::

    / attrs  schema, schema_version, created (UTC ISO), tool_version, git_commit, torch_version,
             num_classes, dataset_fingerprint, teachers (JSON [{name, role, sha256, backbone_id}],
             role "teacher" | "biased"; logits follow the order of the "teacher" entries),
             backbone_ids (JSON [B]), backbone_of_teacher (JSON [T], index into B),
             biased_backbone (index into B), view_spec (JSON), layers (JSON), tau_cached,
             feature_dtype "float16", num_samples (N of the whole data set), row_start, row_stop,
             shard ("i/n", i in 0..n-1, or "" for a full file)
    /samples/  id [R] utf-8 str (img_filename), y, place, group, split [R] int64
    /views/    box [R, V, 4] float32 (top, left, height, width, relative), flip [R, V] bool
    /logits/   teachers [R, V, T, C] float32, biased [R, V, C] float32
    /features/ <layer> [R, V, B, D_layer] float16
    /weights/  agre_cached [R, V, T] float32
    /progress/ done [R] bool

Every dataset is chunked by rows (a chunk holds a few whole rows, all views), checksummed
(fletcher32) and compressed with the portable shuffle + gzip filters. ``num_views`` and the
feature dims are read from the dataset shapes, so they cannot disagree with the data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from data.metrics import _as_numpy, split_metrics
from data.waterbirds import SPLIT_CODES, SPLIT_NAMES

log = logging.getLogger(__name__)

SCHEMA_NAME = "gr-kd-cache"
SCHEMA_VERSION = 1
TOOL_VERSION = "0.1.0"
FEATURE_DTYPE = "float16"
ROLES = ("teacher", "biased")
PROVENANCE_FIELDS = ("created", "tool_version", "git_commit", "torch_version")

# A chunk is the unit of decompression: a random row read decodes its whole chunk, so chunks stay
# small (a DataLoader worker reads one row at a time), but a few rows long so that small per-row
# datasets do not turn into millions of chunks.
CHUNK_BYTES = 256 * 1024
MAX_CHUNK_ROWS = 64
# Bulk reads go through slabs of at most this size, so peak memory stays bounded.
SLAB_BYTES = 64 * 1024 * 1024
READ_CACHE_BYTES = 16 * 1024 * 1024
DEFAULT_GZIP_LEVEL = 1  # float data compresses about as well at level 1 as at 9, and far faster

SAMPLE_FIELDS = ("id", "y", "place", "group", "split")


class CacheError(Exception):
    """A cache file that cannot be used as asked; the message names the file and what to do."""


# ----------------------------------------------------------------------------- provenance


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                          capture_output=True, text=True, timeout=10)


def provenance() -> dict:
    """``{"created", "tool_version", "git_commit", "torch_version"}`` of this process.

    ``git_commit`` is ``git rev-parse HEAD`` with ``-dirty`` when tracked files differ from it, or
    ``"unknown"`` outside a repository or without git. Never raises.
    """
    try:
        head = _git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "unknown"
        if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no").stdout.strip():
            commit += "-dirty"
    except Exception:  # no git binary, timeout, ...: provenance must never stop a run
        commit = "unknown"
    try:
        import torch
        torch_version = str(torch.__version__)
    except Exception:
        torch_version = "none"
    return {"created": _utc_now(),
            "tool_version": TOOL_VERSION, "git_commit": commit, "torch_version": torch_version}


# ----------------------------------------------------------------------------- metadata


def _canon(x):
    """JSON round trip: tuples become lists and dict keys strings, so equal inputs compare equal."""
    return json.loads(json.dumps(x, sort_keys=True))


@dataclass
class CacheMeta:
    """What a cache was made from and how it is laid out (everything but the rows).

    ``teachers`` lists every model with ``{"name", "role", "sha256", "backbone_id"}``; exactly one
    has role ``"biased"``, the others (role ``"teacher"``, T of them, in logit order) are the
    ensemble. ``backbone_ids[backbone_of_teacher[t]]`` is teacher t's backbone (its row in
    ``/features``), ``backbone_ids[biased_backbone]`` the biased model's. Provenance fields left
    empty are filled from :func:`provenance` on construction.
    """

    num_classes: int
    dataset_fingerprint: str
    teachers: list
    backbone_ids: list
    backbone_of_teacher: list
    biased_backbone: int
    view_spec: dict
    layers: list
    feature_dims: dict
    num_views: int
    num_samples: int
    tau_cached: float
    created: str = ""
    tool_version: str = ""
    git_commit: str = ""
    torch_version: str = ""

    # The fields a resumed or merged file must share with the inputs; provenance may differ.
    IDENTITY = ("num_classes", "dataset_fingerprint", "teachers", "backbone_ids",
                "backbone_of_teacher", "biased_backbone", "view_spec", "layers", "feature_dims",
                "num_views", "num_samples", "tau_cached")

    def __post_init__(self):
        self.teachers = _canon(list(self.teachers))
        self.backbone_ids = [str(b) for b in self.backbone_ids]
        self.backbone_of_teacher = [int(b) for b in self.backbone_of_teacher]
        self.layers = [str(l) for l in self.layers]
        self.feature_dims = {str(k): int(v) for k, v in self.feature_dims.items()}
        self.view_spec = _canon(dict(self.view_spec))
        self.num_classes, self.num_views = int(self.num_classes), int(self.num_views)
        self.num_samples, self.biased_backbone = int(self.num_samples), int(self.biased_backbone)
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

    def identity(self) -> dict:
        return _canon({k: getattr(self, k) for k in self.IDENTITY})

    def validate(self) -> None:
        """Raise ValueError on a meta that could not describe a consistent file."""
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
        if self.num_classes < 2 or self.num_views < 1 or self.num_samples < 1:
            problems.append("num_classes >= 2, num_views >= 1 and num_samples >= 1 are required")
        if problems:
            raise ValueError("invalid cache meta: " + "; ".join(problems))


def _identity_diff(a: dict, b: dict, name_a: str, name_b: str) -> list[str]:
    def short(v):
        s = json.dumps(v, sort_keys=True)
        return s if len(s) <= 120 else s[:117] + "..."
    return [f"{k}: {name_a} {short(a.get(k))}, {name_b} {short(b.get(k))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- layout


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"shard must look like 'i/n' with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(m.group(1)), int(m.group(2))


def shard_rows(shard: str, num_samples: int) -> tuple[int, int]:
    """Dataset rows ``[start, stop)`` of shard ``"i/n"``: n contiguous, near-equal ranges."""
    i, n = parse_shard(shard)
    return i * num_samples // n, (i + 1) * num_samples // n


def _layout(meta: CacheMeta, R: int) -> dict[str, tuple[tuple, np.dtype | None]]:
    """Dataset path -> (shape, dtype); dtype None is the utf-8 string of ``samples/id``."""
    V, T, C, B = meta.num_views, meta.num_teachers, meta.num_classes, meta.num_backbones
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


def _row_bytes(ds) -> int:
    return int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize


def _chunk_rows(row_bytes: int, R: int) -> int:
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(row_bytes, 1), R))


def _id_dtype(ids) -> np.dtype:
    # Fixed-length utf-8, not variable-length: HDF5 cannot filter (checksum) variable-length data,
    # and a shared file must be checksummed everywhere. Readers see str either way (``asstr``).
    width = max([len(s.encode("utf-8")) for s in ids] + [1])
    return h5py.string_dtype("utf-8", width)


def _encode_ids(ids) -> np.ndarray:
    ids = [str(s) for s in ids]
    return np.array([s.encode("utf-8") for s in ids], dtype=_id_dtype(ids))


def _meta_attrs(meta: CacheMeta, row_start: int, row_stop: int, shard: str) -> dict:
    return {
        "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "created": meta.created,
        "tool_version": meta.tool_version, "git_commit": meta.git_commit,
        "torch_version": meta.torch_version, "num_classes": meta.num_classes,
        "dataset_fingerprint": meta.dataset_fingerprint, "teachers": json.dumps(meta.teachers),
        "backbone_ids": json.dumps(meta.backbone_ids),
        "backbone_of_teacher": json.dumps(meta.backbone_of_teacher),
        "biased_backbone": meta.biased_backbone,
        "view_spec": json.dumps(meta.view_spec, sort_keys=True), "layers": json.dumps(meta.layers),
        "tau_cached": meta.tau_cached, "feature_dtype": FEATURE_DTYPE,
        "num_samples": meta.num_samples, "row_start": row_start, "row_stop": row_stop, "shard": shard,
    }


def _create_file(path: str, meta: CacheMeta, samples: dict, row_start: int, row_stop: int,
                 shard: str, compression: int | None) -> h5py.File:
    """A new file with attrs, samples and empty (not done) row datasets."""
    R = row_stop - row_start
    ids = _encode_ids(samples["id"])
    f = h5py.File(path, "w-", rdcc_nbytes=READ_CACHE_BYTES)
    try:
        f.attrs.update(_meta_attrs(meta, row_start, row_stop, shard))
        filters = {"fletcher32": True, "shuffle": compression is not None,
                   "compression": "gzip" if compression is not None else None,
                   "compression_opts": compression}
        for name, (shape, dtype) in _layout(meta, R).items():
            dtype = ids.dtype if dtype is None else dtype
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            chunks = (_chunk_rows(row_bytes, R), *shape[1:])
            ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, **filters)
            if name.startswith("samples/"):
                key = name.split("/")[1]
                ds[...] = ids if key == "id" else np.asarray(samples[key], dtype=np.int64)
            elif name == "progress/done":
                ds[...] = False  # allocates the chunks now, so a crash cannot leave "missing" ones
        f.flush()
    except BaseException:
        f.close()
        os.remove(path)  # a half-made file would only be refused on the next run
        raise
    return f


# ----------------------------------------------------------------------------- opening


def _open_h5(path, mode: str = "r") -> h5py.File:
    """h5py.File with the errors a user meets turned into CacheError."""
    path = str(path)
    if mode != "w-" and not os.path.isfile(path):
        raise CacheError(f"{path}: no such cache file; build it with `precompute` or check the path")
    try:
        return h5py.File(path, mode, rdcc_nbytes=READ_CACHE_BYTES)
    except (OSError, ValueError) as e:
        if isinstance(e, BlockingIOError) or "unable to lock file" in str(e):
            raise CacheError(f"{path}: the file is open for writing in another process (a running "
                             "precompute?); wait for it to finish or stop it") from None
        if "already open" in str(e):
            raise CacheError(f"{path}: already open in this process in another mode ({e}); close "
                             "the reader or writer on it first") from None
        raise CacheError(f"{path}: not a readable HDF5 file ({e}). It is truncated or corrupt (an "
                         "interrupted copy or write?); copy it again or delete it and rerun "
                         "precompute") from None


def _check_schema(f: h5py.File, path) -> None:
    schema = f.attrs.get("schema")
    if schema != SCHEMA_NAME:
        raise CacheError(f"{path}: not a teacher cache (schema attribute {schema!r}, expected "
                         f"{SCHEMA_NAME!r}); pass the cache.h5 written by precompute")
    version = f.attrs.get("schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise CacheError(f"{path}: cache schema version {version} found, this tool supports version "
                         f"{SCHEMA_VERSION}; use the tool version that wrote it or rebuild the "
                         "cache with precompute")


def _read_meta(f: h5py.File, path) -> tuple[CacheMeta, int, int, str]:
    """Meta and (row_start, row_stop, shard) from a file whose schema was checked."""
    a = f.attrs
    try:
        layers = json.loads(a["layers"])
        if "views/box" not in f:
            raise KeyError("views/box")
        missing = [f"/features/{l}" for l in layers if f"features/{l}" not in f]
        if missing:
            raise KeyError(", ".join(missing))
        meta = CacheMeta(
            num_classes=int(a["num_classes"]), dataset_fingerprint=str(a["dataset_fingerprint"]),
            teachers=json.loads(a["teachers"]), backbone_ids=json.loads(a["backbone_ids"]),
            backbone_of_teacher=json.loads(a["backbone_of_teacher"]),
            biased_backbone=int(a["biased_backbone"]), view_spec=json.loads(a["view_spec"]),
            layers=layers, feature_dims={l: int(f[f"features/{l}"].shape[-1]) for l in layers},
            num_views=int(f["views/box"].shape[1]), num_samples=int(a["num_samples"]),
            tau_cached=float(a["tau_cached"]), created=str(a["created"]),
            tool_version=str(a["tool_version"]), git_commit=str(a["git_commit"]),
            torch_version=str(a["torch_version"]))
        row_start, row_stop, shard = int(a["row_start"]), int(a["row_stop"]), str(a["shard"])
    except KeyError as e:
        raise CacheError(f"{path}: attribute or dataset {e} is missing; the file was not written "
                         "completely by precompute. Delete it and rerun precompute") from None
    except (ValueError, TypeError, IndexError) as e:
        raise CacheError(f"{path}: inconsistent header ({e}); delete it and rerun precompute") from None
    if not 0 <= row_start < row_stop <= meta.num_samples:
        raise CacheError(f"{path}: row range {row_start}..{row_stop} does not fit num_samples "
                         f"{meta.num_samples}; delete it and rerun precompute")
    return meta, row_start, row_stop, shard


def _layout_problems(f: h5py.File, meta: CacheMeta, R: int) -> list[str]:
    problems = []
    for name, (shape, dtype) in _layout(meta, R).items():
        if name not in f:
            problems.append(f"dataset /{name} is missing")
            continue
        ds = f[name]
        if ds.shape != shape:
            problems.append(f"/{name} has shape {ds.shape}, expected {shape}")
        ok = ds.dtype.kind == "S" if dtype is None else ds.dtype == dtype
        if not ok:
            problems.append(f"/{name} has dtype {ds.dtype}, expected {dtype or 'utf-8 string'}")
    return problems


def _read_checked(f: h5py.File, path, require_complete: bool):
    """Schema, header and layout checks of an open file -> (meta, row_start, row_stop, shard, done)."""
    _check_schema(f, path)
    meta, row_start, row_stop, shard = _read_meta(f, path)
    problems = _layout_problems(f, meta, row_stop - row_start)
    if problems:
        raise CacheError(f"{path}: " + "; ".join(problems) + ". The file is damaged or was not "
                         "written by this tool; delete it and rerun precompute")
    done = _guarded(path, "progress/done", lambda: f["progress/done"][...])
    if require_complete and not done.all():
        raise CacheError(f"{path}: incomplete: {int(done.sum())} of {len(done)} rows done; rerun "
                         "precompute with the same arguments to resume")
    return meta, row_start, row_stop, shard, done


def _guarded(path, name: str, read):
    """Run ``read()``; a failed read (checksum mismatch, truncated data) becomes a CacheError."""
    try:
        return read()
    except OSError as e:
        raise CacheError(f"{path}: cannot read /{name} ({e}); the file is corrupt. Run `cache "
                         "verify` on it, then copy it again or rebuild it with precompute") from None


# ----------------------------------------------------------------------------- writer


class CacheWriter:
    """Writes rows of a cache file in place, resumable: a row is marked done only after its data
    is written and flushed, so an interrupted run restarts where it stopped.

    Use :meth:`create_or_resume`, then write every range of :meth:`pending_chunks`.
    """

    def __init__(self, path: str, f: h5py.File, meta: CacheMeta, row_start: int, row_stop: int,
                 shard: str, resumed: bool):
        self.path, self._f, self.meta, self.shard = path, f, meta, shard
        self.row_start, self.row_stop = row_start, row_stop
        self.resumed = resumed
        self._done = f["progress/done"][...]

    @classmethod
    def create_or_resume(cls, path, meta: CacheMeta, samples: dict, row_start: int = 0,
                         row_stop: int | None = None, shard: str = "",
                         compression: int | None = DEFAULT_GZIP_LEVEL) -> "CacheWriter":
        """Open ``path`` for writing dataset rows ``[row_start, row_stop)`` (default: all N).

        Args:
            meta: what the file is made from; on resume it must equal the file's (provenance aside).
            samples: ``{"id": [R] str, "y", "place", "group", "split": [R] int}`` for these rows.
            shard: ``"i/n"`` for one of n shard files (see :func:`shard_rows`), ``""`` for a full file.
            compression: gzip level (1-9; 1 is nearly as small as 9 on float data and much
                faster) or None (about 20% larger, reads ~10x faster). Used only when creating.
        Raises:
            CacheError: the file exists but was made for other inputs, or cannot be opened.
        """
        path = str(path)
        N = meta.num_samples
        row_stop = N if row_stop is None else int(row_stop)
        row_start = int(row_start)
        if not 0 <= row_start < row_stop <= N:
            raise ValueError(f"rows {row_start}..{row_stop} must satisfy 0 <= start < stop <= {N}")
        if shard:
            parse_shard(shard)
        elif (row_start, row_stop) != (0, N):
            raise ValueError("a file holding part of the rows needs a shard name 'i/n'")
        if compression is not None and not 1 <= int(compression) <= 9:
            raise ValueError(f"gzip level must be in 1..9 or None, got {compression}")
        R = row_stop - row_start
        bad = [k for k in SAMPLE_FIELDS if k not in samples or len(samples[k]) != R]
        if bad:
            raise ValueError(f"samples must hold {SAMPLE_FIELDS} with {R} entries each; wrong or "
                             f"missing: {bad}")

        if not os.path.exists(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            f = _create_file(path, meta, samples, row_start, row_stop, shard, compression)
            log.info("%s: new cache, %d rows to compute", path, R)
            return cls(path, f, meta, row_start, row_stop, shard, resumed=False)

        f = _open_h5(path, "r+")
        try:
            old, old_start, old_stop, old_shard, done = _read_checked(f, path, require_complete=False)
            diff = _identity_diff(old.identity(), meta.identity(), "file", "now")
            if (old_start, old_stop, old_shard) != (row_start, row_stop, shard):
                diff.append(f"rows/shard: file {old_start}..{old_stop} {old_shard!r}, now "
                            f"{row_start}..{row_stop} {shard!r}")
            if not diff:
                same = (f["samples/id"].asstr()[...].tolist() == [str(s) for s in samples["id"]]
                        and all(np.array_equal(f[f"samples/{k}"][...], np.asarray(samples[k]))
                                for k in SAMPLE_FIELDS[1:]))
                if not same:
                    diff.append("samples (ids, labels, places, groups or splits) differ")
            if diff:
                raise CacheError(f"{path} already exists and was made for other inputs ("
                                 + "; ".join(diff) + "). Delete it or choose another --out")
        except BaseException:
            f.close()
            raise
        log.info("%s: resuming, %d of %d rows already done", path, int(done.sum()), R)
        return cls(path, f, old, row_start, row_stop, shard, resumed=True)

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def num_done(self) -> int:
        return int(self._done.sum())

    @property
    def done(self) -> np.ndarray:
        """[R] bool copy of the progress flags (file rows)."""
        return self._done.copy()

    def pending_chunks(self, chunk_rows: int) -> list[tuple[int, int]]:
        """``(start, stop)`` file-row ranges, at most ``chunk_rows`` long and aligned to multiples
        of it, that together cover exactly the rows not done yet. Dataset row = row_start + file row.
        """
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        out = []
        for lo in range(0, self.num_rows, chunk_rows):
            todo = ~self._done[lo:lo + chunk_rows]
            if not todo.any():
                continue
            # runs of not-done rows inside this block (usually the whole block)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], todo.astype(np.int8), [0]])))
            out += [(lo + int(a), lo + int(b)) for a, b in zip(edges[::2], edges[1::2])]
        return out

    def write_rows(self, start: int, stop: int, box, flip, teacher_logits, biased_logits,
                   features: dict, agre_cached) -> None:
        """Write file rows ``[start, stop)`` (n = stop - start), flush, then mark them done.

        Args:
            box: [n, V, 4] relative (top, left, height, width); flip: [n, V] bool.
            teacher_logits: [n, V, T, C]; biased_logits: [n, V, C].
            features: ``{layer: [n, V, B, D_layer]}`` for every layer (stored as float16).
            agre_cached: [n, V, T] per-sample cached AGRE weights.
        Numpy arrays or CPU/GPU tensors. Non-finite values are refused (ValueError).
        """
        if not 0 <= start < stop <= self.num_rows:
            raise ValueError(f"rows {start}..{stop} outside this file's 0..{self.num_rows}")
        unknown = set(features) - set(self.meta.layers)
        missing = set(self.meta.layers) - set(features)
        if unknown or missing:
            raise ValueError(f"features must hold exactly the layers {self.meta.layers}; "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        given = {"views/box": box, "views/flip": flip, "logits/teachers": teacher_logits,
                 "logits/biased": biased_logits, "weights/agre_cached": agre_cached,
                 **{f"features/{l}": v for l, v in features.items()}}
        layout = _layout(self.meta, stop - start)
        arrays = {}
        for name, value in given.items():
            shape, dtype = layout[name]
            a = _as_numpy(value).astype(dtype, copy=False)
            if a.shape != shape:
                raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
            if dtype.kind == "f" and not np.isfinite(a).all():
                hint = " (float16 overflow: |x| > 65504?)" if dtype == np.float16 else ""
                raise ValueError(f"{name}: non-finite values in rows {start}..{stop}{hint}")
            arrays[name] = a
        for name, a in arrays.items():
            self._f[name][start:stop] = a
        self._f.flush()  # data on disk before the rows are claimed done
        self._f["progress/done"][start:stop] = True
        self._f.flush()
        self._done[start:stop] = True

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- reader


def _spans(rows: np.ndarray, gap: int, max_rows: int) -> list[tuple[int, int]]:
    """Split sorted ``rows`` into index ranges whose rows are read as one contiguous slab: a new
    slab starts where the gap exceeds a chunk (rows in between would cost extra chunks) or where
    the slab would exceed ``max_rows`` (memory)."""
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows) > gap) + 1
    out = []
    for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]])):
        a, b = int(a), int(b)
        while a < b:
            # furthest index whose row still fits in max_rows from rows[a]
            e = int(np.searchsorted(rows[a:b], rows[a] + max_rows, side="left")) + a
            e = max(e, a + 1)
            out.append((a, e))
            a = e
    return out


def _gather(ds: h5py.Dataset, rows: np.ndarray, views=None, per_row_views: bool = False) -> np.ndarray:
    """``ds[rows]`` (then the view axis selected) for sorted ``rows``, read as contiguous slabs.

    ``views``: None (all views), an int or an index array applied to every row, or with
    ``per_row_views`` an array giving one view for each row.
    """
    max_rows = max(1, SLAB_BYTES // max(_row_bytes(ds), 1))
    pieces = []
    for a, b in _spans(rows, ds.chunks[0] if ds.chunks else 1, max_rows):
        lo, hi = int(rows[a]), int(rows[b - 1]) + 1
        block = ds[lo:hi]
        idx = rows[a:b] - lo
        if per_row_views:
            pieces.append(block[idx, views[a:b]])
        elif views is None:
            pieces.append(block[idx])
        else:
            pieces.append(block[idx][:, views])
    if pieces:
        return np.concatenate(pieces)
    empty = ds[0:0]
    if per_row_views:
        return empty[:, 0] if empty.ndim > 1 else empty
    return empty if views is None else empty[:, views]


class CacheReader:
    """Read side of a cache. The HDF5 file is opened on first access, once per process, so a
    reader can be handed to DataLoader workers (pickled or forked).

    Row arguments are file rows (dataset rows for a full file). ``rows`` may be unsorted and
    repeat; ``views`` gives one view per row (or one int for all). Results follow ``rows``.
    """

    def __init__(self, path, meta: CacheMeta, row_start: int, row_stop: int, shard: str,
                 done: np.ndarray):
        self.path, self.meta, self.shard = str(path), meta, shard
        self.row_start, self.row_stop = row_start, row_stop
        self.done = done
        self._file, self._pid, self._samples = None, None, None

    # -- lazy handle
    def _h5(self) -> h5py.File:
        # A handle inherited through fork must not be used by the child: reopen per process.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _open_h5(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None}

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"CacheReader({self.path!r}, rows={self.num_rows}, views={self.meta.num_views}, "
                f"teachers={self.meta.num_teachers}, layers={self.meta.layers})")

    # -- samples
    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start

    def _sample(self, key: str) -> np.ndarray:
        if self._samples is None:
            f = self._h5()
            self._samples = _guarded(self.path, "samples", lambda: {
                "id": f["samples/id"].asstr()[...].astype(object),
                **{k: f[f"samples/{k}"][...] for k in SAMPLE_FIELDS[1:]}})
        return self._samples[key]

    @property
    def ids(self) -> np.ndarray:
        """[R] object array of str (img_filename)."""
        return self._sample("id")

    @property
    def y(self) -> np.ndarray:
        return self._sample("y")

    @property
    def place(self) -> np.ndarray:
        return self._sample("place")

    @property
    def group(self) -> np.ndarray:
        return self._sample("group")

    @property
    def split(self) -> np.ndarray:
        return self._sample("split")

    def split_rows(self, split) -> np.ndarray:
        """File rows of a split given by code (0/1/2) or name ("train", "val", "test")."""
        code = SPLIT_CODES[split] if isinstance(split, str) else int(split)
        return np.flatnonzero(self.split == code)

    # -- per (row, view) reads
    def _rows_views(self, name: str, rows, views) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        views = np.asarray(views, dtype=np.int64)
        views = np.full(rows.shape, int(views)) if views.ndim == 0 else views.reshape(-1)
        if views.shape != rows.shape:
            raise ValueError(f"rows ({len(rows)}) and views ({len(views)}) differ in length")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows must lie in 0..{self.num_rows - 1} of {self.path}")
        if len(views) and (views.min() < 0 or views.max() >= self.meta.num_views):
            raise IndexError(f"views must lie in 0..{self.meta.num_views - 1}")
        order = np.argsort(rows, kind="stable")  # h5py reads need increasing rows
        ds = self._h5()[name]
        got = _guarded(self.path, name, lambda: _gather(ds, rows[order], views[order], per_row_views=True))
        out = np.empty_like(got)
        out[order] = got
        return out

    def logits(self, rows, views) -> np.ndarray:
        """Teacher logits [n, T, C] float32."""
        return self._rows_views("logits/teachers", rows, views)

    def biased(self, rows, views) -> np.ndarray:
        """Biased-model logits [n, C] float32."""
        return self._rows_views("logits/biased", rows, views)

    def features(self, layer: str, rows, views) -> np.ndarray:
        """Backbone features [n, B, D_layer] float16 (teacher t uses ``meta.backbone_of_teacher[t]``)."""
        if layer not in self.meta.layers:
            raise KeyError(f"{self.path} holds features of {self.meta.layers}, not {layer!r}; "
                           f"rerun precompute with --layers including {layer}")
        return self._rows_views(f"features/{layer}", rows, views)

    def weights(self, rows, views) -> np.ndarray:
        """Cached AGRE weights [n, T] float32."""
        return self._rows_views("weights/agre_cached", rows, views)

    def boxes(self, rows, views) -> np.ndarray:
        """View boxes [n, 4] float32 (top, left, height, width, relative)."""
        return self._rows_views("views/box", rows, views)

    def flips(self, rows, views) -> np.ndarray:
        """View flips [n] bool."""
        return self._rows_views("views/flip", rows, views)

    # -- bulk
    def load_all(self, split=None, views=None, layers=None) -> dict:
        """Everything for the rows of a split, in memory, read slab by slab.

        Args:
            split: None (all rows), a split code or name ("train", "val", "test").
            views: None (all V views), an int (view axis dropped) or a list of views.
            layers: feature layers to load; None for all, [] for none.
        Returns:
            ``{"rows": [n] file rows, "id", "y", "place", "group", "split": [n],
            "box": [n, v, 4], "flip": [n, v], "logits": [n, v, T, C], "biased": [n, v, C],
            "weights": [n, v, T], "features": {layer: [n, v, B, D]}}`` (no v axis for an int view).
        """
        rows = np.arange(self.num_rows) if split is None else self.split_rows(split)
        if views is not None and not np.isscalar(views):
            views = np.asarray(views, dtype=np.int64)
        layers = self.meta.layers if layers is None else list(layers)
        unknown = [l for l in layers if l not in self.meta.layers]
        if unknown:
            raise KeyError(f"{self.path} holds features of {self.meta.layers}, not {unknown}")
        f = self._h5()

        def read(name):
            return _guarded(self.path, name, lambda: _gather(f[name], rows, views))

        out = {"rows": rows, **{k: self._sample(k)[rows] for k in SAMPLE_FIELDS},
               "box": read("views/box"), "flip": read("views/flip"),
               "logits": read("logits/teachers"), "biased": read("logits/biased"),
               "weights": read("weights/agre_cached"),
               "features": {l: read(f"features/{l}") for l in layers}}
        return out


def open_cache(path, require_complete: bool = True) -> CacheReader:
    """Check a cache file and return a lazy :class:`CacheReader` on it.

    Checks: readable HDF5, schema name and version, header, every dataset present with the shape
    the header implies, and (``require_complete``) every row done. Any failure is a CacheError
    that names the file and says what to do; the file is not kept open.
    """
    with _open_h5(path, "r") as f:
        try:
            meta, row_start, row_stop, shard, done = _read_checked(f, path, require_complete)
        except (OSError, RuntimeError) as e:  # HDF5 failures not caught more precisely above
            raise CacheError(f"{path}: cannot read the file ({e}); it is corrupt. Copy it again "
                             "or delete it and rerun precompute") from None
    return CacheReader(path, meta, row_start, row_stop, shard, done)


# ----------------------------------------------------------------------------- verify


def _chunk_ranges(ds: h5py.Dataset) -> list[tuple[int, int]]:
    step = ds.chunks[0] if ds.chunks else ds.shape[0]
    return [(a, min(a + step, ds.shape[0])) for a in range(0, ds.shape[0], max(step, 1))]


def _verify_dataset(ds: h5py.Dataset, name: str) -> list[str]:
    """Read every chunk of ``ds`` (HDF5 checks each chunk's fletcher32 on read)."""
    problems = []
    if not ds.fletcher32:
        problems.append(f"/{name} has no fletcher32 checksums; its integrity cannot be checked")
    bad, nonfinite = [], 0
    slab = max(1, SLAB_BYTES // max(_row_bytes(ds), 1))
    chunks = _chunk_ranges(ds)
    per_slab = max(1, slab // max(chunks[0][1] - chunks[0][0], 1)) if chunks else 1
    for i in range(0, len(chunks), per_slab):
        group = chunks[i:i + per_slab]
        try:
            parts = [ds[group[0][0]:group[-1][1]]]
        except OSError:
            # a failure somewhere in the slab: read chunk by chunk to name the bad rows
            parts = []
            for a, b in group:
                try:
                    parts.append(ds[a:b])
                except OSError as e:
                    bad.append((a, b, str(e).splitlines()[0]))
        for p in parts:
            if p.dtype.kind == "f":
                nonfinite += int(p.size - np.count_nonzero(np.isfinite(p)))
    if bad:
        where = ", ".join(f"rows {a}..{b}" for a, b, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        problems.append(f"/{name}: {len(bad)} chunk(s) fail the checksum or cannot be read ({where}; "
                        f"{bad[0][2]}): the file is corrupt; copy it again or rebuild it with precompute")
    if nonfinite:
        problems.append(f"/{name}: {nonfinite} non-finite values")
    return problems


def verify(path, fingerprint: str | None = None) -> list[str]:
    """Full check of a cache file; returns the problems found (empty list: the file is sound).

    Re-reads every dataset completely, so every chunk's fletcher32 checksum is checked; also the
    schema, the layout, completeness and, with ``fingerprint``, that the file was made from that
    data set.
    """
    try:
        f = _open_h5(path, "r")
    except CacheError as e:
        return [str(e)]
    with f:
        try:
            _check_schema(f, path)
            meta, row_start, row_stop, _ = _read_meta(f, path)
        except CacheError as e:
            return [str(e)]
        except (OSError, RuntimeError) as e:
            return [f"{path}: cannot read the header ({e}); the file is corrupt"]
        problems = _layout_problems(f, meta, row_stop - row_start)
        present = [n for n in _layout(meta, row_stop - row_start) if n in f]
        for name in present:
            problems += _verify_dataset(f[name], name)
        if "progress/done" in f and not any(p.startswith("/progress/done") for p in problems):
            done = f["progress/done"][...]
            if not done.all():
                problems.append(f"incomplete: {int(done.sum())} of {len(done)} rows done; rerun "
                                "precompute with the same arguments to resume")
        if fingerprint is not None and fingerprint != meta.dataset_fingerprint:
            problems.append(f"cache made from another data set: file fingerprint "
                            f"{meta.dataset_fingerprint[:16]}, data folder {fingerprint[:16]}; "
                            "rerun precompute on this data folder or point to the right one")
    return problems


# ----------------------------------------------------------------------------- merge


def merge(out_path, shard_paths) -> None:
    """Combine complete shard files into one full file, equal in content to a single-process run
    (same datasets, chunking and attributes except ``created``, ``shard`` and the row range).

    The shards must come from the same inputs (fingerprint, teachers, views, layers, schema, N,
    shard count) and cover rows 0..N exactly once. Written to ``out_path + ".tmp"`` and renamed,
    so ``out_path`` never holds a half-written file (an existing one is replaced only when the
    merge succeeded). Provenance attributes that differ between
    shards are recorded as ``"mixed: a, b"``.
    """
    out_path = str(out_path)
    paths = [str(p) for p in shard_paths]
    if not paths:
        raise CacheError("merge needs at least one shard file")
    if any(os.path.abspath(p) == os.path.abspath(out_path) for p in paths):
        raise CacheError(f"{out_path}: the merged file cannot be one of the shards; choose another --out")
    shards = [open_cache(p, require_complete=True) for p in paths]
    ref = shards[0]
    listing = ", ".join(f"{s.path}: {s.shard}" for s in shards)
    counts = set()
    for s in shards:
        if not s.shard:
            raise CacheError(f"{s.path}: a full file (no shard attribute), not a shard; merge only "
                             "files written with --shard i/n")
        counts.add(parse_shard(s.shard)[1])
        diff = _identity_diff(ref.meta.identity(), s.meta.identity(), ref.path, s.path)
        if diff:
            raise CacheError(f"{s.path} does not belong with {ref.path}: " + "; ".join(diff)
                             + ". Merge only shards written with the same arguments")
    if len(counts) > 1:
        raise CacheError(f"shards were written for different shard counts {sorted(counts)} "
                         f"({listing}); rerun them with one n")
    n = counts.pop()
    if len({s.shard for s in shards}) != len(shards):
        raise CacheError(f"the same shard is given twice: {listing}")
    shards.sort(key=lambda s: s.row_start)
    N, expected = ref.meta.num_samples, 0
    for prev, s in zip([None, *shards], shards):
        if s.row_start < expected:
            raise CacheError(f"{s.path} (rows {s.row_start}..{s.row_stop}) overlaps {prev.path} "
                             f"(rows {prev.row_start}..{prev.row_stop}); merge each shard once")
        if s.row_start > expected:
            raise CacheError(f"rows {expected}..{s.row_start} are in none of the shards; run the "
                             f"missing shard(s) of {n} and merge again")
        expected = s.row_stop
    if expected != N:
        raise CacheError(f"rows {expected}..{N} are in none of the shards; run the missing "
                         f"shard(s) of {n} and merge again")

    prov = {k: sorted({getattr(s.meta, k) for s in shards})
            for k in PROVENANCE_FIELDS if k != "created"}
    meta = dataclasses.replace(ref.meta, created=_utc_now(),
                               **{k: v[0] if len(v) == 1 else "mixed: " + ", ".join(v)
                                  for k, v in prov.items()})
    samples = {k: np.concatenate([s._sample(k) for s in shards]) for k in SAMPLE_FIELDS}
    ds0 = ref._h5()["logits/teachers"]
    compression = ds0.compression_opts if ds0.compression == "gzip" else None
    tmp = out_path + ".tmp"
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(tmp):
        os.remove(tmp)  # left over from an interrupted merge
    try:
        with _create_file(tmp, meta, samples, 0, N, "", compression) as out:
            for name in _layout(meta, N):
                if name.startswith("samples/") or name == "progress/done":
                    continue
                for s in shards:
                    src = s._h5()[name]
                    step = max(1, SLAB_BYTES // max(_row_bytes(src), 1))
                    for a in range(0, s.num_rows, step):
                        b = min(a + step, s.num_rows)
                        out[name][s.row_start + a:s.row_start + b] = _guarded(s.path, name, lambda: src[a:b])
            out.flush()
            out["progress/done"][...] = True
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        for s in shards:
            s.close()
    log.info("merged %d shards into %s (%d rows)", len(shards), out_path, N)


# ----------------------------------------------------------------------------- info


def summarize(path) -> dict:
    """What ``cache info`` shows: size, layout, teachers, splits, provenance, and per split the
    accuracy of each teacher, the ensemble (mean probability) and the biased model on view 0.

    Accuracies cover the rows done so far, so an unfinished file can be inspected too.
    """
    r = open_cache(path, require_complete=False)
    with r:
        m = r.meta
        done_rows = np.flatnonzero(r.done)
        d = {
            "path": r.path, "file_bytes": os.path.getsize(r.path),
            "schema": f"{SCHEMA_NAME} v{SCHEMA_VERSION}", "num_samples": m.num_samples,
            "row_start": r.row_start, "row_stop": r.row_stop, "shard": r.shard,
            "rows": r.num_rows, "rows_done": int(len(done_rows)), "num_views": m.num_views,
            "num_classes": m.num_classes, "layers": {l: m.feature_dims[l] for l in m.layers},
            "feature_dtype": FEATURE_DTYPE, "tau_cached": m.tau_cached,
            "dataset_fingerprint": m.dataset_fingerprint, "view_spec": m.view_spec,
            "teachers": m.teachers, "backbone_ids": m.backbone_ids,
            "provenance": {k: getattr(m, k) for k in PROVENANCE_FIELDS},
        }
        codes, counts = np.unique(r.split, return_counts=True)
        d["splits"] = {SPLIT_NAMES.get(int(c), str(int(c))): int(n) for c, n in zip(codes, counts)}
        acc = {}
        if len(done_rows):
            view0 = np.zeros(len(done_rows), dtype=np.int64)
            logits, biased = r.logits(done_rows, view0), r.biased(done_rows, view0)
            z = logits - logits.max(-1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
            preds = {t["name"]: logits[:, i].argmax(-1) for i, t in enumerate(m.teacher_entries)}
            preds["ensemble"] = prob.mean(1).argmax(-1)
            preds[m.biased_entry["name"]] = biased.argmax(-1)
            y, group, split = r.y[done_rows], r.group[done_rows], r.split[done_rows]
            named = {SPLIT_NAMES.get(int(c), str(int(c))): int(c) for c in np.unique(split)}
            for model, pred in preds.items():
                acc[model] = {name: {k: g[k] for k in ("mean_acc", "wga", "group_acc")}
                              for name, g in split_metrics(pred, y, group, split, named).items()}
        d["accuracy"] = acc
    return d


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_summary(d: dict) -> str:
    """Readable text block of :func:`summarize`'s dict."""
    p = d["provenance"]
    rows = (f"{d['rows']} (full file)" if not d["shard"] else
            f"{d['rows']} of {d['num_samples']} (shard {d['shard']}, rows {d['row_start']}..{d['row_stop']})")
    lines = [
        f"cache        {d['path']}  ({_size(d['file_bytes'])}, {d['schema']})",
        f"rows         {rows}; done {d['rows_done']}/{d['rows']}",
        f"views        {d['num_views']} (view 0 eval + {d['num_views'] - 1} random)   classes "
        f"{d['num_classes']}   tau_cached {d['tau_cached']:g}",
        f"features     " + (", ".join(f"{l} {D}" for l, D in d["layers"].items()) or "none")
        + f"  ({d['feature_dtype']}, {len(d['backbone_ids'])} backbones)",
        f"data set     fingerprint {d['dataset_fingerprint']}",
        f"splits       " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
        f"made         {p['created']} by tool {p['tool_version']} (git {p['git_commit']}, "
        f"torch {p['torch_version']})",
        "",
        f"{'model':<20}{'role':<9}{'backbone':<18}sha256",
    ]
    for t in d["teachers"]:
        lines.append(f"{t['name']:<20}{t['role']:<9}{str(t['backbone_id']):<18}{str(t['sha256'])[:16]}")
    if d["accuracy"]:
        splits = list(next(iter(d["accuracy"].values())))
        lines += ["", "accuracy on view 0, % (mean / worst-group)" +
                  ("" if d["rows_done"] == d["rows"] else f", over the {d['rows_done']} rows done"),
                  f"{'model':<20}" + "".join(f"{s:>16}" for s in splits)]
        for model, per in d["accuracy"].items():
            cells = [f"{100 * per[s]['mean_acc']:.1f} / {100 * per[s]['wga']:.1f}" if s in per else "-"
                     for s in splits]
            lines.append(f"{model:<20}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
