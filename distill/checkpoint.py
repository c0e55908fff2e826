"""Run checkpoints: complete per-epoch state for an exact resume, and the settings check on resume."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.files import atomic_write_text, read_jsonl, save_checkpoint
from core.provenance import settings_diff
from distill.config import DistillConfig
from distill.data import DistillError


def save_last(path: Path, model, opt, sched, epoch: int, best: tuple[float, int], cfg: DistillConfig,
              cache_fp: str) -> None:
    """Everything a resume needs after ``epoch`` finished epochs."""
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "best_wga": best[0], "best_epoch": best[1], "config": cfg.to_dict(),
                     "cache_fingerprint": cache_fp}, path)


def save_best(path: Path, model, epoch: int, cfg: DistillConfig) -> None:
    save_checkpoint({"model": model.state_dict(), "epoch": epoch, "config": cfg.to_dict()}, path)


def load_for_resume(path: Path, cfg: DistillConfig, cache_fp: str, device) -> dict:
    """The last checkpoint of a run, refused when it was made with other settings or data."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise DistillError(f"{path} cannot be read ({type(e).__name__}); delete the run folder to start again") from None
    saved = DistillConfig.from_settings(ck.get("config", {})).identity()
    diff = settings_diff(saved, cfg.identity())
    if ck.get("cache_fingerprint", cache_fp) != cache_fp:
        diff.append("the cache was made from another data set")
    if diff:
        raise DistillError(f"cannot resume {path.parent} with other settings ({'; '.join(diff)}); "
                           "use the same options or another --out")
    return ck


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep the metrics lines of the first ``epochs_done`` epochs: a kill between the checkpoint
    and the metrics line (or after it) must not duplicate epochs."""
    if path.is_file():
        keep = [r for r in read_jsonl(path) if isinstance(r.get("epoch"), int) and r["epoch"] <= epochs_done]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
