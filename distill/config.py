"""Typed configuration of one distillation run (saved in every run folder and checkpoint)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

WEIGHTINGS = ("aver", "agre", "agre-batch", "cached")
AGRE_PARAMS = ("last", "all")
FEATURE_WEIGHTINGS = ("none", "disagree")
LAYERS = ("layer2", "layer3", "layer4")


@dataclass
class DistillConfig:
    """One run of ``fit``. Defaults are those of the user's report (AGRE-KD, alpha 1, tau 4)."""

    cache: str = "artifacts/default/cache.h5"
    out: str = "artifacts/default/runs/run"
    gamma: float = 0.0               # weight of the feature loss
    alpha: float = 1.0               # weight of KD against cross-entropy: (1-alpha) CE + alpha KD
    tau: float = 4.0                 # KD temperature
    weighting: str = "agre"          # aver | agre | agre-batch | cached
    agre_params: str = "last"        # for agre-batch: last layer (closed form) or all parameters
    layers: tuple[str, ...] = ("layer4",)
    layer_gammas: tuple[float, ...] | None = None  # per-layer gammas; default gamma for each
    feature_weighting: str = "none"  # none | disagree
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 42
    views: bool | None = None        # sample one cached random view per sample per epoch;
                                     # None: on when the cache holds random views
    pretrained: bool | None = None   # ImageNet-pretrained student; None: as the teachers were
    weights_file: str | None = None  # local ResNet-18 weights instead of the torchvision download
    image_size: int | None = None    # student input size; default: the cache's view size
    data_root: str | None = None     # when given, checked against the cache's data fingerprint
    device: str = "auto"             # auto | cpu | cuda
    feat_eps: float = 1e-6           # eps of the disagreement confidence 1 / (Var_t f + eps)

    def __post_init__(self):
        self.layers = tuple(self.layers)
        if self.layer_gammas is not None:
            self.layer_gammas = tuple(float(g) for g in self.layer_gammas)
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(msg)

        if self.weighting not in WEIGHTINGS:
            bad(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.agre_params not in AGRE_PARAMS:
            bad(f"--agre-params must be one of {', '.join(AGRE_PARAMS)}, got {self.agre_params!r}")
        if self.feature_weighting not in FEATURE_WEIGHTINGS:
            bad(f"--feature-weighting must be one of {', '.join(FEATURE_WEIGHTINGS)}")
        unknown = [l for l in self.layers if l not in LAYERS]
        if unknown or not self.layers:
            bad(f"--layers takes a comma list from {', '.join(LAYERS)}, got {','.join(self.layers)!r}")
        if self.layer_gammas is not None and len(self.layer_gammas) != len(self.layers):
            bad(f"--layer-gammas has {len(self.layer_gammas)} values for {len(self.layers)} layers")
        if not 0.0 <= self.alpha <= 1.0:
            bad(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.gamma < 0 or self.tau <= 0:
            bad("--gamma must be >= 0 and --tau > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            bad("--epochs, --batch-size and --lr must be positive")

    @property
    def gammas(self) -> dict[str, float]:
        """Feature-loss weight per distilled layer (all zero when gamma is 0 and none given)."""
        gs = self.layer_gammas if self.layer_gammas is not None else (self.gamma,) * len(self.layers)
        return dict(zip(self.layers, gs))

    @property
    def uses_features(self) -> bool:
        return any(g > 0 for g in self.gammas.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
