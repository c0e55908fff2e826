"""Full check of a cache file: structure, schema, layout, header digest, every block's digest and
checksum, the samples' ranges, (``expect``) the root digest its sender published, and the image
store beside it; and (:func:`recompute`) that its stored outputs are its teachers': digests catch
accidents, a file whose outputs were edited and digested again passes them, not a recomputation."""
from __future__ import annotations

import h5py
import numpy as np
import torch

from cache.integrity import bad_blocks
from cache.reader import (H5_ERRORS, SLAB_BYTES, check_digest_tables, check_header, check_structure, guarded,
                          layout_problems, open_h5)
from cache.schema import (SAMPLE_FIELDS, CacheError, check_schema, is_slotted, layout, meta_from_file,
                          row_bytes, train_positions)
from cache.integrity import digest_name
from cache.samples import sample_problems, samples_message
from cache.schema import store_path_for
from data.store import ImageStore, StoreError


def _verify_rows(read, n_rows: int, step: int, block: int, digests: np.ndarray | None, where: str):
    """Read rows 0..n_rows of one dataset (or one slot) through ``read(a, b)`` in whole blocks:
    HDF5 checks each chunk's fletcher32 on read, and each block is compared with its digest
    (which catches a damaged chunk index: no read error, wrong rows)."""
    unreadable, mismatched, nonfinite = [], [], 0
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        try:
            slab = read(lo, hi)
        except H5_ERRORS as e:  # a checksum failure somewhere in the slab: name the bad blocks
            for a in range(lo, hi, block):
                try:
                    read(a, min(a + block, hi))
                except H5_ERRORS:
                    unreadable.append((where, a, min(a + block, hi),
                                       (str(e).splitlines() or [type(e).__name__])[0]))
            continue
        if digests is not None:
            mismatched += [(where, b * block, min((b + 1) * block, hi)) for b in bad_blocks(slab, lo // block, digests, block)]
        if slab.dtype.kind == "f":
            nonfinite += int(slab.size - np.count_nonzero(np.isfinite(slab)))
    return unreadable, mismatched, nonfinite


def _verify_dataset(ds: h5py.Dataset, name: str, table: np.ndarray | None, block: int) -> list[str]:
    problems = []
    if not ds.fletcher32:
        problems.append(f"/{name} has no fletcher32 checksums; its integrity cannot be checked")
    slotted = is_slotted(name)
    step = max(1, SLAB_BYTES // max(row_bytes(ds.shape, ds.dtype.itemsize, slotted), 1) // block) * block
    unreadable, mismatched, nonfinite = [], [], 0
    for k in range(ds.shape[0]) if slotted else [None]:
        read = (lambda a, b, k=k: ds[k, a:b]) if slotted else (lambda a, b: ds[a:b])
        u, m, n = _verify_rows(read, ds.shape[1] if slotted else ds.shape[0], step, block,
                               None if table is None else (table[k] if slotted else table),
                               f"slot {k} (view {k + 1}) " if slotted else "")
        unreadable, mismatched, nonfinite = unreadable + u, mismatched + m, nonfinite + n

    def where(spans):
        return ", ".join(f"{w}rows {a}..{b}" for w, a, b, *_ in spans[:5]) + (" ..." if len(spans) > 5 else "")
    if unreadable:
        problems.append(f"/{name}: {len(unreadable)} block(s) fail the checksum or cannot be read "
                        f"({where(unreadable)}; {unreadable[0][3]}): the file is corrupt; copy it again "
                        "or rebuild it with precompute")
    if mismatched:
        problems.append(f"/{name}: {len(mismatched)} block(s) do not match their digest "
                        f"({where(mismatched)}): the file is damaged; copy it again or "
                        "rebuild it with precompute")
    if nonfinite:
        problems.append(f"/{name}: {nonfinite} non-finite values")
    return problems


def verify(path, fingerprint: str | None = None, expect: str | None = None) -> list[str]:
    """Full check of a cache file; returns the problems found (empty list: the file is sound).

    Re-reads every dataset completely, so every chunk's fletcher32 checksum and every block's
    digest is checked; also the file's structure (only datasets stored inside it), the schema,
    the header digest, the layout, the samples' ranges (cache.samples), completeness, with
    ``fingerprint`` that the file was made from that data set, and with ``expect`` that its root
    digest is the one its sender published (digests detect accidents; only the published root
    digest guards against a file that was altered and re-digested).
    """
    try:
        f = open_h5(path, "r")
    except CacheError as e:
        return [str(e)]
    with f:
        try:
            return guarded(path, "", lambda: _verify_open(f, path, fingerprint, expect))
        except CacheError as e:
            return [str(e)]


def _verify_open(f: h5py.File, path, fingerprint: str | None, expect: str | None) -> list[str]:
    check_structure(f, path)
    check_schema(f.attrs, path)
    root = check_header(f, path)
    meta, row_start, row_stop, shard = meta_from_file(f, path)
    R = row_stop - row_start
    Rt = len(train_positions(f["samples/split"][...])) if "samples/split" in f else 0
    names = list(layout(meta, R, Rt))
    problems = layout_problems(f, meta, R, Rt)
    if problems:
        return problems
    block = int(f.attrs.get("block_rows", 0))
    if not 1 <= block <= 1 << 20:
        return [f"block_rows {block} is not a block size: the file is damaged or was not written by this tool"]
    if root:
        check_digest_tables(f, path, names)
    tables = {n: f[digest_name(n)][...] for n in names} if root else {}
    for name in names:
        problems += _verify_dataset(f[name], name, tables.get(name), block)
    if not any(p.startswith("/samples/") for p in problems):  # readable and as digested: judge the values
        samples = {k: f[f"samples/{k}"][...] for k in SAMPLE_FIELDS}
        bad = sample_problems(samples, meta, row_start, row_stop, shard)
        problems += [samples_message(bad)] if bad else []
    if not any(p.startswith("/progress/done") for p in problems):
        done = f["progress/done"][...]
        if not done.all() or not root:
            problems.append(f"incomplete: {int(done.sum())} of {len(done)} rows done"
                            + (", digests not written yet" if done.all() else "")
                            + "; rerun precompute with the same arguments to finish it")
    if fingerprint is not None and fingerprint != meta.dataset_fingerprint:
        problems.append(f"cache made from another data set: file fingerprint "
                        f"{meta.dataset_fingerprint[:16]}, data folder {fingerprint[:16]}; "
                        "rerun precompute on this data folder or point to the right one")
    if expect is not None and (root or "") != expect.strip().lower():
        problems.append(f"root digest {root or '(none: the file is unfinished)'} is not the "
                        f"expected {expect.strip()}: this is not the file that was published (altered, "
                        "re-digested or another build); do not use it, ask its sender for the "
                        "file or the digest again")
    return problems + store_problems(path, meta)


def store_problems(path, meta) -> list[str]:
    """Problems of the image store beside the cache at ``path``: missing (when the header records
    one), not matching the cache's data and image size, an image not matching its digest, or a
    store other than the one the teacher outputs were computed from (``meta.store_digest``)."""
    sp = store_path_for(path)
    if not sp.is_file():
        if not meta.store_digest:
            return []  # a cache made without a store (by hand): nothing is bound to it
        return [f"{sp} is missing: the cache was copied without its image store: send {sp.name} with it "
                "(distill reads the images from it)"]
    try:
        store = ImageStore(sp, meta.dataset_fingerprint, meta.store_size, meta.view_spec.get("resize"))
    except StoreError as e:
        return [f"image store: {e}"]
    try:
        problems = store.verify()
        if not problems and meta.store_digest:
            got = store.store_digest()
            if got != meta.store_digest:
                problems.append(f"{sp} is not the image store this cache was computed from (store digest "
                                f"{got[:16]}, the cache's header records {meta.store_digest[:16]}): copy the "
                                f"cache's own {sp.name} beside it, or rebuild both with precompute")
    except (OSError, KeyError) as e:
        problems = [f"{sp}: unreadable ({type(e).__name__}: {e})"]
    finally:
        store.close()
    return problems


# ---------------------------------------------------------------- recompute
# Unit roundoff of the arithmetic the outputs were computed in: float32 on a CPU, bf16 under the
# GPU's autocast (core.runtime.autocast); the heads always run in float32.
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}


def reduction_sizes(backbone, out_size: int) -> dict[str, int]:
    """Per stored layer (and ``"logits"``), the summed length of every reduction on the way from
    the pixels to it: each convolution's ``in/groups * kh * kw`` (all of them up to the layer: the
    longest path through a residual block and its shortcut is bounded by their sum), the average
    pool's ``h * w``, and for the logits the head's width. The first-order error bound of a chain
    of dot products is ``n u`` times the magnitude of the summands (Higham, ch. 3), with n this size."""
    net = backbone.net
    side = -(-(-(-out_size // 2)) // 2)  # conv1 (stride 2), then the max pool (stride 2)
    total = sum(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                for m in net.conv1.modules() if isinstance(m, torch.nn.Conv2d))
    out = {}
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        side = side if i == 0 else -(-side // 2)
        total += sum(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                     for m in getattr(net, name).modules() if isinstance(m, torch.nn.Conv2d))
        out[name] = total + side * side
    out["logits"] = out["layer4"] + net.fc.in_features
    return out


def _pick_views(n_rows: int, n_train: int, K: int, n: int, seed: int):
    """``n`` distinct (slot, index) of the file's views, drawn by ``seed``: slot 0 the eval view
    of file row ``index``, slot k >= 1 random slot k of training position ``index``."""
    total = n_rows + K * n_train
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    ev = picked[picked < n_rows]
    rnd = picked[picked >= n_rows] - n_rows
    return ev, {int(k) + 1: rnd[rnd // max(n_train, 1) == k] % max(n_train, 1) for k in range(K)}


def _backbone_map(meta, man) -> list[int] | str:
    """For each backbone of the cache, the manifest's backbone that should give its features (by
    the models that use it); or why the two do not describe the same models."""
    got = [(t.get("role"), t.get("sha256"), t.get("head_sha256")) for t in meta.teachers]
    want = [(m.role, m.sha256, m.head_sha256) for m in man.teachers + [man.biased]]
    if got != want:
        return (f"the cache's header names other models than the manifest (role, checkpoint and head "
                f"sha256 in order: {len(got)} in the cache, {len(want)} in the manifest, "
                f"{sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))} differ)")
    pairs = list(zip(meta.backbone_of_teacher + [meta.biased_backbone],
                     man.teacher_backbone + [man.biased_backbone]))
    where = {}
    for c, m in pairs:
        if where.setdefault(c, m) != m:
            return f"cache backbone {c} is computed by two different backbones of the manifest"
    if sorted(where) != list(range(len(meta.backbone_ids))):
        return "the cache holds features of a backbone none of its models uses"
    return [where[c] for c in range(len(meta.backbone_ids))]


def recompute(path, manifest, n: int, seed: int = 0, device: str = "cpu", precision: str = "float32",
              batch_size: int = 64) -> tuple[list[str], list[str]]:
    """Run the manifest's teachers and biased model again on ``n`` of the cache's stored views,
    drawn by ``seed`` among the eval views of every row and the random slots of the training rows,
    rendered from the image store as training renders them (:func:`data.views.render` of the
    stored box and flip), and compare with what the file holds. Returns (report lines, problems).

    Tolerances, from the stored dtype and the reduction sizes n (:func:`reduction_sizes`); u is
    the unit roundoff of the cache's arithmetic (``precision``) plus this run's (float32 on a CPU,
    bf16 under a GPU's autocast), as both are within ``n u`` of the exact value; s the stored
    dtype's unit roundoff (its rounding of the computed value) and half its smallest subnormal:
    logits (float32) ``s |z| + n u (sum_j |W_cj f_j| + |b_c|)``, the head's summands on the
    recomputed layer4 features; features (float16, averages of non-negative values)
    ``(s + n u) |f|``; cached weights (float32, computed in float64 from the float32 logits)
    within one ulp of those recomputed from the stored logits, so that with the logits checked
    they are the teachers' weights. Views: the stored boxes and flips must replay the header's
    view spec (within float32's epsilon: drawn in float64, stored in float32). Prints the largest
    error, its share of the tolerance, and how often the predicted class agrees.
    """
    from cache.reader import open_cache
    from core.ensemble import Ensemble
    from core.manifest import read_manifest, verify_files
    from core.runtime import autocast, pick_device
    from core.weighting import cached_agre_weights
    from data.views import ViewSpec, render, sample_views

    if precision not in UNIT_ROUNDOFF:
        raise CacheError(f"--precision must be one of {', '.join(UNIT_ROUNDOFF)}, got {precision!r}")
    man = read_manifest(manifest)
    verify_files(man)
    with open_cache(path) as r:
        meta = r.meta
        if r.shard:
            raise CacheError(f"{path} is shard {r.shard}; merge the shards (`cache merge`) and check "
                             "the full file")
        mapping = _backbone_map(meta, man)
        if isinstance(mapping, str):
            return [], [f"{manifest} does not describe {path}: {mapping}; give the teachers the cache was "
                        "made from"]
        dev = pick_device(device)
        # the cache's computation and this one, each within n u of the exact value
        u = UNIT_ROUNDOFF[precision] + UNIT_ROUNDOFF["bfloat16" if dev.type == "cuda" else "float32"]
        store = ImageStore(store_path_for(path), meta.dataset_fingerprint, meta.store_size,
                           meta.view_spec.get("resize"))
        try:
            if meta.store_digest and store.store_digest() != meta.store_digest:
                return [], [f"{store.path} is not the image store {path} was computed from; copy its own "
                            "beside it"]
            ens = Ensemble(man).to(dev).eval()
            sizes = reduction_sizes(ens.backbones[0], meta.out_size)
            train = r.train_rows
            ev, slots = _pick_views(r.num_rows, len(train), meta.random_views, n, seed)
            parts = [r.read_eval(rows=ev, layers=meta.layers)] if len(ev) else []
            parts += [r.read_slot(k, layers=meta.layers, positions=p) for k, p in slots.items() if len(p)]
            slot_of = np.concatenate([np.zeros(len(ev), np.int64)] +
                                     [np.full(len(p), k) for k, p in slots.items() if len(p)])
            held = {k: np.concatenate([p[k] for p in parts]) for k in ("rows", "box", "flip", "logits",
                                                                       "biased", "weights")}
            held["features"] = {l: np.concatenate([p["features"][l] for p in parts]) for l in meta.layers}
            rows = held["rows"] + r.row_start
            images = store.load(rows)
            spec = ViewSpec(**meta.view_spec)
            replay_box, replay_flip = sample_views(rows, spec, store.hw[rows])
            at = (np.arange(len(rows)), slot_of)
            box_ok = (np.abs(replay_box[at] - held["box"]) <= np.finfo(np.float32).eps).all(1) \
                & (replay_flip[at] == held["flip"])
            outs = []
            with torch.inference_mode():
                for s in range(0, len(rows), batch_size):
                    idx = torch.arange(s, min(s + batch_size, len(rows)))
                    x = render(images[idx], torch.from_numpy(held["box"][s:s + batch_size]),
                               torch.from_numpy(held["flip"][s:s + batch_size]), meta.out_size)
                    with autocast(dev):
                        zt, zb, f = ens(x.to(dev), tuple(dict.fromkeys([*meta.layers, "layer4"])))
                    outs.append((zt.float().cpu(), zb.float().cpu(),
                                 {l: v.float().cpu() for l, v in f.items()}))
        finally:
            store.close()
        zt = torch.cat([o[0] for o in outs])
        zb = torch.cat([o[1] for o in outs])
        feats = {l: torch.cat([o[2][l] for o in outs]) for l in outs[0][2]}
        heads = [(h.weight.detach().float().cpu(), h.bias.detach().float().cpu()) for h in ens.heads]
    return _compare(held, zt, zb, feats, heads, mapping, sizes, u, meta, slot_of, box_ok,
                    cached_agre_weights, (n, seed, dev.type, precision))


def _head_scale(f4: torch.Tensor, head) -> np.ndarray:
    """sum_j |W_cj f_j| + |b_c| of one head on layer4 features [n, D]: [n, C]."""
    w, b = head
    return (f4.abs() @ w.abs().T + b.abs()).double().numpy()


def _stored_u(a: np.ndarray) -> tuple[float, float]:
    """(unit roundoff, half the smallest subnormal) of a stored array's dtype: the error of
    rounding a computed value into it."""
    fi = np.finfo(a.dtype)
    return float(fi.eps) / 2, float(fi.smallest_subnormal) / 2


def _compare(held, zt, zb, feats, heads, mapping, sizes, u, meta, slot_of, box_ok, weights_of, how):
    """Report lines and problems of the recomputed outputs against the stored ones (see
    :func:`recompute` for the tolerances; ``u``: the two computations' unit roundoffs summed)."""
    n, seed, device, precision = how
    lines, problems = [], []

    def check(what, stored, got, tol, agree=None, note=""):
        err = np.abs(stored.astype(np.float64) - got)
        tol = tol + _stored_u(stored)[1]
        line = (f"  {what:<16} largest error {err.max(initial=0):.3g} "
                f"({(err / tol).max(initial=0):.3g} of its tolerance)")
        if agree is not None:
            line += f", predicted class agrees on {int(agree.sum())}/{agree.size}"
        lines.append(line + note)
        if (err > tol).any():
            problems.append(_mismatch(what, err > tol, err, tol, held, slot_of))

    f4 = feats["layer4"]  # the heads' input, [v, B (the manifest's), D]
    teacher_bb = [mapping[b] for b in meta.backbone_of_teacher]
    scale_t = np.stack([_head_scale(f4[:, b], heads[t]) for t, b in enumerate(teacher_bb)], axis=1)
    scale_b = _head_scale(f4[:, mapping[meta.biased_backbone]], heads[-1])
    for what, stored, got, scale in (("teacher logits", held["logits"], zt, scale_t),
                                     ("biased logits", held["biased"], zb, scale_b)):
        got = got.double().numpy()
        tol = _stored_u(stored)[0] * np.abs(stored) + sizes["logits"] * u * scale
        check(what, stored, got, tol, stored.argmax(-1) == got.argmax(-1))
    for l in meta.layers:
        stored = held["features"][l]                       # [v, B, D] in the cache's backbone order
        got = feats[l][:, mapping].double().numpy()
        check(f"features {l}", stored, got, (_stored_u(stored)[0] + sizes[l] * u) * np.abs(got))
    again = weights_of(torch.from_numpy(held["logits"]), torch.from_numpy(held["biased"]),
                       meta.tau_cached).numpy()
    w = held["weights"]
    ulp = np.spacing(np.maximum(np.abs(w), np.abs(again)).astype(w.dtype)).astype(np.float64)
    check("cached weights", w, again.astype(np.float64), ulp,
          note=" (against the weights of the stored logits: one ulp)")
    lines.append(f"  {'views':<16} {int(box_ok.sum())}/{len(box_ok)} boxes and flips replay the view spec")
    if not box_ok.all():
        bad = np.flatnonzero(~box_ok)[0]
        problems.append(f"{int((~box_ok).sum())} stored view(s) are not the header's view spec's, e.g. "
                        f"{_where(held, slot_of, bad)}")
    head = (f"recomputed {len(slot_of)} views ({int((slot_of == 0).sum())} eval, {int((slot_of > 0).sum())} "
            f"random; --recompute {n} --seed {seed}) on {device}, cache made in {precision} arithmetic "
            f"(u {u:.3g} for both; {sizes['logits']} summed reduction lengths to the logits)")
    return [head] + lines, problems


def _where(held, slot_of, i) -> str:
    s = int(slot_of[i])
    return f"row {int(held['rows'][i])} " + ("(eval view)" if s == 0 else f"(random slot {s - 1}, view {s})")


def _mismatch(what, bad, err, tol, held, slot_of) -> str:
    views = np.flatnonzero(bad.reshape(len(slot_of), -1).any(1))
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    return (f"{what}: {len(views)} of {len(slot_of)} views differ from what the teachers compute, e.g. "
            f"{_where(held, slot_of, worst[0])}: error {err[worst]:.3g} > tolerance {tol[worst]:.3g}; these "
            "are not the outputs of the manifest's models on the stored views (altered, or another build)")
