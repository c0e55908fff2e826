"""What a distillation run reads: the cache and its image store, checked, as tensors per split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache.reader import CacheReader, open_cache
from cache.schema import CacheError, store_path_for
from core.errors import ToolError
from core.runtime import epoch_seed
from data.store import ImageStore, StoreError
from data.folders import fingerprint, load_metadata
from distill.config import DistillConfig


class DistillError(ToolError):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class SplitData:
    """Everything one split needs, as tensors on one device (rows in cache order)."""

    rows: torch.Tensor        # [N] dataset rows (they seed the online loop's crops)
    images: torch.Tensor      # [N, 3, L, L] uint8 canvases
    hw: torch.Tensor          # [N, 2] (height, width) of the image in each canvas
    y: torch.Tensor           # [N]
    group: torch.Tensor       # [N]
    box: torch.Tensor         # [N, V, 4]
    flip: torch.Tensor        # [N, V]
    logits: torch.Tensor | None = None    # [N, V, T, C]
    biased: torch.Tensor | None = None    # [N, V, C]
    cached: torch.Tensor | None = None    # [N, V, T]
    feats: dict | None = None             # {layer: [N, V, B, D] float16}


@dataclass
class Batch:
    """One training batch as the step sees it, on the device (docs/method.md#the-training-step)."""

    x: torch.Tensor                       # [b, 3, S, S] the student's input (normalised views)
    y: torch.Tensor                       # [b] labels
    teacher_logits: torch.Tensor          # [b, T, C]
    biased_logits: torch.Tensor           # [b, C]
    teacher_feats: dict                   # {layer: [b, T, D]} of the distilled layers
    cached_weights: torch.Tensor | None = None  # [b, T] (the ``cached`` weighting only)
    share: float = 1.0                    # this process's share of the global batch (1 alone)


def open_inputs(cfg: DistillConfig) -> tuple[CacheReader, ImageStore]:
    """The cache and its image store, checked against what ``cfg`` asks of them."""
    if not Path(cfg.cache).is_file():
        raise DistillError(f"no cache at {cfg.cache}; make one with `python cli.py precompute`")
    try:
        cache = open_cache(cfg.cache)
    except CacheError as e:
        raise DistillError(str(e)) from None
    meta = cache.meta
    if cache.shard:
        raise DistillError(f"{cfg.cache} is shard {cache.shard} of a cache; merge the shards first with "
                           "`python cli.py cache merge CACHE.h5 SHARD...`")
    empty = [name for name in ("train", "val", "test") if len(cache.split_rows(name)) == 0]
    if empty:
        raise DistillError(f"{cfg.cache} has no {' or '.join(empty)} samples; distillation needs all three splits")
    missing = [l for l in cfg.needs.layers if l not in meta.layers]
    if missing:
        raise DistillError(f"gamma > 0 for {', '.join(missing)} but {cfg.cache} holds features of "
                           f"{', '.join(meta.layers) or 'no layer'}; precompute with --layers "
                           f"{','.join(sorted(set(meta.layers) | set(missing)))} or set gamma 0")
    if cfg.sample_views and meta.random_views < 1:
        raise DistillError(f"--sample-views on, but {cfg.cache} holds only the eval view; precompute with "
                           "--views K (K > 0) or pass --sample-views off")
    if cfg.data_root is not None:
        folder_fp = fingerprint(load_metadata(cfg.data_root, meta.dataset, **meta.dataset_options))
        if folder_fp != meta.dataset_fingerprint:
            raise DistillError(f"{cfg.cache} was made from another data set than {cfg.data_root} "
                               f"(fingerprints {meta.dataset_fingerprint[:12]} vs {folder_fp[:12]})")
    try:
        store = ImageStore(store_path_for(cfg.cache), meta.dataset_fingerprint, meta.store_size,
                           meta.view_spec.get("resize"))
    except StoreError as e:
        raise DistillError(f"the image store of {cfg.cache} does not match it: {e}") from None
    return cache, store


def load_split(cache: CacheReader, store: ImageStore, split: str, cfg: DistillConfig, device,
               train: bool) -> SplitData:
    """A split in memory on ``device``: the training split with every view and the teachers'
    outputs (none in the online loop: the teachers run live), an evaluation split with view 0."""
    needs = cfg.needs
    teachers = train and needs.teacher_outputs
    d = cache.read(split=split, views=None if train else 0, layers=needs.layers if teachers else [])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    box, flip = d["box"], d["flip"]
    if not train:  # one view: keep the [N, V] layout with V = 1
        box, flip = box.reshape(len(box), 1, 4), flip.reshape(len(flip), 1)
    rows = d["rows"] + cache.row_start
    data = SplitData(rows=t(rows), images=t(store.load(rows)), hw=t(store.hw[rows]), y=t(d["y"]),
                     group=t(d["group"]), box=t(box), flip=t(flip))
    if teachers:
        data.logits, data.biased, data.cached = t(d["logits"]), t(d["biased"]), t(d["weights"])
        data.feats = {l: t(v) for l, v in d["features"].items()}
    return data


class InMemorySplit:
    """A split held whole in memory (on the device when it fits): the source of its batches and
    evaluation chunks, like :class:`distill.stream.StreamedSplit` for splits that do not fit."""

    def __init__(self, data: SplitData):
        self.data, self.y, self.group = data, data.y, data.group
        self.views_per_row = data.box.shape[1]

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, order: torch.Tensor, view: torch.Tensor, bounds, pick):
        """``(data, idx, view, positions)`` per batch; ``pick`` selects this process's share."""
        for s, e in bounds:
            idx = pick(order[s:e])
            yield self.data, idx, pick(view[s:e]), idx

    def chunks(self):
        yield self.data


def placement(device: torch.device, nbytes: int) -> torch.device:
    """Keep the data on the GPU when it fits comfortably, else in host memory."""
    if device.type == "cuda" and nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


def batch_bounds(n: int, batch_size: int, min_size: int = 2) -> list[tuple[int, int]]:
    """Batch (start, stop) pairs; a last batch smaller than ``min_size`` joins the previous one
    (BatchNorm cannot normalise a single sample when layer4 is 1x1; under torchrun every process
    needs a row of each batch)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_size:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def epoch_plan(n: int, views_per_row: int, cfg: DistillConfig, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order of the training rows in one epoch, and the view of each row in that order.

    ``order[j]`` is the split position trained j-th, ``view[j]`` the view it is seen through (so
    a batch ``order[s:e]`` takes ``view[s:e]``). With random views (``cfg.sample_views``, or by
    default when the cache holds any), each row walks through its K views in its own random
    order, one per epoch (``1 + perm_row[epoch mod K]``): with K >= epochs every row sees a
    distinct crop every epoch, like the online loop's fresh crop (FKD stores per-epoch crops the
    same way). Without, view 0. The order is seeded by (seed, epoch) and the walks by the seed,
    so a resumed run replays both exactly.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch)))
    use_views = views_per_row > 1 if cfg.sample_views is None else cfg.sample_views
    if not use_views:
        return order, torch.zeros(n, dtype=torch.long)
    K = views_per_row - 1
    walks = torch.rand(n, K, generator=torch.Generator().manual_seed(epoch_seed(cfg.seed, -1))).argsort(dim=1)
    return order, (1 + walks[:, epoch % K])[order]
