"""Splits larger than memory: read from the image store and the cache as the epoch goes.

A training epoch walks its global batches in the same order as the in-memory path
(:func:`distill.data.epoch_plan`); groups of consecutive batches are read together (each row once,
with the one view it is seen through this epoch) by a background thread while the previous group
trains, so the batches, and the results, are those of the in-memory path. Evaluation splits are
read in consecutive chunks the same way. ``DistillConfig.data_mode`` chooses: ``memory``,
``stream``, or ``auto`` (stream when the in-memory path would take more than half of the free
host memory).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from cache.reader import CacheReader
from data.store import ImageStore
from distill.config import DistillConfig
from distill.data import SplitData

GROUP_BATCHES = 16      # training batches read together
EVAL_CHUNK_ROWS = 4096  # evaluation rows read together


def should_stream(cfg: DistillConfig, nbytes: int) -> bool:
    if cfg.data_mode != "auto":
        return cfg.data_mode == "stream"
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: keep the in-memory path
        return False
    return nbytes > 0.5 * free


def load_rows(cache: CacheReader, store: ImageStore, rows: np.ndarray, views, layers, device,
              teachers: bool) -> SplitData:
    """The increasing file ``rows`` as a SplitData with one view per row (``views`` [n]) on
    ``device``; with ``teachers``, their cached outputs too."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    d = cache.read_views(rows, views, layers=layers if teachers else [])
    data_rows = rows + cache.row_start
    data = SplitData(rows=t(data_rows), images=t(store.load(data_rows)), hw=t(store.hw[data_rows]), y=t(d["y"]),
                     group=t(d["group"]), box=t(d["box"]), flip=t(d["flip"]))
    if teachers:
        data.logits, data.biased, data.cached = t(d["logits"]), t(d["biased"]), t(d["weights"])
        data.feats = {l: t(v) for l, v in d["features"].items()}
    return data


class StreamedSplit:
    """A split read from the cache and the image store on demand (see the module docstring)."""

    def __init__(self, cache: CacheReader, store: ImageStore, split: str, cfg: DistillConfig, device):
        self.cache, self.store, self.cfg, self.device = cache, store, cfg, device
        self.file_rows = cache.split_rows(split)
        self.y = torch.from_numpy(cache.y[self.file_rows])
        self.group = torch.from_numpy(cache.group[self.file_rows])
        self.views_per_row = cache.meta.views_per_row
        self.layers = cfg.needs.layers
        self.teachers = cfg.needs.teacher_outputs

    def __len__(self) -> int:
        return len(self.file_rows)

    def _load(self, positions: np.ndarray, views: np.ndarray, teachers: bool) -> tuple[SplitData, np.ndarray]:
        """Rows at split ``positions`` (any order) -> (their SplitData in increasing row order,
        where each position landed in it)."""
        order = np.argsort(positions, kind="stable")
        data = load_rows(self.cache, self.store, self.file_rows[positions[order]], views[order], self.layers,
                         self.device, teachers)
        where = np.empty(len(positions), dtype=np.int64)
        where[order] = np.arange(len(positions))
        return data, where

    def batches(self, order: torch.Tensor, view: torch.Tensor, bounds, pick) -> Iterator:
        """``(data, idx, view, positions)`` per batch, as the in-memory path gives them; ``pick``
        selects this process's share of a global batch."""
        groups = [bounds[i:i + GROUP_BATCHES] for i in range(0, len(bounds), GROUP_BATCHES)]
        order, view = order.cpu().numpy(), view.cpu().numpy()

        def read(group):
            parts = [pick(np.arange(s, e)) for s, e in group]
            flat = np.concatenate(parts)
            data, where = self._load(order[flat], view[flat], self.teachers)
            return data, parts, where

        with ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(read, groups[0]) if groups else None
            for i in range(len(groups)):
                data, parts, where = ahead.result()
                if i + 1 < len(groups):
                    ahead = reader.submit(read, groups[i + 1])
                offset = 0
                for part in parts:
                    local = torch.from_numpy(where[offset:offset + len(part)]).to(data.y.device)
                    offset += len(part)
                    yield data, local, torch.zeros_like(local), torch.from_numpy(order[part])

    def chunks(self) -> Iterator[SplitData]:
        """The split in consecutive chunks of view 0 (evaluation), the next read while this one runs."""
        starts = range(0, len(self), EVAL_CHUNK_ROWS)
        read = lambda s: self._load(np.arange(s, min(s + EVAL_CHUNK_ROWS, len(self))),
                                    np.zeros(min(EVAL_CHUNK_ROWS, len(self) - s), np.int64), False)[0]
        with ThreadPoolExecutor(1) as reader:
            ahead = [reader.submit(read, s) for s in starts[:1]]
            for i, _ in enumerate(starts):
                data = ahead.pop().result()
                if i + 1 < len(starts):
                    ahead.append(reader.submit(read, starts[i + 1]))
                yield data
