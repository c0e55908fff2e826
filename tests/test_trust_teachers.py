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


def test_manifest_paths_stay_in_its_folder(tmp_path, monkeypatch):
    import json

    import pytest

    from core.manifest import ALLOW_OUTSIDE_ENV, ManifestError, read_manifest

    folder = tmp_path / "received"
    folder.mkdir()
    (folder / "inside.pt").write_bytes(b"x")
    (tmp_path / "secret.pt").write_bytes(b"y")
    (folder / "link.pt").symlink_to(tmp_path / "secret.pt")

    def manifest(teacher_file):
        entry = dict(arch="resnet18", num_classes=2, sha256="0" * 64, backbone_id="b")
        d = {"schema": "gr-kd-teachers", "version": 1, "num_classes": 2, "image_size": 16, "pretrained": False,
             "models": [dict(entry, name="t1", role="teacher", file=teacher_file),
                        dict(entry, name="biased", role="biased", file="inside.pt")]}
        (folder / "manifest.json").write_text(json.dumps(d))

    monkeypatch.delenv(ALLOW_OUTSIDE_ENV, raising=False)
    manifest("inside.pt")
    assert read_manifest(folder).path("inside.pt") == folder / "inside.pt"
    for bad in ("../secret.pt", str(tmp_path / "secret.pt"), "link.pt", "sub/../../secret.pt"):
        manifest(bad)
        with pytest.raises(ManifestError, match="lie outside the manifest's folder") as e:
            read_manifest(folder)
        assert f"set {ALLOW_OUTSIDE_ENV}=1" in str(e.value) and bad in str(e.value)
        assert read_manifest(folder, allow_outside_paths=True).models[0].file == bad
    monkeypatch.setenv(ALLOW_OUTSIDE_ENV, "1")
    assert read_manifest(folder).models[0].file == "sub/../../secret.pt"
