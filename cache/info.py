"""What ``cache info`` shows: sizes, layout, teachers and their accuracy, provenance."""
from __future__ import annotations

import os

import numpy as np

from cache.reader import open_cache
from cache.schema import FEATURE_DTYPE, SCHEMA_NAME, SCHEMA_VERSION, store_path_for
from data.store import ImageStore, StoreError
from core.provenance import PROVENANCE_FIELDS
from core.tables import format_table
from data.metrics import split_metrics
from data.folders import SPLIT_NAMES


def model_predictions(logits: np.ndarray, biased: np.ndarray, meta) -> dict[str, np.ndarray]:
    """Predicted class per row of each teacher, the ensemble (mean probability) and the biased
    model, from view-0 logits [n, T, C] and [n, C]."""
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    preds = {t["name"]: logits[:, i].argmax(-1) for i, t in enumerate(meta.teacher_entries)}
    preds["ensemble"] = prob.mean(1).argmax(-1)
    preds[meta.biased_entry["name"]] = biased.argmax(-1)
    return preds


# ----------------------------------------------------------------------------- footprint: ONE home

def view_bytes(T: int, C: int, B: int, dims) -> int:
    """Bytes of one stored view of one row: box, flip, teacher and biased logits, cached weights
    and the pooled features (float16) of the layers whose dims are ``dims``."""
    return 4 * 4 + 1 + 4 * T * C + 4 * C + 4 * T + sum(2 * B * int(d) for d in dims)


def slot_bytes(meta, layers) -> int:
    """Bytes of one view slot of one row of ``meta``'s cache with the features of ``layers``."""
    return view_bytes(meta.num_teachers, meta.num_classes, meta.num_backbones,
                      [meta.feature_dims[l] for l in layers])


def _footprint(per_view: int, K: int, split_sizes: dict, store_bytes: dict, online: bool) -> dict:
    train = int(split_sizes.get("train", 0))
    images = sum(int(store_bytes.get(s, 0)) for s in ("train", "val", "test"))
    # the slot this epoch trains on and the next (prefetched); the epoch reads one
    teacher_held = 0 if online else min(2, K + 1) * train * per_view
    teacher_read = 0 if online else train * per_view
    held = {"images": images, "teacher_outputs": teacher_held, "total": images + teacher_held}
    read = {"images_train": int(store_bytes.get("train", 0)), "teacher_outputs": teacher_read,
            "images_val": int(store_bytes.get("val", 0))}
    read["total"] = sum(read.values())
    return {"held": held, "epoch_read": read}


def run_footprint(meta, split_sizes: dict, store_bytes: dict, layers, teachers_online: bool) -> dict:
    """What a distillation run holds in memory and what a streamed epoch reads, in bytes.

    Args:
        split_sizes: rows per split, ``{"train", "val", "test"}``.
        store_bytes: image-store bytes of each split's images.
        layers: the feature layers the run distils (its non-zero gammas).
        teachers_online: the teachers run on fresh crops (nothing read from the cache).
    Returns:
        ``{"held": {"images", "teacher_outputs", "total"}, "epoch_read": {"images_train",
        "teacher_outputs", "images_val", "total"}}``: a run holds the images of the three splits
        and at most two slots of the training rows' teacher outputs (this epoch's and the next);
        a streamed epoch reads its training images once, one slot, and the validation images once.
    """
    return _footprint(slot_bytes(meta, layers), meta.random_views, split_sizes, store_bytes, teachers_online)


def file_data_bytes(per_view: int, rows: int, train_rows: int, K: int) -> int:
    """Data bytes of a cache file (digests, index and samples aside): view 0 of every row and K
    random views of the training rows."""
    return (rows + K * train_rows) * per_view


# The study's settings, for planning. Image bytes per stored image at short side 256: Waterbirds
# (CUB photos, mostly 500 x 375) 256 x 341; CelebA (aligned 178 x 218) 256 x 313.
REFERENCE = {
    "Waterbirds": {"splits": {"train": 4795, "val": 1199, "test": 5794}, "image": 256 * 341 * 3},
    "CelebA": {"splits": {"train": 162770, "val": 19867, "test": 19962}, "image": 256 * 313 * 3},
}
FEATURE_DIMS = {"layer2": 512, "layer3": 1024, "layer4": 2048}  # ResNet-50 (core.models.FEATURE_DIMS)


def reference_settings(K: int = 30, T: int = 5, C: int = 2) -> list[dict]:
    """File bytes, bytes a run holds and bytes a streamed epoch reads for the study's settings:
    Waterbirds and CelebA, K = 30, layer4 or layer2-4, one or five backbones."""
    out = []
    for name, ref in REFERENCE.items():
        splits, rows = ref["splits"], sum(ref["splits"].values())
        for layers in (["layer4"], ["layer2", "layer3", "layer4"]):
            for B in (1, 5):
                per = view_bytes(T, C, B, [FEATURE_DIMS[l] for l in layers])
                fp = _footprint(per, K, splits, {s: n * ref["image"] for s, n in splits.items()}, False)
                out.append({"setting": f"{name}, {'layer4' if len(layers) == 1 else 'layer2-4'}, "
                                       f"{B} backbone{'s' if B > 1 else ''}", "slot_bytes": per,
                            "file": file_data_bytes(per, rows, splits["train"], K),
                            "held": fp["held"]["total"],
                            "held_teachers": fp["held"]["teacher_outputs"],
                            "epoch_read": fp["epoch_read"]["total"],
                            "epoch_read_teachers": fp["epoch_read"]["teacher_outputs"]})
    return out


def format_reference(rows: list[dict] | None = None) -> str:
    """The table of :func:`reference_settings` (GiB)."""
    rows = reference_settings() if rows is None else rows

    def g(n):
        return f"{n / 2**30:.2f}"
    body = [[r["setting"], f"{r['slot_bytes'] / 1024:.1f}", g(r["file"]), g(r["held"]), g(r["epoch_read"])]
            for r in rows]
    return format_table(["setting (K = 30, T = 5)", "KiB/slot", "cache file GiB", "run holds GiB",
                         "streamed epoch reads GiB"], body, style="text")


def _store_bytes(store, rows: np.ndarray) -> int:
    nbytes_of = getattr(store, "nbytes_of", None)
    return int(nbytes_of(rows)) if nbytes_of is not None else int(store.side) ** 2 * 3 * len(rows)


def memory_needed(cache, store, layers, teachers_online: bool = False) -> dict:
    """:func:`run_footprint` of a cache and its image store (dataset rows = file rows + row_start)."""
    sizes = {s: len(cache.split_rows(s)) for s in ("train", "val", "test")}
    store_bytes = {s: _store_bytes(store, cache.split_rows(s) + cache.row_start) for s in sizes}
    return run_footprint(cache.meta, sizes, store_bytes, layers, teachers_online)


def summarize(path) -> dict:
    """Size, layout, teachers, splits, provenance, and per split the accuracy of each teacher,
    the ensemble (mean probability) and the biased model on view 0.

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
            "rows": r.num_rows, "rows_done": int(len(done_rows)), "random_views": m.random_views,
            "num_classes": m.num_classes, "dataset": m.dataset, "group_names": m.group_names,
            "finished": r.finished, "layers": {l: m.feature_dims[l] for l in m.layers},
            "feature_dtype": FEATURE_DTYPE, "tau_cached": m.tau_cached,
            "dataset_fingerprint": m.dataset_fingerprint, "view_spec": m.view_spec,
            "store_size": m.store_size, "teachers": m.teachers, "backbone_ids": m.backbone_ids,
            "provenance": {k: getattr(m, k) for k in PROVENANCE_FIELDS}, "history": m.history,
        }
        codes, counts = np.unique(r.split, return_counts=True)
        d["splits"] = {SPLIT_NAMES.get(int(c), str(int(c))): int(n) for c, n in zip(codes, counts)}
        acc = {}
        if len(done_rows):
            v0 = r.read_eval(rows=done_rows, fields=("logits", "biased"))
            named = {SPLIT_NAMES.get(int(c), str(int(c))): int(c) for c in np.unique(v0["split"])}
            for model, pred in model_predictions(v0["logits"], v0["biased"], m).items():
                acc[model] = {name: {k: g[k] for k in ("mean_acc", "wga", "group_acc")}
                              for name, g in split_metrics(pred, v0["y"], v0["group"], v0["split"],
                                                           named, m.num_groups).items()}
        d["accuracy"] = acc
        train = len(r.train_rows)
        d["train_rows"] = train
        d["slot_bytes"] = {"layer4": slot_bytes(m, [l for l in m.layers if l == "layer4"]),
                           "all layers": slot_bytes(m, m.layers)}
        d["data_bytes"] = file_data_bytes(d["slot_bytes"]["all layers"], r.num_rows, train, m.random_views)
        d["root_digest"] = r.root_digest
        store = store_path_for(r.path)
        if store.is_file() and not r.shard:
            try:
                images = ImageStore(store)
            except StoreError:
                images = None
            if images is not None:
                d["memory"] = {k: memory_needed(r, images, ls) for k, ls in
                               (("layer4", [l for l in m.layers if l == "layer4"]), ("all layers", m.layers))}
    return d


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _resize_words(d: dict) -> str:
    S = d["store_size"]
    if d["view_spec"].get("resize") == "squash":
        return f"Resize(({S}, {S})) (squashed; DFR's)"
    return f"Resize({S}) (short side {S}, aspect kept; the study's)"


def _history_lines(history: list) -> list[str]:
    from cache.tools import format_history  # what slim / extend did to the file (cache.tools)

    return format_history(history)


def format_summary(d: dict) -> str:
    """Readable text block of :func:`summarize`'s dict."""
    p = d["provenance"]
    rows = (f"{d['rows']} (full file)" if not d["shard"] else
            f"{d['rows']} of {d['num_samples']} (shard {d['shard']}, rows {d['row_start']}..{d['row_stop']})")
    lines = [
        f"cache        {d['path']}  ({_size(d['file_bytes'])}, {d['schema']})",
        f"rows         {rows}; done {d['rows_done']}/{d['rows']}"
        + ("" if d["finished"] else " (not finished: rerun precompute to complete it)"),
        f"views        view 0 (eval) of every row + {d['random_views']} random views of each training row at "
        f"{d['view_spec']['out_size']} px, from images resized with {_resize_words(d)}   classes "
        f"{d['num_classes']}   tau_cached {d['tau_cached']:g}",
        "features     " + (", ".join(f"{l} {D}" for l, D in d["layers"].items()) or "none")
        + f"  ({d['feature_dtype']}, {len(d['backbone_ids'])} backbones)",
        f"data set     {d['dataset']}, groups {', '.join(d['group_names'])}; fingerprint "
        f"{d['dataset_fingerprint']}",
        "splits       " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
        f"made         {p['created']} by tool {p['tool_version']} (git {p['git_commit']}, "
        f"torch {p['torch_version']})",
        *(f"history      {h}" for h in _history_lines(d.get("history", []))),
        "",
        format_table(["model", "role", "backbone", "sha256"],
                     [[t["name"], t["role"], t["backbone_id"], str(t["sha256"])[:16]] for t in d["teachers"]],
                     style="text", align="llll"),
    ]
    lines.append(f"footprint    {_size(d['slot_bytes']['all layers'])} per stored view of a row "
                 f"({_size(d['slot_bytes']['layer4'])} with layer4 only); view 0 of {d['rows']} rows + "
                 f"{d['random_views']} random views of {d['train_rows']} training rows = "
                 f"{_size(d['data_bytes'])} of data in a {_size(d['file_bytes'])} file")
    if d.get("memory"):
        for k, fp in d["memory"].items():
            h, e = fp["held"], fp["epoch_read"]
            lines.append(f"  run, {k:<10} holds {_size(h['total'])} (images "
                         f"{_size(h['images'])}, two slots of teacher outputs "
                         f"{_size(h['teacher_outputs'])}); a streamed epoch reads {_size(e['total'])} "
                         f"(training images {_size(e['images_train'])}, one slot "
                         f"{_size(e['teacher_outputs'])}, validation images {_size(e['images_val'])})")
    if d.get("root_digest"):
        lines.append(f"root digest  {d['root_digest']}  (publish it; receivers run "
                     "`cache verify --expect DIGEST`)")
    if d["accuracy"]:
        splits = list(next(iter(d["accuracy"].values())))
        lines += ["", "accuracy on view 0, % (mean / worst-group)" +
                  ("" if d["rows_done"] == d["rows"] else f", over the {d['rows_done']} rows done")]
        body = [[model] + [f"{100 * per[s]['mean_acc']:.1f} / {100 * per[s]['wga']:.1f}" if s in per else "-"
                           for s in splits] for model, per in d["accuracy"].items()]
        lines.append(format_table(["model", *splits], body, style="text"))
    if d.get("reference", True):
        lines += ["", "for planning, the study's settings:", format_reference()]
    return "\n".join(lines)
