"""Names the whole tool shares, torch-free so that configs and the command line load fast.

``LAYERS``: the ResNet stages whose globally pooled outputs can be cached and distilled (layer4's
is the penultimate embedding). ``WEIGHTINGS``: the teacher weighting modes
(:mod:`core.weighting`); ``AGRE_PARAMS``: the student parameters whose gradients give the
``agre-batch`` weights: ``last`` (the classifier, closed form), ``layer4`` (layer4 + the
classifier, by autograd) or ``all`` (every parameter, as the study did).
"""
LAYERS = ("layer2", "layer3", "layer4")
ROLES = ("teacher", "biased")  # a model of the ensemble, or the biased reference model
WEIGHTINGS = ("aver", "agre", "agre-batch", "cached")
AGRE_PARAMS = ("last", "layer4", "all")
# The backbones (core.models.FEATURE_DIMS has their feature sizes): torchvision's ResNet-18 and -50,
# and ResNet-18 at a quarter of its width (the synthetic default's miniature backbone and student).
ARCHS = ("resnet18", "resnet50", "resnet18-w16")
