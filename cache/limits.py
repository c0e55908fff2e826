"""What a cache header may declare: each field's kind and range, checked on every open.

A header is read from a received file, so its JSON may hold anything. Before any dataset is read
or anything is sized from it (a rendered batch, a layout, a group table), every CacheMeta field
must be of its kind and within these limits: generous next to the study (224 px views, 2 classes,
5 teachers, 10 slots, 3 layers of at most 2048), small enough that nothing sized from them can ask
for gigabytes. :meth:`cache.schema.CacheMeta.validate` calls :func:`field_problems` first.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.schema import CacheMeta

MAX_OUT_SIZE = 1024          # rendered view side: a batch of 64 views is 64 x 3 x 1024^2 float32 = 800 MB
MAX_STORE_SIZE = 4096        # the image store's short side
MAX_CLASSES = 10_000         # classes, and attribute values
MAX_GROUPS = 100_000         # classes x attribute values
MAX_MODELS = 256             # teachers + the biased model (and so distinct backbones)
MAX_RANDOM_VIEWS = 1000      # K
MAX_LAYERS = 16
MAX_FEATURE_DIM = 1 << 16
MAX_SAMPLES = 1 << 31        # dataset rows (the store's offsets and sizes stay far inside int64)
MAX_ID_BYTES = 4096          # one image path, utf-8


def is_int(v) -> bool:
    """An integer, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def field_problems(meta: CacheMeta) -> list[str]:
    """Each field of the kind and within the range the tool can use (a header is read from a
    received file: its JSON may hold anything), naming the field."""
    problems = []

    def bad(field, what):
        problems.append(f"field {field!r} {what}")
    for i, t in enumerate(meta.teachers):
        keys = ("name", "role", "sha256", "backbone_id")
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in keys):
            bad("teachers", f"entry {i} must be an object with string name, role, sha256 and "
                            f"backbone_id, got {str(t)[:80]}")
    if len(meta.teachers) > MAX_MODELS:
        bad("teachers", f"lists {len(meta.teachers)} models (at most {MAX_MODELS})")
    for name, lo, hi in (("num_classes", 2, MAX_CLASSES), ("num_samples", 1, MAX_SAMPLES),
                         ("store_size", 1, MAX_STORE_SIZE)):
        if not lo <= getattr(meta, name) <= hi:
            bad(name, f"is {getattr(meta, name)}, not in {lo}..{hi}")
    if not 1 <= len(meta.attr_names) <= MAX_CLASSES or \
            len(meta.attr_names) * max(1, min(meta.num_classes, MAX_CLASSES)) > MAX_GROUPS:
        bad("attr_names", f"names {len(meta.attr_names)} attribute values (1..{MAX_CLASSES}, at most "
                          f"{MAX_GROUPS} groups with the classes)")
    if len(meta.layers) > MAX_LAYERS:
        bad("layers", f"lists {len(meta.layers)} layers (at most {MAX_LAYERS})")
    for layer, d in meta.feature_dims.items():
        if not is_int(d) or not 1 <= d <= MAX_FEATURE_DIM:
            bad("feature_dims", f"gives layer {layer!r} width {str(d)[:40]}, not an integer in "
                                f"1..{MAX_FEATURE_DIM}")
    if not math.isfinite(meta.tau_cached) or meta.tau_cached <= 0:
        bad("tau_cached", f"is {meta.tau_cached}, not a positive number")
    if not all(isinstance(h, dict) for h in meta.history):
        bad("history", "must list objects")
    problems += [f"field 'view_spec' {p}" for p in view_spec_problems(meta.view_spec)]
    return problems


_VIEW_INTS = {"random_views": (0, MAX_RANDOM_VIEWS), "out_size": (1, MAX_OUT_SIZE),
              "seed": (-(1 << 63), (1 << 64) - 1)}


def view_spec_problems(spec: dict) -> list[str]:
    """What is wrong with a header's view specification (a data.views.ViewSpec as a dict)."""
    problems = []
    for key, (lo, hi) in _VIEW_INTS.items():
        if key in spec and not (is_int(spec[key]) and lo <= spec[key] <= hi):
            problems.append(f"{key} is {str(spec[key])[:40]}, not an integer in {lo}..{hi}")
    for key in ("scale", "ratio"):
        v = spec.get(key, [1.0, 1.0])
        if not (isinstance(v, list) and len(v) == 2 and all(is_number(x) and 0 < x < 1e6 for x in v)
                and v[0] <= v[1]):
            problems.append(f"{key} is {str(v)[:40]}, not two increasing positive numbers")
    for key in ("resize", "random_rows"):
        if key in spec and not isinstance(spec[key], str):
            problems.append(f"{key} is {str(spec[key])[:40]}, not a string")
    return problems
