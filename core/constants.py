"""Names the whole tool shares, torch-free so that configs and the command line load fast.

``LAYERS``: the ResNet stages whose globally pooled outputs can be cached and distilled (layer4's
is the penultimate embedding). ``WEIGHTINGS``: the teacher weighting modes
(:mod:`core.weighting`); ``AGRE_PARAMS``: the student parameters whose gradients give the
``agre-batch`` weights: ``last`` (the classifier, closed form), ``layer4`` (layer4 + the
classifier, by autograd) or ``all`` (every parameter, as the study did). ``DFR_VARIANTS``: the
teachers' DFR protocols (:mod:`precompute.dfr`). ``STUDY_BASELINE``: the study's baseline run.
"""
from types import MappingProxyType

LAYERS = ("layer2", "layer3", "layer4")
ROLES = ("teacher", "biased")  # a model of the ensemble, or the biased reference model
WEIGHTINGS = ("aver", "agre", "agre-batch", "cached")
AGRE_PARAMS = ("last", "layer4", "all")
# The backbones (core.models.FEATURE_DIMS has their feature sizes): torchvision's ResNet-18 and -50,
# and ResNet-18 at a quarter of its width (the synthetic default's miniature backbone and student).
ARCHS = ("resnet18", "resnet50", "resnet18-w16")
# DFR protocols (precompute.dfr): the DFR authors' reference code, the study's dfr.py, this tool's
# earlier variant. "report" is the study's protocol under the name older versions used: accepted on
# the command line, in TeacherConfig and in their records, and read as "study".
DFR_VARIANTS = ("reference", "study", "tool")
DFR_ALIASES = {"report": "study"}
# The study's baseline run, the row its tables measure the others against: its AGRE-KD (batch
# weights from the gradients of all student parameters), logits only (gamma 0), pure KD (alpha 1),
# layer4, no feature weighting. The sweep presets' rows and the report's paired baseline are built
# from it; DistillConfig's defaults are these settings (tests/test_sweep.py holds them together).
STUDY_AGRE = MappingProxyType({"weighting": "agre-batch", "agre_params": "all"})
STUDY_BASELINE = MappingProxyType({**STUDY_AGRE, "gamma": 0.0, "alpha": 1.0, "layers": ("layer4",),
                                   "layer_gammas": None, "feature_weighting": "none"})
