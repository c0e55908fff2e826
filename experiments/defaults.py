"""The embedded default: where the synthetic pipeline keeps its files and how it is sized.

Sized so that the whole default pipeline (data, teachers, precompute, distill) runs on a 2-core
CPU in minutes; the real-data defaults (224 px, 100 ERM epochs, ...) live in each stage's config.
"""
from pathlib import Path

ROOT = Path("artifacts/default")
DATA = ROOT / "data"
TEACHERS = ROOT / "teachers"
CACHE = ROOT / "cache.h5"
RUNS = ROOT / "runs"

IMAGE_SIZE = 32          # synthetic view side (real Waterbirds: 224)
RANDOM_VIEWS = 2         # cached random views per sample besides the eval view
# Teachers for the synthetic default: one from-scratch ERM backbone (no ImageNet weights offline),
# five DFR heads on different balanced subsamples.
TEACHERS_OVERRIDES = dict(image_size=IMAGE_SIZE, pretrained=False, shared_backbone=True,
                          epochs=3, lr=1e-2)
DISTILL_EPOCHS = 10      # the README's end-to-end run (the report's 30 on real data)
# Student from scratch on the synthetic default (no ImageNet weights offline): a larger lr.
DISTILL_OVERRIDES = dict(lr=0.02)
