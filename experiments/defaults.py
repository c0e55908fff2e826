"""The embedded default: where the synthetic pipeline keeps its files and how it is sized.

The scenario has Waterbirds' structure, and its values were fixed from the teachers' own numbers
(``python cli.py teachers`` prints them; ``scenario_problems`` checks them), never from the
students' results:

- a backbone "pretrained" on a generated set where birds and backgrounds are independent, to tell
  the four (bird, background) pairs apart: its features carry both, as ImageNet features carry
  birds and scenes (``PRETRAIN``);
- ERM from it on the training split (95% of birds on their own background): the biased model
  relies on the background and fails the two minority groups;
- five DFR heads on that backbone: two fit on group-balanced validation data (the debiased,
  strong teachers), three on validation data with the training split's group proportions (not
  debiased: weak teachers whose errors sit in the minority groups), so that the plain average of
  the ensemble is far below its best members and how the teachers are weighted can matter.

The bird is drawn by shape only (no colour cue) under pixel noise, so that the background is the
easier feature, as on real Waterbirds. Everything the teachers depend on is computed in float64,
so the scenario is the same on any machine. The backbone and the students are a ResNet-18 at a
quarter of its width (``resnet18-w16``): a miniature for 24 px images that makes the whole demo a
matter of minutes on two CPU cores; the real-data defaults (224 px, ResNet-50 teachers, ResNet-18
student, ...) live in each stage's config.
"""
from pathlib import Path

ROOT = Path("artifacts/default")
DATA = ROOT / "data"
TEACHERS = ROOT / "teachers"
CACHE = ROOT / "cache.h5"
RUNS = ROOT / "runs"

PRETRAIN = ROOT / "pretrain"   # the independent set and the backbone pretrained on it
PRETRAINED = PRETRAIN / "backbone.pt"

IMAGE_SIZE = 24          # synthetic view side (real Waterbirds: 224)
DISTILL_EPOCHS = 10      # the demo's students (the study's 30 on real data)
RANDOM_VIEWS = DISTILL_EPOCHS  # a distinct stored crop per training image per epoch
ARCH = "resnet18-w16"    # backbone and student (the study: ResNet-50 teachers, a ResNet-18 student)
# The data: birds told apart by shape alone, under pixel noise (data.synth.SynthSpec).
SYNTH = dict(colour_shift=0.0, pixel_noise=30.0)
# The stand-in for ImageNet: the same generator, another seed, class and background independent;
# 15 epochs of 4-way ERM (bird x background) in float64.
PRETRAIN_SYNTH = dict(SYNTH, independent=True, seed=1)
PRETRAIN_OVERRIDES = dict(image_size=IMAGE_SIZE, pretrained=False, epochs=15, lr=1e-2, arch=ARCH,
                          precision="float64")
DFR_BIAS = (0.0, 0.0, 1.0, 1.0, 1.0)  # per teacher: the share of the spurious correlation kept
TEACHERS_OVERRIDES = dict(image_size=IMAGE_SIZE, pretrained=False, shared_backbone=True, epochs=3, lr=1e-2,
                          num_teachers=len(DFR_BIAS), dfr_bias=DFR_BIAS, arch=ARCH, precision="float64",
                          weights_file=str(PRETRAINED))
# What the scenario must show before any student is trained (scenario_problems): the biased model
# relies on the background, the ensemble holds strong and weak teachers, its plain average is far
# below the strong ones, and the backbone's features carry the background.
MINORITY_GROUPS = ("landbird/water", "waterbird/land")  # 5% of the training split's birds
SCENARIO = dict(biased_avg_min=0.90, biased_wga_max=0.50, strong_wga_min=0.85, weak_wga_max=0.60,
                aver_gap_min=0.10, attribute_probe_min=0.90)
# The demo's students start from the pretrained backbone, as the study's start from ImageNet; lr
# 0.005 after one warm-up epoch (from scratch, at 0.01 and more, validation WGA swung by 10-15
# points over the last epochs).
DISTILL_OVERRIDES = dict(lr=0.005, warmup_epochs=1, student_arch=ARCH, pretrained=True,
                         weights_file=str(PRETRAINED))
DEMO_SEEDS = (42, 43, 44)


def student_defaults_for(cache, given: dict) -> tuple[dict, str]:
    """The embedded default's student settings for a run on ``cache``: ``(overrides, message)``.

    On the embedded default's cache (``CACHE``), the settings of ``DISTILL_OVERRIDES`` and
    ``epochs`` (``DISTILL_EPOCHS``) that the user did not set (``given``: the options set on the
    command line, by DistillConfig field name) are the demo's from-scratch students', not the
    study's real-data ones; the message says so in one line. Any other cache: ``({}, "")``.
    """
    if Path(cache).resolve() != CACHE.resolve():
        return {}, ""
    wanted = {**DISTILL_OVERRIDES, "epochs": DISTILL_EPOCHS}
    overrides = {k: v for k, v in wanted.items() if k not in given}
    if "epochs" in given and overrides.get("warmup_epochs", 0) >= int(given["epochs"]):
        overrides.pop("warmup_epochs")  # no room for the warm-up in the user's epochs
    if not overrides:
        return {}, ""
    said = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())
    return overrides, (f"on the embedded default's cache {CACHE}: its student settings {said} "
                       "(set them to change them)")
