"""``cache extend``: a new cache from an existing one and a manifest naming the models it should hold.

Models already in the cache (same checkpoint and head sha256) are copied; only the backbones of
new models run, on exactly the stored views (boxes and flips read from the cache, pixels from its
image store), batched as precompute batches them: the same ``batch_size`` on the same kind of
device gives a file equal bit for bit to a fresh precompute of the manifest (on the CPU; other
batch sizes, or a GPU, agree within float32 rounding of the new models' outputs). The static
AGRE weights are recomputed when the teachers or the biased model change.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from cache.reader import open_cache
from cache.schema import CacheError, CacheMeta, store_path_for
from cache.tools import _check_out, fresh, origin, place_store, read_rows, samples_of, source_compression, write_derived
from core.ensemble import Ensemble, head_of
from core.errors import ConfigError
from core.files import JSONFileError, load_json
from core.manifest import load_model, read_manifest, verify_files, verify_models
from core.models import FEATURE_DIMS, load_checkpoint
from core.runtime import autocast, memory_format_for, pick_device
from core.weighting import cached_agre_weights
from data.store import ImageStore
from data.views import render


def _key(entry) -> tuple:
    get = entry.get if isinstance(entry, dict) else (lambda k: getattr(entry, k))
    return (get("sha256"), get("head_sha256"))


class _Runner(torch.nn.Module):
    """The backbones to run and the heads of the models to compute on them (as Ensemble does:
    each backbone once, heads in float32 on its layer4 features)."""

    def __init__(self, man, backbones: list[str], models: list, load=None, seen: dict | None = None):
        super().__init__()
        load = load or functools.cache(load_checkpoint)
        everyone = man.teachers + [man.biased]
        first = {b: next(m for m in everyone if m.backbone_id == b) for b in backbones}
        self.backbone_ids = list(backbones)
        self.backbones = torch.nn.ModuleList(load_model(man, first[b], load, seen) for b in backbones)
        self.owner = [backbones.index(m.backbone_id) for m in models]
        self.heads = torch.nn.ModuleList(Ensemble._head(*head_of(man, m, load)) for m in models)

    def forward(self, x, layers):
        feats = [bb(x, layers=tuple(set(layers) | {"layer4"}))[1] for bb in self.backbones]
        with torch.autocast(x.device.type, enabled=False):
            logits = [head(feats[b]["layer4"].float()) for head, b in zip(self.heads, self.owner)]
        return logits, {l: [f[l] for f in feats] for l in layers}


def check_fit(cache, man, manifest_path, data_root=None) -> None:
    """Refuse a manifest whose models cannot share this cache: another class count, feature
    sizes, view size or resize, or teachers built from another data set."""
    m, problems = cache.meta, []
    if man.num_classes != m.num_classes or any(e.num_classes != m.num_classes for e in man.models):
        problems.append("the models have "
                        f"{sorted({man.num_classes, *(e.num_classes for e in man.models)})} classes, the "
                        f"cache {m.num_classes} ({', '.join(m.class_names)})")
    for e in man.models:
        dims = FEATURE_DIMS.get(e.arch, {})
        bad = [l for l in m.layers if dims.get(l) != m.feature_dims[l]]
        if bad:
            problems.append(f"model {e.name} ({e.arch}) has features of "
                            f"{', '.join(f'{l} {dims.get(l)}' for l in bad)}, the cache "
                            f"{', '.join(f'{l} {m.feature_dims[l]}' for l in bad)}")
    if man.image_size != m.out_size:
        problems.append(f"the models see {man.image_size} px views, the cache's views are {m.out_size} px")
    if man.resize != m.view_spec.get("resize", man.resize):
        problems.append(f"the models saw images resized with {man.resize!r}, the cache's store holds "
                        f"{m.view_spec.get('resize')!r}")
    if man.pretrained != m.teachers_pretrained:
        problems.append(f"the models are {'' if man.pretrained else 'not '}ImageNet-initialised, the cache's "
                        f"teachers were{'' if m.teachers_pretrained else ' not'}")
    record = Path(man.root) / "teachers_config.json"
    if record.is_file():
        try:
            fp = load_json(record, "the teachers' record", kind=dict).get("dataset_fingerprint")
        except JSONFileError:
            fp = None
        fp = fp if isinstance(fp, str) else None
        if fp and fp != m.dataset_fingerprint:
            problems.append(f"the teachers of {manifest_path} were built from another data set (fingerprint "
                            f"{fp[:16]}, the cache {m.dataset_fingerprint[:16]})")
    if data_root is not None:
        from data.folders import fingerprint, load_metadata
        fp = fingerprint(load_metadata(data_root, m.dataset, **m.dataset_options))
        if fp != m.dataset_fingerprint:
            problems.append(f"{data_root} is another data set than the cache's (fingerprint {fp[:16]}, "
                            f"the cache {m.dataset_fingerprint[:16]})")
    if problems:
        raise CacheError(f"{manifest_path} does not fit {cache.path}: " + "; ".join(problems)
                         + ". Use models trained for this data set at these settings, or run precompute")


def check_backbones(meta: CacheMeta, man, digests: dict[str, str], manifest_path) -> None:
    """The manifest's backbone ids were recomputed from its files (``digests``, by model name, from
    :func:`core.manifest.verify_models`); a model the cache also holds (same checkpoint sha256)
    must have the backbone there that its file has here, or the cache's features of that backbone
    are not this model's: refused."""
    claimed = {t["sha256"]: t.get("backbone_id") for t in meta.teachers}
    for e in man.teachers + [man.biased]:
        said = claimed.get(e.sha256)
        if said is not None and not (isinstance(said, str) and len(said) >= 16
                                     and digests[e.name].startswith(said)):
            raise CacheError(f"the cache says model {e.name}'s checkpoint (sha256 {e.sha256[:12]}...) has "
                             f"backbone {str(said)[:20]!r}, its file's weights in {manifest_path} hash to "
                             f"{digests[e.name][:16]}: the cache's features of that backbone are not this "
                             f"model's; run precompute")


def plan(meta: CacheMeta, man) -> dict:
    """Which models are copied from the cache (and from where), which run, which backbones run."""
    old = {_key(t): (("teacher", i) if t["role"] == "teacher" else ("biased", None))
           for i, t in enumerate(meta.teacher_entries)}
    old[_key(meta.biased_entry)] = ("biased", None)
    models = man.teachers + [man.biased]
    source = {e.name: old.get(_key(e)) for e in models}
    compute = [e for e in models if source[e.name] is None]
    run = list(dict.fromkeys(e.backbone_id for e in compute))
    new_bb = [b for b in man.backbone_ids if b not in meta.backbone_ids]
    run += [b for b in new_bb if b not in run]
    same_weights = [_key(t) for t in meta.teacher_entries] == [_key(e) for e in man.teachers] \
        and _key(meta.biased_entry) == _key(man.biased)
    return {"source": source, "compute": compute, "run": run, "same_weights": same_weights}


@torch.inference_mode()
def _forward(runner, images, ev, rnd, layers, out_size, batch_size, device):
    """The new models' logits and the run backbones' features on the stored views of one chunk,
    in precompute's pair order (every row's view 0, then slot by slot the training rows')."""
    n = len(ev["flip"])
    K, nt = (0, 0) if rnd is None else rnd["flip"].shape
    box = np.zeros((n, K + 1, 4), np.float32)
    flip = np.zeros((n, K + 1), bool)
    box[:, 0], flip[:, 0] = ev["box"], ev["flip"]
    train = ev["train"]
    if K:
        box[train, 1:], flip[train, 1:] = rnd["box"].transpose(1, 0, 2), rnd["flip"].T
    pairs = [(i, 0) for i in range(n)] + [(i, v) for v in range(1, K + 1) for i in train]
    pair_row = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    pair_view = torch.tensor([v for _, v in pairs], dtype=torch.long)
    images = images.to(device, non_blocking=True)
    box_t, flip_t = torch.from_numpy(box), torch.from_numpy(flip)
    outs = []
    for s in range(0, len(pairs), batch_size):
        r, v = pair_row[s:s + batch_size], pair_view[s:s + batch_size]
        x = render(images[r], box_t[r, v], flip_t[r, v], out_size)
        with autocast(device):
            z, f = runner(x.contiguous(memory_format=memory_format_for(device)), layers)
        outs.append(([t.float() for t in z], {l: [t.half() for t in f[l]] for l in layers}))
    logits = [torch.cat([o[0][j] for o in outs]).cpu().numpy() for j in range(len(runner.heads))]
    feats = {l: [torch.cat([o[1][l][b] for o in outs]).cpu().numpy() for b in range(len(runner.backbones))]
             for l in layers}
    return logits, feats


def extend(path, manifest, out, batch_size: int = 128, device: str = "auto", data_root=None,
           overwrite: bool = False) -> Path:
    """Write at ``out`` the cache of the models of ``manifest`` on the views of the finished
    cache ``path`` (its image store linked or copied beside it); returns ``out``.

    ``batch_size``: pairs of (row, view) per forward pass, as precompute's ``--batch-size``; equal
    to the one that made the cache, on the same device type, the new outputs are the ones a fresh
    precompute gives bit for bit (CPU). The header's ``history`` records what was computed and
    what was copied, and the input's root digest.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    out = _check_out(path, out, overwrite)
    man = read_manifest(manifest)
    r = open_cache(path)
    with r:
        if r.shard:
            raise CacheError(f"{path} is shard {r.shard}; merge the shards (`cache merge`) "
                             "and extend the full file")
        m = r.meta
        check_fit(r, man, manifest, data_root)
        verify_files(man)
        load, seen = functools.cache(load_checkpoint), {}
        check_backbones(m, man, verify_models(man, load, seen), manifest)
        p = plan(m, man)
        dev = pick_device(device)
        store = None
        if p["run"]:
            store = ImageStore(store_path_for(path), m.dataset_fingerprint, m.store_size,
                               m.view_spec.get("resize"))
            if m.store_digest and store.store_digest() != m.store_digest:
                raise CacheError(f"{store.path} is not the image store {path} was computed "
                                 "from (its digest differs); copy the cache's own store beside it")
        runner = None
        if p["run"]:
            runner = _Runner(man, p["run"], p["compute"], load, seen).to(dev).eval()
            runner = runner.to(memory_format=memory_format_for(dev))
        col = {e.name: j for j, e in enumerate(p["compute"])}
        entry = {"op": "extend", **origin(r), "manifest": str(manifest),
                 "computed": [e.name for e in p["compute"]],
                 "copied": [n for n, s in p["source"].items() if s is not None],
                 "backbones_run": list(p["run"]),  # for new models; features of old backbones are copied
                 "backbones_computed": [b for b in p["run"] if b not in m.backbone_ids],
                 "backbones_copied": [b for b in man.backbone_ids if b in m.backbone_ids],
                 "weights": "copied" if p["same_weights"] else "recomputed",
                 "batch_size": batch_size, "device": dev.type}
        models = [{"name": e.name, "role": e.role, "sha256": e.sha256, "head_sha256": e.head_sha256,
                   "backbone_id": e.backbone_id, "arch": e.arch} for e in man.teachers + [man.biased]]
        meta = fresh(m, teachers=models,
                     backbone_ids=man.backbone_ids, backbone_of_teacher=man.teacher_backbone,
                     biased_backbone=man.biased_backbone, history=[*m.history, entry])
        is_train = r.split == 0
        K = m.random_views

        def assemble(old, computed, feats):
            """One part's arrays for the new file: old = the cache's, computed = new logits,
            feats = {layer: [per run backbone]} (features of old backbones come from the cache)."""
            def logits_of(e):
                s = p["source"][e.name]
                if s is None:
                    return computed[col[e.name]]
                return old["logits"][..., s[1], :] if s[0] == "teacher" else old["biased"]
            zt = np.stack([logits_of(e) for e in man.teachers], axis=-2)
            zb = logits_of(man.biased)
            features = {}
            for l in m.layers:
                per = [old["features"][l][..., m.backbone_ids.index(b), :] if b in m.backbone_ids
                       else feats[l][p["run"].index(b)] for b in man.backbone_ids]
                features[l] = np.stack(per, axis=-2)
            return zt, zb, features

        def fill(w):
            for a, b in w.pending_chunks(batch_size):
                ev, rnd = read_rows(r, a, b, m.layers, K)
                n = b - a
                computed, feats = [], {}
                if runner is not None:
                    images = store.load(np.arange(a, b) + r.row_start)
                    logits, feats = _forward(runner, images, {**ev, "train": np.flatnonzero(is_train[a:b])},
                                             rnd, m.layers, m.out_size, batch_size, dev)
                    computed = logits
                # pair order: n rows of view 0, then K * nt slot-major random views
                nt = 0 if rnd is None else rnd["flip"].shape[1]

                def part(arrays, lo, hi, shape):
                    return [x[lo:hi].reshape(*shape, *x.shape[1:]) for x in arrays]
                parts = {"eval": (ev, 0, n, (n,))}
                if rnd is not None:
                    parts["random"] = (rnd, n, n + K * nt, (K, nt))
                written = {}
                for name, (old, lo, hi, shape) in parts.items():
                    c = part(computed, lo, hi, shape)
                    f = {l: part(v, lo, hi, shape) for l, v in feats.items()}
                    zt, zb, features = assemble(old, c, f)
                    weights = old["weights"] if p["same_weights"] else None  # else: set below
                    written[name] = {"box": old["box"], "flip": old["flip"], "logits": zt, "biased": zb,
                                     "weights": weights, "features": features}
                if not p["same_weights"]:
                    # as precompute: over all pairs of the chunk at once (view 0, then the slots)
                    zt_all = np.concatenate([written["eval"]["logits"]] + (
                        [written["random"]["logits"].reshape(-1, *written["random"]["logits"].shape[2:])]
                        if "random" in written else []))
                    zb_all = np.concatenate([written["eval"]["biased"]] + (
                        [written["random"]["biased"].reshape(-1, written["random"]["biased"].shape[-1])]
                        if "random" in written else []))
                    wts = cached_agre_weights(torch.from_numpy(zt_all), torch.from_numpy(zb_all),
                                              m.tau_cached).numpy()
                    written["eval"]["weights"] = wts[:n]
                    if "random" in written:
                        written["random"]["weights"] = wts[n:].reshape(K, nt, -1)
                w.write_rows(a, b, written["eval"], written.get("random"))
        write_derived(out, meta, samples_of(r), source_compression(r), fill)
    place_store(path, out, overwrite)
    return out
