"""Precompute: run every distinct teacher backbone ONCE per image view and write the cache."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache.merge import merge
from cache.reader import open_cache
from cache.schema import CacheError, CacheMeta, parse_shard, shard_rows, store_path_for
from cache.writer import CacheWriter, made_for_other_inputs
from core.constants import LAYERS
from core.distributed import context
from core.ensemble import Ensemble
from core.errors import ConfigError, ToolError
from core.files import OutputLock, ensure_dir
from core.manifest import read_manifest, verify_files
from core.models import FEATURE_DIMS
from core.provenance import settings_diff
from core.runtime import autocast, memory_format_for, pick_device
from core.weighting import cached_agre_weights
from data.folders import SPLIT_CODES, fingerprint, load_metadata
from data.store import RESIZE_MODES, ImageStore, build_store, store_size_for
from data.views import ViewSpec, render, sample_views


@dataclass
class PrecomputeConfig:
    data_root: str
    teachers: str                       # manifest.json (or its folder)
    out: str                            # cache file
    random_views: int = 30              # K random views of each training image besides the eval view:
                                        # the study's 30 epochs each see a distinct crop
    layers: tuple[str, ...] = LAYERS
    batch_size: int = 128
    shard: str = ""                     # "i/n" (0-based) or "" for the whole data set
    image_size: int | None = None       # default: the teachers' training size
    resize: str | None = None           # keep-aspect | squash; default: as the teachers' manifest says
    view_seed: int = 0
    tau_cached: float = 4.0             # temperature of the static `cached` AGRE weights
    compression: int | None = None      # gzip level, or None (faster reads; fletcher32 either way)
    prefetch: int = 2                   # chunks read ahead of the device (0: read, compute, write in turn)
    dataset: str = "waterbirds"         # layout of data_root (data.folders.DATASETS)
    dataset_options: dict = field(default_factory=dict)  # e.g. CelebA's target and spurious attribute
    overwrite: bool = False             # delete an existing cache made for other inputs first
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        """Every argument checked before any expensive work (fingerprinting, the image store)."""
        self.layers = tuple(self.layers)
        bad = [l for l in self.layers if l not in LAYERS]
        if bad or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"--layers takes distinct names from {', '.join(LAYERS)}, got "
                              f"{','.join(self.layers)!r}")
        import math

        def whole(option, value, low):  # an integer (1.5, NaN and inf are not counts) >= low
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{option} must be >= {low} (an integer), got {value!r}")

        whole("--views", self.random_views, 0)
        whole("--batch-size", self.batch_size, 1)
        whole("view_seed", self.view_seed, 0)
        whole("prefetch", self.prefetch, 0)
        if self.image_size is not None:
            whole("--image-size", self.image_size, 8)
        if self.compression is not None:
            whole("compression", self.compression, 1)
        if isinstance(self.tau_cached, bool) or not isinstance(self.tau_cached, (int, float)) \
                or not math.isfinite(self.tau_cached) or self.tau_cached <= 0:
            raise ConfigError(f"tau_cached must be a finite number > 0, got {self.tau_cached!r}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"--image-size must be at least 8 px, got {self.image_size}")
        if self.compression is not None and not 1 <= self.compression <= 9:
            raise ConfigError(f"compression must be a gzip level 1..9 or None, got {self.compression}")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise ConfigError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.shard:
            parse_shard(self.shard)
        if Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is a folder; give the cache file's path, e.g. "
                              f"{Path(self.out) / 'cache.h5'}")
        pick_device(self.device)


def run_precompute(cfg: PrecomputeConfig) -> Path:
    """Write (or resume, or leave as it is when finished) the cache for ``cfg``; returns its path.

    Under torchrun every process computes its part of the rows (aligned to whole batches) into
    ``<cache>.rank<i>of<n>.h5`` with its own partial image store, then rank 0 merges the parts
    into the cache and its store, as ``cache merge`` does with ``--shard`` files. A killed
    process's part resumes when the same command runs again.
    """
    out = Path(cfg.out)
    man = read_manifest(cfg.teachers)
    meta = load_metadata(cfg.data_root, cfg.dataset, **cfg.dataset_options)
    if man.num_classes != meta.num_classes:
        raise ConfigError(f"the teachers in {cfg.teachers} have {man.num_classes} classes, the data set "
                          f"{cfg.data_root} has {meta.num_classes} ({', '.join(meta.class_names)})")
    d = context(pick_device(cfg.device).type)
    if not d.active:
        return _compute(cfg, man, meta, out, cfg.shard)
    if cfg.shard:
        raise ConfigError("--shard splits the rows by hand; under torchrun the processes split "
                          "them: use one or the other")
    status = d.broadcast_object(_existing(cfg, man, meta, out) if d.is_main else None)
    if status == "finished":
        if d.is_main:
            tqdm.write(f"{out} is already complete; nothing to do")
        return out
    if status != "absent":  # made for other inputs: refused alike by every process
        raise CacheError(status)
    parts = [out.with_name(f"{out.stem}.rank{r}of{d.world}{out.suffix}") for r in range(d.world)]
    _compute(cfg, man, meta, parts[d.rank], f"{d.rank}/{d.world}")
    d.barrier()
    if d.is_main:
        merge(out, parts)  # under a lock on the cache
        for p in parts:  # the parts, their stores and their (released) lock files
            for f in (p, store_path_for(p)):
                f.unlink(missing_ok=True)
                f.with_name(f.name + ".lock").unlink(missing_ok=True)
    d.barrier()
    return out


def _existing(cfg: PrecomputeConfig, man, meta, out: Path) -> str:
    """What a torchrun launch finds at ``out``: "absent" (nothing to keep: missing, unfinished,
    or deleted by ``overwrite``), "finished" (made from these inputs), or why it is refused."""
    if cfg.overwrite:
        out.unlink(missing_ok=True)
    try:
        reader = open_cache(out, require_complete=False) if out.is_file() else None
    except ToolError as e:
        return f"{e} (or pass --overwrite)"
    if reader is None:
        return "absent"
    diff = _differs(reader.meta, _cache_meta(cfg, man, meta, fingerprint(meta)))
    if diff:
        return str(made_for_other_inputs(out, diff))
    return "finished" if reader.finished and not reader.shard else "absent"


def _differs(old: CacheMeta, new: CacheMeta) -> list[str]:
    """What differs between two caches' identities, their image stores' digests aside (compared
    by the writer once the store is built)."""
    def unbound(identity: dict) -> dict:
        return {k: v for k, v in identity.items() if k != "store_digest"}
    return settings_diff(unbound(old.identity()), unbound(new.identity()), names=("file", "now"))


def _cache_meta(cfg: PrecomputeConfig, man, meta, fp: str, store_digest: str = "") -> CacheMeta:
    """What the cache of ``cfg`` is made from (its identity and layout); ``store_digest``: that of
    the image store its teacher outputs are computed from."""
    image_size = cfg.image_size or man.image_size
    spec = ViewSpec(random_views=cfg.random_views, out_size=image_size, seed=cfg.view_seed,
                    resize=cfg.resize or man.resize)
    return CacheMeta(
        num_classes=meta.num_classes, class_names=list(meta.class_names), attr_names=list(meta.attr_names),
        dataset=meta.dataset, dataset_options=meta.options, dataset_fingerprint=fp,
        teachers=[{"name": m.name, "role": m.role, "sha256": m.sha256, "head_sha256": m.head_sha256,
                   "backbone_id": m.backbone_id, "arch": m.arch} for m in man.teachers + [man.biased]],
        backbone_ids=man.backbone_ids, backbone_of_teacher=man.teacher_backbone, biased_backbone=man.biased_backbone,
        view_spec=spec.to_dict(), store_size=store_size_for(image_size), teachers_pretrained=man.pretrained,
        layers=list(cfg.layers), feature_dims={l: FEATURE_DIMS[man.teachers[0].arch][l] for l in cfg.layers},
        num_samples=len(meta), tau_cached=cfg.tau_cached, store_digest=store_digest)


def _compute(cfg: PrecomputeConfig, man, meta, out: Path, shard: str) -> Path:
    """The cache (or shard ``shard``) of ``cfg`` at ``out``, with the image store of its rows."""
    say = tqdm.write if cfg.progress else (lambda *_: None)
    row_start, row_stop = shard_rows(shard, len(meta), cfg.batch_size) if shard else (0, len(meta))
    ensure_dir(out.parent, "output folder")
    with OutputLock(out, "the cache"):
        verify_files(man)
        if cfg.overwrite and out.exists():
            out.unlink()
        say(f"fingerprinting {len(meta)} images in {meta.root}")
        fp = fingerprint(meta)
        cmeta = _cache_meta(cfg, man, meta, fp)
        _refuse_other_inputs(out, cmeta, cfg.overwrite)  # before the (long) image store build
        spec, size = ViewSpec(**cmeta.view_spec), cmeta.store_size
        rows = np.arange(row_start, row_stop)
        samples = {"id": meta.filenames[rows], "y": meta.y[rows], "attr": meta.attr[rows],
                   "group": meta.group[rows], "split": meta.split[rows]}
        mine = range(row_start, row_stop)
        with OutputLock(store_path_for(out), "the image store"):  # kept (or made again) beside it
            store_file = build_store(meta, store_path_for(out), size, fp, spec.resize,
                                     progress=cfg.progress, rows=mine)
        store = ImageStore(store_file, fp, size, spec.resize, rows=mine)
        # the cache is bound to the pixels its teacher outputs are computed from (a resumed file
        # must have been computed from the same store: decoding is deterministic, so a rebuilt
        # store has the same digest)
        cmeta = _cache_meta(cfg, man, meta, fp, store.store_digest())
        store.close()
        with CacheWriter.create_or_resume(str(out), cmeta, samples, row_start, row_stop, shard,
                                          compression=cfg.compression) as writer:
            if writer.finished:
                say(f"{out} is already complete ({writer.num_rows} rows); nothing to do")
                return out
            if writer.num_done:
                say(f"resuming {out}: {writer.num_done} of {writer.num_rows} rows already done")
            chunks = writer.pending_chunks(cfg.batch_size)
            if chunks:
                store = ImageStore(store_file, fp, size, spec.resize, rows=mine)
                device = pick_device(cfg.device)
                ens = Ensemble(man).to(device).eval().to(memory_format=memory_format_for(device))
                is_train = samples["split"] == SPLIT_CODES["train"]
                _run_chunks(writer, chunks, ens, store, rows, is_train, spec, cfg, device)
            writer.finalize()
    return out


def _refuse_other_inputs(out: Path, cmeta: CacheMeta, overwrite: bool) -> None:
    """The writer's refusal of a cache made for other inputs, ahead of the image store build
    (the store's digest aside: it is compared by the writer once the store is built)."""
    if overwrite or not out.is_file():
        return
    try:
        with open_cache(out, require_complete=False) as reader:
            old = reader.meta
    except ToolError:
        return  # the writer says what is wrong with the file
    diff = _differs(old, cmeta)
    if diff:
        raise made_for_other_inputs(out, diff)


def _run_chunks(writer: CacheWriter, chunks, ens, store, rows, is_train, spec, cfg, device) -> None:
    """Compute and write every chunk, overlapped: a reader thread loads the next chunks from the
    image store (into pinned memory on a GPU) while the device computes this one, and a writer
    thread writes the previous one to HDF5 (``cfg.prefetch`` = 0: one thing at a time)."""
    todo = sum(int(np.sum(1 + spec.random_views * is_train[a:b])) for a, b in chunks)
    bar = tqdm(total=todo, desc="precompute", unit="img", disable=not cfg.progress)

    def load(chunk):
        a, b = chunk
        images = store.load(rows[a:b])  # Pixels: each image at its own size
        return chunk, images.pin_memory() if device.type == "cuda" else images

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer_pool:
        ahead = [reader.submit(load, c) for c in chunks[:cfg.prefetch]]
        pending = None
        for i, chunk in enumerate(chunks):
            if cfg.prefetch:
                (a, b), images = ahead.pop(0).result()
                if i + cfg.prefetch < len(chunks):
                    ahead.append(reader.submit(load, chunks[i + cfg.prefetch]))
            else:
                (a, b), images = load(chunk)
            arrays = _forward_chunk(ens, images, store.hw[rows[a:b]], rows[a:b], is_train[a:b], spec, cfg,
                                    device)
            if pending is not None:
                pending.result()
            pending = writer_pool.submit(writer.write_rows, a, b, **arrays)
            if not cfg.prefetch:
                pending.result()
            bar.update(int(np.sum(1 + spec.random_views * is_train[a:b])))
        if pending is not None:
            pending.result()
    bar.close()


@torch.inference_mode()
def _forward_chunk(ens: Ensemble, images: torch.Tensor, hw: np.ndarray, rows: np.ndarray,
                   is_train: np.ndarray, spec: ViewSpec, cfg: PrecomputeConfig, device: torch.device) -> dict:
    """Teacher outputs of one chunk of rows, as :meth:`cache.writer.CacheWriter.write_rows` takes
    them: ``{"eval": view 0 of every row, "random": views 1..K of its training rows, [K, nt, ...]}``
    (evaluation rows have no random views).

    The (row, view) pairs are rendered and run in batches of ``cfg.batch_size``, so a forward
    pass sees a full batch whatever mix of rows and views it holds.
    """
    n, V = len(rows), spec.random_views + 1
    box, flip = sample_views(rows, spec, hw)
    train = np.flatnonzero(is_train)
    # every row's view 0, then slot by slot the training rows' random views: the cache's order
    pairs = [(i, 0) for i in range(n)] + [(i, v) for v in range(1, V) for i in train]
    pair_row = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    pair_view = torch.tensor([v for _, v in pairs], dtype=torch.long)
    images = images.to(device, non_blocking=True)
    box_t, flip_t = torch.from_numpy(box), torch.from_numpy(flip)
    outs = []
    for s in range(0, len(pairs), cfg.batch_size):
        r, v = pair_row[s:s + cfg.batch_size], pair_view[s:s + cfg.batch_size]
        x = render(images[r], box_t[r, v], flip_t[r, v], spec.out_size)  # images carry their sizes
        with autocast(device):
            zt, zb, f = ens(x.contiguous(memory_format=memory_format_for(device)), cfg.layers)
        outs.append((zt.float(), zb.float(), {l: f[l].half() for l in cfg.layers}))
    zt = torch.cat([o[0] for o in outs]).cpu()                          # [P, T, C]
    zb = torch.cat([o[1] for o in outs]).cpu()                          # [P, C]
    feats = {l: torch.cat([o[2][l] for o in outs]).cpu().numpy() for l in cfg.layers}
    weights = cached_agre_weights(zt, zb, cfg.tau_cached).numpy()       # [P, T]
    zt, zb = zt.numpy(), zb.numpy()
    K, nt = V - 1, len(train)

    def view0(a):
        return a[:n]

    def slots(a):  # pairs n.. are slot-major: [K * nt, ...] -> [K, nt, ...]
        return a[n:].reshape(K, nt, *a.shape[1:])
    out = {"eval": {"box": box[:, 0], "flip": flip[:, 0], "logits": view0(zt), "biased": view0(zb),
                    "weights": view0(weights), "features": {l: view0(v) for l, v in feats.items()}}}
    out["random"] = None if K == 0 or nt == 0 else {
        "box": box[train, 1:].transpose(1, 0, 2), "flip": flip[train, 1:].T, "logits": slots(zt),
        "biased": slots(zb),
        "weights": slots(weights), "features": {l: slots(v) for l, v in feats.items()}}
    return out
