"""Typed configuration of one distillation run, and the run's identity (its name and settings).

A run's identity is its configuration minus the placement fields (where and how it executes:
``PLACEMENT_FIELDS``). :func:`run_name` spells the identity as a readable folder name; the study
groups runs by the identity values in each run's ``config.json``, never by parsing names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from core.constants import AGRE_PARAMS, ARCHS, LAYERS, WEIGHTINGS
from core.errors import ConfigError
from core.files import atomic_write_json
from core.provenance import canon

FEATURE_WEIGHTINGS = ("none", "disagree")
FEATURE_TARGETS = ("raw", "erased")  # erased: LEACE of the spurious attribute (distill/erasure.py)
KEEP_CHECKPOINTS = ("best", "last", "all")
# Fields that say where or how a run executes, not what it computes: outside its identity.
PLACEMENT_FIELDS = ("cache", "out", "device", "data_root", "keep_checkpoints", "agre_compare", "data_mode",
                    "expect_cache", "tensorboard", "wandb")
DATA_MODES = ("auto", "memory", "stream")
# Model selection: which epoch's checkpoint is the run's result (docs/method.md, Model selection).
# val-wga needs the validation split's group labels; val-worst-class and val-avg need its classes only.
SELECT_RULES = ("val-wga", "val-worst-class", "val-avg", "last")
SELECT_WORDS = {"val-wga": "best validation WGA (needs validation group labels)",
                "val-worst-class": "best validation worst-class accuracy (no group labels)",
                "val-avg": "best validation accuracy (no group labels)",
                "last": "the last epoch"}
# The files of a run folder, named once (distill writes them; experiments read them).
CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
LAST, BEST, WEIGHTS = "last.pt", "best.pt", "teacher_weights.npy"
RUN_FILES = (CONFIG, METRICS, SUMMARY, LAST, BEST, WEIGHTS)


@dataclass(frozen=True)
class CacheNeeds:
    """What a run reads from the cache for its training rows: the teachers' outputs (not in the
    online loop, where the teachers run live), the features of ``layers``, the cached weights."""

    teacher_outputs: bool
    layers: tuple[str, ...]
    cached_weights: bool


@dataclass
class DistillConfig:
    """One run of ``fit``. Defaults are those of the study: its AGRE-KD (batch weights from
    the gradients of all student parameters), alpha 1, tau 4, 30 epochs, lr 1e-3."""

    cache: str = "artifacts/default/cache.h5"
    out: str = "artifacts/default/runs/run"
    gamma: float = 0.0               # weight of the feature loss
    alpha: float = 1.0               # weight of KD against cross-entropy: (1-alpha) CE + alpha KD
    tau: float = 4.0                 # KD temperature
    weighting: str = "agre-batch"    # aver | agre (per sample, the paper) | agre-batch (the study) | cached
    agre_params: str = "all"         # for agre-batch: all parameters (the study), layer4, last (closed form)
    layers: tuple[str, ...] = ("layer4",)
    layer_gammas: tuple[float, ...] | None = None  # per-layer gammas; default gamma for each
    feature_weighting: str = "none"  # none | disagree
    feature_target: str = "raw"      # raw teacher features, or erased: the spurious attribute removed (LEACE)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 42
    warmup_epochs: int = 0           # linear lr warm-up before the cosine schedule (the study: none)
    teachers_online: str | None = None  # a teacher manifest: run the teachers live on a fresh crop
                                        # every step (the study's loop) instead of reading the cache
    sample_views: bool | None = None  # train on one cached random view per sample per epoch;
                                      # None: on when the cache holds random views
    pretrained: bool | None = None   # ImageNet-pretrained student; None: as the teachers were
    weights_file: str | None = None  # local ResNet-18 weights instead of the torchvision download
    student_arch: str = "resnet18"   # the student's architecture (core.models.FEATURE_DIMS)
    image_size: int | None = None    # student input size; default: the cache's view size
    data_root: str | None = None     # when given, checked against the cache's data fingerprint
    device: str = "auto"             # auto | cpu | cuda
    data_mode: str = "auto"          # memory | stream (splits read as the epoch goes) | auto: stream
                                     # when memory would not hold them comfortably (same results)
    keep_checkpoints: str = "best"   # what a finished run keeps: best (weights), last (+ last
                                     # epoch's weights) or all (+ optimizer state, resumable)
    agre_compare: tuple[str, ...] = ()  # agre-batch: also compute the weights from these parameter
                                        # sets on the same steps and log how they agree (no effect)
    feat_eps: float = 1e-6           # eps of the disagreement confidence 1 / (Var_t f + eps)
    expect_cache: str | None = None  # the cache's published root digest (`cache info`): refuse any other
    select: str = "val-wga"          # model selection (SELECT_RULES): the study's, best validation WGA
    tensorboard: bool = False        # also log to TensorBoard event files in <out>/tensorboard
    wandb: str | None = None         # also log to this W&B project (WANDB_MODE=offline: in <out>/wandb)

    def __post_init__(self):
        # One canonical form per value: 0 and 0.0 or a list and a tuple are the same setting.
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            _check_type(f.name, value, default)
            if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
                    and value.is_integer():
                setattr(self, f.name, int(value))
        self.layers = tuple(self.layers.split(",") if isinstance(self.layers, str) else self.layers)
        self.agre_compare = tuple(self.agre_compare.split(",") if isinstance(self.agre_compare, str)
                                  else self.agre_compare)
        if self.layer_gammas is not None:
            self.layer_gammas = tuple(float(g) for g in self.layer_gammas)
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise ConfigError(msg)

        if self.weighting not in WEIGHTINGS:
            bad(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.agre_params not in AGRE_PARAMS:
            bad(f"--agre-params must be one of {', '.join(AGRE_PARAMS)}, got {self.agre_params!r}")
        if self.feature_target not in FEATURE_TARGETS:
            bad(f"--feature-target must be one of {', '.join(FEATURE_TARGETS)}, got {self.feature_target!r}")
        if self.feature_weighting not in FEATURE_WEIGHTINGS:
            bad(f"--feature-weighting must be one of {', '.join(FEATURE_WEIGHTINGS)}")
        unknown = [l for l in self.layers if l not in LAYERS]
        if unknown or not self.layers:
            bad(f"--layers takes a comma list from {', '.join(LAYERS)}, got {','.join(self.layers)!r}")
        # counts first: a bad --epochs is named as such, not as a --warmup-epochs range error
        _at_least("--epochs", self.epochs, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--seed", self.seed, 0)
        if not 0 <= self.warmup_epochs < self.epochs:
            bad(f"--warmup-epochs must lie in [0, epochs) = [0, {self.epochs}), got {self.warmup_epochs}")
        if self.layer_gammas is not None and len(self.layer_gammas) != len(self.layers):
            bad(f"--layer-gammas has {len(self.layer_gammas)} values for {len(self.layers)} layers")
        if self.layer_gammas is not None and not all(_finite(g) and g >= 0 for g in self.layer_gammas):
            bad(f"--layer-gammas must be >= 0 (finite numbers), "
                f"got {','.join(f'{g:g}' for g in self.layer_gammas)}")
        if any(p not in AGRE_PARAMS for p in self.agre_compare):
            bad(f"agre_compare takes names from {', '.join(AGRE_PARAMS)}, got {','.join(self.agre_compare)}")
        if self.agre_compare and self.weighting != "agre-batch":
            bad("agre_compare compares agre-batch weights; use it with --weighting agre-batch")
        if self.data_mode not in DATA_MODES:
            bad(f"--data-mode must be one of {', '.join(DATA_MODES)}, got {self.data_mode!r}")
        if self.wandb is not None and not (isinstance(self.wandb, str) and self.wandb.strip()):
            bad(f"--wandb takes a project name, got {self.wandb!r}")
        if self.select not in SELECT_RULES:
            bad(f"--select must be one of {', '.join(SELECT_RULES)}, got {self.select!r}")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            bad(f"--keep-checkpoints must be one of {', '.join(KEEP_CHECKPOINTS)}, "
                f"got {self.keep_checkpoints!r}")
        _positive("--lr", self.lr)
        _positive("--tau", self.tau)
        _positive("feat_eps", self.feat_eps)
        _at_least("--gamma", self.gamma, 0)
        _at_least("--weight-decay", self.weight_decay, 0)
        if not (_finite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            bad(f"--alpha must lie in [0, 1], got {self.alpha}")
        if not (_finite(self.momentum) and 0.0 <= self.momentum < 1.0):
            bad(f"--momentum must lie in [0, 1), got {self.momentum}")
        if self.student_arch not in ARCHS:
            bad(f"--student-arch must be one of {', '.join(ARCHS)}, got {self.student_arch!r}")
        if self.image_size is not None and self.image_size < 8:
            bad(f"--image-size must be at least 8 px, got {self.image_size}")

    @property
    def gammas(self) -> dict[str, float]:
        """Feature-loss weight per distilled layer (all zero when gamma is 0 and none given)."""
        gs = self.layer_gammas if self.layer_gammas is not None else (self.gamma,) * len(self.layers)
        return dict(zip(self.layers, gs))

    @property
    def active_layers(self) -> tuple[str, ...]:
        """The distilled layers: those with a feature-loss weight > 0 (the one place that says so)."""
        return tuple(l for l, g in self.gammas.items() if g > 0)

    @property
    def uses_features(self) -> bool:
        return bool(self.active_layers)

    @property
    def needs(self) -> "CacheNeeds":
        """What this run reads from the cache besides the images (the one place that says so)."""
        cached = self.teachers_online is None
        return CacheNeeds(teacher_outputs=cached, layers=self.active_layers if cached else (),
                          cached_weights=cached and self.weighting == "cached")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What the run computes: every field but the placement ones, canonical JSON values
        (``agre_params`` only matters to agre-batch: for the other weightings it reads as the
        default, so that equal computations have one identity)."""
        d = {k: v for k, v in self.to_dict().items() if k not in PLACEMENT_FIELDS}
        if self.weighting != "agre-batch":
            d["agre_params"] = _DEFAULTS_AGRE_PARAMS
        if not self.active_layers:  # no feature loss: the feature target changes nothing
            d["feature_target"] = _DEFAULTS_FEATURE_TARGET
        return canon(d)

    @classmethod
    def from_settings(cls, settings: dict) -> "DistillConfig":
        """Defaults updated with ``settings`` (overrides, or a saved config.json).

        Raises ConfigError on a field DistillConfig does not have: a typo must not be ignored.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; DistillConfig has "
                              f"{', '.join(sorted(names))}")
        return cls(**settings)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())


_DEFAULTS_AGRE_PARAMS = DistillConfig.agre_params
_DEFAULTS_FEATURE_TARGET = DistillConfig.feature_target


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    """True for a finite number (``x <= 0`` is False for NaN: never test a range without this)."""
    try:
        return math.isfinite(value)
    except (TypeError, OverflowError):
        return False


def _positive(option: str, value) -> None:
    if not (_finite(value) and value > 0):
        raise ConfigError(f"{option} must be a finite number > 0, got {value}")


def _at_least(option: str, value, low) -> None:
    if not (_finite(value) and value >= low):
        kind = "" if isinstance(value, int) else "a finite number "
        raise ConfigError(f"{option} must be {kind}>= {low}, got {value}")


def _check_type(name: str, value, default) -> None:
    """A value of the field's kind (numbers for numbers, on/off or None for switches), so that a
    mistyped ``--set`` is a message, not a traceback or a silently wrong run."""
    if isinstance(default, bool) or name in ("sample_views", "pretrained"):
        ok = value is None or isinstance(value, bool)
        want = "true/false (on/off), or null for the default"
    elif isinstance(default, int):
        # 1.5, NaN and inf are not a count of epochs or a seed; 30.0 (from JSON) is 30
        ok = _number(value) and (isinstance(value, int) or (_finite(value) and float(value).is_integer()))
        want = "an integer"
    elif isinstance(default, float):
        ok = _number(value) and _finite(value)
        want = "a finite number"
    elif name in ("image_size",):
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        want = "an integer or null"
    elif name == "layer_gammas":
        ok = value is None or (isinstance(value, (list, tuple))
                               and all(_number(g) and _finite(g) for g in value))
        want = "a list of finite numbers or null"
    else:
        return
    if not ok:
        raise ConfigError(f"{name} takes {want}, got {value!r}")


# ----------------------------------------------------------------------------- names

# Fields always spelled in a run name, in this order (the axes of the study's tables).
_CORE_FIELDS = ("weighting", "gamma", "alpha", "layers", "feature_weighting")
_ABBREV = {"gamma": "g", "alpha": "a", "seed": "s", "epochs": "ep", "batch_size": "bs",
           "weight_decay": "wd", "momentum": "mom", "layer_gammas": "lg", "agre_params": "ap",
           "pretrained": "pre", "image_size": "img", "weights_file": "wf", "feat_eps": "eps",
           "teachers_online": "online", "warmup_epochs": "wu", "sample_views": "sv",
           "feature_target": "ft", "student_arch": "arch", "select": "sel"}
_DEFAULTS = canon({f.name: f.default for f in dataclasses.fields(DistillConfig)})


def non_default_settings(identity: dict) -> dict:
    """The identity fields outside the table axes and the seed that differ from their defaults."""
    skip = set(_CORE_FIELDS) | {"seed"}
    return {k: v for k, v in sorted(identity.items())
            if k not in skip and k in _DEFAULTS and v != _DEFAULTS[k]}


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "-".join(_fmt(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        # a file (weights, a teachers' manifest): its name, and a short hash of the whole path
        # so that two files of one name do not share a run folder
        return f"{Path(value).stem}-{hashlib.sha256(value.encode()).hexdigest()[:6]}"
    return str(value)


def setting_label(key: str, value) -> str:
    """``ep10``, ``lr0.02``: one non-default setting as it appears in names and row labels."""
    return _ABBREV.get(key, key.replace("_", "")) + _fmt(value)


def run_name(cfg: DistillConfig | dict, with_seed: bool = True) -> str:
    """Folder name of a run, e.g. ``agre_g0.5_a1_layer4_none_s42``.

    ``cfg`` is a DistillConfig or overrides of the defaults. Built from the identity, so it is
    the same for the same settings whatever the dict order or which defaults were spelled out.
    Always names weighting, gamma, alpha, layers, feature weighting and seed; any other field only
    when it differs from its default (``..._none_tau2_ep5_s42``); placement fields never. Only
    ``[A-Za-z0-9._+-]`` characters.
    """
    if not isinstance(cfg, DistillConfig):
        cfg = DistillConfig.from_settings(cfg)
    ident = cfg.identity()
    parts = [ident["weighting"], "g" + _fmt(ident["gamma"]), "a" + _fmt(ident["alpha"]),
             _fmt(ident["layers"]), ident["feature_weighting"]]
    parts += [setting_label(k, v) for k, v in non_default_settings(ident).items()]
    if with_seed:
        parts.append("s" + _fmt(ident["seed"]))
    # "_" only separates fields; anything unsafe inside a field becomes "-".
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", part) for part in parts)


def identity_of(config: dict) -> dict:
    """The identity of a saved config; fields this version does not know are dropped (they can
    come from another version of the tool)."""
    return DistillConfig.from_settings({k: v for k, v in config.items() if k in _DEFAULTS}).identity()


def group_key(config: dict) -> str:
    """The identity without the seed, as canonical JSON: runs with equal keys are seeds of one
    configuration."""
    ident = identity_of(config)
    ident.pop("seed")
    return json.dumps(ident, sort_keys=True)
