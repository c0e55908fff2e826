"""JSON the tool reads is untrusted: manifests, run configs and summaries, sweep.json. Size and
depth are bounded before parsing, types are checked field by field, and every refusal names the
file and the field (issue 27, item 7)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.manifest import RESIZE_MODES, ManifestError, read_manifest
from distill.config import DistillConfig


def invoke(*args):
    from cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output, r.output
    return r


def manifest_dict() -> dict:
    entry = dict(arch="resnet18", num_classes=2, sha256="0" * 64, backbone_id="0" * 16, file="a.pt")
    return {"schema": "gr-kd-teachers", "version": 1, "num_classes": 2, "image_size": 16, "pretrained": False,
            "resize": "keep-aspect", "models": [dict(entry, name="t1", role="teacher"),
                                                dict(entry, name="biased", role="biased")]}


def deep(d):
    d["models"][0]["metrics"] = json.loads("[" * 200 + "]" * 200)


def field(path, value):
    def edit(d):
        *where, last = path
        for k in where:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (deep, "nested deeper than 32 levels"),
    (field(["models", 0, "arch"], "resnet34"), r"models\[0\] \(t1\)\.arch must be one of resnet18, resnet50"),
    (field(["num_classes"], "2"), r"num_classes must be an integer in \[2, 1000\], got '2'"),
    (field(["num_classes"], True), r"num_classes must be an integer"),
    (field(["models", 1, "num_classes"], "2"), r"models\[1\] \(biased\)\.num_classes must be the manifest's "
                                              r"num_classes \(2\), got '2'"),
    (field(["image_size"], 30000), r"image_size must be an integer in \[8, 1024\], got 30000"),
    (field(["pretrained"], "false"), r"pretrained must be true or false, got 'false'"),
    (field(["resize"], ["squash"]), r"resize must be one of keep-aspect, squash, got list"),
    (field(["models"], {"t1": {}}), r"models must be a list of 1 to 256 models, got dict"),
    (field(["models", 0, "sha256"], "ABC"), r"models\[0\] \(t1\)\.sha256 must be 64 lowercase hex digits"),
    (field(["models", 0, "head_file"], "h.pt"), r"models\[0\] \(t1\) needs head_file and head_sha256"),
    (field(["models", 0, "file"], ""), r"models\[0\] \(t1\)\.file must be a non-empty string"),
    (field(["models", 0, "name"], 5), r"models\[0\]\.name must be a non-empty string"),
    (field(["models", 0, "backbone_id"], None), r"models\[0\] \(t1\)\.backbone_id must be a non-empty"),
    (field(["models", 0, "metrics"], [1]), r"models\[0\] \(t1\)\.metrics must be an object, got list"),
    (field(["models", 0], [1]), r"models\[0\] must be an object, got list"),
    (field(["extra"], 1), r"unknown field\(s\) \['extra'\]"),
    (field(["image_size"], KeyError), r"missing field\(s\) \['image_size'\]"),
], ids=["deep", "arch", "classes-str", "classes-bool", "entry-classes", "image-size", "pretrained-str",
        "resize", "models-dict", "sha256", "head-alone", "empty-file", "name-int", "backbone-null",
        "metrics-list", "entry-list", "unknown-field", "missing-field"])
def test_manifest_fields_checked_at_read_naming_file_and_field(tmp_path, edit, match):
    d = manifest_dict()
    edit(d)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match) as e:
        read_manifest(path)
    assert str(e.value).startswith(f"{path}: malformed manifest")


def test_intact_manifest_reads(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest_dict()))
    man = read_manifest(tmp_path)
    assert man.source == tmp_path / "manifest.json" and man.image_size == 16 and man.pretrained is False


def test_resize_modes_are_the_stores():
    from data.store import RESIZE_MODES as STORE_MODES

    assert RESIZE_MODES == STORE_MODES


def test_bad_manifest_through_the_command_line(tmp_path, tiny_data):
    for edit in (deep, field(["models", 0, "arch"], "resnet34"), field(["num_classes"], "2")):
        d = manifest_dict()
        edit(d)
        (tmp_path / "manifest.json").write_text(json.dumps(d))
        r = invoke("precompute", "--data-root", tiny_data, "--teachers", tmp_path / "manifest.json",
                   "--out", tmp_path / "c.h5")
        assert r.exit_code == 1 and f"{tmp_path / 'manifest.json'}: malformed manifest" in r.output, r.output


# ------------------------------------------------------------ run folders: summary, config, sweep.json

def run_folder(root: Path, summary) -> Path:
    cfg = DistillConfig(out=str(root / "run1"))
    out = Path(cfg.out)
    out.mkdir(parents=True)
    cfg.save(out / "config.json")
    (out / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    return out


@pytest.mark.parametrize("summary, reason", [
    ("[" * 200_000 + "]" * 200_000, "summary.json is unreadable: nested deeper than 32 levels"),
    ("[]", "summary.json is unreadable: holds an array, not a JSON object"),
    ({"status": "finished", "test_best": [0.8]},
     "summary.json is unreadable: field test_best is not an object"),
    ({"status": "finished", "test_best": {"wga": 0.8, "group_acc": {"a": 1}}},
     "field test_best.group_acc is not a number or a list of numbers"),
    ({"status": "finished", "test_best": {"wga": 0.8}, "teacher_test": {"t": 5}},
     "field teacher_test['t'] is not an object"),
    ({"status": "finished", "test_best": {"wga": 0.8}, "group_names": [1, 2]},
     "field group_names is not a list of names"),
    ({"status": ["finished"]}, "field status is not a string"),
], ids=["deep", "array", "test-best-list", "group-acc", "teacher-test", "group-names", "status"])
def test_unusable_summary_makes_a_failed_run_with_its_reason(tmp_path, summary, reason):
    from experiments.runs import load_runs

    run_folder(tmp_path / "runs", summary)
    (rec,) = load_runs(tmp_path / "runs")
    assert rec.status == "failed" and reason in rec.reason and rec.summary is None
    r = invoke("report", tmp_path / "runs", "--out", tmp_path / "report")
    assert r.exit_code == 0, r.output


def test_unusable_config_makes_a_failed_run(tmp_path):
    from experiments.runs import load_runs

    out = run_folder(tmp_path / "runs", {"status": "finished", "test_best": {"wga": 0.8}})
    (out / "config.json").write_text(json.dumps({"epochs": "many"}))
    (rec,) = load_runs(tmp_path / "runs")
    assert rec.status == "failed" and rec.reason.startswith("config.json: epochs") and rec.config == {}
    r = invoke("report", tmp_path / "runs", "--out", tmp_path / "report")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("plan, match", [
    ("[]", "holds an array, not a JSON object"),
    ('{"runs": 5}', "field runs is not a list of objects"),
    ('{"runs": [{"name": ["x"]}]}', r"field runs\[0\] needs a name"),
    ("{" * 100 + "}" * 100, "nested deeper than 32 levels"),
])
def test_unusable_sweep_plan_is_a_message(tmp_path, plan, match):
    from core.files import JSONFileError
    from experiments.runs import load_plan

    run_folder(tmp_path / "runs", {"status": "finished", "test_best": {"wga": 0.8}})
    (tmp_path / "runs" / "sweep.json").write_text(plan)
    with pytest.raises(JSONFileError, match=match):
        load_plan(tmp_path / "runs")
    r = invoke("report", tmp_path / "runs", "--out", tmp_path / "report")
    assert r.exit_code == 1 and "sweep.json" in r.output, r.output
