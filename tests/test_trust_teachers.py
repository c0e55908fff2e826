"""A received teacher is untrusted: NaN/inf weights and a head of the wrong class count are refused."""
from __future__ import annotations

import torch
import torchvision
from click.testing import CliRunner

from cli import cli
from data.synth import SynthSpec, generate


def invoke(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r


def state(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=num_classes).state_dict()


def test_nan_weight_refused_at_import_naming_file_and_parameter(tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "nan.pt"
    torch.save(state(), good)
    s = state(seed=1)
    s["layer3.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    s["fc.bias"][1] = float("inf")
    torch.save(s, bad)
    out = tmp_path / "teachers"
    r = invoke("teachers", "import", "--out", out, "--teacher", good, "--teacher", bad, "--biased", good,
               "--arch", "resnet18")
    assert r.exit_code == 1, r.output
    assert f"Error: {bad}: parameter layer3.0.conv1.weight holds 1 non-finite value(s)" in r.output
    assert not (out / "manifest.json").exists()


def test_head_class_count_must_match_the_data_set(tmp_path):
    data = generate(tmp_path / "wb", SynthSpec(scale=0.01, size=16))
    three = tmp_path / "three.pt"
    torch.save(state(num_classes=3), three)
    out = tmp_path / "teachers"
    r = invoke("teachers", "import", "--out", out, "--teacher", three, "--biased", three, "--arch", "resnet18",
               "--num-classes", 3, "--image-size", 16, "--no-pretrained", "--data-root", data)
    assert r.exit_code == 1, r.output
    assert "--num-classes 3 but the data set" in r.output and "has 2 classes (landbird, waterbird)" in r.output
    assert not (out / "manifest.json").exists()
