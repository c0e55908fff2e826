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


def memory_needed(cache, store_side: int, layers) -> dict[str, int]:
    """Bytes a distillation run holds in memory (not streaming): every image of the store
    (train, val, test) and the training split's teacher outputs for every stored view, with the
    features of ``layers``. ``distill --data-mode auto`` streams when this does not fit."""
    m = cache.meta
    train = len(cache.split_rows("train"))
    per_view = 4 * (m.num_teachers * m.num_classes + m.num_classes + m.num_teachers + 4) + 1 + sum(
        2 * m.num_backbones * m.feature_dims[l] for l in layers)
    return {"images": store_side ** 2 * 3 * cache.num_rows, "teacher_outputs": train * m.views_per_row * per_view}


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
            "provenance": {k: getattr(m, k) for k in PROVENANCE_FIELDS},
        }
        codes, counts = np.unique(r.split, return_counts=True)
        d["splits"] = {SPLIT_NAMES.get(int(c), str(int(c))): int(n) for c, n in zip(codes, counts)}
        acc = {}
        if len(done_rows):
            v0 = r.read(rows=done_rows, views=0, layers=[])
            named = {SPLIT_NAMES.get(int(c), str(int(c))): int(c) for c in np.unique(v0["split"])}
            for model, pred in model_predictions(v0["logits"], v0["biased"], m).items():
                acc[model] = {name: {k: g[k] for k in ("mean_acc", "wga", "group_acc")}
                              for name, g in split_metrics(pred, v0["y"], v0["group"], v0["split"],
                                                           named, m.num_groups).items()}
        d["accuracy"] = acc
        store = store_path_for(r.path)
        if store.is_file() and not r.shard:
            try:
                side = ImageStore(store).side
            except StoreError:
                side = None
            if side is not None:
                d["memory"] = {"layer4": memory_needed(r, side, ["layer4"] if "layer4" in m.layers else []),
                               "all layers": memory_needed(r, side, m.layers)}
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
    return f"Resize({S}) (short side {S}, aspect kept; the report's)"


def format_summary(d: dict) -> str:
    """Readable text block of :func:`summarize`'s dict."""
    p = d["provenance"]
    rows = (f"{d['rows']} (full file)" if not d["shard"] else
            f"{d['rows']} of {d['num_samples']} (shard {d['shard']}, rows {d['row_start']}..{d['row_stop']})")
    lines = [
        f"cache        {d['path']}  ({_size(d['file_bytes'])}, {d['schema']})",
        f"rows         {rows}; done {d['rows_done']}/{d['rows']}"
        + ("" if d["finished"] else " (not finished: rerun precompute to complete it)"),
        f"views        {d['random_views'] + 1} per row (view 0 eval + {d['random_views']} random) at "
        f"{d['view_spec']['out_size']} px, from images resized with {_resize_words(d)}   classes "
        f"{d['num_classes']}   tau_cached {d['tau_cached']:g}",
        f"features     " + (", ".join(f"{l} {D}" for l, D in d["layers"].items()) or "none")
        + f"  ({d['feature_dtype']}, {len(d['backbone_ids'])} backbones)",
        f"data set     {d['dataset']}, groups {', '.join(d['group_names'])}; fingerprint {d['dataset_fingerprint']}",
        f"splits       " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
        f"made         {p['created']} by tool {p['tool_version']} (git {p['git_commit']}, "
        f"torch {p['torch_version']})",
        "",
        format_table(["model", "role", "backbone", "sha256"],
                     [[t["name"], t["role"], t["backbone_id"], str(t["sha256"])[:16]] for t in d["teachers"]],
                     style="text", align="llll"),
    ]
    if d.get("memory"):
        mem = {k: sum(v.values()) / 2**30 for k, v in d["memory"].items()}
        img = d["memory"]["layer4"]["images"] / 2**30
        lines.append(f"memory       a run holds {mem['layer4']:.2f} GiB with layer4 features, {mem['all layers']:.2f} GiB "
                     f"with every layer (images {img:.2f} GiB); `distill --data-mode stream` reads the splits "
                     "as the epoch goes instead")
    if d["accuracy"]:
        splits = list(next(iter(d["accuracy"].values())))
        lines += ["", "accuracy on view 0, % (mean / worst-group)" +
                  ("" if d["rows_done"] == d["rows"] else f", over the {d['rows_done']} rows done")]
        body = [[model] + [f"{100 * per[s]['mean_acc']:.1f} / {100 * per[s]['wga']:.1f}" if s in per else "-"
                           for s in splits] for model, per in d["accuracy"].items()]
        lines.append(format_table(["model", *splits], body, style="text"))
    return "\n".join(lines)
