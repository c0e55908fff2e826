"""Range checks of a cache's per-row samples (untrusted input): classes, attributes, groups, splits, ids.

A received cache's ``/samples`` arrays index everything downstream (one-hot labels, per-group
counts and WGA, which rows hold random views), so a value out of range would surface much later as
an IndexError or, worse, as a silently wrong metric. They are small (R integers each), so every
open (:func:`cache.reader.read_checked`), the writer (before it writes) and ``cache verify`` check
them all (docs/cache.md#untrusted-input):

- every array holds exactly the file's R rows, and a whole file (shard "") all ``num_samples``;
- ``y`` in 0..C-1, ``attr`` in 0..A-1, ``group`` in 0..C*A-1 and equal to ``y * A + attr``;
- ``split`` one of the known codes (0 train, 1 val, 2 test);
- no image id twice (``train_rows`` and the split rows are derived from ``split``, so they are
  increasing and in range by construction).
"""
from __future__ import annotations

import numpy as np

from cache.schema import SAMPLE_FIELDS
from data.folders import SPLIT_CODES

ADVICE = ("The cache is damaged or was not written by this tool: ask its sender for a fresh copy, "
          "or rebuild it with precompute (--overwrite)")


def _where(r: int, row_start: int) -> str:
    return f"row {r}" + (f" (dataset row {row_start + r})" if row_start else "")


def _first(name: str, values: np.ndarray, bad: np.ndarray, row_start: int, want: str) -> list[str]:
    """One problem naming the first bad row of ``/samples/<name>``, its value and how many are bad."""
    rows = np.flatnonzero(bad)
    if not len(rows):
        return []
    r = int(rows[0])
    more = f" ({len(rows)} such rows, the first shown)" if len(rows) > 1 else ""
    return [f"/samples/{name} {_where(r, row_start)} holds {int(values[r])}, {want}{more}"]


def sample_problems(samples: dict, meta, row_start: int, row_stop: int, shard: str) -> list[str]:
    """What is wrong with the sample arrays ``samples`` ({field: [R] array}, ids as str or bytes)
    of a file holding rows ``row_start..row_stop`` (shard ``shard``) of a data set described by
    ``meta`` (a :class:`cache.schema.CacheMeta`); empty when they are sound."""
    R = row_stop - row_start
    problems = []
    if not shard and (row_start, row_stop) != (0, meta.num_samples):
        problems.append(f"rows {row_start}..{row_stop} of a whole file (no shard name), which must hold "
                        f"all num_samples = {meta.num_samples} rows")
    arrays = {k: np.asarray(samples[k]).reshape(-1) for k in SAMPLE_FIELDS if k in samples}
    for k in SAMPLE_FIELDS:
        if k not in arrays or len(arrays[k]) != R:
            problems.append(f"/samples/{k} holds {len(arrays[k]) if k in arrays else 'no'} rows, not the "
                            f"file's {R} (rows {row_start}..{row_stop} of num_samples {meta.num_samples})")
    if problems:
        return problems
    ints = {}
    for k in ("y", "attr", "group", "split"):
        if arrays[k].dtype.kind not in "iu":
            problems.append(f"/samples/{k} holds {arrays[k].dtype} values, not integers")
        ints[k] = arrays[k].astype(np.int64, copy=False) if arrays[k].dtype.kind in "iu" else None
    C, A = meta.num_classes, len(meta.attr_names)
    y, attr, group, split = (ints[k] for k in ("y", "attr", "group", "split"))
    if y is not None:
        problems += _first("y", y, (y < 0) | (y >= C), row_start,
                           f"not a class in 0..{C - 1} (num_classes {C}: {', '.join(meta.class_names)})")
    if attr is not None:
        problems += _first("attr", attr, (attr < 0) | (attr >= A), row_start,
                           f"not an attribute value in 0..{A - 1} ({', '.join(meta.attr_names)})")
    if group is not None:
        out = (group < 0) | (group >= C * A)
        problems += _first("group", group, out, row_start,
                           f"not a group in 0..{C * A - 1} (num_groups {C * A})")
        if y is not None and attr is not None and not out.any():
            ok = (y >= 0) & (y < C) & (attr >= 0) & (attr < A)
            wrong = ok & (group != y * A + attr)
            if wrong.any():
                r = int(np.flatnonzero(wrong)[0])
                problems += _first("group", group, wrong, row_start,
                                   f"but its class {y[r]} and attribute {attr[r]} make group "
                                   f"{y[r] * A + attr[r]} (y * {A} + attr)")
    if split is not None:
        codes = sorted(SPLIT_CODES.values())
        problems += _first("split", split, ~np.isin(split, codes), row_start,
                           "not a split code (" + ", ".join(f"{c} {n}" for n, c in SPLIT_CODES.items()) + ")")
    ids = arrays["id"]
    order = np.argsort(ids, kind="stable")
    dup = np.zeros(R, dtype=bool)
    dup[order[1:]] = ids[order[1:]] == ids[order[:-1]]
    if dup.any():
        r = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero(ids == ids[r])[0])
        shown = ids[r].decode("utf-8", "replace") if isinstance(ids[r], bytes) else str(ids[r])
        problems.append(f"/samples/id {_where(r, row_start)} holds {shown!r}, the image of "
                        f"{_where(first, row_start)} again ({int(dup.sum())} repeated "
                        "ids): each image is one row")
    return problems


def samples_message(problems: list[str]) -> str:
    """The problems of :func:`sample_problems` as one message that says what to do."""
    return "; ".join(problems) + ". " + ADVICE
