"""The embedded default's own folder: its teachers and cache are rebuilt when its settings change."""
import json
import shutil

from experiments import defaults, pipeline
from precompute.teachers import TeacherConfig


def _point_defaults_at(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "DATA", tmp_path / "data")
    monkeypatch.setattr(defaults, "TEACHERS", tmp_path / "teachers")
    monkeypatch.setattr(defaults, "CACHE", tmp_path / "cache.h5")
    defaults.TEACHERS.mkdir()


def _record(config: dict):
    (defaults.TEACHERS / "manifest.json").write_text("{}")
    (defaults.TEACHERS / "teachers_config.json").write_text(json.dumps({"config": config}))


def test_default_teachers_are_rebuilt_when_the_defaults_changed(tmp_path, monkeypatch):
    _point_defaults_at(tmp_path, monkeypatch)
    calls = []
    monkeypatch.setattr(pipeline, "build_teachers_for", lambda *a, **kw: calls.append((a, kw)))
    pipeline.ensure_teachers()  # nothing there yet: built, nothing to overwrite
    assert calls == [((None, None), {"overwrite": None})]

    today = TeacherConfig(str(defaults.DATA), str(defaults.TEACHERS), **defaults.TEACHERS_OVERRIDES).identity()
    _record(json.loads(json.dumps(today)))
    assert pipeline._default_teachers_current()
    calls.clear()
    pipeline.ensure_teachers()  # built with today's settings: reused
    assert calls == []

    _record({**json.loads(json.dumps(today)), "precision": "float32"})  # built before the float64 default
    assert not pipeline._default_teachers_current()
    pipeline.ensure_teachers()
    assert calls == [((None, None), {"overwrite": True})]


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
