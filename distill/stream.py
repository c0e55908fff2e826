"""Splits larger than memory: read from the image store and the cache as the epoch goes.

A training epoch walks its global batches in the same order as the in-memory path
(:func:`distill.data.epoch_order`); the images of groups of consecutive batches are read together
(each row once) by a background thread while the previous group trains, and the teacher outputs
come from the epoch's slot, which the run holds whole either way (:class:`distill.data.Slots`),
so the batches, and the results, are those of the in-memory path. Evaluation splits are read in
consecutive chunks the same way. ``DistillConfig.data_mode`` chooses: ``memory``,
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
from distill.data import SplitData, View, view_of

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


class StreamedSplit:
    """A split whose images are read from the image store as the epoch goes (see the module
    docstring); the training rows' teacher outputs come from the epoch's slot, held whole."""

    def __init__(self, cache: CacheReader, store: ImageStore, split: str, device):
        self.store, self.device = store, device
        read = cache.read_eval(split=split, fields=("box", "flip"))  # the eval view: 20 bytes a row
        self.eval_view = view_of(read, "cpu")
        self.dataset_rows = read["rows"] + cache.row_start
        self.y, self.group = (torch.from_numpy(np.ascontiguousarray(read[k])) for k in ("y", "group"))

    def __len__(self) -> int:
        return len(self.y)

    def _load(self, positions: np.ndarray, view: View) -> tuple[SplitData, np.ndarray]:
        """Rows at split ``positions`` (any order) -> (their SplitData in increasing row order, seen
        through ``view``, and where each position landed in it)."""
        order = np.argsort(positions, kind="stable")
        at = torch.from_numpy(positions[order])
        rows = self.dataset_rows[positions[order]]
        data = SplitData(rows=torch.from_numpy(rows).to(self.device),
                         images=self.store.load(rows).to(self.device),
                         y=self.y[at].to(self.device), group=self.group[at].to(self.device),
                         view=view.take(at, self.device))
        where = np.empty(len(positions), dtype=np.int64)
        where[order] = np.arange(len(positions))
        return data, where

    def batches(self, order: torch.Tensor, view: View, bounds, rank: int = 0, world: int = 1) -> Iterator:
        """``(data, idx, positions)`` per batch, as the in-memory path gives them: this process's
        share of each global batch is every ``world``-th row from ``rank``."""
        groups = [bounds[i:i + GROUP_BATCHES] for i in range(0, len(bounds), GROUP_BATCHES)]
        order = order.cpu().numpy()

        def read(group):
            parts = [np.arange(s, e)[rank::world] for s, e in group]
            data, where = self._load(order[np.concatenate(parts)], view)
            return data, parts, where

        with ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(read, groups[0]) if groups else None
            for i in range(len(groups)):
                data, parts, where = ahead.result()
                if i + 1 < len(groups):
                    ahead = reader.submit(read, groups[i + 1])
                offset = 0
                for part in parts:
                    local = torch.from_numpy(where[offset:offset + len(part)])
                    offset += len(part)
                    yield data, local, torch.from_numpy(order[part])

    def chunks(self) -> Iterator[SplitData]:
        """The split in consecutive chunks of its eval view, the next read while this one runs."""
        starts = range(0, len(self), EVAL_CHUNK_ROWS)
        read = lambda s: self._load(np.arange(s, min(s + EVAL_CHUNK_ROWS, len(self))), self.eval_view)[0]
        with ThreadPoolExecutor(1) as reader:
            ahead = [reader.submit(read, s) for s in starts[:1]]
            for i, _ in enumerate(starts):
                data = ahead.pop().result()
                if i + 1 < len(starts):
                    ahead.append(reader.submit(read, starts[i + 1]))
                yield data
