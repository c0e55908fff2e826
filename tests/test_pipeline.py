"""The embedded default: its scenario's structure (at a tenth of its size), and its own folder: teachers and
cache reused, and rebuilt when its settings change."""
import copy
import json
import shutil

import pytest

from core.manifest import read_manifest
from experiments import defaults, pipeline
from precompute.teachers import ENSEMBLE


SMALL = 0.1  # of the real group counts: 480 training images, 6 of them waterbirds on land


def _point_defaults_at(tmp_path, monkeypatch, scale: float = SMALL):
    """The embedded default in ``tmp_path``, at ``scale`` of its size (its other settings as they are)."""
    monkeypatch.setattr(defaults, "DATA", tmp_path / "data")
    monkeypatch.setattr(defaults, "TEACHERS", tmp_path / "teachers")
    monkeypatch.setattr(defaults, "CACHE", tmp_path / "cache.h5")
    monkeypatch.setattr(defaults, "PRETRAIN", tmp_path / "pretrain")
    monkeypatch.setattr(defaults, "PRETRAINED", tmp_path / "pretrain" / "backbone.pt")
    monkeypatch.setattr(defaults, "SYNTH", {**defaults.SYNTH, "scale": scale})
    monkeypatch.setattr(defaults, "PRETRAIN_SYNTH", {**defaults.PRETRAIN_SYNTH, "scale": scale})
    monkeypatch.setattr(defaults, "TEACHERS_OVERRIDES",
                        {**defaults.TEACHERS_OVERRIDES, "weights_file": str(defaults.PRETRAINED), "progress": False})
    monkeypatch.setattr(defaults, "PRETRAIN_OVERRIDES", {**defaults.PRETRAIN_OVERRIDES, "progress": False})


@pytest.fixture(scope="module")
def small_default(tmp_path_factory):
    """The default's teachers built for real, at a tenth of its size."""
    mp = pytest.MonkeyPatch()
    _point_defaults_at(tmp_path_factory.mktemp("default"), mp)
    manifest = pipeline.ensure_teachers()
    yield read_manifest(manifest)
    mp.undo()


def test_the_default_scenario_has_waterbirds_structure_at_a_tenth_of_its_size(small_default):
    """The biased model relies on the background: its two worst test groups are the minority ones
    (a landbird on water, a waterbird on land), while it gets the majority groups right."""
    test = small_default.biased.metrics["test"]
    worst_two = sorted(range(4), key=lambda g: test["group_acc"][g])[:2]
    assert {test["group_names"][g] for g in worst_two} == set(defaults.MINORITY_GROUPS)
    majority = [test["group_acc"][g] for g in range(4) if g not in worst_two]
    assert min(majority) > max(test["group_acc"][g] for g in worst_two)
    ensemble = json.loads((small_default.root / ENSEMBLE).read_text())
    assert ensemble["attribute_probe"]["test"] > ensemble["attribute_probe"]["chance"]


def test_the_scenario_check_names_every_bound_missed(small_default):
    summary = json.loads((small_default.root / ENSEMBLE).read_text())
    man = copy.deepcopy(small_default)
    man.biased.metrics["test"]["group_acc"] = [0.1, 1.0, 1.0, 0.2]  # fails the majority groups
    for m in man.teachers:
        m.metrics["test"]["wga"] = 0.7
    summary["attribute_probe"]["test"] = 0.6
    problems = " ".join(pipeline.scenario_problems(man, summary))
    assert "two worst groups" in problems and "teachers' test WGA" in problems and "attribute probe" in problems


def test_default_teachers_are_reused_and_rebuilt_when_the_defaults_change(small_default, monkeypatch):
    root = small_default.root
    _point_defaults_at(root.parent, monkeypatch)
    overrides = defaults.TEACHERS_OVERRIDES
    before = (root / "manifest.json").read_bytes()
    pretrained = defaults.PRETRAINED.stat().st_mtime_ns
    assert pipeline._default_teachers_current()
    pipeline.ensure_teachers()  # built with today's settings and data: reused as they are
    assert (root / "manifest.json").read_bytes() == before
    assert defaults.PRETRAINED.stat().st_mtime_ns == pretrained  # the pretrained backbone too

    # records of an older version name the study's DFR protocol "report": the same teachers
    for record in (root / "teachers_config.json", defaults.PRETRAIN / "backbone_config.json"):
        held = json.loads(record.read_text())
        assert held["config"]["dfr"] == "study"
        record.write_text(json.dumps({**held, "config": {**held["config"], "dfr": "report"}}))
    assert pipeline._default_teachers_current()
    pipeline.ensure_teachers()
    assert (root / "manifest.json").read_bytes() == before
    assert defaults.PRETRAINED.stat().st_mtime_ns == pretrained

    monkeypatch.setattr(defaults, "TEACHERS_OVERRIDES", {**overrides, "dfr_bias": (0.0, 0.0, 0.0, 1.0, 1.0)})
    assert not pipeline._default_teachers_current()
    pipeline.ensure_teachers()  # the default changed: its own folder rebuilt
    assert (root / "manifest.json").read_bytes() != before
    assert pipeline._default_teachers_current()


def test_default_cache_is_stale_when_made_from_other_teachers(tmp_path, monkeypatch, tiny_cache, tiny_teachers):
    _point_defaults_at(tmp_path, monkeypatch)
    assert not pipeline._cache_stale(tiny_teachers)  # no cache yet
    shutil.copy(tiny_cache, defaults.CACHE)
    assert not pipeline._cache_stale(tiny_teachers)  # made from these very teachers

    other = json.loads(tiny_teachers.read_text())
    other["models"][0]["sha256"] = "0" * 64  # a rebuilt teacher_1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(other))
    for entry in other["models"]:
        for key in ("file", "head_file"):
            if entry.get(key):
                (tmp_path / "other" / entry[key]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(tiny_teachers.parent / entry[key], tmp_path / "other" / entry[key])
    assert pipeline._cache_stale(tmp_path / "other" / "manifest.json")

    defaults.CACHE.write_bytes(b"not a cache")  # damaged: the tool's own file, rebuilt
    assert pipeline._cache_stale(tiny_teachers)
