"""Experiment tracking beside metrics.jsonl: TensorBoard event files and Weights & Biases runs.

``distill --tensorboard`` writes event files into ``<run folder>/tensorboard`` (through
``torch.utils.tensorboard``); ``distill --wandb PROJECT`` logs to a W&B run (``WANDB_MODE=offline``
keeps it in ``<run folder>/wandb``). Both get the run's configuration, every epoch's numbers as
metrics.jsonl holds them (one scalar per tag: ``val/wga``, ``val/group_acc/landbird_water``,
``teacher_weights/teacher_1``, ...; step = epoch) and the final summary. The packages are optional
and imported only when asked; under torchrun only rank 0 logs (:func:`open_tracker`). A resumed run
appends to its event files (what a killed run logged past its last checkpoint purged) and is a new
W&B run holding the epochs from the resumed one on.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from core.errors import ConfigError

TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"
# The summary's numbers a tracker keeps as the run's result (metrics objects are flattened).
SUMMARY_KEYS = ("best_epoch", "val_best", "test_best", "test_last")


def _tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def flatten(record: dict, names: dict[str, list[str]] | None = None, prefix: str = "") -> dict[str, float]:
    """Every finite number of a metrics.jsonl line (or a summary) as ``{"a/b/c": value}``.

    Lists are indexed by ``names`` (``{"group_acc": group names, "teacher_weights": teacher
    names, ...}``, keyed by the list's own key) or by position; None, NaN and strings are left out
    (a tracker's scalar must be a number)."""
    names = names or {}
    out: dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{_tag(key)}"
        if isinstance(value, dict):
            out.update(flatten(value, names, tag + "/"))
        elif isinstance(value, (list, tuple)):
            labels = names.get(key) or []
            for i, v in enumerate(value):
                if _number(v):
                    out[f"{tag}/{_tag(labels[i]) if i < len(labels) else i}"] = float(v)
        elif _number(value):
            out[tag] = float(value)
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _needs(package: str, option: str):
    try:
        return __import__(package, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"{option} needs the optional package {package.split('.')[0]!r}, which is not "
                          f"installed: pip install {option.lstrip('-').split()[0]}") from None


class Tracker:
    """The trackers of one run (none, TensorBoard, W&B or both); every method is a no-op for the
    ones not asked for, so train.py calls them unconditionally."""

    def __init__(self, out: Path, config: dict, names: dict[str, list[str]], start: int,
                 tensorboard: bool = False, wandb_project: str | None = None):
        self.names, self.writer, self.run = names, None, None
        if tensorboard:
            tb = _needs("torch.utils.tensorboard", "--tensorboard")
            folder = Path(out) / TENSORBOARD_DIR
            if start == 0 and folder.is_dir():  # a run started again: its earlier events would mix in
                shutil.rmtree(folder)
            # purge_step: a resumed run drops what a killed one logged after its last checkpoint
            self.writer = tb.SummaryWriter(str(folder), purge_step=start + 1 if start else None)
            if start == 0:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
        if wandb_project:
            wandb = _needs("wandb", "--wandb")
            self.run = wandb.init(project=wandb_project, name=Path(out).name, dir=str(out), config=config,
                                  reinit="create_new")

    def log_epoch(self, record: dict) -> None:
        """One metrics.jsonl line, at step = its epoch."""
        scalars = flatten({k: v for k, v in record.items() if k != "epoch"}, self.names)
        step = int(record["epoch"])
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.run is not None:
            self.run.log({**scalars, "epoch": step}, step=step)

    def finish(self, summary: dict) -> None:
        """The run's result: the selected epoch, rule and metrics, the oracle (marked as such)."""
        result = flatten({k: summary[k] for k in SUMMARY_KEYS if k in summary}, self.names, "summary/")
        oracle = summary.get("oracle") or {}
        if oracle:
            result.update(flatten({"epoch": oracle["epoch"], "test": oracle["test"]}, self.names,
                                  "summary/oracle_diagnostic/"))
        rule = (summary.get("select") or {}).get("rule")
        if self.writer is not None:
            step = int(summary.get("config", {}).get("epochs", 0))
            for tag, value in result.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.add_text("selection", f"rule {rule}, epoch {summary.get('best_epoch')}", step)
        if self.run is not None:
            self.run.summary.update({**result, "summary/select_rule": rule})
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_tracker(cfg, out: Path, is_main: bool, names: dict[str, list[str]], start: int) -> Tracker:
    """The run's tracker; an empty one on processes other than rank 0 (only rank 0 logs)."""
    if not is_main:
        return Tracker(out, {}, names, start)
    return Tracker(out, cfg.to_dict(), names, start, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb)
