"""What a distillation run reads: the cache and its image store, checked, as tensors per split,
and the batch source that makes an epoch's training batches of them (:class:`Batches`)."""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cache.reader import CacheReader, open_cache
from cache.schema import CacheError, store_path_for
from core.distributed import Dist
from core.errors import ToolError
from core.runtime import epoch_seed
from data.store import ImageStore, Pixels, StoreError
from data.folders import fingerprint, load_metadata
from data.views import render
from distill.config import CacheNeeds, DistillConfig


class DistillError(ToolError):
    """A run that cannot start or go on; the message says why and what to do."""


@dataclass
class View:
    """One view of each row of a split (a slot of the cache: the eval view or one random crop) and
    what the teachers output on it; the fields a run does not read are None."""

    box: torch.Tensor                     # [N, 4] relative crop box
    flip: torch.Tensor                    # [N] horizontal flip
    logits: torch.Tensor | None = None    # [N, T, C]
    biased: torch.Tensor | None = None    # [N, C]
    cached: torch.Tensor | None = None    # [N, T] the ``cached`` weighting's weights
    feats: dict | None = None             # {layer: [N, B, D] float16}, per backbone

    def take(self, at: torch.Tensor, device) -> "View":
        """The rows ``at`` of this view, on ``device``."""
        pick = lambda a: None if a is None else a[at].to(device)  # noqa: E731
        return View(pick(self.box), pick(self.flip), pick(self.logits), pick(self.biased), pick(self.cached),
                    {l: pick(v) for l, v in (self.feats or {}).items()})


@dataclass
class SplitData:
    """Rows of one split as tensors, in cache order: their images and labels, seen through ``view``
    (the eval view, or this epoch's slot)."""

    rows: torch.Tensor        # [N] dataset rows (they seed the online loop's crops)
    images: Pixels            # the N images, each at its own stored size
    y: torch.Tensor           # [N]
    group: torch.Tensor       # [N]
    view: View

    def seen_through(self, view: View) -> "SplitData":
        """These rows seen through ``view`` (a view of the same rows)."""
        return dataclasses.replace(self, view=view)


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
    positions: torch.Tensor | None = None  # [b] the rows' positions in the training split


def open_inputs(cfg: DistillConfig) -> tuple[CacheReader, ImageStore]:
    """The cache and its image store, checked against what ``cfg`` asks of them."""
    if not Path(cfg.cache).is_file():
        raise DistillError(f"no cache at {cfg.cache}; make one with `python cli.py precompute`")
    try:
        cache = open_cache(cfg.cache)
    except CacheError as e:
        raise DistillError(str(e)) from None
    meta = cache.meta
    if cfg.expect_cache is not None and (cache.root_digest or "") != cfg.expect_cache.strip().lower():
        cache.close()
        raise DistillError(f"{cfg.cache} has root digest {cache.root_digest}, not the expected "
                           f"{cfg.expect_cache.strip()} (--expect-cache): this is not the cache that was "
                           "published (altered, re-digested or another build); do not train on it, ask its "
                           "sender for the file or the digest again")
    if cache.shard:
        raise DistillError(f"{cfg.cache} is shard {cache.shard} of a cache; merge the shards first with "
                           "`python cli.py cache merge CACHE.h5 SHARD...`")
    empty = [name for name in ("train", "val", "test") if len(cache.split_rows(name)) == 0]
    if empty:
        raise DistillError(f"{cfg.cache} has no {' or '.join(empty)} samples; "
                           "distillation needs all three splits")
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
    if meta.store_digest:  # reads the store's tables only, not its pixels
        got = store.store_digest()
        store.close()  # opened lazily again where it is read (a handle must not cross a fork)
        if got != meta.store_digest:
            raise DistillError(f"{store.path} is not the image store {cfg.cache} was computed from "
                               f"(store digest {got[:16]}, the cache's header records "
                               f"{meta.store_digest[:16]}); copy the cache's own {store.path.name} beside "
                               "it, or rebuild both with precompute")
    return cache, store


def _tensors(read: dict, device) -> dict:
    """Arrays of a cache read as tensors on ``device`` (``features`` a dict of them)."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return {k: ({l: t(a) for l, a in v.items()} if k == "features" else t(v)) for k, v in read.items()
            if k not in ("id",)}


def view_of(read: dict, device) -> View:
    """The :class:`View` of a cache read (``CacheReader.read_eval`` or ``read_slot``)."""
    t = _tensors(read, device)
    return View(t["box"], t["flip"], t.get("logits"), t.get("biased"), t.get("weights"), t["features"])


def load_split(cache: CacheReader, store: ImageStore, split: str, device) -> SplitData:
    """A split's images and labels in memory on ``device``, seen through the eval view."""
    read = cache.read_eval(split=split, fields=("box", "flip"))
    rows = read["rows"] + cache.row_start
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return SplitData(rows=t(rows), images=store.load(rows).to(device), y=t(read["y"]), group=t(read["group"]),
                     view=view_of(read, device))


def slot_of(sample_views: bool | None, random_views: int, epoch: int) -> int:
    """The slot every training row is seen through in ``epoch``: ``1 + epoch mod K`` with random
    views (``sample_views``, ``DistillConfig.sample_views``: by default on when the cache holds
    any), else 0, the eval view.

    The K stored crops of a row are independent draws, so their order is free: epoch e takes slot
    e mod K of every row, one contiguous read (docs/method.md#slots); with K >= epochs every row
    sees a distinct crop every epoch, like the online loop's fresh crop."""
    use = random_views > 0 if sample_views is None else sample_views
    return 1 + epoch % random_views if use else 0


class Slots:
    """The training rows' view of each epoch with its teacher outputs, one slot at a time: the
    epoch's slot is held, the next epoch's read in the background while this one trains, so a
    run holds at most two slots (and reads each once per epoch it is used).

    ``needs``: what the run reads besides the view (``DistillConfig.needs``); ``sample_views`` and
    ``epochs``: as in :class:`distill.config.DistillConfig`."""

    def __init__(self, cache: CacheReader, needs: CacheNeeds, device, *, sample_views: bool | None,
                 epochs: int):
        self.cache, self.device, self.sample_views, self.epochs = cache, device, sample_views, epochs
        self.fields = ("box", "flip") + (("logits", "biased") if needs.teacher_outputs else ()) + \
            (("weights",) if needs.cached_weights else ())
        self.layers = needs.layers
        self._reader = ThreadPoolExecutor(1)
        self._held: dict[int, object] = {}  # slot -> future of its View

    def _read(self, slot: int) -> View:
        return view_of(self.cache.read_slot(slot, layers=self.layers, fields=self.fields), self.device)

    def view(self, epoch: int) -> View:
        """The view of ``epoch`` (read now unless prefetched), and the next epoch's started."""
        K = self.cache.meta.random_views
        slot = slot_of(self.sample_views, K, epoch)
        nxt = slot_of(self.sample_views, K, epoch + 1) if epoch + 1 < self.epochs else None
        if slot not in self._held:
            self._held[slot] = self._reader.submit(self._read, slot)
        self._held = {s: f for s, f in self._held.items() if s in (slot, nxt)}
        if nxt is not None and nxt not in self._held:
            self._held[nxt] = self._reader.submit(self._read, nxt)
        return self._held[slot].result()

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self._held = {}


class InMemorySplit:
    """A split held whole in memory (on the device when it fits): the source of its batches and
    evaluation chunks, like :class:`distill.stream.StreamedSplit` for splits that do not fit."""

    def __init__(self, data: SplitData):
        self.data, self.y, self.group = data, data.y, data.group

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, order: torch.Tensor, view: View, bounds, rank: int = 0, world: int = 1):
        """``(data, idx, positions)`` per batch, the rows seen through ``view`` (this epoch's
        slot); this process's share of each global batch is every ``world``-th row from ``rank``."""
        data = self.data.seen_through(view)
        for s, e in bounds:
            idx = order[s:e][rank::world]
            yield data, idx, idx

    def chunks(self):
        yield self.data


def data_device(device: torch.device, nbytes: int) -> torch.device:
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


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training rows in one epoch, seeded by (seed, epoch) so that a resumed run
    replays it exactly (the view of the epoch is :func:`slot_of`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def make_batch(data: SplitData, idx: torch.Tensor, epoch: int, teachers, image_size: int, device,
               share: float = 1.0, positions: torch.Tensor | None = None) -> Batch:
    """The rows ``idx`` of ``data`` as one training batch on ``device``: the student's input,
    rendered from the stored pixels, and the teachers' outputs on exactly those pixels.

    ``teachers`` (:mod:`distill.teachers`) says where both come from: the cache (the epoch's
    stored view, ``data`` seen through it, and its cached outputs) or, with ``teachers.live``, the
    study's loop (a fresh crop of every row, the teachers run on it)."""
    images, view, device = data.images, data.view, torch.device(device)
    if teachers.live:  # the images' sizes from their host copy: no device sync
        box, flip = teachers.crops(data.rows[idx].cpu().numpy(), images._hw[idx.cpu().numpy()], epoch)
    else:
        box, flip = view.box[idx], view.flip[idx]
    if images.flat.device.type == device.type:  # drawn in place, then on the run's device
        x = render(images, box.to(device), flip.to(device), image_size, index=idx).to(device)
    else:  # held in host memory for a GPU run: the batch's bytes cross, not its rendered views
        x = render(images[idx].to(device, non_blocking=True), box.to(device), flip.to(device), image_size)
    y = data.y[idx].to(device)
    if teachers.live:
        logits, biased, feats, cached = teachers.outputs(x, y)
    else:
        logits, biased = view.logits[idx].to(device), view.biased[idx].to(device)
        feats = {l: view.feats[l][idx].to(device).index_select(1, teachers.backbone) for l in teachers.layers}
        cached = None if view.cached is None else view.cached[idx].to(device)
    if teachers.erase is not None:  # the spurious attribute erased from each teacher's features
        feats = {l: teachers.erase(l, f, y) for l, f in feats.items()}
    return Batch(x, y, logits, biased, feats, cached, share, positions)


class Batches:
    """The training batches of a run, one epoch at a time: ``for batch in batches.epoch(e)``.

    Owns what makes an epoch's batches: its order (:func:`epoch_order`), the batch bounds, this
    process's share of each global batch (every ``world``-th row under torchrun), the epoch's
    slot (:class:`Slots`), rendering and the teacher outputs (:func:`make_batch`; ``teachers``:
    the run's teachers, :mod:`distill.teachers`). ``split`` is where the image bytes come from: in memory
    (:class:`InMemorySplit`) or read as the epoch goes (:class:`distill.stream.StreamedSplit`)."""

    def __init__(self, split, slots: Slots, teachers, image_size: int, device, *, seed: int, batch_size: int,
                 epochs: int, dist: Dist = Dist()):
        self.split, self.slots, self.teachers = split, slots, teachers
        self.image_size, self.device = image_size, device
        self.seed, self.epochs, self.rank, self.world = seed, epochs, dist.rank, dist.world
        self.num_teachers = teachers.num_teachers
        self.bounds = batch_bounds(len(split), batch_size, min_size=max(2, dist.world))

    def __len__(self) -> int:
        """Batches (optimiser steps) per epoch."""
        return len(self.bounds)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch``, this process's share of each global batch."""
        order = epoch_order(len(self.split), self.seed, epoch)
        parts = self.split.batches(order, self.slots.view(epoch), self.bounds, self.rank, self.world)
        for (s, e), (data, idx, positions) in zip(self.bounds, parts):
            yield make_batch(data, idx, epoch, self.teachers, self.image_size, self.device,
                             share=len(idx) / (e - s), positions=positions)

    def close(self) -> None:
        self.slots.close()
