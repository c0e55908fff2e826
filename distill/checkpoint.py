"""Run checkpoints: complete per-epoch state for an exact resume, the settings check on resume, and
model selection (which epoch's checkpoint is the run's result, by ``DistillConfig.select``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.files import atomic_write_text, read_jsonl, save_checkpoint
from core.provenance import settings_diff
from distill.config import LAST, SELECT_RULES, DistillConfig, identity_of
from distill.data import DistillError


# What each rule maximises: a key of the validation metrics (data.metrics.group_metrics), or the
# epoch itself. worst_class_acc and mean_acc are computed from predictions and classes only.
SELECT_KEY = {"val-wga": "wga", "val-worst-class": "worst_class_acc", "val-avg": "mean_acc", "last": "epoch"}
ORACLE_NOTE = "diagnostic only, never a selection rule: the epoch with the best TEST WGA"


def selection_score(rule: str, val: dict, epoch: int) -> float:
    """The number ``rule`` maximises over the epochs; the earliest epoch wins a tie."""
    return float(epoch) if rule == "last" else float(val[SELECT_KEY[rule]])


def selection_epochs(history: list[dict]) -> dict[str, int]:
    """The epoch every rule of SELECT_RULES picks from metrics.jsonl's lines (``{"epoch", "val"}``)."""
    out = {}
    for rule in SELECT_RULES:
        scored = [(selection_score(rule, h["val"], h["epoch"]), -h["epoch"]) for h in history if "val" in h]
        if scored:
            out[rule] = -max(scored)[1]
    return out


def oracle(history: list[dict]) -> dict | None:
    """The epoch of the best test WGA (the earliest on ties) and its test metrics, from
    metrics.jsonl's lines; None when they hold no test metrics (runs of earlier versions)."""
    lines = [h for h in history if isinstance(h.get("test"), dict)]
    if not lines:
        return None
    best = max(lines, key=lambda h: (h["test"]["wga"], -h["epoch"]))
    return {"epoch": best["epoch"], "test": best["test"], "note": ORACLE_NOTE}


def save_last(path: Path, model, opt, sched, epoch: int, best: tuple[float, int], cfg: DistillConfig,
              cache_id: str) -> None:
    """Everything a resume needs after ``epoch`` finished epochs (``best``: the selection rule's
    best score so far and its epoch)."""
    save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "epoch": epoch, "best_score": best[0],
                     "best_epoch": best[1], "config": cfg.to_dict(), "cache_identity": cache_id}, path)


def save_best(path: Path, model, epoch: int, cfg: DistillConfig) -> None:
    save_checkpoint({"model": model.state_dict(), "epoch": epoch, "config": cfg.to_dict()}, path)


def check_same_run(out: Path, saved_config: dict, saved_cache_id: str | None, cfg: DistillConfig,
                   cache_id: str) -> None:
    """Refuse to continue (or reuse) the run in ``out`` when it was made with other settings or
    from a cache with other contents (data, teachers, views, layers)."""
    diff = settings_diff(identity_of(saved_config), cfg.identity())
    if saved_cache_id != cache_id:
        diff.append("the cache differs (other data, teachers, views or layers)")
    if diff:
        raise DistillError(f"{out} holds a run made with other settings ({'; '.join(diff)}); use the same "
                           "options, pass --overwrite to start it again, or choose another --out")


def load_for_resume(path: Path, cfg: DistillConfig, cache_id: str, device) -> dict:
    """The last checkpoint of a run, refused when it was made with other settings or data."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise DistillError(f"{path} cannot be read ({type(e).__name__}); "
                           "pass --overwrite to start the run again") from None
    check_same_run(path.parent, ck.get("config", {}), ck.get("cache_identity"), cfg, cache_id)
    return ck


def trim_checkpoints(out: Path, keep: str) -> None:
    """What a finished run keeps (``DistillConfig.keep_checkpoints``): ``best`` the best epoch's
    weights only, ``last`` also the last epoch's weights, ``all`` also the optimizer state."""
    last = out / LAST
    if keep == "best":
        last.unlink(missing_ok=True)
    elif keep == "last" and last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        save_checkpoint({k: ck[k] for k in ("model", "epoch", "config")}, last)


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep the metrics lines of the first ``epochs_done`` epochs: a kill between the checkpoint
    and the metrics line (or after it) must not duplicate epochs."""
    if path.is_file():
        keep = [r for r in read_jsonl(path) if isinstance(r.get("epoch"), int) and r["epoch"] <= epochs_done]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
