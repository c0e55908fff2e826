"""Sharing tools on finished cache files: ``slim`` (a smaller copy) and ``diff`` (where two differ).

``extend`` (new teachers or another biased model on the stored views) runs backbones, so it lives
in :mod:`precompute.extend`; it uses :func:`copy_rows` and :func:`place_store` from here.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from cache.reader import CacheReader, open_cache
from cache.schema import EVAL, RANDOM, SAMPLE_FIELDS, CacheError, CacheMeta, layout, store_path_for
from cache.writer import CacheWriter
from core.errors import ConfigError
from core.provenance import PROVENANCE_FIELDS, settings_diff

# Rows copied per write: a multiple of the digest block, so reads are whole blocks.
COPY_ROWS = 1024


def source_compression(reader: CacheReader) -> int | None:
    """The gzip level of a file (None: uncompressed), to write a derived file alike."""
    ds = reader._h5()["eval/logits/teachers"]
    return ds.compression_opts if ds.compression == "gzip" else None


def samples_of(reader: CacheReader) -> dict:
    return {k: reader.sample(k) for k in SAMPLE_FIELDS}


def read_rows(reader: CacheReader, a: int, b: int, layers, slots: int) -> tuple[dict, dict | None]:
    """File rows ``[a, b)`` as :meth:`CacheWriter.write_rows` takes them: view 0 of every row and
    random slots 1..``slots`` of the training rows among them (None when there are none)."""
    e = reader.read_eval(rows=np.arange(a, b), layers=layers)
    train = reader.train_rows
    p0, p1 = int(np.searchsorted(train, a)), int(np.searchsorted(train, b))
    keys = ("box", "flip", "logits", "biased", "weights")
    ev = {k: e[k] for k in keys}
    ev["features"] = e["features"]
    if slots == 0 or p1 == p0:
        return ev, None
    per = [reader.read_slot(k, layers=layers, positions=np.arange(p0, p1)) for k in range(1, slots + 1)]
    rnd = {k: np.stack([d[k] for d in per]) for k in keys}
    rnd["features"] = {l: np.stack([d["features"][l] for d in per]) for l in layers}
    return ev, rnd


def place_store(src_cache, out_cache, overwrite: bool = False) -> Path:
    """The image store of ``src_cache`` beside ``out_cache``: a hard link where the file system
    allows (no space used), else a copy. Returns its path."""
    src, dst = store_path_for(src_cache), store_path_for(out_cache)
    if not src.is_file():
        raise CacheError(f"{src}: the image store of {src_cache} is missing; copy it beside the cache "
                         "(training needs it)")
    if dst.exists():
        if os.path.samefile(src, dst):
            return dst
        if not overwrite:
            raise CacheError(f"{dst} already exists; pass --overwrite or choose another --out")
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _check_out(path, out, overwrite: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the new cache file's path, e.g. {out / 'cache.h5'}")
    if out.exists() and os.path.abspath(out) == os.path.abspath(path):
        raise ConfigError(f"--out {out} is the input file; choose another path")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite or choose another --out")
    return out


def write_derived(out: Path, meta: CacheMeta, samples: dict, compression, fill) -> Path:
    """Write a full file for ``meta`` through the writer (its own digests, verified like any
    precomputed file): ``fill(writer)`` writes every row. Written to ``out.tmp``, then renamed."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with CacheWriter.create_or_resume(str(tmp), meta, samples, compression=compression) as w:
            fill(w)
            w.finalize()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def fresh(meta: CacheMeta, **changes) -> CacheMeta:
    """``meta`` with ``changes`` and this process's provenance (the derived file is made now)."""
    return dataclasses.replace(meta, **changes, **{k: "" for k in PROVENANCE_FIELDS})


def origin(reader: CacheReader) -> dict:
    """What a history entry says of the file it was made from."""
    m = reader.meta
    return {"from": reader.root_digest, "from_path": Path(reader.path).name, "from_created": m.created,
            "from_git_commit": m.git_commit}


# ----------------------------------------------------------------------------- slim


def slim(path, out, layers=None, views: int | None = None, overwrite: bool = False) -> Path:
    """A copy of the finished cache ``path`` at ``out`` with only ``layers`` (default: all) and
    the first ``views`` random slots (default: all), written through the writer (its own block
    digests and root digest), its image store hard-linked (or copied) beside it. The kept data
    is bit for bit the input's; the header's ``history`` records what was dropped and the input's
    root digest. Backbones (and so teachers) are not dropped: every model's logits stay.
    """
    out = _check_out(path, out, overwrite)
    r = open_cache(path)
    with r:
        if r.shard:
            raise CacheError(f"{path} is shard {r.shard}; merge the shards (`cache "
                             "merge`) and slim the full file")
        m = r.meta
        keep = list(m.layers) if not layers else list(layers)
        unknown = [l for l in keep if l not in m.layers]
        if unknown or len(set(keep)) != len(keep):
            raise ConfigError("--layers must name distinct layers of the cache "
                              f"({', '.join(m.layers)}), got {','.join(keep)}")
        keep = [l for l in m.layers if l in keep]  # the file's order
        K = m.random_views if views is None else int(views)
        if not 0 <= K <= m.random_views:
            raise ConfigError(f"--views must be in 0..{m.random_views} (the random views "
                              f"{path} holds), got {views}")
        dropped = {"layers": [l for l in m.layers if l not in keep],
                   "random_views": list(range(K + 1, m.random_views + 1))}
        entry = {"op": "slim", **origin(r), "dropped": dropped,
                 "note": f"kept layers {','.join(keep) or 'none'} and random views 1..{K} of {m.random_views}"}
        meta = fresh(m, layers=keep, feature_dims={l: m.feature_dims[l] for l in keep},
                     view_spec={**m.view_spec, "random_views": K}, history=[*m.history, entry])

        def fill(w):
            for a, b in w.pending_chunks(COPY_ROWS):
                ev, rnd = read_rows(r, a, b, keep, K)
                w.write_rows(a, b, ev, rnd)
        write_derived(out, meta, samples_of(r), source_compression(r), fill)
    place_store(path, out, overwrite)
    return out


# ----------------------------------------------------------------------------- diff


def _compare(read_a, read_b, n: int, atol: float, rtol: float, step: int) -> dict:
    """Largest absolute and relative difference and the rows (axis 0) differing beyond
    ``atol + rtol * |b|`` between two equally shaped arrays read in slabs."""
    max_abs = max_rel = 0.0
    rows = 0
    first = None
    for lo in range(0, n, step):
        a, b = read_a(lo, min(lo + step, n)), read_b(lo, min(lo + step, n))
        a, b = a.astype(np.float64), b.astype(np.float64)
        d = np.abs(a - b)
        if d.size:
            max_abs = max(max_abs, float(d.max()))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(d == 0, 0.0, d / np.abs(b))
            max_rel = max(max_rel, float(rel.max()))
        bad = (d > atol + rtol * np.abs(b)).reshape(len(a), -1).any(axis=1)
        if bad.any() and first is None:
            first = lo + int(np.flatnonzero(bad)[0])
        rows += int(bad.sum())
    return {"max_abs": max_abs, "max_rel": max_rel, "rows_differing": rows, "first_row": first}


def diff(path_a, path_b, atol: float = 0.0, rtol: float = 0.0) -> dict:
    """What differs between two finished caches of the same data set.

    Returns ``{"header": [...], "provenance": [...], "teachers": {...}, "rows": [...],
    "datasets": [{"dataset", "slot" (None for /eval), "max_abs", "max_rel", "rows_differing",
    "first_row"} ...], "only_in": [...], "equal": bool}``. Rows are compared position by position
    (file row r of A with file row r of B; /random by slot and training row). The relative
    difference is ``|a - b| / |b|`` (B the reference; inf where b = 0 and a != 0). ``equal``:
    the identities (every header field but provenance and history) agree, the same datasets and
    slots exist, and no row differs beyond ``atol + rtol * |b|``.
    """
    if atol < 0 or rtol < 0:
        raise ConfigError("--atol and --rtol must be >= 0")
    A, B = open_cache(path_a), open_cache(path_b)
    with A, B:
        ma, mb = A.meta, B.meta
        ignore = ("history",)
        header = settings_diff(ma.identity(), mb.identity(), ignore=ignore, names=("A", "B"))
        prov = settings_diff({k: getattr(ma, k) for k in PROVENANCE_FIELDS + ignore},
                             {k: getattr(mb, k) for k in PROVENANCE_FIELDS + ignore}, names=("A", "B"))

        def key(t):
            return (t["name"], t["role"], t["sha256"], t.get("head_sha256"))
        ka, kb = [key(t) for t in ma.teachers], [key(t) for t in mb.teachers]
        teachers = {"only_in_A": [k[0] for k in ka if k not in kb],
                    "only_in_B": [k[0] for k in kb if k not in ka],
                    "same_order": ka == kb}
        rows = []
        if (A.row_start, A.row_stop, A.shard) != (B.row_start, B.row_stop, B.shard):
            rows.append(f"row range: A {A.row_start}..{A.row_stop} {A.shard!r}, B "
                        f"{B.row_start}..{B.row_stop} {B.shard!r}")
        same_rows = A.num_rows == B.num_rows
        if same_rows:
            for k in SAMPLE_FIELDS:
                n = int(np.sum(A.sample(k) != B.sample(k)))
                if n:
                    rows.append(f"samples/{k}: {n} of {A.num_rows} rows differ")
        if len(A.train_rows) != len(B.train_rows):
            rows.append(f"training rows: A {len(A.train_rows)}, B {len(B.train_rows)}")
        la = layout(ma, A.num_rows, len(A.train_rows))
        lb = layout(mb, B.num_rows, len(B.train_rows))
        names = [n for n in la if n.startswith((EVAL + "/", RANDOM + "/"))]
        names += [n for n in lb if n.startswith((EVAL + "/", RANDOM + "/")) and n not in la]
        out, only = [], []
        for name in names:
            if name not in la or name not in lb:
                only.append(f"/{name} only in {'A' if name in la else 'B'}")
                continue
            sa, sb = la[name][0], lb[name][0]
            slotted = name.startswith(RANDOM + "/")
            if slotted:
                common = min(sa[0], sb[0])
                if sa[0] != sb[0]:
                    only.append(f"/{name} slots {common + 1}..{max(sa[0], sb[0])} (views) only in "
                                f"{'A' if sa[0] > sb[0] else 'B'}")
                sa, sb = sa[1:], sb[1:]
            if sa != sb:
                only.append(f"/{name}: shape A {sa}, B {sb}: not comparable")
                continue
            n = sa[0]
            step = max(64, (64 << 20) // max(1, int(np.prod(sa[1:], dtype=np.int64)) * 8) // 64 * 64)
            for slot in range(common) if slotted else [None]:
                def reader(R, slot=slot):
                    return lambda a, b: R.load(name, np.arange(a, b), slot)
                res = _compare(reader(A), reader(B), n, atol, rtol, step)
                out.append({"dataset": name, "slot": slot, **res})
        equal = not header and not rows and not only and all(d["rows_differing"] == 0 for d in out) \
            and not teachers["only_in_A"] and not teachers["only_in_B"] and teachers["same_order"]
        return {"a": str(path_a), "b": str(path_b), "atol": atol, "rtol": rtol, "header": header,
                "provenance": prov, "teachers": teachers, "rows": rows, "datasets": out, "only_in": only,
                "root_digests": [A.root_digest, B.root_digest], "equal": bool(equal)}


def format_diff(d: dict) -> str:
    lines = [f"A {d['a']}  (root digest {d['root_digests'][0]})",
             f"B {d['b']}  (root digest {d['root_digests'][1]})"]
    if d["root_digests"][0] == d["root_digests"][1]:
        lines.append("the root digests are equal: the files hold the same bytes")
    differ = f"{len(d['header'])} field(s) differ:"
    lines.append("header       " + ("same identity" if not d["header"] else differ))
    lines += [f"  {x}" for x in d["header"]]
    if d["provenance"]:
        lines.append("provenance   (not counted) " + "; ".join(d["provenance"]))
    t = d["teachers"]
    lines.append("teachers     " + ("same models, same order" if not t["only_in_A"] and not t["only_in_B"] and t["same_order"]
                                    else f"only in A: {t['only_in_A'] or '-'}; only in B: {t['only_in_B'] or '-'}"
                                    + ("" if t["same_order"] else "; order or roles differ")))
    lines.append("rows         " + ("same rows and samples" if not d["rows"] else "; ".join(d["rows"])))
    lines += [f"only         {x}" for x in d["only_in"]]
    lines.append(f"datasets (atol {d['atol']:g}, rtol {d['rtol']:g}; rel = |A - B| / |B|):")
    width = max([len(x["dataset"]) for x in d["datasets"]] + [7])
    lines.append(f"  {'dataset':<{width}}  slot  {'max abs':>10}  {'max rel':>10}  rows differing")
    for x in d["datasets"]:
        slot = "-" if x["slot"] is None else f"{x['slot']}"
        first = "" if x["first_row"] is None else f" (first: row {x['first_row']})"
        lines.append(f"  {x['dataset']:<{width}}  {slot:>4}  {x['max_abs']:>10.3g}  {x['max_rel']:>10.3g}  "
                     f"{x['rows_differing']}{first}")
    bad = [x for x in d["datasets"] if x["rows_differing"]]
    lines.append("EQUAL within the tolerances" if d["equal"] else
                 f"DIFFERENT: {len(bad)} dataset slot(s) beyond the tolerances"
                 + (", and header, teacher, row or layout differences" if d["header"] or d["rows"] or d["only_in"]
                    or t["only_in_A"] or t["only_in_B"] or not t["same_order"] else ""))
    return "\n".join(lines)


def format_history(history: list) -> list[str]:
    """Lines for ``cache info``: what was done to the file after precompute."""
    def short(backbones):
        return ", ".join(b[:12] for b in backbones) or "none"

    out = []
    for h in history:
        src = f"from {str(h.get('from'))[:16]} ({h.get('from_path', '?')})"
        if h.get("op") == "slim":
            dr = h.get("dropped", {})
            what = ", ".join(x for x in (
                f"layers {','.join(dr['layers'])}" if dr.get("layers") else "",
                f"random views {dr['random_views'][0]}..{dr['random_views'][-1]}" if dr.get("random_views") else "") if x)
            out.append(f"slim {src}: dropped {what or 'nothing'}")
        elif h.get("op") == "extend":
            out.append(f"extend {src}: computed {', '.join(h.get('computed', [])) or 'nothing'} "
                       f"(ran backbones {short(h.get('backbones_run', []))}, "
                       f"new features of {short(h.get('backbones_computed', []))}; on "
                       f"{h.get('device', '?')}, batch {h.get('batch_size', '?')}); copied "
                       f"{', '.join(h.get('copied', [])) or 'nothing'}; static weights "
                       f"{h.get('weights', '?')}")
        else:
            out.append(f"{h.get('op', '?')} {src}")
    return out
